"""The ``--int8`` section: vlmkit with the fastest int8 scheme for this CPU
(:func:`vlmkit.quant_schemes.quantize` scheme ``int8``: ``w8a8``, i.e.
:func:`vlmkit.quantize.quantize_int8`, or weight-only ``w8``) against vlmkit float32 (speed rows,
bytes per decode token) and :func:`int8_accuracy` (logit differences, greedy agreement
on :data:`~vlmkit.bench.prompts.AGREEMENT_PROMPTS`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .measure import INT8_ROWS, Metric, alternate, timed, decode_bytes_per_token
from .prompts import AGREEMENT_TOKENS, MANY_TILES, Prompt, agreement_prompts
from .sides import VlmkitSide


def int8_section(folder: Path, fp32: VlmkitSide, prompts: dict[int, Prompt], keys: list[str], repeats: int,
                  new_tokens: int, bandwidth: float) -> dict[str, Any]:  # fmt: skip
    """Quantize a fresh copy of the model with scheme ``int8`` (not from the cache: the quantize
    row is a real quantization), time it against ``fp32`` in alternation and measure its
    accuracy; the JSON-ready ``int8`` section of the result (``scheme``, ``why``: what ``int8``
    resolved to on this CPU, and why)."""
    import torch

    from ..quant_schemes import quantize

    q = VlmkitSide(folder)
    q.load()
    start = time.perf_counter()
    report = quantize(q.model, "int8")
    rows = {k: Metric(k, *INT8_ROWS[k]) for k in keys}
    rows["quantize_s"].add("int8", time.perf_counter() - start)
    pair = {"int8": q, "fp32": fp32}
    with torch.inference_mode():
        p1 = prompts[1]
        alternate(rows["decode_tps"], {s: (lambda s=s: pair[s].decode(prompts[0], new_tokens)) for s in pair}, repeats)
        alternate(rows["vision_1_ms"], {s: timed(lambda s=s: pair[s].encode(p1), 1e3 / p1.tiles) for s in pair}, repeats)
        alternate(rows["ttft_1_ms"], {s: timed(lambda s=s: pair[s].first_token(p1), 1e3) for s in pair}, repeats)
        if "vision_17_ms" in rows:
            pm = prompts[MANY_TILES]
            alternate(rows["vision_17_ms"], {s: timed(lambda s=s: pair[s].encode(pm), 1e3 / pm.tiles) for s in pair}, repeats, 0)
            alternate(rows["ttft_17_ms"], {s: timed(lambda s=s: pair[s].first_token(pm), 1e3) for s in pair}, repeats, 0)
        accuracy = int8_accuracy(fp32, q, folder, prompts)
    per_token = decode_bytes_per_token(q.model.backbone)
    return {
        "scheme": report["scheme"],
        "why": report["choice"]["why"],
        "rows": [rows[k].as_dict("int8", "fp32") for k in keys],
        "accuracy": accuracy,
        "bytes_per_token_mb": per_token / 1e6,
        "floor_tok_s": bandwidth * 1e9 / per_token,
    }


def int8_accuracy(fp32: VlmkitSide, q: VlmkitSide, folder: Path, prompts: dict[int, Prompt],
                  new_tokens: int = AGREEMENT_TOKENS) -> dict[str, Any]:  # fmt: skip
    """Accuracy of ``q`` against ``fp32``: on the text-only and 1-tile prompts, the largest
    |logit difference| at any position and at the last one (the next-token logits generation
    reads), and the relative L2 error of the 1-tile prompt's visual tokens; over a fixed prompt
    set, greedy continuations of ``new_tokens``: the share of prompts whose continuation is
    identical, and, teacher-forced (both models read the float32 continuation one token per
    step, as decoding does, so a weight-only scheme's quantized copy is the one measured), how
    often their next-token argmax agrees and the largest |logit difference| over those steps."""
    import torch

    max_diff, last_diff = {}, {}
    for p in (prompts[0], prompts[1]):
        diff = (q.logits(p) - fp32.logits(p)).abs()
        max_diff[p.name], last_diff[p.name] = float(diff.max()), float(diff[:, -1].max())
    prompt_ids = agreement_prompts(folder)
    exact = agree = total = 0
    step_diff = 0.0
    for ids in prompt_ids:
        want = fp32.greedy(ids, new_tokens)
        got = q.greedy(ids, new_tokens)
        exact += bool(torch.equal(want, got))
        continuation = want[0, ids.shape[1] :]
        a, b = _stepwise_logits(fp32, ids, continuation), _stepwise_logits(q, ids, continuation)
        step_diff = max(step_diff, float((a - b).abs().max()))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += continuation.numel()
    return {
        "max_logit_diff": max(max_diff.values()),
        "max_logit_diff_per_prompt": max_diff,
        "next_token_logit_diff_per_prompt": last_diff,
        "visual_tokens_rel_error": _visual_error(fp32, q, prompts[1]),
        "prompts": len(prompt_ids),
        "new_tokens": new_tokens,
        "greedy_exact_match_rate": exact / len(prompt_ids),
        "teacher_forced_top1_agreement": agree / total,
        "decode_step_max_logit_diff": step_diff,
    }


def _stepwise_logits(side: VlmkitSide, ids, continuation):  # noqa: ANN001
    """``(n, V)`` next-token logits before each of the ``n`` tokens of ``continuation`` after the
    prompt ``ids`` ``(1, T)``: the prompt in one forward, then one token per step through the
    backbone's KV cache (a backbone without one reads the whole sequence in one forward)."""
    import torch

    bb = side.model.backbone
    new_cache = getattr(bb, "new_cache", None)
    if not callable(new_cache):
        full = torch.cat([ids, continuation[None]], dim=1)
        return side.model(full).logits[0, ids.shape[1] - 1 : -1]
    cache = new_cache(1, ids.shape[1] + continuation.numel())
    rows = [bb.logits(bb(bb.embed(ids), cache=cache)[:, -1:])[0, -1]]
    for tok in continuation[:-1]:
        rows.append(bb.logits(bb(bb.embed(tok.view(1, 1)), cache=cache))[0, -1])
    return torch.stack(rows)


def _visual_error(fp32: VlmkitSide, q: VlmkitSide, p: Prompt) -> float:
    """``||int8 - fp32|| / ||fp32||`` over the visual tokens of prompt ``p``."""
    pixels, mask = p.tensors["pixel_values"], p.tensors.get("pixel_attention_mask")
    want = fp32.model.encode_images(pixels, mask)[0]
    got = q.model.encode_images(pixels, mask)[0]
    return float((got - want).norm() / want.norm())
