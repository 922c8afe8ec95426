"""The benchmark run: :func:`run_bench` (fresh-process rows, in-process rows in alternation, the
decode floor, the int8 section, then the report) and the command line (:func:`build_parser`,
:func:`main`)."""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .accelerator import DEVICE_DTYPES, device_bench, print_device_report
from .int8 import int8_section
from .llama_cpp import llama_cpp_section
from .schemes import layout_and_batch, scheme_section
from .vision import vision_dtype_section
from .measure import (
    ROWS,
    SIDES,
    Metric,
    alternate,
    cli_checks,
    run_child,
    timed,
    decode_bytes_per_token,
    expected_rows,
    BandwidthProbe,
    measure_matmul_gflops,
    vision_flops_per_tile,
)
from .prompts import MANY_TILES, Prompt, agreement_prompts, make_prompts
from .report import make_console, machine_facts, print_report, write_json
from .sides import HFSide, VlmkitSide


def run_bench(
    source: str | os.PathLike,
    *,
    repeats: int = 3,
    quick: bool = False,
    int8: bool = False,
    threads: int | None = None,
    new_tokens: int = 32,
    json_path: str | os.PathLike | None = None,
    console: Any = None,
    subprocess_timeout: float = 1800.0,
    quantize: Sequence[str] = (),
    decode: bool = True,
    device: str | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Run the benchmark on ``source`` (a checkpoint folder or Hub repo id), print the tables on
    ``console`` (a rich Console; None prints to stdout) and return the results (also written
    to ``json_path``). ``quick`` skips the 17-tile rows; ``int8`` adds the int8 comparison;
    ``decode`` the decode-layout and batched-decode rows; each scheme of ``quantize``
    (:data:`vlmkit.quant_schemes.SCHEMES`) a table against vlmkit float32. A ``device`` other
    than the CPU or a ``dtype`` other than float32 runs :mod:`vlmkit.bench.accelerator` instead
    (no ``int8``, ``quantize`` or ``decode=False`` there)."""
    import torch

    from ..hub import resolve_source

    _check_options(repeats, new_tokens)
    quantize = _check_schemes(quantize)
    target = _check_target(device, dtype, int8=int8, quantize=quantize, decode=decode)
    _import_transformers()
    folder = resolve_source(source, weights=True)
    threads = int(threads or torch.get_num_threads())
    torch.set_num_threads(threads)
    console = console or make_console()
    say = (lambda msg: console.print(f"[dim]{msg}[/dim]")) if console is not None else (lambda msg: None)
    if target is not None:
        return _run_on_device(source, folder, target, repeats=repeats, quick=quick, threads=threads,
                              new_tokens=new_tokens, json_path=json_path, console=console, say=say)  # fmt: skip

    tile_counts = [0, 1] if quick else [0, 1, MANY_TILES]
    prompts = make_prompts(folder, tile_counts)
    keys, int8_keys = expected_rows(quick, int8)
    rows = {k: Metric(k, *ROWS[k]) for k in keys}
    sides = {"vlmkit": VlmkitSide(folder), "transformers": HFSide(folder)}
    info = _info(source, folder, prompts, threads=threads, repeats=repeats, quick=quick, new_tokens=new_tokens)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        say("fresh-process runs (import, load, peak RSS)...")
        _fresh_process_rows(rows, folder, tile_counts, threads, min(new_tokens, 8), subprocess_timeout)
        checks = cli_checks(subprocess_timeout, folder)
        probe = BandwidthProbe()  # sampled before each round of the text-prompt decode row
        _in_process_rows(rows, sides, prompts, repeats, new_tokens, say, probe)
        bandwidth = probe.median()
        result: dict[str, Any] = {
            "info": info,
            "rows": [rows[k].as_dict("vlmkit", "transformers") for k in keys],
            "floor": _floor(rows["decode_tps"], probe, decode_bytes_per_token(sides["vlmkit"].model.backbone)),
            "vision_floor": _vision_floor(rows["vision_1_ms"], sides["vlmkit"], prompts[1]),
            "checks": checks,
        }
        say("vision tower in bfloat16...")
        result["vision_dtype"] = vision_dtype_section(folder, sides, prompts[1], repeats)
        if int8:
            say("int8...")
            result["int8"] = int8_section(folder, sides["vlmkit"], prompts, int8_keys, repeats, new_tokens, bandwidth)
        _decode_sections(result, folder, sides["vlmkit"], prompts, repeats, new_tokens, bandwidth, decode, quantize, say)
        say("llama.cpp on the same weights, alternated with vlmkit (when llama-cpp-python is installed)...")
        result["llama_cpp"] = _llama_cpp(folder, sides["vlmkit"], prompts[0], threads, new_tokens, repeats, subprocess_timeout)
    sides.clear()
    print_report(result, console)
    if json_path is not None:
        write_json(result, json_path)
    return result


def _decode_sections(result: dict[str, Any], folder: Path, fp32: VlmkitSide, prompts: dict[int, Prompt], repeats: int,
                     new_tokens: int, bandwidth: float, decode: bool, schemes: tuple[str, ...], say) -> None:  # noqa: ANN001  # fmt: skip
    """The decode-layout / batched rows and the ``--quantize`` tables, into ``result``."""
    import torch

    from ..quant_schemes import cpu_flags

    result["cpu"] = cpu_flags()
    with torch.inference_mode():
        if decode:
            say("decode layout and batched decode...")
            result["decode"] = layout_and_batch(folder, fp32, prompts, repeats, new_tokens, bandwidth)
        for scheme in schemes:
            say(f"quantize {scheme}...")
            result.setdefault("schemes", []).append(scheme_section(folder, fp32, prompts, scheme, repeats, new_tokens, bandwidth))


def _llama_cpp(folder: Path, fp32: VlmkitSide, prompt: Prompt, threads: int, new_tokens: int, repeats: int,
               timeout: float) -> dict[str, Any]:  # fmt: skip
    """llama.cpp's rows (:mod:`vlmkit.bench.llama_cpp`), alternated with vlmkit's, and both sides'
    continuations of the agreement prompts; its GGUFs are cached beside the quantized weights."""
    import torch

    from ..quant_cache import cache_dir

    greedy = [ids[0].tolist() for ids in agreement_prompts(folder)]
    with torch.inference_mode():
        return llama_cpp_section(folder, fp32, prompt, threads, new_tokens, repeats, cache_dir() / "llama_cpp", timeout, greedy)


def _check_target(device: str | None, dtype: str, *, int8: bool, quantize: tuple[str, ...], decode: bool):
    """``(torch.device, torch.dtype)`` for a run off the CPU float32 default, else None; a
    :class:`~vlmkit.errors.VlmkitError` for an unknown dtype, a device this machine lacks, or a
    CPU-only option asked for with either."""
    from ..builder import resolve_device
    from ..errors import VlmkitError

    if dtype not in DEVICE_DTYPES:
        raise VlmkitError(f"--dtype {dtype!r} is not one the benchmark runs", hint=f"choose among {', '.join(DEVICE_DTYPES)}")
    dev = resolve_device(device)
    if dev.type == "cpu" and dtype == "float32":
        return None
    asked = [name for name, on in (("--int8", int8), ("--quantize", bool(quantize)), ("--no-decode", not decode)) if on]
    if asked:
        verb = "compares" if len(asked) == 1 else "compare"
        raise VlmkitError(f"{' and '.join(asked)} {verb} CPU float32 schemes and cannot run with --device {dev} --dtype {dtype}",
                          hint="run them in a separate bench without --device/--dtype")  # fmt: skip
    import torch

    return dev, getattr(torch, dtype)


def _run_on_device(source: str | os.PathLike, folder: Path, target: tuple[Any, Any], *, repeats: int, quick: bool,
                   threads: int, new_tokens: int, json_path: str | os.PathLike | None, console: Any, say) -> dict[str, Any]:  # noqa: ANN001  # fmt: skip
    """The :mod:`~vlmkit.bench.accelerator` run, its report and JSON file."""
    import torch
    import transformers

    device, dtype = target
    result = device_bench(folder, device=device, dtype=dtype, repeats=repeats, quick=quick, new_tokens=new_tokens, say=say)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    result["info"] = {
        "source": str(source), "folder": str(folder), "device": str(device), "device_name": name,
        "dtype": str(dtype).removeprefix("torch."), "threads": threads, "repeats": repeats, "quick": quick,
        "new_tokens": new_tokens, "torch": torch.__version__, "transformers": transformers.__version__,
        "machine": machine_facts(),
    }  # fmt: skip
    print_device_report(result, console)
    if json_path is not None:
        write_json(result, json_path)
    return result


def _check_schemes(schemes: Sequence[str]) -> tuple[str, ...]:
    """The ``--quantize`` schemes, each one of :data:`~vlmkit.quant_schemes.SCHEMES`."""
    from ..errors import VlmkitError
    from ..quant_schemes import SCHEMES

    schemes = (schemes,) if isinstance(schemes, str) else tuple(schemes)
    for scheme in schemes:
        if scheme not in SCHEMES:
            raise VlmkitError(f"--quantize {scheme!r} is not a scheme", hint=f"choose among {', '.join(SCHEMES)}")
    return schemes


def _check_options(repeats: int, new_tokens: int) -> None:
    """Raise a :class:`~vlmkit.errors.VlmkitError` for a ``repeats`` or ``new_tokens`` out of range."""
    from ..errors import VlmkitError

    if not isinstance(repeats, int) or repeats < 1:
        raise VlmkitError(f"repeats must be an integer >= 1; got {repeats!r}")
    if not isinstance(new_tokens, int) or new_tokens < 2:
        raise VlmkitError(f"new_tokens must be an integer >= 2 (decode speed needs two tokens); got {new_tokens!r}")


def _import_transformers():
    """transformers, quieted (errors only, no progress bars); a VlmkitError when it is not installed."""
    from ..errors import VlmkitError

    try:
        import transformers
    except ImportError:
        raise VlmkitError("the benchmark compares against transformers, which is not installed",
                          hint="pip install 'vlmkit[hf]'") from None  # fmt: skip
    transformers.logging.set_verbosity_error()
    if hasattr(transformers.utils.logging, "disable_progress_bar"):
        transformers.utils.logging.disable_progress_bar()
    return transformers


def _info(source: str | os.PathLike, folder: Path, prompts: dict[int, Prompt], *, threads: int, repeats: int,
          quick: bool, new_tokens: int) -> dict[str, Any]:  # fmt: skip
    """The ``info`` section of the result: the run's settings, versions, prompt lengths and machine."""
    import torch
    import transformers

    return {
        "source": str(source), "folder": str(folder), "threads": threads, "dtype": "float32", "repeats": repeats,
        "quick": quick, "new_tokens": new_tokens, "torch": torch.__version__, "transformers": transformers.__version__,
        "prompt_tokens": {p.name: p.length for p in prompts.values()}, "machine": machine_facts(),
    }  # fmt: skip


def _floor(decode: Metric, probe: BandwidthProbe, per_token: int) -> dict[str, Any]:
    """The ``floor`` section: the median bandwidth sampled in the decode rounds / bytes per token,
    and the share of it each side's median decode speed (row ``decode``) reaches."""
    bandwidth = probe.median()
    return {
        "bandwidth_gb_s": bandwidth,
        "bandwidth_samples": list(probe.samples),
        "bytes_per_token_mb": per_token / 1e6,
        "floor_tok_s": bandwidth * 1e9 / per_token,
        "vlmkit_fraction": decode.median("vlmkit") / (bandwidth * 1e9 / per_token),
        "transformers_fraction": decode.median("transformers") / (bandwidth * 1e9 / per_token),
    }


def _vision_floor(vision: Metric, side: VlmkitSide, prompt: Prompt) -> dict[str, Any]:
    """The ``vision_floor`` section: one tile's FLOPs / this CPU's measured float32 matmul speed,
    and the share of it each side's median vision encode (row ``vision``) reaches."""
    flops = vision_flops_per_tile(side.model, prompt.tensors["pixel_values"], prompt.tensors.get("pixel_attention_mask"))
    gflops = measure_matmul_gflops()
    floor_ms = flops / (gflops * 1e9) * 1e3
    return {
        "gflop_per_tile": flops / 1e9, "matmul_gflop_s": gflops, "floor_ms": floor_ms,
        "vlmkit_fraction": floor_ms / vision.median("vlmkit"),
        "transformers_fraction": floor_ms / vision.median("transformers"),
    }  # fmt: skip


# ============================================================================== rows
def _fresh_process_rows(rows: dict[str, Metric], folder: Path, tile_counts: list[int], threads: int, new_tokens: int,
                        timeout: float) -> None:  # fmt: skip
    """Import, import + load and peak RSS: one fresh subprocess per side and image prompt."""
    for tiles in [t for t in tile_counts if t]:
        key = "rss_1_mb" if tiles == 1 else "rss_17_mb"
        for side in SIDES:
            res = run_child(side, folder, tiles, threads, new_tokens, timeout)
            rows[key].add(side, res["maxrss_mb"])
            if tiles == 1:
                rows["import_s"].add(side, res["import_s"])
                rows["cold_load_s"].add(side, res["import_s"] + res["load_s"])


def _in_process_rows(rows: dict[str, Metric], sides: dict[str, Any], prompts: dict[int, Prompt], repeats: int,
                     new_tokens: int, say: Callable[[str], None], probe: BandwidthProbe) -> None:  # fmt: skip
    """Load, then (inference mode) vision encode, prefill, time to first token and decode, each
    side in alternation; ``probe`` samples the bandwidth before each text-prompt decode round."""
    import torch

    say("load...")
    alternate(rows["load_s"], {s: timed(sides[s].load) for s in SIDES}, repeats)
    with torch.inference_mode():
        say("vision encode...")
        _vision_rows(rows, sides, prompts, repeats)
        say("prefill...")
        _prefill_rows(rows, sides, prompts, repeats)
        say("time to first token...")
        _first_token_rows(rows, sides, prompts, repeats)
        say("decode (and the memory bandwidth before each round of the text-prompt row)...")
        for tiles, key in ((0, "decode_tps"), (1, "decode_1_tps")):
            p = prompts[tiles]
            alternate(rows[key], {s: (lambda s=s, p=p: sides[s].decode(p, new_tokens)) for s in SIDES}, repeats,
                      between=probe.sample if tiles == 0 else None)  # fmt: skip
            probe.release()


def _vision_rows(rows: dict[str, Metric], sides: dict[str, Any], prompts: dict[int, Prompt], repeats: int) -> None:
    """Vision encode per tile: 1 tile, and (unless quick) the many-tile prompt with no warm-up."""
    p1 = prompts[1]
    alternate(rows["vision_1_ms"], {s: timed(lambda s=s: sides[s].encode(p1), 1e3 / p1.tiles) for s in SIDES}, repeats)
    if "vision_17_ms" in rows:
        pm = prompts[MANY_TILES]
        alternate(rows["vision_17_ms"], {s: timed(lambda s=s: sides[s].encode(pm), 1e3 / pm.tiles) for s in SIDES},
                   repeats, warmup=0)  # fmt: skip


def _prefill_rows(rows: dict[str, Metric], sides: dict[str, Any], prompts: dict[int, Prompt], repeats: int) -> None:
    """Prefill of the language model alone; the label gets the prompt length."""
    for tiles, key in ((1, "prefill_1_ms"), (MANY_TILES, "prefill_17_ms")):
        if key in rows:
            p = prompts[tiles]
            rows[key].label += f" ({p.length} tok)"
            alternate(rows[key], {s: timed(lambda s=s, p=p: sides[s].prefill(p), 1e3) for s in SIDES}, repeats)


def _first_token_rows(rows: dict[str, Metric], sides: dict[str, Any], prompts: dict[int, Prompt], repeats: int) -> None:
    """Time to first token: text only, 1 tile, and the many-tile prompt (no warm-up)."""
    for tiles, key in ((0, "ttft_text_ms"), (1, "ttft_1_ms"), (MANY_TILES, "ttft_17_ms")):
        if key in rows:
            p = prompts[tiles]
            alternate(rows[key], {s: timed(lambda s=s, p=p: sides[s].first_token(p), 1e3) for s in SIDES},
                       repeats, warmup=0 if tiles == MANY_TILES else 1)  # fmt: skip


# ============================================================================== command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run_bench", description="vlmkit vs transformers on one checkpoint folder.")
    parser.add_argument("source", help="checkpoint folder (or Hub repo id)")
    parser.add_argument("--repeats", type=int, default=3, help="timed samples per side and row (default 3)")
    parser.add_argument("--quick", action="store_true", help="skip the 17-tile rows")
    parser.add_argument("--int8", action="store_true", help="also compare vlmkit --int8 (the fastest int8 scheme for this CPU) with vlmkit float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps per decode sample (default 32)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the results to this JSON file")
    parser.add_argument("--quantize", action="append", default=[], metavar="SCHEME",
                        help="also compare this scheme (auto, fp32, w8, w4, w8a8, int8) with vlmkit float32; repeatable")
    parser.add_argument("--no-decode", dest="decode", action="store_false", help="skip the decode-layout and batched rows")
    parser.add_argument("--device", default=None, help="run both sides on this device, e.g. cuda (default: the CPU)")
    parser.add_argument("--dtype", default="float32", choices=DEVICE_DTYPES, help="both sides' dtype (default float32)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vlmkit.bench`` / ``benchmarks/run_bench.py``: a
    :class:`~vlmkit.errors.VlmkitError` prints as ``error: ...`` and ``hint: ...`` on stderr (exit
    1), as ``vlmkit bench`` prints it."""
    import sys

    from ..errors import VlmkitError

    args = build_parser().parse_args(argv)
    try:
        run_bench(args.source, repeats=args.repeats, quick=args.quick, int8=args.int8, threads=args.threads,
                  new_tokens=args.new_tokens, json_path=args.json_path, quantize=args.quantize, decode=args.decode,
                  device=args.device, dtype=args.dtype)  # fmt: skip
    except VlmkitError as exc:
        print(f"error: {exc.message}" + (f"\nhint: {exc.hint}" if exc.hint else ""), file=sys.stderr)
        return 1
    return 0
