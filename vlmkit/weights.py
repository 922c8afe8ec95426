"""Reading and writing safetensors checkpoints through the components' key maps.

Never unpickles: a folder with only ``.bin``/``.pt`` weights is refused. Tensors are read one at
a time from memory-mapped files into the (meta-initialised) model, so the weights are held once:
a tensor whose file dtype is the model's dtype is used in place (a view of the mapping, no copy).
A fused tensor (e.g. ``gate_up_proj`` from ``gate/up_proj``) is a view too when its parts lie back
to back in one file (checkpoints written with sorted names store ``gate_proj`` right before
``up_proj``); otherwise (``q/k/v_proj`` sit around ``o_proj``) it is read straight from the file
into its one buffer, without touching the mapped pages of its parts (which would otherwise stay
resident next to the copy).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import WeightLoadError
from .keymap import KeyMap

__all__ = ["Checkpoint", "LoadReport", "find_weight_files", "load_component", "dtype_problem", "PICKLE_SUFFIXES"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_NAME = "model.safetensors.index.json"


def find_weight_files(folder: Path) -> list[Path]:
    """The safetensors files of ``folder`` (single file or the shards of an index)."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        return _shards_from_index(index)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickles:
        raise WeightLoadError(
            f"{folder} has only pickle weights ({', '.join(pickles)}); vlmkit never unpickles a checkpoint, "
            "because loading a pickle can run arbitrary code",
            hint="convert it once in a trusted environment to safetensors (transformers: "
            "model.save_pretrained(out, safe_serialization=True))",
        )
    raise WeightLoadError(
        f"no weights in {folder}: expected model.safetensors or {INDEX_NAME}",
        hint="pass the checkpoint folder, or build with load_weights=False for a fresh model",
    )


def _shards_from_index(index: Path) -> list[Path]:
    from .errors import SpecError
    from .limits import read_json_file

    try:
        weight_map = read_json_file(index, kind="safetensors index")["weight_map"]
        names = sorted(set(weight_map.values()))
    except SpecError as exc:
        raise WeightLoadError(f"{index} is not a valid safetensors index: {exc.detail}", hint=exc.hint) from None
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise WeightLoadError(
            f"{index} is not a valid safetensors index ({type(exc).__name__}: {exc}); expected "
            '{"weight_map": {"tensor name": "shard file name", ...}}',
            hint="the download is incomplete or corrupt; fetch the index again",
        ) from None
    for name in names:
        _check_shard_name(index, name)
    missing = [n for n in names if not (index.parent / n).is_file()]
    if missing:
        raise WeightLoadError(
            f"{index} names shard(s) that are not in the folder: {', '.join(missing)}",
            hint="the download is incomplete; fetch the missing shard(s) again",
        )
    return [index.parent / n for n in names]


def _check_shard_name(index: Path, name: object) -> None:
    """A shard is a plain ``.safetensors`` file name inside the checkpoint folder."""
    if not isinstance(name, str) or not name:
        raise WeightLoadError(f"{index}: a shard name is {name!r}, not a file name", hint="fetch the index again")
    if Path(name).suffix in PICKLE_SUFFIXES:
        raise WeightLoadError(
            f"{index} names the pickle shard {name!r}; vlmkit never unpickles a checkpoint, because loading a "
            "pickle can run arbitrary code",
            hint="convert the checkpoint to safetensors in a trusted environment",
        )
    path = Path(name)
    if path.is_absolute() or ".." in path.parts or not name.endswith(".safetensors"):
        raise WeightLoadError(
            f"{index} names the shard {name!r}; expected a .safetensors file name inside the checkpoint folder",
            hint="an index may only point at shards next to it; fix or re-download it",
        )


