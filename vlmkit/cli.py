"""The ``vlmkit`` command line. Heavy imports (torch, transformers) happen inside commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

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


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


class _Waiting:
    """A rich spinner on stderr while nothing else shows progress (only on a terminal): use as a
    context manager, or ``start()``/``stop()`` (stop is idempotent, e.g. at the first token)."""

    def __init__(self, err, text: str) -> None:  # noqa: ANN001
        self.status = err.status(text) if err.is_terminal else None
        self.running = False

    def start(self) -> _Waiting:
        if self.status is not None and not self.running:
            self.status.start()
            self.running = True
        return self

    def stop(self) -> None:
        if self.running:
            self.status.stop()
            self.running = False

    def __enter__(self) -> _Waiting:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# The sampling flags `generate` and `chat` share (defined once; each command sets the default).
Sample = Annotated[bool, typer.Option("--sample", help="Sample instead of greedy decoding.")]
Temperature = Annotated[float, typer.Option("--temperature", help="Sampling temperature (> 0).")]
TopK = Annotated[Optional[int], typer.Option("--top-k", help="Sample from the k most likely tokens.")]
TopP = Annotated[Optional[float], typer.Option("--top-p", help="Sample from the smallest set with this probability.")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Make sampling reproducible.")]


def _is_yaml(source: str) -> bool:
    return source.endswith((".yaml", ".yml"))


@app.command()
def inspect(
    source: str = typer.Argument(..., help="A checkpoint folder, a Hub repo id, or a model YAML file."),
    weights: Optional[bool] = typer.Option(None, "--weights/--no-weights", help="Load weights (default: when the source has them)."),
) -> None:
    """Print the assembled model: slots, plugins, params, parameter counts and one image's shapes."""
    from .inspect import describe

    describe(source, load_weights=weights, console=_console())


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
    console = _console()
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
    int8: bool = typer.Option(False, "--int8", help="Quantize the text model and vision tower to int8 (CPU, approximate; see docs/speed.md)."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="CPU speed scheme: auto, fp32, w8, w4 or w8a8 (= --int8); see docs/speed.md."),
) -> None:
    """Answer PROMPT about the images: the checkpoint's chat template, streamed to stdout; timings to stderr."""
    from .generation import stream

    _check_flags(max_new_tokens, sample, temperature, top_k, top_p, seed)  # fail before loading anything
    quantize = _check_quantize(quantize, int8)
    gen = dict(max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    prompts = _batch_prompts(prompt, image, batch_file, batch_size, output)
    err = _console(stderr=True)
    images = _read_images(image or [])
    with _Waiting(err, f"loading {source} ..."):
        model, processor = _load_model_and_processor(source)
    if int8:
        with _Waiting(err, "quantizing to int8 ..."):
            _quantize(err, model)
    elif quantize is not None:
        with _Waiting(err, f"quantizing ({quantize}) ..."):
            _quantize_scheme(err, model, quantize, source)
    if prompts is not None:
        _run_batch(err, model, processor, prompts, output, batch_size, gen)
        return
    kwargs = {} if split is None else {"do_image_splitting": split}
    for k, (path, img) in enumerate(zip(image or [], images), start=1):
        err.print(f"image {k} " + _image_line(processor, path, img, kwargs), markup=False)
    batch = _chat_batch(processor, prompt, images, kwargs)
    chunks = stream(
        model, batch["input_ids"], processor=processor, attention_mask=batch.get("attention_mask"),
        pixel_values=batch.get("pixel_values"), pixel_attention_mask=batch.get("pixel_attention_mask"), **gen,
    )  # fmt: skip
    tiles = batch["pixel_values"].shape[1] if "pixel_values" in batch else 0
    waiting = _Waiting(err, f"reading the prompt ({batch['input_ids'].shape[1]} tokens" + (f", {tiles} image tiles" if tiles else "") + ") ...")
    _write_stream(chunks, waiting.start())
    _print_timings(err, model)


#: generate()'s argument names as the CLI spells them, for its error messages.
_FLAG_NAMES = (("use do_sample=False", "drop --sample"), ("do_sample", "--sample"), ("max_new_tokens=", "--max-new-tokens "),
               ("max_new_tokens", "--max-new-tokens"),
               ("temperature", "--temperature"), ("top_k", "--top-k"), ("top_p", "--top-p"), ("seed", "--seed"))  # fmt: skip


def _check_flags(*values) -> None:  # noqa: ANN002
    """:func:`vlmkit.generation.check_options` with its messages in flag names (``--temperature``,
    ``--sample``), so the hint is something to type."""
    from .errors import GenerationError
    from .generation import check_options

    try:
        check_options(*values)
    except GenerationError as exc:
        message, hint = exc.message, exc.hint
        for name, flag in _FLAG_NAMES:
            message = message.replace(name, flag)
            hint = hint.replace(name, flag) if hint else hint
        raise GenerationError(message, hint=hint) from None


def _batch_prompts(prompt, image, batch_file, batch_size, output):  # noqa: ANN001, ANN202
    """The checked prompts of ``--batch`` (None without it); --prompt xor --batch."""
    from .errors import VlmkitError

    if (prompt is None) == (batch_file is None):
        raise VlmkitError("give either --prompt TEXT or --batch FILE.jsonl" + (", not both" if prompt else ""),
                          hint='e.g. vlmkit generate SOURCE -p "Describe the image." -i cat.png')  # fmt: skip
    if batch_file is None:
        for name, value in (("--batch-size", batch_size != 8), ("--output", output is not None)):
            if value:
                raise VlmkitError(f"{name} only applies with --batch", hint="drop it, or pass --batch FILE.jsonl")
        return None
    if image:
        raise VlmkitError("--image does not apply with --batch", hint='list each prompt\'s images in its JSONL line: "images": [...]')
    if batch_size < 1:
        raise VlmkitError(f"--batch-size must be >= 1; got {batch_size}", hint="e.g. --batch-size 8")
    from .batch import read_prompts

    return read_prompts(batch_file)


def _run_batch(err, model, processor, prompts, output, batch_size, gen) -> None:  # noqa: ANN001
    from .batch import run_batch

    sink = sys.stdout if output is None else output.open("w", encoding="utf-8")
    done = [0]

    def write(answer: dict) -> None:
        sink.write(json.dumps(answer, ensure_ascii=False) + "\n")
        sink.flush()
        done[0] += 1
        err.print(f"{done[0]}/{len(prompts)} answered", markup=False)

    try:
        run_batch(model, processor, prompts, write, batch_size=batch_size, open_images=_read_images, **gen)
    finally:
        if output is not None:
            sink.close()


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
) -> None:
    """Chat with SOURCE in the terminal: history kept, /image PATH attaches images, the conversation's KV cache is reused each turn; /reset, /quit; Ctrl-C stops an answer."""
    from .chat import ChatSession
    from .repl import run_repl

    _check_flags(max_new_tokens, sample, temperature, top_k, top_p, seed)
    err = _console(stderr=True)
    images = _read_images(image or [])
    with _Waiting(err, f"loading {source} ..."):
        model, processor = _load_model_and_processor(source)
    session = ChatSession(model, processor, system=system, max_new_tokens=max_new_tokens, do_sample=sample,
                          temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)  # fmt: skip

    def write(chunk: str) -> None:
        sys.stdout.write(chunk)
        sys.stdout.flush()

    run_repl(session, images=images, read=_read_line, write=write, note=lambda line: err.print(line, markup=False),
             open_images=_read_images, describe_image=lambda path, img: "attached " + _image_line(processor, path, img, {}),
             waiting=lambda: _Waiting(err, "thinking ..."))  # fmt: skip


