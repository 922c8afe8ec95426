"""What the ``vlmkit`` commands share: reading images and prompts, loading a model with its
processor, spinners and streamed output on the terminal, and the CLI's wording of option errors.

Kept apart from :mod:`vlmkit.cli` (which only declares the commands) so each piece can be used and
tested on its own. Heavy imports (torch, PIL, rich) happen inside the functions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = [
    "FLAG_NAMES",
    "answer_batch",
    "batch_prompts",
    "chat_batch",
    "check_flags",
    "check_quantize",
    "image_line",
    "is_yaml",
    "load_model_and_processor",
    "print_timings",
    "quantize_and_say",
    "quantize_scheme",
    "read_images",
    "read_line",
    "rich_console",
    "Waiting",
    "write_stream",
]


def rich_console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


class Waiting:
    """A rich spinner on stderr while nothing else shows progress (only on a terminal): use as a
    context manager, or ``start()``/``stop()`` (stop is idempotent, e.g. at the first token)."""

    def __init__(self, err, text: str) -> None:  # noqa: ANN001
        self.status = err.status(text) if err.is_terminal else None
        self.running = False

    def start(self) -> Waiting:
        if self.status is not None and not self.running:
            self.status.start()
            self.running = True
        return self

    def stop(self) -> None:
        if self.running:
            self.status.stop()
            self.running = False

    def __enter__(self) -> Waiting:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def is_yaml(source: str) -> bool:
    return source.endswith((".yaml", ".yml"))


#: generate()'s argument names as the CLI spells them, for its error messages.
FLAG_NAMES = (("use do_sample=False", "drop --sample"), ("do_sample", "--sample"), ("max_new_tokens=", "--max-new-tokens "),
               ("max_new_tokens", "--max-new-tokens"),
               ("temperature", "--temperature"), ("top_k", "--top-k"), ("top_p", "--top-p"), ("seed", "--seed"))  # fmt: skip


def check_flags(*values) -> None:  # noqa: ANN002
    """:func:`vlmkit.generation.check_options` with its messages in flag names (``--temperature``,
    ``--sample``), so the hint is something to type."""
    from .errors import GenerationError
    from .generation import check_options

    try:
        check_options(*values)
    except GenerationError as exc:
        message, hint = exc.message, exc.hint
        for name, flag in FLAG_NAMES:
            message = message.replace(name, flag)
            hint = hint.replace(name, flag) if hint else hint
        raise GenerationError(message, hint=hint) from None


def batch_prompts(prompt, image, batch_file, batch_size, output):  # noqa: ANN001, ANN202
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


def answer_batch(err, model, processor, prompts, output, batch_size, gen) -> None:  # noqa: ANN001
    from .batch import run_batch

    sink = sys.stdout if output is None else output.open("w", encoding="utf-8")
    done = [0]

    def write(answer: dict) -> None:
        sink.write(json.dumps(answer, ensure_ascii=False) + "\n")
        sink.flush()
        done[0] += 1
        err.print(f"{done[0]}/{len(prompts)} answered", markup=False)

    try:
        run_batch(model, processor, prompts, write, batch_size=batch_size, open_images=read_images, **gen)
    finally:
        if output is not None:
            sink.close()


def read_line(prompt: str) -> str:
    """``input(prompt)`` on a terminal; a plain line read (no prompt echoed) from a pipe."""
    if sys.stdin.isatty():
        return input(prompt)
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def read_images(paths: list[Path]) -> list:
    """Open and fully load each image file (within the bounds of docs/limits.md); a
    :class:`~vlmkit.errors.ProcessorError` names an unreadable, truncated or oversized one."""
    from .limits import read_image_file

    return [read_image_file(path) for path in paths]


def load_model_and_processor(source: str):
    """The model (from a YAML file or a checkpoint) and its processor. For a YAML model the
    processor follows the model's own spec (its tower's tile size, its tokens per image), with
    the tokenizer of ``spec.tokenizer``; for a checkpoint it is the checkpoint's."""
    from .builder import build, build_from_hf
    from .processor import load_processor

    if is_yaml(source):
        model = build(source)
        return model, load_processor(spec=model.spec)
    model = build_from_hf(source)
    return model, load_processor(source)


