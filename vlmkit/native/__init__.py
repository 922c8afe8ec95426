"""vlmkit's own one-row matrix-vector kernels (``gemv.c``), compiled on first use.

A decode step multiplies one row ``x`` ``(in,)`` by every weight ``W`` ``(out, in)``. torch's
one-row products (MKL's ``sgemv``/``sgemm``, ``_weight_int8pack_mm``) stream the weights at well
under the memory bandwidth on some CPUs (measured: ~half on an AMD EPYC). ``gemv.c`` computes
each output as a dot product over a contiguous weight row, four rows per pass against one load of
``x``, rows split across the OpenMP threads torch uses (:func:`torch.get_num_threads`):

* :func:`gemv_f32`: float32 ``W`` ``(out, in)`` row-major -> ``(out,)``;
* :func:`gemv_i8`: int8 ``W`` with one float32 scale per group of inputs (weight-only int8:
  ``x`` stays float32, the int8 values are widened in registers) -> ``(out,)``;
* :func:`gemv_q4`: 4-bit ``W`` (``q * scale + lo`` per group of inputs, ``q`` in 0..15, two per
  byte, float16 ``scale``/``lo``) -> ``(out,)``.

The source is compiled once per machine with the C compiler ``$CC`` (else ``cc``), ``-O3
-march=native -fopenmp``, into ``$VLMKIT_CACHE/native`` (default ``~/.cache/vlmkit/native``),
keyed by the source, the flags, the compiler's version and the CPU's flags; a second process
loads the file in milliseconds. Where no compiler works, :func:`available` is False, the reason
is logged once on the ``vlmkit`` log (:func:`status` returns it) and callers keep torch's kernels.
``VLMKIT_NATIVE=0`` switches the kernels off; :func:`disabled` does so for a block (A/B timing).
``VLMKIT_NATIVE_MARCH=NAME`` compiles for ``-march=NAME`` instead of ``native`` (e.g. ``haswell``:
the AVX2 kernels, ``x86-64``: the portable C ones, on a CPU that also runs wider ones), with no
fallback to other flags: a name the compiler refuses leaves the kernels off, and says why.
Nothing here runs under autograd: callers use it for inference-only one-row calls.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from ..quant_cache import cache_dir

__all__ = ["available", "library", "status", "disabled", "reload", "gemv_f32", "gemm_rows", "gemv_i8", "gemv_q4", "FLAGS", "MAX_ROWS"]

log = logging.getLogger("vlmkit.native")

SOURCE = Path(__file__).with_name("gemv.c")
#: compiler flags, tried in order until one set compiles (OpenMP and -march=native are optional)
FLAGS = (
    ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared"),
    ("-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared"),
    ("-O3", "-ffp-contract=off", "-fPIC", "-shared"),
)
#: the most rows :func:`gemm_rows` takes (a batched decode step; more rows are torch's GEMM's job)
MAX_ROWS = 16
#: seconds a compile may take
COMPILE_TIMEOUT = 120
ABI = 11

_state: dict[str, object] = {"lib": None, "why": None, "tried": False, "off": 0}
_P, _I = ctypes.c_void_p, ctypes.c_int


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc)


def _version(cc: str) -> str:
    try:
        done = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "?"
    return done.stdout.splitlines()[0] if done.stdout else "?"


def _compile(cc: str, folder: Path) -> tuple[Path | None, str]:
    """The compiled library in ``folder`` (built now unless cached) and the flags used, or
    ``(None, why)``."""
    source = b"".join(p.read_bytes() for p in sorted(SOURCE.parent.glob("*.c")))
    base = hashlib.sha256(source + _version(cc).encode() + _cpu_flags().encode() + platform.machine().encode())
    errors = []
    sets, why = _flag_sets()
    if not sets:
        return None, why
    for flags in sets:
        key = hashlib.sha256(base.digest() + " ".join(flags).encode()).hexdigest()[:24]
        target = folder / f"gemv-{key}.so"
        if target.is_file():
            return target, " ".join(flags)
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        try:
            done = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=COMPILE_TIMEOUT)
        except (OSError, subprocess.SubprocessError) as exc:
            done, errors = None, [*errors, f"{' '.join(flags)}: {exc}"]
        if done is not None and done.returncode == 0:
            os.replace(tmp, target)  # atomic: a parallel process sees no half-written file
            return target, " ".join(flags)
        if done is not None:
            errors.append(f"{' '.join(flags)}: {(done.stderr.strip().splitlines() or ['failed'])[-1]}")
        Path(tmp).unlink(missing_ok=True)
    return None, "; ".join(errors)


def _flag_sets() -> tuple[list[tuple[str, ...]], str]:
    """:data:`FLAGS`, or with ``$VLMKIT_NATIVE_MARCH`` set only the sets with ``-march``, for that
    name; ``([], why)`` for a value that is not a ``-march`` name."""
    march = os.environ.get("VLMKIT_NATIVE_MARCH")
    if not march:
        return list(FLAGS), ""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}", march):
        return [], f"VLMKIT_NATIVE_MARCH={march!r} is not a -march name (e.g. native, haswell, x86-64)"
    return [tuple(f"-march={march}" if f == "-march=native" else f for f in flags) for flags in FLAGS if "-march=native" in flags], ""


def _load() -> ctypes.CDLL | None:
    cc = _compiler()
    if cc is None:
        _state["why"] = f"no C compiler ({os.environ.get('CC') or 'cc'} not on PATH)"
        return None
    try:
        path, how = _compile(cc, cache_dir().parent / "native")
    except OSError as exc:
        path, how = None, f"cannot write the kernel cache: {exc}"
    if path is None:
        _state["why"] = f"{cc} could not compile {SOURCE.name}: {how}"
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:  # e.g. a file another tool truncated: drop it, the next process rebuilds it
        path.unlink(missing_ok=True)
        _state["why"] = f"cannot load {path} ({exc}); removed it"
        return None
    if lib.vlmkit_gemv_abi() != ABI:
        _state["why"] = f"{path} is not this vlmkit's kernel (ABI {lib.vlmkit_gemv_abi()} != {ABI})"
        return None
    lib.vlmkit_gemv_isa.restype = ctypes.c_char_p
    lib.vlmkit_gemv_f32.argtypes = [_P, _P, _P, _P, _I, _I, _I]
    lib.vlmkit_gemv_i8.argtypes = [_P, _P, _P, _P, _P, _I, _I, _I, _I]
    lib.vlmkit_gemv_q4.argtypes = [_P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I]
    lib.vlmkit_gemm_f32_rows.argtypes = [_P, _P, _P, _P, _I, _I, _I, _I]
    lib.vlmkit_llama_scratch.argtypes = [_P, _I, _I]
    lib.vlmkit_llama_scratch.restype = ctypes.c_long
    lib.vlmkit_llama_step.argtypes = [_P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _P, ctypes.c_long, _I]
    lib.vlmkit_exp_neg.argtypes = [_P, _P, _I]
    lib.vlmkit_silu_mul.argtypes = [_P, _P, _P, _I]
    _state["why"] = f"{path.name} ({lib.vlmkit_gemv_isa().decode()}; {how})"
    return lib


def _lib() -> ctypes.CDLL | None:
    if _state["off"] or os.environ.get("VLMKIT_NATIVE", "1") == "0":
        return None
    if not _state["tried"]:
        _state["tried"] = True
        _state["lib"] = _load()
        if _state["lib"] is None:
            log.warning("vlmkit native kernels unavailable: %s; one-row products use torch's kernels", _state["why"])
    return _state["lib"]  # type: ignore[return-value]


def library() -> ctypes.CDLL | None:
    """The loaded kernel library (None where :func:`available` is False), for callers that run
    a kernel of ``gemv.c`` other than the products below (e.g. the Llama decode step)."""
    return _lib()


def available() -> bool:
    """Whether the kernels are compiled and switched on (compiles them on the first call)."""
    return _lib() is not None


def status() -> str:
    """One line: the library and instruction set in use, or why the kernels are not used."""
    if _state["off"] or os.environ.get("VLMKIT_NATIVE", "1") == "0":
        return "off (VLMKIT_NATIVE=0 or native.disabled())"
    _lib()
    return str(_state["why"])


def reload() -> bool:
    """Forget the loaded kernels and find them again (after changing ``$CC`` or
    ``$VLMKIT_CACHE``); returns :func:`available`."""
    _state.update(lib=None, why=None, tried=False)
    return available()


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Use torch's kernels instead of these inside the block (for A/B timing)."""
    _state["off"] = int(_state["off"]) + 1
    try:
        yield
    finally:
        _state["off"] = int(_state["off"]) - 1


