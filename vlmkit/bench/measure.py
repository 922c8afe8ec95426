"""How the benchmark measures: :class:`Metric` (one table row, per-side samples), the row tables
(:data:`ROWS`, :data:`INT8_ROWS`), timing in alternation, the fresh-process runs (import, load,
peak RSS) and the CLI checks, and the decode floor (memory bandwidth, bytes read per token)."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SIDES = ("vlmkit", "transformers")


# ============================================================================== rows
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
    "vision_1_ms": ("vision encode, 1 tile", "ms/tile", False, 0.7),
    "vision_17_ms": ("vision encode, 17 tiles", "ms/tile", False, 0.7),
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


# ============================================================================== timing
def timed(fn: Callable[[], Any], scale: float = 1.0) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * scale

    return run


def alternate(metric: Metric, fns: dict[str, Callable[[], float]], repeats: int, warmup: int = 1,
              between: Callable[[], Any] | None = None) -> None:  # fmt: skip
    """Warm up each side, then take ``repeats`` samples in alternation A B A B ...; ``between``
    (if given) runs before each round, e.g. to sample the memory bandwidth beside the timings."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    for _ in range(repeats):
        if between is not None:
            between()
        for side, fn in fns.items():
            metric.add(side, fn())


# ============================================================================== subprocesses
CHILD_SCRIPT = r"""
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


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env["PYTHONWARNINGS"] = "ignore"
    return env


def run_child(side: str, folder: Path, tiles: int, threads: int, new_tokens: int, timeout: float) -> dict[str, float]:
    args = json.dumps({"side": side, "folder": str(folder), "tiles": tiles, "threads": threads, "new_tokens": new_tokens})
    proc = subprocess.run([sys.executable, "-c", CHILD_SCRIPT, args], capture_output=True, text=True, timeout=timeout, env=child_env())
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line.removeprefix("BENCH_RESULT "))
    from ..errors import VlmkitError

    tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
    raise VlmkitError(f"the {side} measurement subprocess failed (exit {proc.returncode}):\n" + "\n".join(tail))


def cli_checks(timeout: float, folder: Path | None = None) -> dict[str, Any]:
    """``import vlmkit`` must not import transformers; ``vlmkit --help`` should be fast; with
    ``folder``: ``vlmkit inspect`` on a YAML of its spec against a bare ``import torch``."""
    env = child_env()
    code = "import sys, time; t = time.perf_counter(); import vlmkit; print(time.perf_counter() - t, 'transformers' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env).stdout.split()
    checks = {
        "import_vlmkit_s": float(out[0]) if out else None,
        "import_vlmkit_imports_transformers": out[1] == "True" if len(out) > 1 else None,
        "import_vlmkit_imports_torch": out[2] == "True" if len(out) > 2 else None,
        "cli_help_s": _best_wall(_vlmkit_cmd("--help"), timeout, env),
    }
    if folder is not None:
        checks.update(_inspect_yaml_check(folder, timeout, env))
    return checks


def _vlmkit_cmd(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("vlmkit")
    return [str(script), *args] if script.is_file() else [sys.executable, "-m", "vlmkit.cli", *args]


def _best_wall(cmd: list[str], timeout: float, env: dict[str, str], repeats: int = 3) -> float | None:
    """Best wall time of ``repeats`` runs of ``cmd``; None if it fails."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        if subprocess.run(cmd, capture_output=True, timeout=timeout, env=env).returncode != 0:
            return None
        best = min(best, time.perf_counter() - start)
    return best


