"""The ``vlmkit`` command line. Heavy imports (torch, transformers) happen inside commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .cli_helpers import (
    Waiting,
    answer_batch,
    batch_prompts,
    chat_batch,
    check_flags,
    rich_console,
    image_line,
    load_model_and_processor,
    print_timings,
    read_images,
    read_line,
    write_stream,
)
from .cli_model import Int8, Quantize, VisionDtype, check_model_options, load_for_command

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Assemble, inspect and run small VLMs.")
_state = {"debug": False}


def _tidy_help() -> None:
    """typer 0.29 writes a required argument as ``{source}`` in the usage line and ``<bool>``
    beside every on/off flag; show ``SOURCE`` and nothing, as click does. (Skipped on typer
    versions without these hooks.)"""
    from typer import core

    def usage_name(self) -> str:  # noqa: ANN001
        name = (self.metavar or self.name or "").upper()
        return (name if self.required else f"[{name}]") + ("..." if self.nargs != 1 else "")

    def option_type(self, ctx) -> str | None:  # noqa: ANN001
        return None if self.is_flag else original(self, ctx)

    if hasattr(core.TyperArgument, "_usage_display_name") and hasattr(core.TyperOption, "display_type_rich"):
        original = core.TyperOption.display_type_rich
        core.TyperArgument._usage_display_name = usage_name
        core.TyperOption.display_type_rich = option_type


_tidy_help()


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        sys.stdout.write(f"vlmkit {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show informational log lines (e.g. how files that disagree were resolved)."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
) -> None:
    _state["debug"] = debug
    if verbose:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("vlmkit").setLevel(logging.INFO)


# The sampling flags `generate` and `chat` share (defined once; each command sets the default).
Sample = Annotated[bool, typer.Option("--sample", help="Sample instead of greedy decoding.")]
Temperature = Annotated[float, typer.Option("--temperature", help="Sampling temperature (> 0).")]
TopK = Annotated[Optional[int], typer.Option("--top-k", help="Sample from the k most likely tokens.")]
TopP = Annotated[Optional[float], typer.Option("--top-p", help="Sample from the smallest set with this probability.")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Make sampling reproducible.")]


@app.command()
def inspect(
    source: str = typer.Argument(..., help="A checkpoint folder, a Hub repo id, or a model YAML file."),
    weights: Optional[bool] = typer.Option(None, "--weights/--no-weights", help="Load weights (default: when the source has them)."),
    check: bool = typer.Option(False, "--check", help="Read every weight and refuse NaN/inf values, naming the tensors."),
) -> None:
    """Print the assembled model: slots, plugins, params, parameter counts and one image's shapes."""
    from .inspect import describe

    describe(source, load_weights=weights, console=rich_console(), check=check)


@app.command()
def plugins() -> None:
    """List every registered component and the package that provides it."""
    from rich.table import Table

    from .plugins import failures, get_registry, plugin_sources

    sources = plugin_sources()
    table = Table(title="vlmkit components")
    for col in ("slot", "name", "plugin", "distribution"):
        table.add_column(col, overflow="fold")  # wrap long module names instead of cutting them
    for entry in get_registry().entries():
        table.add_row(entry.slot, entry.name, entry.plugin, sources.get(entry.plugin, "?"))
    console = rich_console()
    console.print(table)
    from rich.markup import escape

    for fail in failures():
        console.print(f"[red]failed[/red] plugin {escape(repr(fail.name))} from {escape(fail.distribution)}: {escape(fail.error)}")


