"""The llama.cpp comparison of ``vlmkit bench`` (:mod:`vlmkit.bench.llama_cpp`): its rows and the
not-installed path (llama-cpp-python is optional; the measurement itself runs in the bench)."""

from __future__ import annotations

import importlib.util
import io
import sys

import pytest
from rich.console import Console

from vlmkit.bench.llama_cpp import GOALS, KINDS, comparison_rows, llama_cpp_section, vlmkit_counterparts
from vlmkit.bench.report import print_llama_cpp


def _result(kinds: dict) -> dict:
    return {
        "rows": [{"key": "decode_tps", "vlmkit": 36.0}, {"key": "vision_1_ms", "vlmkit": 800.0}],
        "schemes": [
            {"scheme": "w8", "rows": [{"key": "decode_tps", "q": 20.0}]},
            {"scheme": "w8a8", "rows": [{"key": "decode_tps", "q": 60.0}]},
        ],
        "llama_cpp": {"version": "0.3.36", "gguf": "/x/SmolLM2-135M-Instruct.Q4_1.gguf", "prompt_len": 17,
                      "kinds": kinds},
    }


def test_counterparts_take_the_main_table_and_the_fastest_int8_scheme() -> None:
    assert vlmkit_counterparts(_result({})) == {"fp32": 36.0, "int8": 60.0, "w4": None}


def test_rows_set_each_kind_against_its_counterpart_with_the_issue_goals() -> None:
    kinds = {
        "F32": {"prefill_tok_s": 760.0, "decode_tok_s": 48.0, "extra_bufts": True},
        "Q8_0": {"prefill_tok_s": 630.0, "decode_tok_s": 90.0, "extra_bufts": False, "first_try": "signal 11"},
        "Q4_1": {"error": "exit status 1: boom"},
    }
    rows = {r["key"]: r for r in comparison_rows(_result(kinds))}
    assert set(rows) == {"decode_F32", "prefill_F32", "decode_Q8_0", "prefill_Q8_0"}  # Q4_1 failed: no row
    assert rows["decode_F32"]["ratio"] == pytest.approx(36.0 / 48.0)
    assert rows["decode_F32"]["goal"] is None and rows["decode_F32"]["met"] is None
    assert rows["decode_Q8_0"]["ratio"] == pytest.approx(60.0 / 90.0)
    assert rows["decode_Q8_0"]["goal"] == GOALS["Q8_0"] == 1.0 and rows["decode_Q8_0"]["met"] is False
    assert rows["prefill_Q8_0"]["llama.cpp"] == 630.0 and rows["prefill_Q8_0"]["ratio"] is None
    out = io.StringIO()
    print_llama_cpp(_result(kinds), Console(file=out, width=200))
    text = out.getvalue()
    assert "vlmkit int8 vs llama.cpp Q8_0" in text and "0.667" in text
    assert "prefill, llama.cpp F32 (17 tok)" in text
    assert "llama.cpp Q4_1: exit status 1: boom" in text  # a failed kind is said, not dropped
    assert "Q8_0: ran without extra buffer types after: signal 11" in text


def print_report_part(result: dict, out: io.StringIO) -> None:
    from vlmkit.bench import report

    report._print_llama_cpp(result, Console(file=out, width=200))


def test_not_installed_gives_no_figures(monkeypatch, tmp_path) -> None:  # noqa: ANN001
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    assert llama_cpp_section(2, 16, 4, 1, tmp_path, 60.0) == {"version": None}
    assert comparison_rows({"llama_cpp": {"version": None}}) == []
    assert not any(tmp_path.iterdir())  # nothing written


def test_every_kind_has_a_counterpart_and_a_goal_entry() -> None:
    assert set(KINDS) == set(GOALS) == {"F32", "Q8_0", "Q4_1"}
    assert set(KINDS.values()) == set(vlmkit_counterparts({}))


