"""The hostile inputs: each case damages one file or argument and says what must come out.

A case is ``Case(run, error=..., words=...)``: ``run(ctx)`` is called in a bounded child
process (see ``_worker.py``) and must raise a ``vlmkit.errors`` class named ``error`` whose
message holds each of ``words`` and a ``hint:`` line (the fix); or ``Case(run, ok=...)``: it
must return, and the returned text must hold each of ``words`` (``run`` checks the result
itself, so a wrong result raises). CLI cases return ``"rc=N\\n<stderr>"`` and expect ``rc=1``
and vlmkit's ``error:`` line, never ``internal error``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PUBLISHED = REPO / "vlmkit" / "data" / "hf-configs" / "SmolVLM-256M-Instruct"

#: A tiny YAML-form spec (builds in milliseconds); a 4096-token context.
TINY = {
    "vision_tower": {"name": "navit", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 4, "image_size": 48, "patch_size": 8},
    "connector": {"name": "idefics3", "scale_factor": 2},
    "packer": {"name": "image_packer", "image_token_id": 290},
    "backbone": {"name": "llama", "vocab_size": 300, "hidden_size": 48, "intermediate_size": 104,
                 "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "max_position_embeddings": 4096},
}  # fmt: skip


@dataclass
class Ctx:
    """What a case may use: its scratch folder and the tiny checkpoint (copy it to damage it)."""

    tmp: Path
    ckpt_source: Path

    def ckpt(self) -> Path:
        """A private copy of the tiny Idefics3 checkpoint (config.json + model.safetensors)."""
        dst = self.tmp / "ckpt"
        if not dst.exists():
            shutil.copytree(self.ckpt_source, dst)
        return dst

    def published(self) -> Path:
        """A private copy of the published SmolVLM-256M-Instruct files (no weights)."""
        dst = self.tmp / "SmolVLM-256M-Instruct"
        if not dst.exists():
            shutil.copytree(PUBLISHED, dst)
        return dst

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path


@dataclass(frozen=True)
class Case:
    run: Callable[[Ctx], object]
    error: str | None = None
    words: tuple[str, ...] = ()
    ok: bool = False
    cli: bool = False
    env: dict[str, str] = field(default_factory=dict)


CASES: dict[str, Case] = {}


def case(name: str, *, error: str | None = None, words: tuple[str, ...] = (), ok: bool = False, cli: bool = False,
         env: dict[str, str] | None = None):  # fmt: skip
    def add(fn: Callable[[Ctx], object]) -> Callable[[Ctx], object]:
        def run(ctx: Ctx) -> object:
            os.environ.update(env or {})
            return fn(ctx)

        CASES[name] = Case(run, error=error, words=words, ok=ok, cli=cli, env=env or {})
        return fn

    return add


# ----------------------------------------------------------------------------- helpers


def _yaml(spec: dict) -> str:
    import yaml

    return yaml.safe_dump(spec, sort_keys=False)


def _cli(*args: str) -> str:
    """``vlmkit ARGS`` in this process; returns ``"rc=N\\n"`` + what it wrote to stderr."""
    from vlmkit.cli import main

    sys.stderr.flush()
    err = Path("stderr.txt")
    before = err.stat().st_size if err.exists() else 0
    rc = main(list(args))
    sys.stderr.flush()
    text = err.read_bytes()[before:].decode(errors="replace") if err.exists() else ""
    return f"rc={rc}\n{text}"


def _edit_json(path: Path, edit: Callable[[dict], None]) -> Path:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


def _nested(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


def _laughs(levels: int = 12) -> str:
    """The tiny spec with ``freeze:`` a "billion laughs" (10 ** levels strings from a few lines)."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n" + _yaml(TINY) + f"freeze: *a{levels - 1}\n"


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _save(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def _png(width: int, height: int, *, truncate: bool = False) -> bytes:
    """A valid 8-bit grayscale PNG header of ``width x height`` with one tiny IDAT (no big buffer)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    raw = zlib.compress(b"\x00" * (width + 1) * min(height, 4))
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw)
    return data if truncate else data + chunk(b"IEND", b"")


def _real_png(size: int = 32) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _tiny_model():
    import torch

    import vlmkit

    torch.manual_seed(0)
    return vlmkit.build(TINY, load_weights=False)


def _template(ctx: Ctx, text: str):
    import vlmkit

    folder = ctx.published()
    (folder / "chat_template.json").unlink()
    (folder / "chat_template.jinja").write_text(text)
    processor = vlmkit.load_processor(folder)
    return processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                         add_generation_prompt=True)  # fmt: skip


def _entry_point_plugin(ctx: Ctx, module: str, body: str) -> None:
    """A fake installed distribution whose ``vlmkit`` entry point is ``module`` (with ``body``)."""
    site = ctx.tmp / "site"
    dist = site / f"{module}-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[vlmkit]\n{module} = {module}\n")
    (site / f"{module}.py").write_text(body)
    sys.path.insert(0, str(site))
    from vlmkit import plugins

    plugins.reset()


def warm_up(ckpt: Path) -> None:
    """Run once in the worker before any fork: the registry, torch's first-use costs, transformers'
    config classes and the processor files, so each forked case starts warm."""
    import warnings

    import vlmkit
    from transformers import AutoConfig  # noqa: F401

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _tiny_model()
        vlmkit.build_from_hf(ckpt)
        vlmkit.load_processor(PUBLISHED)


from . import cases_files, cases_runtime, cases_weights  # noqa: E402,F401 - the cases themselves register here