def _read_line(prompt: str) -> str:
    """``input(prompt)`` on a terminal; a plain line read (no prompt echoed) from a pipe."""
    if sys.stdin.isatty():
        return input(prompt)
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def _read_images(paths: list[Path]) -> list:
    """Open and fully load each image file; a :class:`~vlmkit.errors.ProcessorError` names an unreadable one."""
    from PIL import Image

    from .errors import ProcessorError

    images = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img.load()
                images.append(img.copy())
        except (OSError, ValueError) as exc:
            raise ProcessorError(f"cannot read image {str(path)!r}: {exc}", hint="pass a PNG/JPEG/... file") from None
    return images


def _load_model_and_processor(source: str):
    """The model (from a YAML file or a checkpoint) and its processor. For a YAML model the
    processor follows the model's own spec (its tower's tile size, its tokens per image), with
    the tokenizer of ``spec.tokenizer``; for a checkpoint it is the checkpoint's."""
    from .builder import build, build_from_hf
    from .processor import load_processor

    if _is_yaml(source):
        model = build(source)
        return model, load_processor(spec=model.spec)
    model = build_from_hf(source)
    return model, load_processor(source)


def _quantize(err, model) -> None:
    """:func:`vlmkit.quantize.quantize_int8` with its defaults, and one stderr line saying so."""
    import time

    from .quantize import Int8Linear, quantize_int8

    start = time.perf_counter()
    quantize_int8(model)
    layers = sum(isinstance(m, Int8Linear) for m in model.modules())
    err.print(f"int8: {layers} linear layers quantized in {time.perf_counter() - start:.1f} s (LM head float32)", markup=False)


