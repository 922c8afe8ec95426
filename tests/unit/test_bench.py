"""Smoke test of the benchmark (not a timed test): a tiny random checkpoint, --quick, 1 repeat."""

from __future__ import annotations

import json
import math
import statistics

import pytest

pytest.importorskip("transformers")

from vlmkit.bench import expected_rows, run_bench  # noqa: E402
from vlmkit.scheme_choice import has_int8_dot  # noqa: E402
from vlmkit.vision_dtype import has_bf16_units  # noqa: E402

from ..parity.tiny_hf import SHAPES, make_checkpoint  # noqa: E402


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_bench_quick_int8_reports_every_row(tmp_path):
    from rich.console import Console

    folder = tmp_path / "tiny"
    make_checkpoint(SHAPES[0], folder)
    out = tmp_path / "bench.json"
    console = Console(record=True, width=200)
    run_bench(folder, repeats=1, quick=True, int8=True, new_tokens=4, threads=1, json_path=out, console=console)

    result = json.loads(out.read_text())
    main_keys, int8_keys = expected_rows(quick=True, int8=True)
    assert [r["key"] for r in result["rows"]] == main_keys
    for row in result["rows"]:
        assert _positive(row["vlmkit"]) and _positive(row["transformers"]) and _positive(row["ratio"]), row
    assert [r["key"] for r in result["int8"]["rows"]] == int8_keys
    for row in result["int8"]["rows"]:
        assert _positive(row["int8"]), row
    for key in ("bandwidth_gb_s", "bytes_per_token_mb", "floor_tok_s"):
        assert _positive(result["floor"][key])
    samples = result["floor"]["bandwidth_samples"]  # one before each round of the text-prompt decode row
    assert len(samples) == result["info"]["repeats"] and all(_positive(v) for v in samples)
    assert result["floor"]["bandwidth_gb_s"] == statistics.median(samples)
    for key in ("gflop_per_tile", "matmul_gflop_s", "floor_ms", "vlmkit_fraction", "transformers_fraction"):
        assert _positive(result["vision_floor"][key])
    assert result["checks"]["import_vlmkit_imports_transformers"] is False
    assert _positive(result["checks"]["cli_help_s"])
    assert _positive(result["checks"]["inspect_yaml_s"]) and _positive(result["checks"]["import_torch_s"])
    acc = result["int8"]["accuracy"]
    assert 0 <= acc["greedy_exact_match_rate"] <= 1 and 0 <= acc["teacher_forced_top1_agreement"] <= 1
    assert math.isfinite(acc["max_logit_diff"])
    # --int8 is w8a8 where this CPU has int8 dot products and its prompts are not slower, else w8
    assert result["int8"]["scheme"] in ("w8a8", "w8") and result["int8"]["why"]
    if result["int8"]["scheme"] == "w8a8":
        assert 0 < acc["visual_tokens_rel_error"] < 0.2  # int8 moves the visual tokens, a little
    else:
        assert acc["visual_tokens_rel_error"] == 0  # weight-only: the vision tower stays float32
        assert acc["max_logit_diff"] < 1e-4  # ... and so do prompts (float32; summation order aside)
    # the teacher-forced figures run decode steps, where even a weight-only scheme's int8 copy acts
    assert 0 < acc["decode_step_max_logit_diff"] < 5
    assert set(acc["next_token_logit_diff_per_prompt"]) == set(acc["max_logit_diff_per_prompt"])
    assert all(acc["next_token_logit_diff_per_prompt"][k] <= v for k, v in acc["max_logit_diff_per_prompt"].items())

    vd = result["vision_dtype"]  # bfloat16 / int8 vision towers where this CPU has the units for them
    for dtype, label, present, missing in (("bfloat16", "bf16", has_bf16_units(), "none of avx512_bf16"),
                                           ("int8", "int8", has_int8_dot(), "none of avx512_vnni")):  # fmt: skip
        if present:
            assert _positive(vd[dtype]["vs_transformers"][label]) and _positive(vd[dtype]["vs_fp32"]["vlmkit"])
            assert vd[dtype]["vs_transformers"]["goal"] == 0.7 and 0 < vd[dtype]["token_rel_err"] < 0.1
            assert vd[dtype]["report"]["dtype"] == dtype
        else:
            assert missing in vd[dtype]["skipped"]

    text = console.export_text()
    assert "vision tower in bfloat16" in text
    for row in result["rows"] + result["int8"]["rows"]:
        assert row["label"] in text
    assert "decode floor" in text and "int8 accuracy" in text and "vision floor" in text
    native_line = result["info"]["machine"]["native"]  # which kernel build ran: its ISA and flags, or why none
    assert native_line.startswith(("gemv-", "off: ")) and "vlmkit native kernels" in text
    assert f"--int8 chose {result['int8']['scheme']}" in text