def quantize_and_say(err, model, source: str) -> None:  # noqa: ANN001
    """``--int8``: :func:`quantize_scheme` with scheme ``int8`` (``w8a8`` or ``w8``, whichever is
    the fastest int8 scheme for this CPU), one stderr line saying which and why."""
    quantize_scheme(err, model, "int8", source)


def check_quantize(scheme: str | None, int8: bool) -> str | None:
    """``--quantize`` / ``--int8`` checked before the model loads: the scheme to apply (``int8``
    for ``--int8``), None for neither."""
    from .errors import VlmkitError
    from .quant_schemes import SCHEMES

    if scheme is None:
        return "int8" if int8 else None
    if scheme not in SCHEMES:
        raise VlmkitError(f"--quantize {scheme!r} is not a scheme", hint=f"choose one of {', '.join(SCHEMES)}")
    if int8:
        raise VlmkitError("--int8 and --quantize were both given", hint="--int8 is --quantize int8: give one")
    return scheme


def quantize_scheme(err, model, scheme: str, source: str) -> None:  # noqa: ANN001
    """:func:`vlmkit.quant_schemes.quantize` (cached when SOURCE is a local folder); one stderr line
    with what was applied, why (``auto``/``int8``: the reason and the timings), the layers and the
    cache; one more where ``w8a8`` was asked for on a CPU without int8 dot products."""
    from .quant_schemes import has_int8_dot, quantize

    local = Path(source).is_dir()
    report = quantize(model, scheme, source=source if local else None)
    choice = report.get("choice")
    why = f" ({choice['why']}; timed {choice['timed']}, ms {choice['ms']}, CPU {choice['cpu']['capability']})" if choice else ""
    if choice and choice.get("cached"):
        why = f" (chosen by an earlier run on this CPU, from the cache: {choice['why']})"
    cache = report.get("cache", "off") + ("" if local else " (SOURCE is not a local folder)")
    label = "int8" if scheme == "int8" else "quantize"
    err.print(f"{label}: {report['scheme']}{why}; {report['layers']} layers in {report['seconds']:.2f} s; cache {cache}", markup=False)
    if scheme == "w8a8" and not has_int8_dot():
        err.print("w8a8: this CPU has no VNNI/AMX int8 instructions, so prompts and images run much slower than "
                  "float32 here; --int8 picks the fastest int8 scheme for this CPU (docs/speed.md)", markup=False)  # fmt: skip


def image_line(processor, path: Path, img, kwargs: dict) -> str:
    """One line about an image: its tile grid and visual tokens (when the processor can tell)."""
    if not hasattr(processor, "image_cost"):
        return f"{path} ({img.width}x{img.height})"
    cost = processor.image_cost(img, **kwargs)
    grid = f"{cost.tiles[0]}x{cost.tiles[1]} tiles + global = {cost.n_tiles} tiles" if cost.tiles != (0, 0) else "not split, 1 tile"
    return f"{path} ({img.width}x{img.height}): {grid}, {cost.visual_tokens} visual tokens"


def chat_batch(processor, prompt: str, images: list, kwargs: dict):
    """Model inputs for one user turn: an image item per image, then the prompt, in the chat template."""
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor(text=text, images=images or None, **kwargs)


def write_stream(chunks, waiting: Waiting) -> None:
    """Write each chunk to stdout as it comes (stopping ``waiting`` at the first), then a newline."""
    for chunk in chunks:
        waiting.stop()
        sys.stdout.write(chunk)
        sys.stdout.flush()
    waiting.stop()
    sys.stdout.write("\n")
    sys.stdout.flush()


def print_timings(err, model) -> None:
    """The last generation's prefill time, token counts, speed and path, to stderr."""
    info = getattr(model, "last_generation", None)
    if info is not None:
        err.print(
            f"prefill {info.prefill_s:.2f} s ({info.prompt_tokens} prompt tokens), {info.new_tokens} new tokens, "
            f"{info.tokens_per_s:.1f} tokens/s, path {info.path}" + (" (images dropped)" if info.images_dropped else ""),
            markup=False,
        )