@app.command()
def schema(output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write to this file.")) -> None:
    """Print the JSON schema of model YAML files (every registered component)."""
    from .spec import json_schema

    text = json.dumps(json_schema(), indent=2)
    if output is None:
        sys.stdout.write(text + "\n")
    else:
        output.write_text(text + "\n", encoding="utf-8")


@app.command()
def generate(
    source: str = typer.Argument(..., help="A checkpoint folder, a Hub repo id, or a model YAML file."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="The user's message."),
    image: Optional[list[Path]] = typer.Option(None, "--image", "-i", help="An image file; repeat for several."),
    batch_file: Optional[Path] = typer.Option(None, "--batch", help='A JSONL file of prompts ({"prompt": ..., "images": [...], "id": ...} per line); answers go out as JSONL.'),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts decoded together with --batch."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="With --batch: write the answers here (default: stdout)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", help="Most tokens to generate."),
    sample: Sample = False,
    temperature: Temperature = 1.0,
    top_k: TopK = None,
    top_p: TopP = None,
    seed: Seed = None,
    split: Optional[bool] = typer.Option(None, "--split/--no-split", help="Image splitting (default: the checkpoint's)."),
    int8: Int8 = False,
    video: Optional[list[Path]] = typer.Option(None, "--video", help="A video file (checkpoints that take video); repeat for several."),
    fps: Optional[float] = typer.Option(None, "--fps", help="With --video: frames sampled per second of video (default: the checkpoint's)."),
    max_frames: Optional[int] = typer.Option(None, "--max-frames", help="With --video: the most frames per video (default: the checkpoint's)."),
    quantize: Quantize = None,
    vision_dtype: VisionDtype = None,
) -> None:
    """Answer PROMPT about the images (and videos): the checkpoint's chat template, streamed to stdout; timings to stderr."""
    from .cli_video import check_video_flags, video_batch
    from .generation import stream

    check_flags(max_new_tokens, sample, temperature, top_k, top_p, seed)  # fail before loading anything
    check_video_flags(video, fps, max_frames, batch_file is not None)
    options = check_model_options(quantize, int8, vision_dtype)
    gen = dict(max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    prompts = batch_prompts(prompt, image, batch_file, batch_size, output)
    err = rich_console(stderr=True)
    images = read_images(image or [])
    model, processor = load_for_command(err, source, options)
    if prompts is not None:
        answer_batch(err, model, processor, prompts, output, batch_size, gen)
        return
    kwargs = {} if split is None else {"do_image_splitting": split}
    for k, (path, img) in enumerate(zip(image or [], images), start=1):
        err.print(f"image {k} " + image_line(processor, path, img, kwargs), markup=False)
    if video:
        batch = video_batch(err, model, processor, prompt, images, video, fps, max_frames, max_new_tokens, kwargs)
    else:
        batch = chat_batch(processor, prompt, images, kwargs)
    chunks = stream(
        model, batch["input_ids"], processor=processor, attention_mask=batch.get("attention_mask"),
        pixel_values=batch.get("pixel_values"), pixel_attention_mask=batch.get("pixel_attention_mask"), **gen,
    )  # fmt: skip
    tiles = batch["pixel_values"].shape[1] if "pixel_values" in batch else 0
    waiting = Waiting(err, f"reading the prompt ({batch['input_ids'].shape[1]} tokens" + (f", {tiles} image tiles" if tiles else "") + ") ...")
    write_stream(chunks, waiting.start())
    print_timings(err, model)


@app.command()
def chat(
    source: str = typer.Argument(..., help="A checkpoint folder, a Hub repo id, or a model YAML file."),
    image: Optional[list[Path]] = typer.Option(None, "--image", "-i", help="An image for the first message; repeat for several."),
    system: Optional[str] = typer.Option(None, "--system", help="A system message for the whole conversation."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", help="Most tokens per answer."),
    sample: Sample = False,
    temperature: Temperature = 1.0,
    top_k: TopK = None,
    top_p: TopP = None,
    seed: Seed = None,
    int8: Int8 = False,
    quantize: Quantize = None,
    vision_dtype: VisionDtype = None,
) -> None:
    """Chat with SOURCE in the terminal: history kept, /image PATH attaches images, the conversation's KV cache is reused each turn; /reset, /quit; Ctrl-C stops an answer."""
    from .chat import ChatSession
    from .repl import run_repl

    check_flags(max_new_tokens, sample, temperature, top_k, top_p, seed)
    options = check_model_options(quantize, int8, vision_dtype)
    err = rich_console(stderr=True)
    images = read_images(image or [])
    model, processor = load_for_command(err, source, options)
    session = ChatSession(model, processor, system=system, max_new_tokens=max_new_tokens, do_sample=sample,
                          temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)  # fmt: skip

    def write(chunk: str) -> None:
        sys.stdout.write(chunk)
        sys.stdout.flush()

    run_repl(session, images=images, read=read_line, write=write, note=lambda line: err.print(line, markup=False),
             open_images=read_images, describe_image=lambda path, img: "attached " + image_line(processor, path, img, {}),
             waiting=lambda: Waiting(err, "thinking ..."))  # fmt: skip


def _serve_default(name: str):
    """A ``vlmkit serve`` option's default: :class:`vlmkit.serve.ServeOptions` holds them (one place)."""
    from .serve.options import ServeOptions

    return ServeOptions.model_fields[name].default


@app.command()
def serve(
    source: str = typer.Argument(..., help="A checkpoint folder, a Hub repo id, or a model YAML file."),
    host: str = typer.Option(_serve_default("host"), "--host", help="Interface to bind (0.0.0.0: every interface)."),
    port: int = typer.Option(_serve_default("port"), "--port", help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY' on /v1/*."),
    max_batch: int = typer.Option(_serve_default("max_batch"), "--max-batch", help="Most requests decoded together."),
    max_queue: int = typer.Option(_serve_default("max_queue"), "--max-queue", help="Most requests waiting for a slot; more get 429."),
    int8: Int8 = False,
    quantize: Quantize = None,
    vision_dtype: VisionDtype = None,
    allow_remote_images: bool = typer.Option(False, "--allow-remote-images", help="Fetch http(s) image URLs."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Allow file:// image URLs under this folder."),
    request_timeout: float = typer.Option(_serve_default("request_timeout"), "--request-timeout", help="Seconds from arrival to the last token."),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="Images per request (default: what fits the context)."),
    max_image_bytes: int = typer.Option(_serve_default("max_image_bytes"), "--max-image-bytes", help="Encoded bytes per image."),
    max_image_pixels: int = typer.Option(_serve_default("max_image_pixels"), "--max-image-pixels", help="Decoded pixels per image."),
    max_body_bytes: int = typer.Option(_serve_default("max_body_bytes"), "--max-body-bytes", help="Request body size, images included."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="The model id clients send (default: SOURCE)."),
) -> None:
    """Serve SOURCE with OpenAI's chat-completions API (streaming, images, continuous batching); see docs/serving.md."""
    _need_modules("vlmkit serve", "fastapi", "uvicorn", "prometheus_client", extra="serve")
    from .serve import check_options
    from .serve.server import run

    options = check_options(  # every option (and the model's, below) checked before the model loads
        host=host, port=port, api_key=api_key, max_batch=max_batch, max_queue=max_queue, request_timeout=request_timeout,
        allow_remote_images=allow_remote_images, image_root=image_root, max_images=max_images,
        max_image_bytes=max_image_bytes, max_image_pixels=max_image_pixels, max_body_bytes=max_body_bytes, model_name=model_name,
    )  # fmt: skip
    model_options = check_model_options(quantize, int8, vision_dtype)
    model, processor = load_for_command(rich_console(stderr=True), source, model_options)
    run(model, processor, options, model_name=options.model_name or source)


@app.command()
def export(
    source: str = typer.Argument(..., help="A checkpoint folder, a Hub repo id, or a model YAML file."),
    out: Path = typer.Argument(..., help="A new folder for the Hugging Face checkpoint."),
    check: bool = typer.Option(False, "--check", help="Load OUT with transformers and compare logits with vlmkit's."),
) -> None:
    """Write SOURCE as a Hugging Face folder (weights, config, processor, tokenizer, chat template) for vLLM / TGI."""
    from .serve.export import check_export, export_folder

    if check:
        _need_modules("vlmkit export --check", "transformers", extra="hf")
    model, processor = load_model_and_processor(source)
    folder = export_folder(model, source, out)
    console = rich_console()
    console.print(f"wrote {folder}: " + ", ".join(sorted(p.name for p in folder.iterdir())), markup=False)
    if check:
        diff = check_export(model, processor, folder)
        console.print(f"transformers AutoModelForImageTextToText logits vs vlmkit: max |diff| {diff:.2e}", markup=False)


def _need_modules(what: str, *modules: str, extra: str) -> None:
    """A :class:`~vlmkit.errors.VlmkitError` naming the missing packages and the extra to install."""
    import importlib.util

    from .errors import VlmkitError

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise VlmkitError(f"{what} needs {', '.join(missing)}, which are not installed",
                          hint=f"pip install 'vlmkit[{extra}]'")  # fmt: skip


@app.command()
def bench(
    source: str = typer.Argument(..., help="A checkpoint folder (or Hub repo id) both libraries can load."),
    repeats: int = typer.Option(3, "--repeats", help="Timed samples per side and row (medians are shown)."),
    quick: bool = typer.Option(False, "--quick", help="Skip the 17-tile rows."),
    int8: bool = typer.Option(False, "--int8", help="Also compare vlmkit --int8 (the fastest int8 scheme for this CPU: w8a8 or w8) with vlmkit float32."),
    quantize: Optional[list[str]] = typer.Option(None, "--quantize", help="Also compare this scheme (auto, fp32, w8, w4, w8a8, int8) with vlmkit float32; repeatable."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads for both sides (default: torch's)."),
    new_tokens: int = typer.Option(32, "--new-tokens", help="Decode steps per decode sample."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this JSON file."),
    device: Optional[str] = typer.Option(None, "--device", help="Run both sides on this device, e.g. cuda (default: the CPU)."),
    dtype: str = typer.Option("float32", "--dtype", help="Both sides' dtype: float32 (default), bfloat16 or float16."),
) -> None:
    """Benchmark vlmkit against transformers on SOURCE (float32, CPU; or --device/--dtype): load, vision, prefill, time to first token, decode, memory."""
    from .bench import run_bench

    run_bench(source, repeats=repeats, quick=quick, int8=int8, threads=threads, new_tokens=new_tokens, json_path=json_out,
              quantize=quantize or (), device=device, dtype=dtype)  # fmt: skip


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="A training recipe YAML (docs/training.md; `vlmkit.train.json_schema()`)."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Run folder (default: the recipe's output_dir)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's latest checkpoint."),
    save_adapter: Optional[bool] = typer.Option(None, "--save-adapter/--merge-adapter", help="Keep LoRA adapters separate (default: merged)."),
) -> None:
    """Train a model from RECIPE: stages of frozen/trained slots and LoRA; one process, or many under `accelerate launch`."""
    from .train.cli import train_command

    train_command(recipe, output_dir, resume, save_adapter)


def main(argv: list[str] | None = None) -> int:
    """Entry point. A :class:`~vlmkit.errors.VlmkitError` prints as ``error: ...`` plus ``hint: ...``
    (exit 1); any other exception is a bug: ``internal error: ...`` (exit 2). ``--debug`` (anywhere
    before ``--``) adds the traceback."""
    from .errors import VlmkitError

    args = list(sys.argv[1:] if argv is None else argv)
    _state["debug"] = _wants_debug(args)
    if _state["debug"]:  # accept `vlmkit inspect X --debug` too: the option belongs to the root
        args = ["--debug", *[a for i, a in enumerate(args) if a != "--debug" or _after_separator(args, i)]]
    try:
        app(args=args, standalone_mode=False)
    except VlmkitError as exc:
        _report(exc, "error", exc.message, exc.hint)
        return 1
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        rich_console(stderr=True).print("aborted", markup=False)
        return 130
    except BrokenPipeError:  # `vlmkit schema | head`
        return 0
    except MemoryError:  # not a bug: the input asked for more memory than this machine (or its limits) gives
        _report(MemoryError(), "error", "out of memory", "use a smaller input or model; docs/limits.md lists vlmkit's bounds")
        return 1
    except Exception as exc:
        if isinstance(exc, _usage_errors()):
            exc.show()
            return exc.exit_code
        _report(exc, "internal error", f"{type(exc).__name__}: {exc}",
                "this is a bug in vlmkit or a plugin; please report it with the output of `vlmkit --debug ...`")  # fmt: skip
        return 2
    return 0


def _after_separator(args: list[str], index: int) -> bool:
    return "--" in args[:index]


def _wants_debug(args: list[str]) -> bool:
    return any(a == "--debug" and not _after_separator(args, i) for i, a in enumerate(args))


def _usage_errors() -> tuple[type, ...]:
    """Click's exception base, as vendored by typer (>= 0.2x) and/or from click itself."""
    import importlib

    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(importlib.import_module(module).ClickException)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _report(exc: BaseException, label: str, message: str, hint: str | None) -> None:
    """Print one ``label: message`` line (continuation lines indented) and the hint to stderr."""
    import traceback

    from rich.markup import escape

    err = rich_console(stderr=True)
    if _state["debug"]:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    first, *rest = str(message).splitlines() or [""]
    err.print(f"[bold red]{label}:[/bold red] {escape(first)}")
    for line in rest:  # keep each line's own indentation: a YAML error's caret points at its column
        err.print(f"  {escape(line.rstrip())}" if line.strip() else "")
    if hint:
        err.print(f"[yellow]hint:[/yellow] {escape(hint)}")
    if not _state["debug"]:
        err.print("(run with --debug for the traceback)", markup=False)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
