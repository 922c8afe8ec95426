"""Smoke test of the bench's decode section and ``--quantize`` tables (not timed): a tiny random
checkpoint, --quick, 1 repeat; every figure present and positive, the cache hit on the second run."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("transformers")

from vlmkit.bench import run_bench  # noqa: E402

from ..parity.tiny_hf import SHAPES, make_checkpoint  # noqa: E402


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_bench_reports_layout_batch_and_schemes(tmp_path, monkeypatch):
    from rich.console import Console

    monkeypatch.setenv("VLMKIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny"
    make_checkpoint(SHAPES[0], folder)
    out = tmp_path / "bench.json"
    console = Console(record=True, width=220)
    run_bench(folder, repeats=1, quick=True, new_tokens=4, threads=1, json_path=out, console=console, quantize=["w8", "auto"])
    result = json.loads(out.read_text())
    d = result["decode"]
    assert _positive(d["layout"]["layout"]) and _positive(d["layout"]["rows"]) and d["layout"]["chosen"]
    assert _positive(d["batch"]["8 rows"]) and _positive(d["batch"]["1 row"]) and _positive(d["floor_tok_s"])
    w8, auto = result["schemes"]
    assert w8["scheme"] == "w8" and w8["report"]["cache"] == "written" and w8["cache_second_run"] == "hit"
    assert auto["requested"] == "auto" and auto["scheme"] in ("fp32", "w8", "w4")
    for row in w8["rows"] + auto["rows"]:
        assert _positive(row["q"]) and _positive(row["fp32"]), row
    assert w8["bytes_per_token_mb"] < result["floor"]["bytes_per_token_mb"]
    assert 0 <= w8["accuracy"]["greedy_exact_match_rate"] <= 1
    assert result["cpu"]["capability"]
    text = console.export_text()
    assert "batched decode" in text and "--quantize w8" in text and "goal: the bound" in text and "llama.cpp:" in text


def test_bench_rejects_a_bad_scheme_before_loading(tmp_path):
    from vlmkit.errors import VlmkitError

    with pytest.raises(VlmkitError, match="int3"):
        run_bench(tmp_path / "missing", quantize=["int3"])