def _inspect_yaml_check(folder: Path, timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """``vlmkit inspect spec.yaml`` (the folder's spec written as YAML, no weights) against
    ``python -c 'import torch'``; the goal is at most the torch import + 1 s."""
    import tempfile

    from ..hf import spec_from_hf
    from ..spec import dump_yaml

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.yaml"
        dump_yaml(spec_from_hf(folder), path)
        inspect_s = _best_wall(_vlmkit_cmd("inspect", str(path)), timeout, env)
    torch_s = _best_wall([sys.executable, "-c", "import torch"], timeout, env)
    return {"inspect_yaml_s": inspect_s, "import_torch_s": torch_s}


# ============================================================================== bandwidth floor
def measure_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Read bandwidth in GB/s: the best of ``repeats`` sums over an ``nbytes`` float32 tensor
    (larger than the last-level cache, so it measures memory)."""
    probe = BandwidthProbe(nbytes)
    return probe.sample(repeats)


class BandwidthProbe:
    """:func:`measure_bandwidth` with its ``nbytes`` buffer allocated once, for samples taken
    between other timings (a shared machine's bandwidth moves over a run: the decode floor is
    measured in the same rounds as the decode it bounds)."""

    def __init__(self, nbytes: int = 1 << 30) -> None:
        self.nbytes = nbytes
        self.buffer: Any = None  # allocated at the first sample, dropped by release()
        self.samples: list[float] = []

    def sample(self, repeats: int = 3) -> float:
        """One sample in GB/s (the best of ``repeats`` sums), also kept in :attr:`samples`."""
        import torch

        if self.buffer is None:
            self.buffer = torch.ones(self.nbytes // 4)
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            self.buffer.sum()
            best = min(best, time.perf_counter() - start)
        self.samples.append(self.nbytes / best / 1e9)
        return self.samples[-1]

    def release(self) -> None:
        """Free the buffer (the samples stay)."""
        self.buffer = None

    def median(self) -> float:
        """The median sample (one is taken first when there is none)."""
        if not self.samples:
            self.sample()
            self.release()
        return statistics.median(self.samples)


def measure_matmul_gflops(n: int = 1536, repeats: int = 5) -> float:
    """This CPU's float32 matmul speed in GFLOP/s at the current thread count: the best of
    ``repeats`` ``(n, n) @ (n, n)`` products (the compute a vision tower's matmuls can reach)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def vision_flops_per_tile(model, pixel_values, pixel_attention_mask=None) -> float:  # noqa: ANN001
    """Floating-point operations of one :meth:`encode_images` call over ``pixel_values``
    ``(B, N, 3, H, W)``, per tile (torch's ``FlopCounterMode``: matmuls and attention)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sdpa = {op: _attention_flops for op in _cpu_attention_ops()}  # torch counts these on GPUs only
    counter = FlopCounterMode(display=False, custom_mapping=sdpa)
    with torch.inference_mode(), counter:
        model.encode_images(pixel_values, pixel_attention_mask)
    tiles = pixel_values.shape[0] * pixel_values.shape[1]
    return counter.get_total_flops() / tiles


def _cpu_attention_ops() -> list:
    import torch

    # the fused CPU kernel; the math path decomposes into matmuls, which torch already counts
    name = "_scaled_dot_product_flash_attention_for_cpu"
    return [getattr(torch.ops.aten, name)] if hasattr(torch.ops.aten, name) else []


def _attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001, ANN002, ANN003
    """``Q K^T`` and ``A V`` of one attention call, from the shapes ``(B, H, T, d)``, ``(B, H_kv, L, d)``,
    ``(B, H_kv, L, d_v)`` (a shape wrapper passes shapes, not tensors)."""
    *lead, T, d = query
    L, d_v = key[-2], value[-1]
    return 2 * math.prod(lead) * T * L * (d + d_v)


def decode_bytes_per_token(backbone) -> int:  # noqa: ANN001
    """Bytes of weights one decode step reads: every backbone parameter except the embedding
    table (one row is read), plus the LM head matrix (the embedding table when tied); int8
    layers count their int8 bytes, weight-only layers their quantized copy (not their float weight,
    which only prompts read)."""
    from ..quantize import Int8Linear
    from ..weight_only import WeightOnlyLinear

    embed = getattr(backbone, "embed_tokens", None)
    head = getattr(getattr(backbone, "lm_head", None), "weight", None)
    tied_to_head = embed is not None and head is getattr(embed, "weight", 0)  # a Linear head sharing the table
    skip = {id(embed.weight)} if embed is not None and hasattr(embed, "weight") and not tied_to_head else set()
    weight_only = [m for m in backbone.modules() if isinstance(m, WeightOnlyLinear)]
    skip |= {id(p) for m in weight_only for p in (m.weight, m.bias) if p is not None}
    total = sum(p.numel() * p.element_size() for p in backbone.parameters() if id(p) not in skip)
    total += sum(m.nbytes for m in backbone.modules() if isinstance(m, (Int8Linear, WeightOnlyLinear)))
    if getattr(backbone, "lm_head", "absent") is None and embed is not None:
        total += embed.weight.numel() * embed.weight.element_size()  # tied head reads the table
    return int(total)