def _fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.dtype == torch.float32 and x.device.type == "cpu" and weight.device.type == "cpu" and weight.dim() == 2
        and weight.is_contiguous() and x.numel() == weight.shape[1] and 0 < weight.shape[0] < 2**31
    )  # fmt: skip


def _bias_ptr(bias: torch.Tensor | None, out: int) -> int | None:
    if bias is None:
        return None
    if bias.dtype != torch.float32 or not bias.is_contiguous() or bias.numel() != out:
        raise ValueError(f"bias must be a contiguous float32 ({out},) tensor; got {tuple(bias.shape)} {bias.dtype}")
    return bias.data_ptr()


def gemv_f32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``weight @ x + bias``: ``x`` ``(in,)`` (any shape with ``in`` elements), float32 ``weight``
    ``(out, in)`` contiguous -> ``(out,)``. None when the kernels are unavailable or the inputs
    do not fit them (the caller then uses torch)."""
    lib = _lib()
    if lib is None or weight.dtype != torch.float32 or not _fits(x, weight):
        return None
    x = x.contiguous()
    out = torch.empty(weight.shape[0], dtype=torch.float32)
    lib.vlmkit_gemv_f32(weight.data_ptr(), x.data_ptr(), _bias_ptr(bias, out.numel()), out.data_ptr(),
                        weight.shape[0], weight.shape[1], torch.get_num_threads())  # fmt: skip
    return out


def gemm_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x @ weight.T + bias`` for 2..:data:`MAX_ROWS` rows: ``x`` float32 ``(..., in)``, float32
    ``weight`` ``(out, in)`` contiguous -> ``(R, out)`` (``R`` rows of ``x``), each weight row read
    once for all rows. None when the kernels are unavailable or the inputs do not fit."""
    lib = _lib()
    rows = x.numel() // max(1, x.shape[-1])
    if lib is None or not 2 <= rows <= MAX_ROWS or x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2 or not weight.is_contiguous():
        return None
    if x.shape[-1] != weight.shape[1] or not 0 < weight.shape[0] < 2**31:
        return None
    x = x.reshape(rows, -1).contiguous()
    out = torch.empty(rows, weight.shape[0], dtype=torch.float32)
    lib.vlmkit_gemm_f32_rows(weight.data_ptr(), x.data_ptr(), _bias_ptr(bias, weight.shape[0]), out.data_ptr(),
                             rows, weight.shape[0], weight.shape[1], torch.get_num_threads())  # fmt: skip
    return out


