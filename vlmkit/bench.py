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
  bytes a decode step reads (every backbone weight once, the LM head included).

``--int8`` adds :func:`vlmkit.quantize.quantize_int8` against vlmkit float32: speed-ups, the
largest logit difference on two prompts, and greedy agreement on a fixed prompt set.

Entry points: ``vlmkit bench SOURCE`` and ``python benchmarks/run_bench.py SOURCE``; from Python
:func:`run_bench` (returns the JSON-ready dict).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["run_bench", "main", "ROWS", "INT8_ROWS", "expected_rows", "Metric"]

SIDES = ("vlmkit", "transformers")
MANY_TILES = 17
TEXT_PROMPT = "Describe the water cycle in a few sentences."
IMAGE_PROMPT = "Describe this image."
#: The fixed prompt set of the int8 agreement check (chat checkpoints).
AGREEMENT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain gravity to a child.",
    "What is 12 times 7?",
    "Name a famous painter.",
    "How do plants make food?",
    "Translate 'good morning' into Spanish.",
    "What is the boiling point of water?",
    "Give me a tip for sleeping better.",
    "Who wrote Romeo and Juliet?",
    "Describe a cat in one sentence.",
    "What does a computer do?",
    "Why is the sky blue?",
    "Name three fruits.",
    "What is the largest ocean?",
    "How many legs does a spider have?",
    "Suggest a name for a dog.",
    "What is photosynthesis?",
    "Tell me a fun fact about space.",
    "What is the opposite of hot?",
    "How do you make tea?",
    "What color is grass?",
    "Summarize the water cycle.",
)


@dataclass
class Metric:
    """One row: per-side samples; ``goal`` bounds the ratio (vlmkit / reference)."""

    key: str
    label: str
    unit: str
    higher_is_better: bool = False
    goal: float | None = None
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, side: str, value: float) -> None:
        self.values.setdefault(side, []).append(float(value))

    def median(self, side: str) -> float | None:
        vals = self.values.get(side)
        return statistics.median(vals) if vals else None

    def ratio(self, a: str, b: str) -> float | None:
        x, y = self.median(a), self.median(b)
        return None if x is None or not y else x / y

    def met(self, a: str, b: str) -> bool | None:
        r = self.ratio(a, b)
        if r is None or self.goal is None:
            return None
        return r >= self.goal if self.higher_is_better else r <= self.goal

    def as_dict(self, a: str, b: str) -> dict[str, Any]:
        return {
            "key": self.key, "label": self.label, "unit": self.unit, "higher_is_better": self.higher_is_better,
            a: self.median(a), b: self.median(b), "ratio": self.ratio(a, b), "goal": self.goal,
            "met": self.met(a, b), "samples": self.values,
        }  # fmt: skip


#: key -> (label, unit, higher_is_better, goal on vlmkit/transformers). Labels may get the
#: prompt length appended at run time.
ROWS: dict[str, tuple[str, str, bool, float | None]] = {
    "import_s": ("import (fresh process)", "s", False, None),
    "cold_load_s": ("import + load (fresh process)", "s", False, None),
    "load_s": ("load (in process, warm cache)", "s", False, 0.5),
    "vision_1_ms": ("vision encode, 1 tile", "ms/tile", False, None),
    "vision_17_ms": ("vision encode, 17 tiles", "ms/tile", False, None),
    "prefill_1_ms": ("prefill LLM, 1-tile prompt", "ms", False, None),
    "prefill_17_ms": ("prefill LLM, 17-tile prompt", "ms", False, None),
    "ttft_text_ms": ("time to first token, text only", "ms", False, None),
    "ttft_1_ms": ("time to first token, 1 tile", "ms", False, 1.0),
    "ttft_17_ms": ("time to first token, 17 tiles", "ms", False, 0.9),
    "decode_tps": ("decode, text prompt", "tok/s", True, 3.0),
    "decode_1_tps": ("decode, after a 1-tile prompt", "tok/s", True, None),
    "rss_1_mb": ("peak RSS, 1 tile (own process)", "MB", False, 0.8),
    "rss_17_mb": ("peak RSS, 17 tiles (own process)", "MB", False, 0.8),
}
#: Rows left out by ``--quick``.
QUICK_SKIPS = frozenset({"vision_17_ms", "prefill_17_ms", "ttft_17_ms", "rss_17_mb"})
#: int8 rows: vlmkit int8 against vlmkit float32 (ratio = int8 / fp32).
INT8_ROWS: dict[str, tuple[str, str, bool, float | None]] = {
    "quantize_s": ("quantize (after load)", "s", False, None),
    "decode_tps": ("decode, text prompt", "tok/s", True, 1.6),
    "vision_1_ms": ("vision encode, 1 tile", "ms/tile", False, 1 / 1.3),
    "vision_17_ms": ("vision encode, 17 tiles", "ms/tile", False, 1 / 1.3),
    "ttft_1_ms": ("time to first token, 1 tile", "ms", False, None),
    "ttft_17_ms": ("time to first token, 17 tiles", "ms", False, None),
}
INT8_QUICK_SKIPS = frozenset({"vision_17_ms", "ttft_17_ms"})


