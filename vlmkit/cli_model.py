"""The model options of the commands that run a model (``generate``, ``chat``, ``serve``):
``--int8``, ``--quantize SCHEME`` and ``--vision-dtype DTYPE``.

They are checked together before anything loads (:func:`check_model_options`), so a bad value or
a combination that cannot work costs no loading time, and applied in one place once the model
is loaded (:func:`load_for_command`): quantization first (it reads the float32 weights, and its
cache is keyed by them), then the vision side's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Optional

import typer

from .cli_helpers import Waiting, check_quantize, load_model_and_processor, quantize_scheme

__all__ = ["Int8", "Quantize", "VisionDtype", "ModelOptions", "check_model_options", "load_for_command"]

Int8 = Annotated[bool, typer.Option("--int8", help="The fastest int8 scheme for this CPU: w8a8 (int8 activations too) where its prompts are not slower than float32, else w8 (weight-only); CPU, approximate; see docs/speed.md.")]  # fmt: skip
Quantize = Annotated[Optional[str], typer.Option("--quantize", help="CPU speed scheme: auto, fp32, w8, w4, w8a8 or int8 (= --int8); see docs/speed.md.")]  # fmt: skip
VisionDtype = Annotated[Optional[str], typer.Option("--vision-dtype", help="Run the vision side in bfloat16 (~2x faster images on CPUs with avx512_bf16/amx_bf16) or int8 (w8a8 tower layers, ~2.5x faster on CPUs with VNNI/AMX), the text model staying as it is (float32 or --quantize w8/w4); slower on CPUs without those units; approximate; see docs/speed.md.")]  # fmt: skip


@dataclass(frozen=True)
class ModelOptions:
    """What to do to a loaded model: ``scheme`` for :func:`vlmkit.quant_schemes.quantize` (None:
    stay float32) and ``vision_dtype`` (a dtype name, None: leave the vision side as loaded)."""

    scheme: str | None = None
    vision_dtype: str | None = None


def check_model_options(quantize: str | None, int8: bool, vision_dtype: str | None) -> ModelOptions:
    """The options checked before the model loads: an unknown scheme or dtype, ``--int8`` with
    ``--quantize``, and ``--quantize w8a8`` with a float vision dtype (w8a8 makes the vision
    tower int8) are :class:`~vlmkit.errors.VlmkitError` naming the valid choices."""
    from .errors import VlmkitError
    from .vision_dtype import INT8, vision_dtype_name

    scheme = check_quantize(quantize, int8)
    if vision_dtype is None:
        return ModelOptions(scheme, None)
    name = vision_dtype_name(vision_dtype)
    if scheme == "w8a8" and name != INT8:
        raise VlmkitError(f"--vision-dtype {vision_dtype} with --quantize w8a8: w8a8 runs the vision tower in int8",
                          hint="use --quantize w8 or w4 (weight-only: the text model only) with --vision-dtype")  # fmt: skip
    return ModelOptions(scheme, name)


def load_for_command(err, source: str, options: ModelOptions):  # noqa: ANN001, ANN201
    """``(model, processor)`` of SOURCE with ``options`` applied, a spinner on ``err`` while each
    step runs and one stderr line per option saying what it did."""
    with Waiting(err, f"loading {source} ..."):
        model, processor = load_model_and_processor(source)
    if options.scheme is not None:  # --int8 is --quantize int8
        with Waiting(err, f"quantizing ({options.scheme}) ..."):
            quantize_scheme(err, model, options.scheme, source)
    if options.vision_dtype is not None:
        _apply_vision_dtype(err, model, options)
    return model, processor


def _apply_vision_dtype(err, model, options: ModelOptions) -> None:  # noqa: ANN001
    """:func:`~vlmkit.vision_dtype.set_vision_dtype`, refused with a CLI hint where ``--int8`` /
    ``auto`` chose w8a8 on this CPU and a float vision dtype was asked for (the tower is int8 then)."""
    from .errors import VlmkitError
    from .vision_dtype import INT8, set_vision_dtype

    if getattr(model, "quantized", None) == "int8" and options.vision_dtype != INT8:
        raise VlmkitError(f"--quantize {options.scheme} chose w8a8 on this CPU, which runs the vision tower in int8: "
                          f"--vision-dtype {options.vision_dtype} cannot apply",
                          hint="use --quantize w8 or w4 (weight-only) with --vision-dtype, or drop --vision-dtype")  # fmt: skip
    report = set_vision_dtype(model, options.vision_dtype)  # a CPU without the units for it: a logged warning
    already = f"; {report['note']}" if report["note"].endswith("already") else ""
    err.print(f"vision dtype: {report['dtype']} ({', '.join(report['slots'])}; the text model as it was){already}", markup=False)