def _groups(scale: torch.Tensor, out: int, inp: int) -> int:
    """The group size a float32 ``(out, groups)`` scale gives ``inp`` inputs (0 when it does not fit)."""
    if scale.dtype != torch.float32 or not scale.is_contiguous() or scale.dim() != 2 or scale.shape[0] != out:
        return 0
    groups = scale.shape[1]
    group = inp // groups if groups and inp % groups == 0 else 0
    return group if group == inp or (group and group % 32 == 0) else 0


def gemv_i8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``W @ x + bias`` for int8 ``weight`` ``(out, in)`` contiguous with float32 ``scale``
    ``(out, in // group)``: ``W[o, i] = weight[o, i] * scale[o, i // group]``, ``group`` a multiple
    of 32 or ``in`` (one scale per row); ``x`` float32 ``(in,)`` -> ``(out,)``. None as :func:`gemv_f32`."""
    lib = _lib()
    if lib is None or weight.dtype != torch.int8 or not _fits(x, weight):
        return None
    out, inp = weight.shape
    group = _groups(scale, out, inp)
    if not group:
        return None
    x = x.contiguous()
    y = torch.empty(out, dtype=torch.float32)
    rc = lib.vlmkit_gemv_i8(weight.data_ptr(), scale.data_ptr(), x.data_ptr(), _bias_ptr(bias, out),
                            y.data_ptr(), out, inp, group, torch.get_num_threads())  # fmt: skip
    return y if rc == 0 else None


def gemv_q4(x: torch.Tensor, q4: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, group: int,
            bias: torch.Tensor | None = None) -> torch.Tensor | None:  # fmt: skip
    """``W @ x + bias`` for a 4-bit ``W`` ``(out, in)``: ``W[o, i] = q[o, i] * scale[o, g] + lo[o, g]``,
    ``g = i // group`` (``group`` a multiple of 32 dividing ``in``). ``q4`` ``(out, in // 2)``
    uint8 holds, per block of 32 inputs, ``q[j] | q[j + 16] << 4`` in byte ``j``
    (:func:`vlmkit.weight_only.quantize_w4`); ``scale``/``lo`` ``(out, in // group)`` float16;
    ``x`` float32 ``(in,)`` -> ``(out,)``. None as :func:`gemv_f32`."""
    lib = _lib()
    if lib is None or q4.dtype != torch.uint8 or q4.dim() != 2 or not q4.is_contiguous():
        return None
    out, inp = q4.shape[0], 2 * q4.shape[1]
    groups = inp // group if group > 0 and group % 32 == 0 and inp % group == 0 else 0
    ok = groups and x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() == inp
    if not ok or any(t.dtype != torch.float16 or not t.is_contiguous() or t.shape != (out, groups) for t in (scale, lo)):
        return None
    x = x.contiguous()
    y = torch.empty(out, dtype=torch.float32)
    scratch = torch.empty(groups, dtype=torch.float32)
    lib.vlmkit_gemv_q4(q4.data_ptr(), scale.data_ptr(), lo.data_ptr(), x.data_ptr(), _bias_ptr(bias, out),
                       scratch.data_ptr(), y.data_ptr(), out, inp, group, torch.get_num_threads())  # fmt: skip
    return y
