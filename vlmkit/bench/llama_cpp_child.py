"""The llama.cpp child process of ``vlmkit bench`` (:mod:`vlmkit.bench.llama_cpp` runs it).

``python -m vlmkit.bench.llama_cpp_child GGUF KIND THREADS N_CTX CACHE_DIR [--no-extra-bufts]``
loads one weight kind (``F32``/``Q8_0`` written once by llama.cpp's own ``llama_model_quantize``
into ``CACHE_DIR``; ``Q4_1`` as shipped), prints ``{"ready": true, "bytes", "vocab"}``, then answers
one JSON request per stdin line with one JSON line on stdout, until stdin closes:

* ``{"op": "decode", "prompt": [ids], "new_tokens": n}`` -> ``{"prefill_tok_s", "decode_tok_s"}``:
  the prompt in one ``llama_decode``, then ``n`` greedy one-token steps (argmax of the last
  logits fed back, as a generation does), each timed;
* ``{"op": "greedy", "prompts": [[ids], ...], "new_tokens": n}`` -> ``{"greedy": [[ids], ...]}``:
  each prompt's ``n`` greedy tokens (no stop token).

The model stays loaded between requests, so the parent can alternate llama.cpp's timings with
vlmkit's, one request at a time. Only this process imports llama-cpp-python.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["KINDS_WRITTEN", "SHIPPED", "main"]

#: the kind the shipped GGUF already has (run as is, never re-quantized)
SHIPPED = "Q4_1"
#: the kinds written from it by llama_model_quantize, and their llama.cpp file type names
KINDS_WRITTEN = {"F32": "LLAMA_FTYPE_ALL_F32", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}
#: the most token ids one request may carry, and the longest request line read
MAX_IDS = 1 << 20
LINE_LIMIT = 16 * MAX_IDS


def weights(gguf: Path, kind: str, cache_dir: Path) -> Path:
    """The GGUF for ``kind``: the shipped file, or one written by ``llama_model_quantize`` (cached)."""
    import llama_cpp

    if kind == SHIPPED:
        return gguf
    out = cache_dir / f"{gguf.stem.rsplit('.', 1)[0]}.{kind}.gguf"
    if not out.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, KINDS_WRITTEN[kind])
        params.allow_requantize = True
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        if llama_cpp.llama_model_quantize(str(gguf).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama_model_quantize to {kind} failed")
        tmp.replace(out)
    return out


class Runner:
    """One loaded model and context: ``eval(ids)`` runs one ``llama_decode``; ``argmax()`` reads the last logits."""

    def __init__(self, path: Path, threads: int, n_ctx: int, extra: bool) -> None:
        import llama_cpp

        self.lib = llama_cpp
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.use_extra_bufts = extra
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = n_ctx
        cparams.n_threads = cparams.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams) if self.model else None
        if not self.model or not self.ctx:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.n_ctx = n_ctx
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))

    def reset(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def eval(self, ids: list[int]) -> None:
        arr = (self.lib.llama_token * len(ids))(*ids)
        if self.lib.llama_decode(self.ctx, self.lib.llama_batch_get_one(arr, len(ids))) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax(self) -> int:
        import numpy as np

        return int(np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, -1), shape=(self.vocab,)).argmax())

    def check(self, ids: list[int], new_tokens: int) -> None:
        if not ids or not all(isinstance(t, int) and 0 <= t < self.vocab for t in ids):
            raise ValueError(f"a prompt must be token ids in [0, {self.vocab}); got {ids[:8]!r}...")
        if len(ids) + new_tokens > self.n_ctx:
            raise ValueError(f"{len(ids)} prompt + {new_tokens} new tokens exceed the context of {self.n_ctx}")


def decode(runner: Runner, prompt: list[int], new_tokens: int) -> dict[str, float]:
    """Prefill tokens/s of ``prompt`` and decode tokens/s of ``new_tokens`` greedy steps."""
    runner.check(prompt, new_tokens)
    runner.reset()
    start = time.perf_counter()
    runner.eval(prompt)
    prefill = len(prompt) / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(new_tokens):
        runner.eval([runner.argmax()])
    return {"prefill_tok_s": prefill, "decode_tok_s": new_tokens / (time.perf_counter() - start)}


def greedy(runner: Runner, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Each prompt's ``new_tokens`` greedy tokens."""
    out = []
    for ids in prompts:
        runner.check(ids, new_tokens)
        runner.reset()
        runner.eval(ids)
        tokens: list[int] = []
        for _ in range(new_tokens):
            tokens.append(runner.argmax())
            runner.eval(tokens[-1:])
        out.append(tokens)
    return out


def answer(runner: Runner, line: str) -> dict[str, Any]:
    """One request line -> its answer (``{"error": ...}`` for a request it cannot run)."""
    try:
        req = json.loads(line)
        op, n = req["op"], int(req["new_tokens"])
        if op == "decode":
            return decode(runner, list(req["prompt"]), n)
        if op == "greedy":
            prompts = [list(p) for p in req["prompts"]]
            if sum(map(len, prompts)) > MAX_IDS:
                raise ValueError(f"more than {MAX_IDS} prompt ids in one request")
            return {"greedy": greedy(runner, prompts, n)}
        raise ValueError(f"unknown op {op!r} (decode, greedy)")
    except (ValueError, KeyError, TypeError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlmkit.bench.llama_cpp_child")
    parser.add_argument("gguf", type=Path)
    parser.add_argument("kind", choices=sorted([SHIPPED, *KINDS_WRITTEN]))
    parser.add_argument("threads", type=int)
    parser.add_argument("n_ctx", type=int)
    parser.add_argument("cache_dir", type=Path)
    parser.add_argument("--no-extra-bufts", action="store_true")
    a = parser.parse_args(argv)
    path = weights(a.gguf, a.kind, a.cache_dir)
    runner = Runner(path, a.threads, a.n_ctx, not a.no_extra_bufts)
    print(json.dumps({"ready": True, "bytes": path.stat().st_size, "vocab": runner.vocab, "extra_bufts": not a.no_extra_bufts}), flush=True)
    while line := sys.stdin.readline(LINE_LIMIT):
        if not line.endswith("\n") and len(line) == LINE_LIMIT:  # too long: skip the rest of it
            while (more := sys.stdin.readline(LINE_LIMIT)) and not more.endswith("\n"):
                pass
            print(json.dumps({"error": f"request line longer than {LINE_LIMIT} characters"}), flush=True)
            continue
        print(json.dumps(answer(runner, line)), flush=True)


if __name__ == "__main__":
    main()