def _check_quantize(scheme: Optional[str], int8: bool) -> Optional[str]:
    """``--quantize`` checked before the model loads (None: not given)."""
    from .errors import VlmkitError
    from .quant_schemes import SCHEMES

    if scheme is None:
        return None
    if scheme not in SCHEMES:
        raise VlmkitError(f"--quantize {scheme!r} is not a scheme", hint=f"choose one of {', '.join(SCHEMES)}")
    if int8:
        raise VlmkitError("--int8 and --quantize were both given", hint="--int8 is --quantize w8a8: give one")
    return scheme


def _quantize_scheme(err, model, scheme: str, source: str) -> None:
    """:func:`vlmkit.quant_schemes.quantize`; one stderr line with what was chosen and the cache."""
    from .quant_schemes import quantize

    local = Path(source).is_dir()
    report = quantize(model, scheme, source=source if local else None)
    chosen = report["scheme"] + (f" (auto: {report['auto']['ms']} ms per layer group, CPU {report['auto']['cpu']['capability']})" if "auto" in report else "")
    cache = report.get("cache", "off") + ("" if local else " (SOURCE is not a local folder)")
    err.print(f"quantize: {chosen}; {report['layers']} layers in {report['seconds']:.2f} s; cache {cache}", markup=False)


def _image_line(processor, path: Path, img, kwargs: dict) -> str:
    """One line about an image: its tile grid and visual tokens (when the processor can tell)."""
    if not hasattr(processor, "image_cost"):
        return f"{path} ({img.width}x{img.height})"
    cost = processor.image_cost(img, **kwargs)
    grid = f"{cost.tiles[0]}x{cost.tiles[1]} tiles + global = {cost.n_tiles} tiles" if cost.tiles != (0, 0) else "not split, 1 tile"
    return f"{path} ({img.width}x{img.height}): {grid}, {cost.visual_tokens} visual tokens"


def _chat_batch(processor, prompt: str, images: list, kwargs: dict):
    """Model inputs for one user turn: an image item per image, then the prompt, in the chat template."""
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor(text=text, images=images or None, **kwargs)


def _write_stream(chunks, waiting: _Waiting) -> None:
    """Write each chunk to stdout as it comes (stopping ``waiting`` at the first), then a newline."""
    for chunk in chunks:
        waiting.stop()
        sys.stdout.write(chunk)
        sys.stdout.flush()
    waiting.stop()
    sys.stdout.write("\n")
    sys.stdout.flush()