#: safetensors dtype names -> torch dtypes, for reading raw bytes into a tensor.
_FILE_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class Checkpoint:
    """All tensors of a safetensors checkpoint, by name, opened lazily with mmap."""

    def __init__(self, folder: str | Path) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        self._handles = {}
        self._where: dict[str, object] = {}
        self._path_of: dict[str, Path] = {}
        self._layouts: dict[Path, tuple[int, dict] | None] = {}
        for path in find_weight_files(self.folder):
            try:
                handle = safe_open(str(path), framework="pt")
                keys = list(handle.keys())
            except Exception as exc:  # safetensors raises its own error types for bad headers
                raise WeightLoadError(
                    f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})",
                    hint="the file is truncated or corrupt; download it again",
                ) from None
            self._handles[path] = handle
            for key in keys:
                if key in self._path_of:
                    raise WeightLoadError(
                        f"tensor {key!r} is stored twice: in {self._path_of[key].name} and in {path.name} "
                        f"({self.folder}); which one is meant is ambiguous",
                        hint="the shards come from different saves; download the checkpoint again",
                    )
                self._where[key] = handle
                self._path_of[key] = path

    def keys(self) -> set[str]:
        """Every tensor name in the checkpoint."""
        return set(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``key`` without reading its data."""
        return tuple(self._where[key].get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor."""
        try:
            return self._where[key].get_tensor(key)
        except Exception as exc:
            raise WeightLoadError(
                f"could not read tensor {key!r} from {self.folder} ({type(exc).__name__}: {exc})",
                hint="the file is truncated or corrupt; download it again",
            ) from None


    def _layout(self, path: Path) -> tuple[int, dict] | None:
        """``(offset of the data section, header)`` of one file, or None if unreadable."""
        if path not in self._layouts:
            layout = None
            try:
                with open(path, "rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(n))
                if isinstance(header, dict):
                    layout = (8 + n, header)
            except (OSError, ValueError, RecursionError):
                pass
            self._layouts[path] = layout
        return self._layouts[path]

    def read_fused(self, keys: list[str], dtype: torch.dtype) -> torch.Tensor | None:
        """``torch.cat([get(k) for k in keys])`` without reading the parts: a view of the file when
        they lie back to back in it, else copied from the file straight into one new ``dtype``
        tensor; None (caller falls back) unless every part is stored in ``dtype`` with matching
        trailing dims in a readable file."""
        if sys.byteorder != "little" or not keys:
            return None
        spans, shapes = [], []
        for key in keys:
            path = self._path_of.get(key)
            layout = self._layout(path) if path is not None else None
            entry = layout[1].get(key) if layout else None
            if not isinstance(entry, dict) or _FILE_DTYPES.get(entry.get("dtype")) != dtype:
                return None
            try:
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(v) for v in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                return None
            if not shape or end - begin != dtype.itemsize * _numel(shape):
                return None
            spans.append((path, layout[0] + begin, end - begin))
            shapes.append(shape)
        if len({s[1:] for s in shapes}) != 1:
            return None
        shape = (sum(s[0] for s in shapes), *shapes[0][1:])
        if _back_to_back(spans):
            try:
                return _map_from_file(spans[0][0], spans[0][1], sum(size for _, _, size in spans), dtype).view(shape)
            except (OSError, ValueError, BufferError, RuntimeError):
                pass  # e.g. a misaligned span: copy instead
        out = torch.empty(shape, dtype=dtype)
        flat = out.view(-1)
        pos = 0
        try:
            for path, offset, size in spans:
                _copy_from_file(path, offset, size, flat[pos : pos + size // dtype.itemsize])
                pos += size // dtype.itemsize
        except (OSError, ValueError, BufferError):
            return None
        return out


def _back_to_back(spans: list[tuple[Path, int, int]]) -> bool:
    """True when the ``(path, offset, size)`` spans follow each other in one file, in order (as
    ``gate_proj`` and ``up_proj`` do in a checkpoint written with sorted names)."""
    return all(a[0] == b[0] and a[1] + a[2] == b[1] for a, b in zip(spans, spans[1:]))


def _map_from_file(path: Path, offset: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D ``dtype`` tensor over ``size`` bytes at ``offset`` of ``path``, without a copy.

    A private (copy-on-write) mapping of just that range: pages are read on first use, writes
    (e.g. training) never reach the file, and the mapping lives as long as the tensor."""
    import mmap

    if size % dtype.itemsize or offset % dtype.itemsize:
        raise ValueError("span not aligned to the dtype")
    start = offset // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), offset + size - start, flags=mmap.MAP_PRIVATE,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)  # fmt: skip
    return torch.frombuffer(mm, dtype=dtype, count=size // dtype.itemsize, offset=offset - start)


def _copy_from_file(path: Path, offset: int, size: int, dest: torch.Tensor) -> None:
    """Copy ``size`` bytes at ``offset`` of ``path`` into the contiguous tensor ``dest``.

    Through a private mapping of just that range, closed right after: the copy is torch's
    (multi-threaded) and the mapped pages leave this process's RSS when it closes (a copy from
    the checkpoint's long-lived mapping would keep them resident next to ``dest``)."""
    import mmap

    if size == 0:
        return
    start = offset // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), offset + size - start, flags=mmap.MAP_PRIVATE,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)  # fmt: skip
    try:
        src = torch.frombuffer(mm, dtype=dest.dtype, count=dest.numel(), offset=offset - start)
        dest.copy_(src)
        del src
    finally:
        mm.close()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass
class LoadReport:
    """What loading did, per component: tensors loaded, and problems found."""

    loaded: dict[str, int] = field(default_factory=dict)  # checkpoint tensors read, per slot
    missing: dict[str, list[str]] = field(default_factory=dict)
    mismatched: dict[str, list[str]] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    fresh: dict[str, list[str]] = field(default_factory=dict)  # params left at fresh init
    wrong_dtype: dict[str, list[str]] = field(default_factory=dict)  # not floating point

    @property
    def ok(self) -> bool:
        """True when nothing is missing, mis-shaped, of a wrong dtype or unexpected."""
        return not (self.missing or self.mismatched or self.wrong_dtype or self.unexpected)

    def summary(self) -> str:
        """A multi-line, per-component description of the problems."""
        lines = []
        tables = (("missing", self.missing), ("mis-shaped", self.mismatched), ("of a wrong dtype", self.wrong_dtype))
        for title, table in tables:
            for slot, keys in table.items():
                lines.append(f"  {slot}: {len(keys)} {title}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}")
        if self.unexpected:
            u = self.unexpected
            lines.append(f"  {len(u)} unexpected (read by no component): {', '.join(u[:6])}{' ...' if len(u) > 6 else ''}")
        return "\n".join(lines)


def dtype_problem(name: str, tensor: torch.Tensor) -> str | None:
    """The one dtype check of every checkpoint tensor, alone or as a part of a fused one: ``None``
    when it is a float (or bool) tensor, else the line :class:`LoadReport` lists."""
    if tensor.is_floating_point() or tensor.dtype == torch.bool:
        return None
    return f"{name} {str(tensor.dtype).removeprefix('torch.')} (model expects a float)"


def _gather(rule_sources: Iterable[str], ckpt: Checkpoint) -> list[str]:
    return [s for s in rule_sources if s not in ckpt._where]  # noqa: SLF001


def load_component(
    slot: str, module: nn.Module, keymap: KeyMap, ckpt: Checkpoint, dtype: torch.dtype, report: LoadReport
) -> set[str]:
    """Load ``module``'s tensors from ``ckpt`` into ``report``; returns the checkpoint keys read.

    Mis-shaped and missing tensors are recorded (not raised) so one error can list them all.
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}
    state: dict[str, torch.Tensor] = {}
    n_read = 0
    for rule in keymap:
        absent = _gather(rule.sources, ckpt)
        if absent:
            report.missing.setdefault(slot, []).extend(absent)
            continue
        tensor = _read_fused(ckpt, rule, dtype) if len(rule.sources) > 1 else None
        if tensor is None:
            parts = [ckpt.get(s) for s in rule.sources]
            problems = [x for x in map(dtype_problem, rule.sources, parts) if x]
            if problems:  # a part is checked before fusing (torch.cat would promote int8 to float)
                report.wrong_dtype.setdefault(slot, []).extend(problems)
                continue
            tensor = parts[0] if len(parts) == 1 else _fuse(parts, rule.rows, rule.local, slot, report)
        if tensor is None:
            continue
        want = expected.get(rule.local)
        if want is None or tuple(tensor.shape) != want:
            report.mismatched.setdefault(slot, []).append(
                f"{'/'.join(rule.sources)} {tuple(tensor.shape)} (model expects {want})"
            )
            continue
        problem = dtype_problem("/".join(rule.sources), tensor)
        if problem:
            report.wrong_dtype.setdefault(slot, []).append(problem)
            continue
        state[rule.local] = tensor.to(dtype)
        n_read += len(rule.sources)
    _assign(module, state)
    report.loaded[slot] = n_read
    return {s for r in keymap for s in r.sources}


def _assign(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``module.load_state_dict(state, strict=False, assign=True)`` for checked tensors.

    Shapes were checked against ``module.state_dict()`` already, so plain modules get their
    tensors set directly (torch's per-module walk costs ~40% of a warm load); a component that
    overrides ``load_state_dict`` (e.g. to re-tie weights) or holds a module with its own
    ``_load_from_state_dict``, extra state or load hooks goes through torch."""
    if type(module).load_state_dict is not nn.Module.load_state_dict or any(_custom_loading(m) for m in module.modules()):
        module.load_state_dict(state, strict=False, assign=True)
        return
    for key, tensor in state.items():
        owner_name, _, name = key.rpartition(".")
        owner = module.get_submodule(owner_name)
        if name in owner._parameters:  # noqa: SLF001
            old = owner._parameters[name]  # noqa: SLF001
            owner._parameters[name] = nn.Parameter(tensor, requires_grad=old is None or old.requires_grad)  # noqa: SLF001
        else:
            owner._buffers[name] = tensor  # noqa: SLF001


def _custom_loading(m: nn.Module) -> bool:
    return (
        type(m)._load_from_state_dict is not nn.Module._load_from_state_dict  # noqa: SLF001
        or type(m).set_extra_state is not nn.Module.set_extra_state
        or bool(m._load_state_dict_pre_hooks)  # noqa: SLF001
        or bool(m._load_state_dict_post_hooks)  # noqa: SLF001
    )


def _read_fused(ckpt: Checkpoint, rule, dtype: torch.dtype) -> torch.Tensor | None:  # noqa: ANN001
    """The fused tensor of ``rule`` read straight from the file, or None to take the general path
    (which also reports mis-shaped parts and unreadable files)."""
    try:
        if tuple(ckpt.shape(s)[0] if ckpt.shape(s) else None for s in rule.sources) != tuple(rule.rows):
            return None
        return ckpt.read_fused(list(rule.sources), dtype)
    except Exception:  # noqa: BLE001 - any problem: the general path raises the proper error
        return None


def _fuse(parts, rows, local, slot, report) -> torch.Tensor | None:
    got = tuple(p.shape[0] if p.dim() else None for p in parts)
    if got != tuple(rows) or len({p.shape[1:] for p in parts}) != 1:
        shapes = ", ".join(str(tuple(p.shape)) for p in parts)
        report.mismatched.setdefault(slot, []).append(f"{local}: parts {shapes} (model expects rows {tuple(rows)})")
        return None
    return torch.cat(parts, dim=0)


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (made contiguous, de-aliased) to ``path``."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    out = {}
    for key, t in tensors.items():
        t = t.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr()
        out[key] = t.clone().contiguous() if ptr in seen else t.contiguous()
        seen.add(ptr)
    save_file(out, str(path), metadata=metadata or {"format": "pt"})
