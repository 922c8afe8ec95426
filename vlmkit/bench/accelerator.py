"""``vlmkit bench --device D --dtype T``: vlmkit against transformers (sdpa) on any device and
dtype other than the CPU float32 default, e.g. a GPU in bfloat16.

Both sides load the same folder with ``dtype`` on ``device`` (vlmkit through
``build_from_hf(..., device=, dtype=)``, transformers through ``from_pretrained(dtype=,
attn_implementation="sdpa").to(device)``) and get the same input tensors, moved there. Each timing
waits for the device (``torch.cuda.synchronize``) before its clock stops, and the decode streamer
waits before each stamp. Rows, each side in alternation after a warm-up:

* load (in process), vision encode per tile (1 and 17 tiles), prefill, time to first token;
* decode tokens/s of one row after the text and the 1-tile prompt, and of :data:`BATCH` rows of the
  text prompt together (aggregate tokens/s; the ``8 rows / 1 row`` scaling is printed per side);
* on CUDA, peak device memory of a 1- and a 17-tile generation (the side's weights plus the peak
  it allocates above them; ``torch.cuda.max_memory_allocated``);
* the decode floor: this device's read bandwidth (sums over a 1 GiB buffer) / the bytes a decode
  step reads; and the vision floor: one tile's FLOPs / this device's measured ``dtype`` matmul rate.

The CPU-only sections of the default run (fresh-process RSS, the decode layouts, quantization
schemes, llama.cpp) are not part of this run; :func:`check_device_options` refuses ``--int8`` and
``--quantize`` with one.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .measure import ROWS, Metric, alternate, decode_bytes_per_token, vision_flops_per_tile
from .prompts import MANY_TILES, Prompt, make_prompts
from .sides import HFSide, VlmkitSide, device_sync

#: The dtypes ``--dtype`` takes (float32 on the CPU is the default, full run).
DEVICE_DTYPES = ("float32", "bfloat16", "float16")
#: Rows decoded together in the batched row.
BATCH = 8
#: the rows this run shares with the CPU float32 run, under the same labels and units (:data:`ROWS`)
_SHARED_ROWS = ("load_s", "vision_1_ms", "vision_17_ms", "prefill_1_ms", "prefill_17_ms", "ttft_text_ms", "ttft_1_ms",
                "ttft_17_ms", "decode_tps", "decode_1_tps")  # fmt: skip
#: key -> (label, unit, higher is better, goal). No goals in the table: the issues bound these ratios on
#: CPUs (on a GPU the figures are recorded); the 8-row scaling line keeps issue 19's >= 4x, which names no device.
DEVICE_ROWS: dict[str, tuple[str, str, bool, float | None]] = {
    **{k: (*ROWS[k][:3], None) for k in _SHARED_ROWS},
    "decode_batch_tps": (f"decode, {BATCH} rows of the text prompt (aggregate)", "tok/s", True, None),
    "memory_1_mb": ("peak device memory, 1 tile", "MB", False, None),
    "memory_17_mb": ("peak device memory, 17 tiles", "MB", False, None),
}
_MANY_TILE_ROWS = frozenset({"vision_17_ms", "prefill_17_ms", "ttft_17_ms", "memory_17_mb"})
_MEMORY_ROWS = frozenset({"memory_1_mb", "memory_17_mb"})


def device_rows(quick: bool, device_type: str) -> list[str]:
    """The row keys of a run: ``quick`` leaves out the 17-tile rows; memory rows need CUDA."""
    return [k for k in DEVICE_ROWS if not (quick and k in _MANY_TILE_ROWS) and (device_type == "cuda" or k not in _MEMORY_ROWS)]


def on_device(p: Prompt, device: Any, dtype: Any) -> Prompt:
    """``p`` with its tensors on ``device`` (pixels in ``dtype``, ids and masks as they are)."""
    moved = {k: (v.to(device=device, dtype=dtype) if k == "pixel_values" else v.to(device)) for k, v in p.tensors.items()}
    return Prompt(p.name, moved, p.tiles)


def device_bench(folder: Path, *, device: Any, dtype: Any, repeats: int, quick: bool, new_tokens: int,
                 say: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """Run the rows above on ``device`` in ``dtype``; the JSON-ready result (``rows``, ``floor``,
    ``vision_floor``, ``batch_scaling``)."""
    import torch

    sync = device_sync(device) or (lambda: None)
    tile_counts = [0, 1] if quick else [0, 1, MANY_TILES]
    prompts = {n: on_device(p, device, dtype) for n, p in make_prompts(folder, tile_counts).items()}
    keys = device_rows(quick, device.type)
    rows = {k: Metric(k, *DEVICE_ROWS[k]) for k in keys}
    sides = {"vlmkit": VlmkitSide(folder, device=device, dtype=dtype), "transformers": HFSide(folder, device=device, dtype=dtype)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        say("load...")
        alternate(rows["load_s"], {s: _timed(side.load, sync) for s, side in sides.items()}, repeats)
        with torch.inference_mode():
            agreement = logit_agreement(sides, prompts[1])
            _timed_rows(rows, sides, prompts, repeats, sync, say)
            say("decode...")
            _decode_rows(rows, sides, prompts, repeats, new_tokens)
            if device.type == "cuda":
                say("peak device memory...")
                _memory_rows(rows, sides, prompts, device)
            say("floors (bandwidth, matmul rate)...")
            bandwidth = measure_device_bandwidth(device, sync)
            floor = _floor(rows["decode_tps"], bandwidth, decode_bytes_per_token(sides["vlmkit"].model.backbone))
            vision = _vision_floor(rows["vision_1_ms"], sides["vlmkit"], prompts[1], device, dtype, sync)
    scaling = {s: rows["decode_batch_tps"].median(s) / rows["decode_tps"].median(s) for s in sides}
    return {"rows": [rows[k].as_dict("vlmkit", "transformers") for k in keys], "floor": floor, "vision_floor": vision,
            "batch_scaling": scaling, "batch": BATCH, "agreement": agreement}  # fmt: skip


def logit_agreement(sides: dict[str, Any], p: Prompt) -> dict[str, float]:
    """Both sides' logits over the 1-tile prompt ``p`` (every position): the largest difference,
    the largest logit (for scale) and the share of positions whose top-1 token agrees."""
    a, b = (sides[s].logits(p).float() for s in ("vlmkit", "transformers"))
    return {
        "max_abs_diff": float((a - b).abs().max()), "max_abs_logit": float(b.abs().max()),
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()), "positions": int(a.shape[1]),
    }  # fmt: skip


def _timed(fn: Callable[[], Any], sync: Callable[[], None], scale: float = 1.0) -> Callable[[], float]:
    """``fn``'s wall time (after ``sync``) times ``scale``."""

    def run() -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return (time.perf_counter() - start) * scale

    return run


