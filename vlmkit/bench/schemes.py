"""The decode section of ``vlmkit bench``: the float32 decode layout against plain row-major
weights, batched decode (8 rows against 1), and each ``--quantize`` scheme
(:func:`vlmkit.quant_schemes.quantize`) against vlmkit float32, with its floor, its cache and its
greedy agreement; plus the CPU's flags and what ``auto`` would choose on them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .measure import Metric, alternate, decode_bytes_per_token, timed
from .prompts import Prompt
from .sides import Clock, VlmkitSide

#: rows of a scheme table: (label, unit, higher is better, goal on scheme / fp32)
SCHEME_ROWS: dict[str, tuple[str, str, bool, float | None]] = {
    "decode_tps": ("decode, text prompt", "tok/s", True, None),
    "ttft_1_ms": ("time to first token, 1 tile", "ms", False, 1.05),
    "vision_1_ms": ("vision encode, 1 tile", "ms/tile", False, 1.05),
}
#: batched decode: aggregate tokens/s of this many rows against one row
BATCH = 8
BATCH_GOAL = 4.0


def _batched_tps(side: VlmkitSide, p: Prompt, rows: int, new_tokens: int) -> float:
    """Aggregate tokens/s of ``rows`` copies of prompt ``p`` decoded together."""
    ids = p.tensors["input_ids"].repeat(rows, 1)
    clock = Clock()
    side.model.generate(ids, max_new_tokens=new_tokens, eos_token_id=[], streamer=clock)
    return clock.tokens_per_s() * rows


def layout_and_batch(folder: Path, fp32: VlmkitSide, prompts: dict[int, Prompt], repeats: int, new_tokens: int,
                     bandwidth: float) -> dict[str, Any]:  # fmt: skip
    """vlmkit's decode layout vs row-major weights (same model, fresh copy), and 8 rows vs 1."""
    from ..decode_layout import prepare_decode

    rows = VlmkitSide(folder)
    rows.load()
    prepare_decode(rows.model.backbone, "rows")
    fp32.model.generate(prompts[0].tensors["input_ids"], max_new_tokens=2)  # prepares fp32's layout
    layout = Metric("layout", "decode, text prompt", "tok/s", True, None)
    pair = {"layout": fp32, "rows": rows}
    alternate(layout, {s: (lambda s=s: pair[s].decode(prompts[0], new_tokens)) for s in pair}, repeats)
    batch = Metric("batch", f"decode, {BATCH} rows vs 1 (aggregate)", "tok/s", True, BATCH_GOAL)
    one = {f"{BATCH} rows": BATCH, "1 row": 1}
    alternate(batch, {s: (lambda n=n: _batched_tps(fp32, prompts[0], n, new_tokens)) for s, n in one.items()}, repeats)
    per_token = decode_bytes_per_token(fp32.model.backbone)
    floor = bandwidth * 1e9 / per_token
    return {
        "layout": {**layout.as_dict("layout", "rows"), "chosen": {f"{o}x{i}": v for (o, i), v in fp32.model.backbone.decode_layout.items()}},
        "batch": batch.as_dict(f"{BATCH} rows", "1 row"),
        "floor_tok_s": floor,
        "layout_fraction": layout.median("layout") / floor,
        "rows_fraction": layout.median("rows") / floor,
    }


def scheme_section(folder: Path, fp32: VlmkitSide, prompts: dict[int, Prompt], scheme: str, repeats: int,
                   new_tokens: int, bandwidth: float, cache: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Quantize a fresh copy with ``scheme``, time it against ``fp32`` in alternation, time a
    second quantization from the cache, measure greedy agreement; JSON-ready."""
    from ..quant_schemes import quantize
    from .int8 import int8_accuracy

    q = VlmkitSide(folder)
    q.load()
    report = quantize(q.model, scheme, source=folder, cache=cache)
    again = VlmkitSide(folder)
    again.load()
    cached = quantize(again.model, scheme, source=folder, cache=cache)
    del again
    rows = {k: Metric(k, *SCHEME_ROWS[k]) for k in SCHEME_ROWS}
    pair = {"q": q, "fp32": fp32}
    p1 = prompts[1]
    alternate(rows["decode_tps"], {s: (lambda s=s: pair[s].decode(prompts[0], new_tokens)) for s in pair}, repeats)
    alternate(rows["ttft_1_ms"], {s: timed(lambda s=s: pair[s].first_token(p1), 1e3) for s in pair}, repeats)
    alternate(rows["vision_1_ms"], {s: timed(lambda s=s: pair[s].encode(p1), 1e3 / p1.tiles) for s in pair}, repeats)
    start = time.perf_counter()
    accuracy = int8_accuracy(fp32, q, folder, prompts)
    per_token = decode_bytes_per_token(q.model.backbone)
    return {
        "scheme": report["scheme"], "requested": scheme, "report": report,
        "cache_second_run_s": cached["seconds"], "cache_second_run": cached.get("cache", "off"),
        "rows": [rows[k].as_dict("q", "fp32") for k in SCHEME_ROWS],
        "accuracy": accuracy, "accuracy_s": time.perf_counter() - start,
        "bytes_per_token_mb": per_token / 1e6, "floor_tok_s": bandwidth * 1e9 / per_token,
    }  # fmt: skip