def test_vision_flops_per_tile_counts_every_matmul_of_the_tower_and_connector():
    """The vision floor's FLOPs, against the count by hand for a tiny navit + idefics3 connector."""
    import torch

    import vlmkit
    from vlmkit.bench.measure import vision_flops_per_tile

    D, I, L, S, p, s, Dt = 32, 64, 2, 32, 8, 2, 48  # width, MLP, layers, image size, patch, scale, text width
    spec = {
        "vision_tower": {"name": "navit", "hidden_size": D, "intermediate_size": I, "num_hidden_layers": L,
                         "num_attention_heads": 4, "image_size": S, "patch_size": p},
        "connector": {"name": "idefics3", "scale_factor": s},
        "packer": {"name": "image_packer", "image_token_id": 90},
        "backbone": {"name": "llama", "vocab_size": 96, "hidden_size": Dt, "intermediate_size": 64,
                     "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2},
    }  # fmt: skip
    model = vlmkit.build(spec, load_weights=False).eval()
    P = (S // p) ** 2  # patches per tile
    patch_embed = 2 * P * D * 3 * p * p
    per_layer = 2 * P * D * (4 * D) + 2 * P * D * I * 2 + 2 * (2 * P * P * D)  # q,k,v,o; fc1, fc2; QK^T and AV
    connector = 2 * (P // s**2) * (D * s**2) * Dt
    want = patch_embed + L * per_layer + connector
    got = vision_flops_per_tile(model, torch.rand(1, 3, 3, S, S))  # 3 tiles: the count is per tile
    assert got == want


def test_bench_cli_rejects_bad_options(tmp_path):
    from vlmkit.cli import main

    assert main(["bench", str(tmp_path), "--repeats", "0"]) == 1


def test_bandwidth_probe_samples_beside_alternated_rounds():
    from vlmkit.bench.measure import BandwidthProbe, Metric, alternate

    probe, order = BandwidthProbe(1 << 20), []
    metric = Metric("m", "m", "s")
    alternate(metric, {"a": lambda: order.append("a") or 1.0, "b": lambda: order.append("b") or 2.0}, 3,
              between=lambda: order.append("bw") or probe.sample(1))  # fmt: skip
    assert order == ["a", "b"] + ["bw", "a", "b"] * 3  # the warm-up round has no sample
    assert len(probe.samples) == 3 and all(_positive(v) for v in probe.samples) and probe.buffer is not None
    probe.release()
    assert probe.buffer is None and probe.median() == statistics.median(probe.samples)
    fresh = BandwidthProbe(1 << 20)
    assert _positive(fresh.median()) and len(fresh.samples) == 1 and fresh.buffer is None  # sampled on demand, then freed


def test_bench_on_another_dtype_runs_the_device_rows(tmp_path):
    """``--device``/``--dtype`` other than CPU float32 (here bfloat16 on the CPU: the path a GPU run
    takes, without one): both sides in that dtype, every row, the floors and the logit agreement."""
    from rich.console import Console

    from vlmkit.bench.accelerator import DEVICE_ROWS, device_rows

    folder = tmp_path / "tiny"
    make_checkpoint(SHAPES[0], folder)
    out = tmp_path / "bench.json"
    console = Console(record=True, width=200)
    run_bench(folder, repeats=1, quick=True, new_tokens=4, threads=1, json_path=out, console=console,
              device="cpu", dtype="bfloat16")  # fmt: skip

    result = json.loads(out.read_text())
    assert result["info"]["dtype"] == "bfloat16" and result["info"]["device"] == "cpu"
    keys = device_rows(quick=True, device_type="cpu")
    assert [r["key"] for r in result["rows"]] == keys
    assert "vision_17_ms" not in keys and "memory_1_mb" not in keys  # quick; device memory is read on CUDA only
    assert {"memory_1_mb", "memory_17_mb"} <= set(device_rows(quick=False, device_type="cuda")) <= set(DEVICE_ROWS)
    for row in result["rows"]:
        assert _positive(row["vlmkit"]) and _positive(row["transformers"]) and _positive(row["ratio"]), row
    for section, names in (("floor", ("bandwidth_gb_s", "bytes_per_token_mb", "floor_tok_s")),
                           ("vision_floor", ("gflop_per_tile", "matmul_gflop_s", "floor_ms"))):  # fmt: skip
        assert all(_positive(result[section][k]) for k in names), result[section]
    assert result["floor"]["bytes_per_token_mb"] * 2 < _float32_bytes_per_token(folder) / 1e6 * 1.01  # bf16 halves it
    ag = result["agreement"]
    assert ag["positions"] > 1 and 0.9 <= ag["top1_agreement"] <= 1 and ag["max_abs_diff"] <= 0.05 * ag["max_abs_logit"]
    assert all(_positive(v) for v in result["batch_scaling"].values())
    text = console.export_text()
    assert "decode floor" in text and "vision floor" in text and "logits, 1-tile prompt" in text and "8 rows / 1 row" in text
    assert all(row["label"] in text for row in result["rows"])


def _float32_bytes_per_token(folder) -> int:
    import vlmkit
    from vlmkit.bench import decode_bytes_per_token

    return decode_bytes_per_token(vlmkit.build_from_hf(folder, dtype="float32").backbone)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dtype", "int8"], "--dtype 'int8' is not one the benchmark runs"),
        (["--dtype", "bfloat16", "--int8"], "--int8 compares CPU float32 schemes"),
        (["--dtype", "float16", "--quantize", "w8"], "--quantize compares CPU float32 schemes"),
        (["--device", "tpu9"], "tpu9"),
    ],
)
def test_bench_device_options_are_checked_before_loading(tmp_path, capsys, args, message):
    from vlmkit.cli import main

    assert main(["bench", str(tmp_path / "absent"), *args]) == 1  # the folder is never looked at
    assert message in capsys.readouterr().err


def test_the_module_entry_point_reports_errors_as_the_cli_does(tmp_path, capsys):
    from vlmkit.bench import main

    assert main([str(tmp_path / "absent"), "--device", "cuda:99", "--dtype", "bfloat16"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "cuda:99" in err and "hint: " in err and "Traceback" not in err