def _timed_rows(rows: dict[str, Metric], sides: dict[str, Any], prompts: dict[int, Prompt], repeats: int,
                sync: Callable[[], None], say: Callable[[str], None]) -> None:  # fmt: skip
    """Vision encode, prefill and time to first token, each side in alternation."""
    say("vision encode, prefill, time to first token...")
    for tiles, key, call, scale in ((1, "vision_1_ms", "encode", 1e3), (MANY_TILES, "vision_17_ms", "encode", 1e3),
                                    (1, "prefill_1_ms", "prefill", 1e3), (MANY_TILES, "prefill_17_ms", "prefill", 1e3),
                                    (0, "ttft_text_ms", "first_token", 1e3), (1, "ttft_1_ms", "first_token", 1e3),
                                    (MANY_TILES, "ttft_17_ms", "first_token", 1e3)):  # fmt: skip
        if key not in rows:
            continue
        p = prompts[tiles]
        if call == "prefill":
            rows[key].label += f" ({p.length} tok)"
        per = scale / p.tiles if call == "encode" else scale
        alternate(rows[key], {s: _timed(lambda side=side, p=p: getattr(side, call)(p), sync, per) for s, side in sides.items()},
                  repeats)  # fmt: skip


def _decode_rows(rows: dict[str, Metric], sides: dict[str, Any], prompts: dict[int, Prompt], repeats: int,
                 new_tokens: int) -> None:  # fmt: skip
    """One row after the text and the 1-tile prompt, and :data:`BATCH` rows of the text prompt."""
    for tiles, key in ((0, "decode_tps"), (1, "decode_1_tps")):
        p = prompts[tiles]
        alternate(rows[key], {s: (lambda side=side, p=p: side.decode(p, new_tokens)) for s, side in sides.items()}, repeats)
    batch = _batched(prompts[0], BATCH)
    alternate(rows["decode_batch_tps"], {s: (lambda side=side: side.decode(batch, new_tokens) * BATCH)
                                         for s, side in sides.items()}, repeats)  # fmt: skip


def _batched(p: Prompt, rows: int) -> Prompt:
    """``rows`` copies of the text-only prompt ``p`` (equal lengths: no padding)."""
    return Prompt(f"{rows} x {p.name}", {k: v.repeat(rows, 1) for k, v in p.tensors.items()}, p.tiles)