def _print_timings(err, model) -> None:
    """The last generation's prefill time, token counts, speed and path, to stderr."""
    info = getattr(model, "last_generation", None)
    if info is not None:
        err.print(
            f"prefill {info.prefill_s:.2f} s ({info.prompt_tokens} prompt tokens), {info.new_tokens} new tokens, "
            f"{info.tokens_per_s:.1f} tokens/s, path {info.path}" + (" (images dropped)" if info.images_dropped else ""),
            markup=False,
        )


@app.command()
def serve(
    source: str = typer.Argument(..., help="A checkpoint folder, a Hub repo id, or a model YAML file."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY' on /v1/*."),
    max_batch: int = typer.Option(8, "--max-batch", help="Most requests decoded together."),
    max_queue: int = typer.Option(64, "--max-queue", help="Most requests waiting for a slot; more get 429."),
    int8: bool = typer.Option(False, "--int8", help="Quantize the text model and vision tower to int8 (CPU, approximate)."),
    allow_remote_images: bool = typer.Option(False, "--allow-remote-images", help="Fetch http(s) image URLs."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Allow file:// image URLs under this folder."),
    request_timeout: float = typer.Option(600.0, "--request-timeout", help="Seconds from arrival to the last token."),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="Images per request (default: what fits the context)."),
    max_image_bytes: int = typer.Option(20 * 1024 * 1024, "--max-image-bytes", help="Encoded bytes per image."),
    max_image_pixels: int = typer.Option(4096 * 4096, "--max-image-pixels", help="Decoded pixels per image."),
    max_body_bytes: int = typer.Option(100 * 1024 * 1024, "--max-body-bytes", help="Request body size, images included."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="The model id clients send (default: SOURCE)."),
) -> None:
    """Serve SOURCE with OpenAI's chat-completions API (streaming, images, continuous batching); see docs/serving.md."""
    _need_modules("vlmkit serve", "fastapi", "uvicorn", "prometheus_client", extra="serve")
    from .serve import check_options
    from .serve.server import run

    options = check_options(  # every option checked before the model loads
        host=host, port=port, api_key=api_key, max_batch=max_batch, max_queue=max_queue, request_timeout=request_timeout,
        allow_remote_images=allow_remote_images, image_root=image_root, max_images=max_images,
        max_image_bytes=max_image_bytes, max_image_pixels=max_image_pixels, max_body_bytes=max_body_bytes, model_name=model_name,
    )  # fmt: skip
    err = _console(stderr=True)
    model, processor = _load_model_and_processor(source)
    if int8:
        _quantize(err, model)
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
    model, processor = _load_model_and_processor(source)
    folder = export_folder(model, source, out)
    console = _console()
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
    int8: bool = typer.Option(False, "--int8", help="Also compare vlmkit int8 (quantize_int8) with vlmkit float32."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads for both sides (default: torch's)."),
    new_tokens: int = typer.Option(32, "--new-tokens", help="Decode steps per decode sample."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this JSON file."),
    quantize: Optional[list[str]] = typer.Option(None, "--quantize", help="Also compare this scheme (auto, fp32, w8, w4, w8a8) with vlmkit float32; repeatable."),
) -> None:
    """Benchmark vlmkit against transformers on SOURCE (float32, CPU): load, vision, prefill, time to first token, decode, peak RSS."""
    from .bench import run_bench

    run_bench(source, repeats=repeats, quick=quick, int8=int8, threads=threads, new_tokens=new_tokens, json_path=json_out,
              quantize=quantize or ())  # fmt: skip


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
        _console(stderr=True).print("aborted", markup=False)
        return 130
    except BrokenPipeError:  # `vlmkit schema | head`
        return 0
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

    err = _console(stderr=True)
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