def expected_rows(quick: bool = False, int8: bool = False) -> tuple[list[str], list[str]]:
    """The row keys a run reports: ``(main rows, int8 rows)``."""
    main = [k for k in ROWS if not (quick and k in QUICK_SKIPS)]
    extra = [k for k in INT8_ROWS if not (quick and k in INT8_QUICK_SKIPS)] if int8 else []
    return main, extra


# ============================================================================== inputs
@dataclass
class Prompt:
    """Tensors for one prompt (batch of 1): ``input_ids``, ``attention_mask`` and, with images,
    ``pixel_values`` / ``pixel_attention_mask``."""

    name: str
    tensors: dict[str, Any]
    tiles: int

    @property
    def length(self) -> int:
        return int(self.tensors["input_ids"].shape[1])


def _noise_image(size: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(size // 16, 1), max(size // 16, 1), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BILINEAR)


def _load_processor(folder: Path):
    """vlmkit's processor for ``folder``, or None when it has no usable tokenizer/template."""
    from .errors import VlmkitError
    from .processor import load_processor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            proc = load_processor(folder)
            proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
            return proc
        except (VlmkitError, OSError, ValueError, KeyError):
            return None


def _facts(folder: Path) -> dict[str, Any]:
    """What the synthetic inputs need, read from the folder's config (no model needed)."""
    from .hf import spec_from_hf

    spec = spec_from_hf(folder)
    tower = dict(spec.vision_tower.params)
    backbone = dict(spec.backbone.params)
    side = int(tower.get("image_size", 224))
    patch = int(tower.get("patch_size", 16))
    scale = int(dict(spec.connector.params).get("scale_factor", 1))
    return {
        "image_size": side,
        "tokens_per_image": (side // patch // scale) ** 2,
        "image_token_id": int(spec.packer.params.image_token_id),
        "vocab_size": int(backbone.get("vocab_size", 1000)),
    }


def make_prompts(folder: str | os.PathLike, tiles: Sequence[int] = (0, 1, MANY_TILES)) -> dict[int, Prompt]:
    """Prompt tensors per tile count (0 = text only), the same for both sides."""
    folder = Path(folder)
    proc = _load_processor(folder)
    if proc is not None:
        return {n: _processor_prompt(proc, n) for n in tiles}
    facts = _facts(folder)
    return {n: _synthetic_prompt(facts, n) for n in tiles}


def _processor_prompt(proc, tiles: int) -> Prompt:
    content = [{"type": "image"}] if tiles else []
    content.append({"type": "text", "text": IMAGE_PROMPT if tiles else TEXT_PROMPT})
    text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    if not tiles:
        return Prompt("text only", dict(proc(text=text)), 0)
    tile = getattr(getattr(proc, "settings", None), "tile", None)
    tile = tile if isinstance(tile, int) and tile > 0 else 512
    if tiles == 1:
        batch = proc(text=text, images=[_noise_image(tile, 1)], do_image_splitting=False)
    else:
        side = tile * math.isqrt(tiles - 1)  # a square image: (sqrt(tiles-1))^2 tiles + the global one
        batch = proc(text=text, images=[_noise_image(side, 2)], do_image_splitting=True, longest_edge=side)
    got = int(batch["pixel_values"].shape[1])
    return Prompt(f"{got} tile{'s' if got > 1 else ''}", dict(batch), got)


def _synthetic_prompt(facts: dict[str, Any], tiles: int) -> Prompt:
    import torch

    g = torch.Generator().manual_seed(1234 + tiles)
    image_id, vocab, k, side = facts["image_token_id"], facts["vocab_size"], facts["tokens_per_image"], facts["image_size"]
    hi = min(vocab, image_id) if image_id > 8 else vocab
    hi = min(hi, 5000)

    def words(n: int) -> list[int]:
        return [i if i != image_id else 3 for i in torch.randint(3, max(hi, 4), (n,), generator=g).tolist()]

    ids = words(12)
    for _ in range(tiles):
        ids += [image_id] * k + words(1)
    ids += words(4)
    tensors: dict[str, Any] = {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
    }
    if tiles:
        tensors["pixel_values"] = torch.randn(1, tiles, 3, side, side, generator=g)
        tensors["pixel_attention_mask"] = torch.ones(1, tiles, side, side, dtype=torch.long)
    return Prompt("text only" if not tiles else f"{tiles} tile{'s' if tiles > 1 else ''}", tensors, tiles)


# ============================================================================== the two sides
class _Clock:
    """A transformers-style streamer (``put``/``end``) that stamps each new token."""

    def __init__(self) -> None:
        self.prompt_seen = False
        self.stamps: list[float] = []

    def put(self, value) -> None:  # noqa: ANN001
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def tokens_per_s(self) -> float:
        if len(self.stamps) < 2 or self.stamps[-1] <= self.stamps[0]:
            return float("nan")
        return (len(self.stamps) - 1) / (self.stamps[-1] - self.stamps[0])


class VlmkitSide:
    """vlmkit's calls, shaped like :class:`HFSide`'s."""

    name = "vlmkit"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.model = None

    def load(self):
        from .builder import build_from_hf

        self.model = build_from_hf(self.folder, dtype="float32")
        return self.model

    def encode(self, p: Prompt) -> None:
        self.model.encode_images(p.tensors["pixel_values"], p.tensors.get("pixel_attention_mask"))

    def prefill(self, p: Prompt) -> None:
        bb = self.model.backbone
        hidden = bb(bb.embed(p.tensors["input_ids"]))
        bb.logits(hidden[:, -1:])

    def first_token(self, p: Prompt) -> None:
        self.model.generate(**p.tensors, max_new_tokens=1)

    def decode(self, p: Prompt, new_tokens: int) -> float:
        clock = _Clock()
        self.model.generate(**p.tensors, max_new_tokens=new_tokens, eos_token_id=[], streamer=clock)
        return clock.tokens_per_s()

    def greedy(self, ids, new_tokens: int):  # noqa: ANN001
        return self.model.generate(ids, max_new_tokens=new_tokens, eos_token_id=[])

    def logits(self, p: Prompt):
        return self.model(**p.tensors).logits


class HFSide:
    """transformers' ``AutoModelForImageTextToText`` on the same folder, float32."""

    name = "transformers"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.model = None
        self._gen = None

    def load(self):
        import torch
        import transformers

        self.model = transformers.AutoModelForImageTextToText.from_pretrained(self.folder, dtype=torch.float32).eval()
        gen = copy.deepcopy(self.model.generation_config)
        gen.eos_token_id = None  # decode exactly the asked number of tokens, as vlmkit does
        gen.do_sample = False
        if gen.pad_token_id is None:
            gen.pad_token_id = 0
        self._gen = gen
        return self.model

    def _kw(self, p: Prompt, new_tokens: int) -> dict[str, Any]:
        gen = copy.copy(self._gen)
        gen.max_new_tokens = new_tokens
        gen.min_new_tokens = None
        return {**p.tensors, "generation_config": gen}

    def encode(self, p: Prompt) -> None:
        self.model.model.get_image_features(
            pixel_values=p.tensors["pixel_values"], pixel_attention_mask=p.tensors.get("pixel_attention_mask")
        )

    def prefill(self, p: Prompt) -> None:
        text_model = self.model.model.text_model
        embeds = text_model.get_input_embeddings()(p.tensors["input_ids"])
        out = text_model(inputs_embeds=embeds, use_cache=False)
        self.model.lm_head(out.last_hidden_state[:, -1:])

    def first_token(self, p: Prompt) -> None:
        self.model.generate(**self._kw(p, 1))

    def decode(self, p: Prompt, new_tokens: int) -> float:
        clock = _Clock()
        self.model.generate(**self._kw(p, new_tokens), streamer=clock)
        return clock.tokens_per_s()


def _timed(fn: Callable[[], Any], scale: float = 1.0) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * scale

    return run


def _alternate(metric: Metric, fns: dict[str, Callable[[], float]], repeats: int, warmup: int = 1) -> None:
    """Warm up each side, then take ``repeats`` samples in alternation A B A B ..."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    for _ in range(repeats):
        for side, fn in fns.items():
            metric.add(side, fn())


# ============================================================================== subprocesses
_CHILD = r"""
import json, resource, sys, time
args = json.loads(sys.argv[1])
t0 = time.perf_counter()
import torch
if args["side"] == "vlmkit":
    import vlmkit.builder, vlmkit.generation
else:
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.AutoModelForImageTextToText, transformers.AutoConfig
    transformers.Idefics3ForConditionalGeneration
import_s = time.perf_counter() - t0
torch.set_num_threads(args["threads"])
from vlmkit.bench import HFSide, VlmkitSide, make_prompts
from pathlib import Path
prompt = make_prompts(args["folder"], [args["tiles"]])[args["tiles"]]
side = (VlmkitSide if args["side"] == "vlmkit" else HFSide)(Path(args["folder"]))
t1 = time.perf_counter()
side.load()
load_s = time.perf_counter() - t1
with torch.inference_mode():
    side.decode(prompt, args["new_tokens"])
print("BENCH_RESULT " + json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "import_s": import_s, "load_s": load_s}))
"""


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _run_child(side: str, folder: Path, tiles: int, threads: int, new_tokens: int, timeout: float) -> dict[str, float]:
    args = json.dumps({"side": side, "folder": str(folder), "tiles": tiles, "threads": threads, "new_tokens": new_tokens})
    proc = subprocess.run([sys.executable, "-c", _CHILD, args], capture_output=True, text=True, timeout=timeout, env=_child_env())
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line.removeprefix("BENCH_RESULT "))
    from .errors import VlmkitError

    tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
    raise VlmkitError(f"the {side} measurement subprocess failed (exit {proc.returncode}):\n" + "\n".join(tail))


def _cli_checks(timeout: float) -> dict[str, Any]:
    """``import vlmkit`` must not import transformers; ``vlmkit --help`` should be fast."""
    env = _child_env()
    code = "import sys, time; t = time.perf_counter(); import vlmkit; print(time.perf_counter() - t, 'transformers' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env).stdout.split()
    script = Path(sys.executable).with_name("vlmkit")
    cmd = [str(script), "--help"] if script.is_file() else [sys.executable, "-m", "vlmkit.cli", "--help"]
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run(cmd, capture_output=True, timeout=timeout, env=env)
        best = min(best, time.perf_counter() - start)
    return {
        "import_vlmkit_s": float(out[0]) if out else None,
        "import_vlmkit_imports_transformers": out[1] == "True" if len(out) > 1 else None,
        "import_vlmkit_imports_torch": out[2] == "True" if len(out) > 2 else None,
        "cli_help_s": best,
    }


# ============================================================================== bandwidth floor
def measure_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Read bandwidth in GB/s: the best of ``repeats`` sums over an ``nbytes`` float32 tensor
    (larger than the last-level cache, so it measures memory)."""
    import torch

    x = torch.ones(nbytes // 4)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def decode_bytes_per_token(backbone) -> int:  # noqa: ANN001
    """Bytes of weights one decode step reads: every backbone parameter except the embedding
    table (one row is read), plus the LM head matrix (the embedding table when tied); int8
    layers count their int8 bytes."""
    from .quantize import Int8Linear

    embed = getattr(backbone, "embed_tokens", None)
    skip = {id(embed.weight)} if embed is not None and hasattr(embed, "weight") else set()
    total = sum(p.numel() * p.element_size() for p in backbone.parameters() if id(p) not in skip)
    total += sum(m.nbytes for m in backbone.modules() if isinstance(m, Int8Linear))
    if getattr(backbone, "lm_head", "absent") is None and embed is not None:
        total += embed.weight.numel() * embed.weight.element_size()  # tied head reads the table
    return int(total)


# ============================================================================== the run
def run_bench(
    source: str | os.PathLike,
    *,
    repeats: int = 3,
    quick: bool = False,
    int8: bool = False,
    threads: int | None = None,
    new_tokens: int = 32,
    json_path: str | os.PathLike | None = None,
    console: Any = None,
    subprocess_timeout: float = 1800.0,
) -> dict[str, Any]:
    """Run the benchmark on ``source`` (a checkpoint folder or Hub repo id), print the tables on
    ``console`` (a rich Console; None prints to stdout) and return the results (also written
    to ``json_path``). ``quick`` skips the 17-tile rows; ``int8`` adds the int8 comparison."""
    import torch

    from .errors import VlmkitError
    from .hub import resolve_source

    if not isinstance(repeats, int) or repeats < 1:
        raise VlmkitError(f"repeats must be an integer >= 1; got {repeats!r}")
    if not isinstance(new_tokens, int) or new_tokens < 2:
        raise VlmkitError(f"new_tokens must be an integer >= 2 (decode speed needs two tokens); got {new_tokens!r}")
    try:
        import transformers
    except ImportError:
        raise VlmkitError("the benchmark compares against transformers, which is not installed",
                          hint="pip install 'vlmkit[hf]'") from None  # fmt: skip
    transformers.logging.set_verbosity_error()
    if hasattr(transformers.utils.logging, "disable_progress_bar"):
        transformers.utils.logging.disable_progress_bar()
    folder = resolve_source(source, weights=True)
    threads = int(threads or torch.get_num_threads())
    torch.set_num_threads(threads)
    console = console or _console()
    say = (lambda msg: console.print(f"[dim]{msg}[/dim]")) if console is not None else (lambda msg: None)

    tile_counts = [0, 1] if quick else [0, 1, MANY_TILES]
    prompts = make_prompts(folder, tile_counts)
    keys, int8_keys = expected_rows(quick, int8)
    rows = {k: Metric(k, *ROWS[k]) for k in keys}
    sides = {"vlmkit": VlmkitSide(folder), "transformers": HFSide(folder)}
    info: dict[str, Any] = {
        "source": str(source), "folder": str(folder), "threads": threads, "dtype": "float32", "repeats": repeats,
        "quick": quick, "new_tokens": new_tokens, "torch": torch.__version__, "transformers": transformers.__version__,
        "prompt_tokens": {p.name: p.length for p in prompts.values()}, "machine": _machine(),
    }  # fmt: skip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # ---- fresh processes: import, cold load, peak RSS (one subprocess per side and prompt)
        say("fresh-process runs (import, load, peak RSS)...")
        for tiles in [t for t in tile_counts if t]:
            key = "rss_1_mb" if tiles == 1 else "rss_17_mb"
            for side in SIDES:
                res = _run_child(side, folder, tiles, threads, min(new_tokens, 8), subprocess_timeout)
                rows[key].add(side, res["maxrss_mb"])
                if tiles == 1:
                    rows["import_s"].add(side, res["import_s"])
                    rows["cold_load_s"].add(side, res["import_s"] + res["load_s"])
        checks = _cli_checks(subprocess_timeout)

        # ---- in process
        say("load...")
        _alternate(rows["load_s"], {s: _timed(sides[s].load) for s in SIDES}, repeats)
        with torch.inference_mode():
            say("vision encode...")
            p1 = prompts[1]
            _alternate(rows["vision_1_ms"], {s: _timed(lambda s=s: sides[s].encode(p1), 1e3 / p1.tiles) for s in SIDES}, repeats)
            if not quick:
                pm = prompts[MANY_TILES]
                _alternate(rows["vision_17_ms"], {s: _timed(lambda s=s: sides[s].encode(pm), 1e3 / pm.tiles) for s in SIDES},
                           repeats, warmup=0)  # fmt: skip
            say("prefill...")
            for tiles, key in ((1, "prefill_1_ms"), (MANY_TILES, "prefill_17_ms")):
                if key in rows:
                    p = prompts[tiles]
                    rows[key].label += f" ({p.length} tok)"
                    _alternate(rows[key], {s: _timed(lambda s=s, p=p: sides[s].prefill(p), 1e3) for s in SIDES}, repeats)
            say("time to first token...")
            for tiles, key in ((0, "ttft_text_ms"), (1, "ttft_1_ms"), (MANY_TILES, "ttft_17_ms")):
                if key in rows:
                    p = prompts[tiles]
                    _alternate(rows[key], {s: _timed(lambda s=s, p=p: sides[s].first_token(p), 1e3) for s in SIDES},
                               repeats, warmup=0 if tiles == MANY_TILES else 1)  # fmt: skip
            say("decode...")
            for tiles, key in ((0, "decode_tps"), (1, "decode_1_tps")):
                p = prompts[tiles]
                _alternate(rows[key], {s: (lambda s=s, p=p: sides[s].decode(p, new_tokens)) for s in SIDES}, repeats)

        say("memory bandwidth...")
        bandwidth = measure_bandwidth()
        per_token = decode_bytes_per_token(sides["vlmkit"].model.backbone)
        floor = {
            "bandwidth_gb_s": bandwidth,
            "bytes_per_token_mb": per_token / 1e6,
            "floor_tok_s": bandwidth * 1e9 / per_token,
            "vlmkit_fraction": rows["decode_tps"].median("vlmkit") / (bandwidth * 1e9 / per_token),
            "transformers_fraction": rows["decode_tps"].median("transformers") / (bandwidth * 1e9 / per_token),
        }
        result: dict[str, Any] = {
            "info": info,
            "rows": [rows[k].as_dict("vlmkit", "transformers") for k in keys],
            "floor": floor,
            "checks": checks,
        }
        if int8:
            say("int8...")
            result["int8"] = _int8_section(folder, sides["vlmkit"], prompts, int8_keys, repeats, new_tokens, bandwidth)
    sides.clear()
    _print(result, console)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    return result


def _int8_section(folder: Path, fp32: VlmkitSide, prompts: dict[int, Prompt], keys: list[str], repeats: int,
                  new_tokens: int, bandwidth: float) -> dict[str, Any]:  # fmt: skip
    import torch

    from .quantize import quantize_int8

    q = VlmkitSide(folder)
    q.load()
    start = time.perf_counter()
    quantize_int8(q.model)
    rows = {k: Metric(k, *INT8_ROWS[k]) for k in keys}
    rows["quantize_s"].add("int8", time.perf_counter() - start)
    pair = {"int8": q, "fp32": fp32}
    with torch.inference_mode():
        p1 = prompts[1]
        _alternate(rows["decode_tps"], {s: (lambda s=s: pair[s].decode(prompts[0], new_tokens)) for s in pair}, repeats)
        _alternate(rows["vision_1_ms"], {s: _timed(lambda s=s: pair[s].encode(p1), 1e3 / p1.tiles) for s in pair}, repeats)
        _alternate(rows["ttft_1_ms"], {s: _timed(lambda s=s: pair[s].first_token(p1), 1e3) for s in pair}, repeats)
        if "vision_17_ms" in rows:
            pm = prompts[MANY_TILES]
            _alternate(rows["vision_17_ms"], {s: _timed(lambda s=s: pair[s].encode(pm), 1e3 / pm.tiles) for s in pair}, repeats, 0)
            _alternate(rows["ttft_17_ms"], {s: _timed(lambda s=s: pair[s].first_token(pm), 1e3) for s in pair}, repeats, 0)
        accuracy = int8_accuracy(fp32, q, folder, prompts)
    per_token = decode_bytes_per_token(q.model.backbone)
    return {
        "rows": [rows[k].as_dict("int8", "fp32") for k in keys],
        "accuracy": accuracy,
        "bytes_per_token_mb": per_token / 1e6,
        "floor_tok_s": bandwidth * 1e9 / per_token,
    }


def int8_accuracy(fp32: VlmkitSide, q: VlmkitSide, folder: Path, prompts: dict[int, Prompt], new_tokens: int = 16) -> dict[str, Any]:
    """Accuracy of ``q`` against ``fp32``: the largest |logit difference| over the text-only and
    1-tile prompts; over a fixed prompt set, greedy continuations of ``new_tokens``: the share of
    prompts whose continuation is identical, and the teacher-forced top-1 agreement (both models
    read the float32 continuation; how often their next-token argmax agrees)."""
    import torch

    max_diff = {p.name: float((q.logits(p) - fp32.logits(p)).abs().max()) for p in (prompts[0], prompts[1])}
    prompt_ids = _agreement_prompts(folder)
    exact = agree = total = 0
    for ids in prompt_ids:
        want = fp32.greedy(ids, new_tokens)
        got = q.greedy(ids, new_tokens)
        exact += bool(torch.equal(want, got))
        t = ids.shape[1]
        a = fp32.model(want).logits[0, t - 1 : -1].argmax(-1)
        b = q.model(want).logits[0, t - 1 : -1].argmax(-1)
        agree += int((a == b).sum())
        total += a.numel()
    return {
        "max_logit_diff": max(max_diff.values()),
        "max_logit_diff_per_prompt": max_diff,
        "prompts": len(prompt_ids),
        "new_tokens": new_tokens,
        "greedy_exact_match_rate": exact / len(prompt_ids),
        "teacher_forced_top1_agreement": agree / total,
    }


def _agreement_prompts(folder: Path) -> list:
    import torch

    proc = _load_processor(folder)
    if proc is not None:
        texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": t}]}]) for t in AGREEMENT_PROMPTS]
        return [proc(text=t)["input_ids"] for t in texts]
    facts = _facts(folder)
    g = torch.Generator().manual_seed(99)
    hi = min(facts["vocab_size"], facts["image_token_id"], 5000)
    return [torch.randint(3, max(hi, 4), (1, 12), generator=g) for _ in AGREEMENT_PROMPTS]


# ============================================================================== output
def _machine() -> dict[str, Any]:
    import platform

    import torch

    out = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "cpu": platform.processor() or None}
    with contextlib.suppress(Exception):
        out["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                out["cpu"] = line.split(":", 1)[1].strip()
                break
    return out


def _jsonable(value: Any) -> Any:
    return str(value)


def _console():
    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else 132)


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value == 0:
        return "0"
    mag = abs(value)
    return f"{value:,.0f}" if mag >= 100 else f"{value:.1f}" if mag >= 10 else f"{value:.2f}" if mag >= 1 else f"{value:.3f}"


def _goal_text(row: dict[str, Any]) -> str:
    if row["goal"] is None:
        return ""
    return f"{'>=' if row['higher_is_better'] else '<='} {row['goal']:.2f}"


def _met_text(met: bool | None) -> str:
    return "" if met is None else "[green]met[/green]" if met else "[red]not met[/red]"


def _print(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    info = result["info"]
    table = Table(title=f"vlmkit vs transformers -- {info['folder']} (float32, {info['threads']} threads, medians of {info['repeats']})")
    for col, kw in (("metric", {}), ("unit", {}), ("vlmkit", {"justify": "right"}), ("transformers", {"justify": "right"}),
                    ("ratio v/t", {"justify": "right"}), ("goal", {}), ("", {})):  # fmt: skip
        table.add_column(col, **kw)
    for row in result["rows"]:
        table.add_row(row["label"], row["unit"], _fmt(row["vlmkit"]), _fmt(row["transformers"]), _fmt(row["ratio"]),
                      _goal_text(row), _met_text(row["met"]))  # fmt: skip
    console.print(table)
    fl, ck = result["floor"], result["checks"]
    console.print(
        f"decode floor: {fl['bandwidth_gb_s']:.1f} GB/s measured / {_fmt(fl['bytes_per_token_mb'])} MB per token = "
        f"{_fmt(fl['floor_tok_s'])} tok/s; vlmkit reaches {fl['vlmkit_fraction']:.0%} of it, transformers {fl['transformers_fraction']:.0%}",
        markup=False,
    )
    console.print(
        f"import vlmkit: {_fmt(ck['import_vlmkit_s'])} s, imports transformers: {ck['import_vlmkit_imports_transformers']}, "
        f"torch: {ck['import_vlmkit_imports_torch']}; vlmkit --help: {ck['cli_help_s']:.2f} s (goal < 0.5 s)",
        markup=False,
    )
    console.print("prompt tokens: " + ", ".join(f"{k} {v}" for k, v in info["prompt_tokens"].items()), markup=False)
    if "int8" in result:
        q = result["int8"]
        t = Table(title="vlmkit int8 (quantize_int8) vs vlmkit float32")
        for col, kw in (("metric", {}), ("unit", {}), ("int8", {"justify": "right"}), ("fp32", {"justify": "right"}),
                        ("ratio int8/fp32", {"justify": "right"}), ("goal", {}), ("", {})):  # fmt: skip
            t.add_column(col, **kw)
        for row in q["rows"]:
            t.add_row(row["label"], row["unit"], _fmt(row["int8"]), _fmt(row["fp32"]), _fmt(row["ratio"]),
                      _goal_text(row), _met_text(row["met"]))  # fmt: skip
        console.print(t)
        acc = q["accuracy"]
        console.print(
            f"int8 accuracy: max |logit diff| {acc['max_logit_diff']:.3f}; over {acc['prompts']} prompts x "
            f"{acc['new_tokens']} greedy tokens: identical continuations {acc['greedy_exact_match_rate']:.0%}, "
            f"teacher-forced top-1 agreement {acc['teacher_forced_top1_agreement']:.1%}; "
            f"{_fmt(q['bytes_per_token_mb'])} MB per token, floor {_fmt(q['floor_tok_s'])} tok/s",
            markup=False,
        )


# ============================================================================== command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run_bench", description="vlmkit vs transformers on one checkpoint folder.")
    parser.add_argument("source", help="checkpoint folder (or Hub repo id)")
    parser.add_argument("--repeats", type=int, default=3, help="timed samples per side and row (default 3)")
    parser.add_argument("--quick", action="store_true", help="skip the 17-tile rows")
    parser.add_argument("--int8", action="store_true", help="also compare vlmkit int8 with vlmkit float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps per decode sample (default 32)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the results to this JSON file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run_bench(args.source, repeats=args.repeats, quick=args.quick, int8=args.int8, threads=args.threads,
              new_tokens=args.new_tokens, json_path=args.json_path)  # fmt: skip
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