def _memory_rows(rows: dict[str, Metric], sides: dict[str, Any], prompts: dict[int, Prompt], device: Any) -> None:
    """Each side's weights plus the peak it allocates above them in a short generation."""
    import torch

    for tiles, key in ((1, "memory_1_mb"), (MANY_TILES, "memory_17_mb")):
        if key not in rows:
            continue
        for name, side in sides.items():
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            side.decode(prompts[tiles], 4)
            extra = torch.cuda.max_memory_allocated(device) - before
            weights = sum(t.numel() * t.element_size() for t in (*side.model.parameters(), *side.model.buffers()))
            rows[key].add(name, (weights + extra) / 1e6)


def measure_device_bandwidth(device: Any, sync: Callable[[], None], nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Read bandwidth of ``device`` in GB/s: the best of ``repeats`` sums over an ``nbytes`` buffer."""
    import torch

    buffer = torch.ones(nbytes // 4, device=device)
    best = math.inf
    for _ in range(repeats + 1):  # the first is a warm-up
        sync()
        start = time.perf_counter()
        buffer.sum()
        sync()
        best = min(best, time.perf_counter() - start)
    del buffer
    return nbytes / best / 1e9


def measure_device_matmul(device: Any, dtype: Any, sync: Callable[[], None], repeats: int = 5) -> float:
    """``dtype`` matmul rate of ``device`` in GFLOP/s: the best of ``repeats`` square products
    (8192 on a GPU, 1536 on a CPU)."""
    import torch

    n = 8192 if device.type == "cuda" else 1536
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = math.inf
    for _ in range(repeats + 1):  # the first is a warm-up
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def _floor(decode: Metric, bandwidth: float, per_token: int) -> dict[str, Any]:
    floor = bandwidth * 1e9 / per_token
    return {
        "bandwidth_gb_s": bandwidth, "bytes_per_token_mb": per_token / 1e6, "floor_tok_s": floor,
        "vlmkit_fraction": decode.median("vlmkit") / floor, "transformers_fraction": decode.median("transformers") / floor,
    }  # fmt: skip


def _vision_floor(vision: Metric, side: VlmkitSide, prompt: Prompt, device: Any, dtype: Any,
                  sync: Callable[[], None]) -> dict[str, Any]:  # fmt: skip
    flops = vision_flops_per_tile(side.model, prompt.tensors["pixel_values"], prompt.tensors.get("pixel_attention_mask"))
    gflops = measure_device_matmul(device, dtype, sync)
    floor_ms = flops / (gflops * 1e9) * 1e3
    return {
        "gflop_per_tile": flops / 1e9, "matmul_gflop_s": gflops, "floor_ms": floor_ms,
        "vlmkit_fraction": floor_ms / vision.median("vlmkit"), "transformers_fraction": floor_ms / vision.median("transformers"),
    }  # fmt: skip


def print_device_report(result: dict[str, Any], console: Any) -> None:
    """The vlmkit vs transformers table of a device run, its floors and the batch scaling."""
    from .report import fmt_value, rows_table

    info = result["info"]
    title = (f"vlmkit vs transformers (sdpa) -- {info['folder']} ({info['dtype']} on {info['device']}"
             f"{', ' + info['device_name'] if info.get('device_name') else ''}, medians of {info['repeats']})")  # fmt: skip
    console.print(rows_table(title, "vlmkit", "transformers", "ratio v/t", result["rows"]))
    fl, vf, bs = result["floor"], result["vision_floor"], result["batch_scaling"]
    console.print(
        f"decode floor: {fl['bandwidth_gb_s']:.0f} GB/s measured / {fmt_value(fl['bytes_per_token_mb'])} MB per token = "
        f"{fmt_value(fl['floor_tok_s'])} tok/s; vlmkit reaches {fl['vlmkit_fraction']:.1%} of it, transformers "
        f"{fl['transformers_fraction']:.1%}",
        markup=False,
    )
    console.print(
        f"vision floor: {fmt_value(vf['gflop_per_tile'])} GFLOP per tile / {fmt_value(vf['matmul_gflop_s'])} GFLOP/s "
        f"({info['dtype']} matmul, measured) = {fmt_value(vf['floor_ms'])} ms/tile; vlmkit reaches {vf['vlmkit_fraction']:.0%} "
        f"of it, transformers {vf['transformers_fraction']:.0%}",
        markup=False,
    )
    ag = result["agreement"]
    console.print(f"logits, 1-tile prompt ({ag['positions']} positions): max |vlmkit - transformers| {ag['max_abs_diff']:.2e} "
                  f"(largest logit {ag['max_abs_logit']:.1f}), top-1 agreement {ag['top1_agreement']:.1%}", markup=False)  # fmt: skip
    console.print(f"decode, {result['batch']} rows / 1 row (aggregate tok/s): vlmkit {bs['vlmkit']:.2f}x, "
                  f"transformers {bs['transformers']:.2f}x (goal >= 4x)", markup=False)  # fmt: skip