def _agreement_result() -> dict:
    a, b, c, d = [1, 2], [1, 3], [4, 4], [5, 6]
    return {
        "int8": {"accuracy": {"greedy_exact_match_rate": 0.5, "fp32_continuations": [a, b, c, d]}},
        "schemes": [
            {"scheme": "w8", "rows": [{"key": "decode_tps", "q": 100.0}], "accuracy": {"greedy_exact_match_rate": 0.75, "fp32_continuations": [a, b, c, d]}},
            {"scheme": "w4", "rows": [{"key": "decode_tps", "q": 120.0}], "accuracy": {"greedy_exact_match_rate": 0.25}},
        ],
        "llama_cpp": {"version": "0.3.36", "greedy_tokens": 2, "kinds": {
            "F32": {"decode_tok_s": 50.0, "prefill_tok_s": 500.0, "greedy": [a, b, c, [5, 7]]},  # 3 of 4 = vlmkit fp32
            "Q8_0": {"decode_tok_s": 90.0, "prefill_tok_s": 600.0, "greedy": [a, b, [4, 5], [9, 9]]},  # 2 of 4 = F32
            "Q4_1": {"error": "exit status 1: boom"},
        }},
    }  # fmt: skip


def test_agreement_rows_set_each_scheme_beside_llama_cpps_own_kind() -> None:
    from vlmkit.bench.llama_cpp import agreement_rows

    rows = {r["key"]: r for r in agreement_rows(_agreement_result())}
    assert set(rows) == {"agree_fp32", "agree_Q8_0"}  # Q4_1 failed: no continuations, no row
    assert rows["agree_fp32"]["llama.cpp"] == 0.75 and rows["agree_fp32"]["vlmkit"] is None
    assert rows["agree_Q8_0"]["vlmkit"] == 0.75  # the better of --int8 and --quantize w8
    assert rows["agree_Q8_0"]["llama.cpp"] == 0.5 and rows["agree_Q8_0"]["ratio"] == pytest.approx(1.5)
    assert "greedy 2 tokens = float32, vlmkit int8 vs llama.cpp Q8_0 (4 prompts)" == rows["agree_Q8_0"]["label"]
    out = io.StringIO()
    print_llama_cpp(_agreement_result(), Console(file=out, width=200))
    assert "llama.cpp F32 = vlmkit fp32" in out.getvalue()


def test_agreement_rows_need_llama_cpps_float32_continuations() -> None:
    from vlmkit.bench.llama_cpp import agreement_rows

    result = _agreement_result()
    del result["llama_cpp"]["kinds"]["F32"]["greedy"]
    assert agreement_rows(result) == []
    assert agreement_rows({}) == []


def test_the_child_refuses_a_prompts_file_that_is_not_token_ids(tmp_path) -> None:  # noqa: ANN001
    from vlmkit.bench.llama_cpp import _read_prompts  # noqa: PLC2701 -- the child's own reader

    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text("[[1, 2, 3], [4]]")
    bad.write_text('[[1, "2"]]')
    assert _read_prompts(good) == [[1, 2, 3], [4]]
    with pytest.raises(ValueError, match="token id lists"):
        _read_prompts(bad)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is optional and not installed")
def test_the_child_continues_prompts_greedily_with_real_llama_cpp(tmp_path) -> None:  # noqa: ANN001
    """With llama-cpp-python installed: the shipped Q4_1 GGUF continues two prompts, deterministically."""
    from vlmkit.recipes.smollm2 import gguf_path

    section = llama_cpp_section(2, 8, 4, 1, tmp_path, 300.0, greedy=[[1, 1000, 1001], [1, 2000]], greedy_tokens=3)
    q4 = section["kinds"]["Q4_1"]
    assert "error" not in q4, q4
    assert len(q4["greedy"]) == 2 and all(len(g) == 3 for g in q4["greedy"])
    again = llama_cpp_section(2, 8, 4, 1, tmp_path, 300.0, greedy=[[1, 1000, 1001], [1, 2000]], greedy_tokens=3)
    assert again["kinds"]["Q4_1"]["greedy"] == q4["greedy"] and section["gguf"] == str(gguf_path())
    assert not list(tmp_path.glob("greedy-prompts-*.json"))  # the prompts file is removed
