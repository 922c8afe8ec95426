"""Benchmark output: the machine description, the rich tables and summary lines printed at the end
of a run, and the JSON file."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any


def machine_facts() -> dict[str, Any]:
    import platform

    import torch

    from .. import native

    out = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "cpu": platform.processor() or None}
    out["native"] = native.status() if native.available() else f"off: {native.status()}"  # which build (ISA, flags)
    with contextlib.suppress(Exception):
        out["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                out["cpu"] = line.split(":", 1)[1].strip()
                break
    return out


def jsonable(value: Any) -> Any:
    return str(value)


def write_json(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``result`` to ``path`` as indented JSON (values JSON cannot hold become strings)."""
    Path(path).write_text(json.dumps(result, indent=2, default=jsonable) + "\n", encoding="utf-8")


def make_console():
    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else 132)


def fmt_value(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value == 0:
        return "0"
    mag = abs(value)
    return f"{value:,.0f}" if mag >= 100 else f"{value:.1f}" if mag >= 10 else f"{value:.2f}" if mag >= 1 else f"{value:.3f}"


def goal_text(row: dict[str, Any]) -> str:
    if row["goal"] is None:
        return ""
    return f"{'>=' if row['higher_is_better'] else '<='} {row['goal']:.2f}"


def met_text(met: bool | None) -> str:
    return "" if met is None else "[green]met[/green]" if met else "[red]not met[/red]"


def rows_table(title: str, a: str, b: str, ratio: str, rows: list[dict[str, Any]]):
    """A rich Table of result rows: label, unit, the medians of sides ``a`` and ``b``, their
    ratio (column ``ratio``), the goal and whether it is met."""
    from rich.table import Table

    table = Table(title=title)
    for col, kw in (("metric", {}), ("unit", {}), (a, {"justify": "right"}), (b, {"justify": "right"}),
                    (ratio, {"justify": "right"}), ("goal", {}), ("", {})):  # fmt: skip
        table.add_column(col, **kw)
    for row in rows:
        table.add_row(row["label"], row["unit"], fmt_value(row[a]), fmt_value(row[b]), fmt_value(row["ratio"]),
                      goal_text(row), met_text(row["met"]))  # fmt: skip
    return table


def _spread(samples: list[float] | None) -> str:
    """`` (median of N samples, LO-HI GB/s, beside the decode rounds)`` for several samples."""
    if not samples or len(samples) < 2:
        return ""
    return f" (median of {len(samples)} samples, {min(samples):.1f}-{max(samples):.1f}, taken beside the decode rounds)"


def _print_main(result: dict[str, Any], console: Any) -> None:
    """The vlmkit vs transformers table, the decode floor, the CLI checks and the prompt lengths."""
    info = result["info"]
    title = f"vlmkit vs transformers -- {info['folder']} (float32, {info['threads']} threads, medians of {info['repeats']})"
    console.print(rows_table(title, "vlmkit", "transformers", "ratio v/t", result["rows"]))
    fl, ck = result["floor"], result["checks"]
    console.print(
        f"decode floor: {fl['bandwidth_gb_s']:.1f} GB/s measured{_spread(fl.get('bandwidth_samples'))} / "
        f"{fmt_value(fl['bytes_per_token_mb'])} MB per token = "
        f"{fmt_value(fl['floor_tok_s'])} tok/s; vlmkit reaches {fl['vlmkit_fraction']:.0%} of it, transformers {fl['transformers_fraction']:.0%}",
        markup=False,
    )
    if "vision_floor" in result:
        vf = result["vision_floor"]
        console.print(
            f"vision floor: {fmt_value(vf['gflop_per_tile'])} GFLOP per tile / {fmt_value(vf['matmul_gflop_s'])} GFLOP/s "
            f"(float32 matmul, measured) = {fmt_value(vf['floor_ms'])} ms/tile; vlmkit reaches {vf['vlmkit_fraction']:.0%} "
            f"of it, transformers {vf['transformers_fraction']:.0%} (goal: vlmkit <= 0.70x transformers' time)",
            markup=False,
        )
    console.print(
        f"import vlmkit: {fmt_value(ck['import_vlmkit_s'])} s, imports transformers: {ck['import_vlmkit_imports_transformers']}, "
        f"torch: {ck['import_vlmkit_imports_torch']}; vlmkit --help: {fmt_value(ck['cli_help_s'])} s (goal < 0.5 s)",
        markup=False,
    )
    if "inspect_yaml_s" in ck:
        console.print(
            f"vlmkit inspect on a YAML: {fmt_value(ck['inspect_yaml_s'])} s; import torch alone: {fmt_value(ck['import_torch_s'])} s "
            "(goal: at most the torch import + 1 s)",
            markup=False,
        )
    console.print("prompt tokens: " + ", ".join(f"{k} {v}" for k, v in info["prompt_tokens"].items()), markup=False)


def _print_int8(q: dict[str, Any], console: Any) -> None:
    """The int8 vs float32 table and the int8 accuracy line."""
    title = f"vlmkit --int8 (applied: {q.get('scheme', 'w8a8')}) vs vlmkit float32"
    console.print(rows_table(title, "int8", "fp32", "ratio int8/fp32", q["rows"]))
    if "why" in q:
        console.print(f"--int8 chose {q['scheme']}: {q['why']}", markup=False)
    acc = q["accuracy"]
    console.print(
        "int8 accuracy: max |logit diff| at the next token "
        + ", ".join(f"{k} {v:.2f}" for k, v in acc["next_token_logit_diff_per_prompt"].items())
        + f", at any position {acc['max_logit_diff']:.2f}; visual tokens rel. error {acc['visual_tokens_rel_error']:.1%}; "
        f"over {acc['prompts']} prompts x "
        f"{acc['new_tokens']} greedy tokens: identical continuations {acc['greedy_exact_match_rate']:.0%}, "
        f"{_teacher_forced(acc)}; {fmt_value(q['bytes_per_token_mb'])} MB per token, floor {fmt_value(q['floor_tok_s'])} tok/s",
        markup=False,
    )


#: printed under the tables: what the goal and met columns mean
GOAL_NOTE = ("goal: the bound the ratio column must meet (>= for speeds, <= for times and memory), from the "
             "project's issues; met: whether this run's medians meet it (blank: no goal). Ratios come from "
             "alternating A/B runs in one process; on a busy machine read them with the load average shown.")


def _print_cpu(result: dict[str, Any], console: Any) -> None:
    import os

    cpu = result.get("cpu")
    if cpu is None:
        return
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "-"
    lcpp = (result.get("llama_cpp") or {}).get("version") or "not installed (pip install llama-cpp-python to compare on the same GGUF)"
    console.print(f"CPU: {result['info']['machine'].get('cpu')}; torch capability {cpu['capability']}; flags "
                  f"{' '.join(cpu['flags']) or '-'}; load average {load}; llama.cpp: {lcpp}; vlmkit native kernels: "
                  f"{result['info']['machine'].get('native', '?')}", markup=False)  # fmt: skip


def _print_decode(d: dict[str, Any], console: Any) -> None:
    """The decode-layout and batched-decode rows."""
    console.print(rows_table("vlmkit decode layout (per-shape, see chosen) vs row-major weights", "layout", "rows",
                              "ratio", [d["layout"]]))  # fmt: skip
    console.print(f"decode layout chosen per weight shape: {d['layout']['chosen']}; floor {fmt_value(d['floor_tok_s'])} tok/s: "
                  f"layout reaches {d['layout_fraction']:.0%}, row-major {d['rows_fraction']:.0%} (goal >= 85%)", markup=False)  # fmt: skip
    console.print(rows_table("batched decode (vlmkit float32)", "8 rows", "1 row", "ratio", [d["batch"]]))


def _print_scheme(q: dict[str, Any], console: Any) -> None:
    rep = q["report"]
    title = f"vlmkit --quantize {q['requested']} (applied: {q['scheme']}) vs vlmkit float32"
    console.print(rows_table(title, "q", "fp32", "ratio q/fp32", q["rows"]))
    acc = q["accuracy"]
    choice = rep.get("choice")
    extra = f"; {q['requested']}: {choice['why']} (timed {choice['timed']}, ms {choice['ms']})" if choice else ""
    console.print(
        f"{q['scheme']}: {rep.get('layers', 0)} layers in {rep['seconds']:.2f} s (cache {rep.get('cache', 'off')}), second run "
        f"{q['cache_second_run_s']:.2f} s (cache {q['cache_second_run']}); {fmt_value(q['bytes_per_token_mb'])} MB per token, "
        f"floor {fmt_value(q['floor_tok_s'])} tok/s; greedy {acc['new_tokens']}-token continuations identical to fp32 on "
        f"{acc['greedy_exact_match_rate']:.0%} of {acc['prompts']} prompts; {_teacher_forced(acc)}{extra}",
        markup=False,
    )


def _teacher_forced(acc: dict[str, Any]) -> str:
    """The teacher-forced decode-step figures of an accuracy block, in words."""
    diff = acc.get("decode_step_max_logit_diff")
    return (f"teacher-forced decode steps: top-1 agreement {acc['teacher_forced_top1_agreement']:.1%}"
            + ("" if diff is None else f", max |logit diff| {diff:.2f}"))  # fmt: skip


def print_llama_cpp(result: dict[str, Any], console: Any) -> None:
    """vlmkit against llama.cpp on the same GGUF weights (:mod:`vlmkit.bench.llama_cpp`)."""
    from .llama_cpp import agreement_rows, comparison_rows

    section = result.get("llama_cpp") or {}
    if section.get("version") is None:
        return
    rows = comparison_rows(result) + agreement_rows(result)
    if rows:
        title = f"vlmkit vs llama.cpp {section['version']} ({Path(section.get('gguf', '')).name} and its F32/Q8_0 rewrites)"
        console.print(rows_table(title, "vlmkit", "llama.cpp", "ratio v/l", rows))
    for kind, figures in (section.get("kinds") or {}).items():
        note = figures.get("error") or (None if figures.get("extra_bufts", True) else
                                        f"ran without extra buffer types after: {figures.get('first_try')}")  # fmt: skip
        if note:
            console.print(f"llama.cpp {kind}: {note}", markup=False)
    if section.get("error"):
        console.print(f"llama.cpp: {section['error']}", markup=False)


def _print_vision_dtype(section: dict[str, Any], console: Any) -> None:
    """The bfloat16 / int8 vision towers' rows (or why each was skipped)."""
    rows, lines = [], []
    for dtype, figures in section.items():
        if "skipped" in figures:
            lines.append(f"vision tower in {dtype}: skipped ({figures['skipped']})")
            continue
        label, vt, vf = figures["label"], figures["vs_transformers"], figures["vs_fp32"]
        rows.append({**vt, "label": f"vision encode, 1 tile: {label} tower / transformers fp32", "tower": vt[label]})
        lines.append(
            f"{label} tower / vlmkit fp32 tower: {fmt_value(vf['ratio'])} ({fmt_value(vf[label])} / {fmt_value(vf['vlmkit'])} ms); "
            f"visual tokens differ from fp32's by {figures['token_rel_err']:.2%} (relative norm); opt-in: "
            f"vlmkit.vision_dtype.set_vision_dtype(model, '{dtype}') / --vision-dtype {dtype}"
        )
    if rows:
        console.print(rows_table("vlmkit vision tower in bfloat16 / int8 (text model float32)", "tower", "transformers", "ratio", rows))
    for line in lines:
        console.print(line, markup=False)


def print_report(result: dict[str, Any], console: Any) -> None:
    """Print a run's results on ``console``: the main table and lines, then the int8 section if any."""
    _print_main(result, console)
    if "vision_dtype" in result:
        _print_vision_dtype(result["vision_dtype"], console)
    if "int8" in result:
        _print_int8(result["int8"], console)
    if "decode" in result:
        _print_decode(result["decode"], console)
    for q in result.get("schemes", []):
        _print_scheme(q, console)
    print_llama_cpp(result, console)
    _print_cpu(result, console)
    console.print(GOAL_NOTE, markup=False)
