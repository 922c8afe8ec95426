"""``vlmkit bench``: vlmkit against transformers on one checkpoint folder, side by side.

Both libraries load the same folder in float32 on the CPU with the same number of threads
(``torch.set_num_threads``) and get the same input tensors (made by :mod:`vlmkit.processor`
when the folder has a tokenizer, else synthetic ids and pixels). Every measurement runs the two
sides in alternation (vlmkit, transformers, vlmkit, ...) after one untimed warm-up each, so a
machine that gets busier or quieter affects both; the table shows medians and the ratio
``vlmkit / transformers``.

Measured:

* **import** and **import + load** in a fresh process, and **load** again in this process (page
  cache warm);
* **vision encode** per tile (1 tile, and 17 tiles in one batch);
* **prefill**: the language model alone over a prompt's embeddings (last-position logits);
* **time to first token**: ``generate(max_new_tokens=1)`` from the processor's tensors (text
  only, one 512 px tile, one image split into 16 tiles + the global one);
* **decode** tokens/s (greedy, no stop token, ``--new-tokens`` steps), timed from the first to
  the last new token by a streamer;
* **peak RSS**: each side in its own fresh subprocess (``ru_maxrss``), loading the model and
  generating a few tokens for one prompt;
* the **decode floor**: measured memory bandwidth (a sum over a 1 GiB tensor) divided by the
  bytes a decode step reads (every backbone weight once, the LM head included);
* a **bfloat16 vision tower** (:func:`vlmkit.vision_dtype.set_vision_dtype`) against vlmkit's and
  transformers' float32 ones, where the CPU has bfloat16 units (:mod:`vlmkit.bench.vision`).

``--int8`` adds the fastest int8 scheme for this CPU (``quantize(model, "int8")``: ``w8a8``, i.e.
:func:`vlmkit.quantize.quantize_int8`, or weight-only ``w8``) against vlmkit float32: speed-ups, the
largest logit difference on two prompts, and greedy agreement on a fixed prompt set.

Entry points: ``vlmkit bench SOURCE`` and ``python benchmarks/run_bench.py SOURCE``; from Python
:func:`run_bench` (returns the JSON-ready dict).

**Layout.** This package splits the work into modules; everything public is re-exported here:

- :mod:`~vlmkit.bench.prompts` -- the prompt texts, :class:`Prompt` and :func:`make_prompts`
  (processor-made or synthetic inputs) and the int8 agreement prompt set;
- :mod:`~vlmkit.bench.sides` -- :class:`VlmkitSide` and :class:`HFSide`, the same calls on both
  libraries, and the streamer that times decoding;
- :mod:`~vlmkit.bench.measure` -- :class:`Metric`, the row tables (:data:`ROWS`,
  :data:`INT8_ROWS`, :func:`expected_rows`), timing in alternation, the fresh-process runs and CLI
  checks, :func:`measure_bandwidth` and :func:`decode_bytes_per_token`;
- :mod:`~vlmkit.bench.int8` -- the ``--int8`` section and :func:`int8_accuracy`;
- :mod:`~vlmkit.bench.accelerator` -- ``--device``/``--dtype``: the same comparison on a GPU or in
  another dtype (synchronized timings, device memory, 8-row decode, floors, logit agreement);
- :mod:`~vlmkit.bench.report` -- the printed tables and the JSON file;
- :mod:`~vlmkit.bench.run` -- :func:`run_bench` and the command line (:func:`build_parser`,
  :func:`main`; also ``python -m vlmkit.bench``).

Only the standard library is imported here; torch and transformers are imported when a run needs
them.
"""

from __future__ import annotations

from .int8 import int8_section, int8_accuracy
from .measure import (
    CHILD_SCRIPT,
    INT8_QUICK_SKIPS,
    INT8_ROWS,
    QUICK_SKIPS,
    ROWS,
    SIDES,
    Metric,
    alternate,
    child_env,
    cli_checks,
    run_child,
    timed,
    decode_bytes_per_token,
    expected_rows,
    measure_bandwidth,
)
from .prompts import (
    AGREEMENT_PROMPTS,
    IMAGE_PROMPT,
    MANY_TILES,
    TEXT_PROMPT,
    Prompt,
    agreement_prompts,
    checkpoint_facts,
    bench_processor,
    noise_image,
    processor_prompt,
    synthetic_prompt,
    make_prompts,
)
from .report import make_console, fmt_value, goal_text, jsonable, machine_facts, met_text, print_report
from .run import build_parser, main, run_bench
from .sides import HFSide, VlmkitSide, Clock

# The measurement subprocess imports ``HFSide``, ``VlmkitSide`` and ``make_prompts`` from here;
# the other names are the package's shared helpers, public in their own modules.
__all__ = ["run_bench", "main", "ROWS", "INT8_ROWS", "expected_rows", "Metric"]
