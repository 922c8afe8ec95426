"""Training checkpoints: weights, optimizer, scheduler and RNG state, written atomically.

A checkpoint is a folder ``checkpoints/step-00000100`` holding only safetensors and JSON (no
pickle, ever): ``weights.safetensors`` (the tensors of every slot trained so far, LoRA included),
``optimizer.safetensors`` + ``optimizer.json``, ``scheduler.json``, ``rng-<rank>.safetensors`` +
``rng-<rank>.json`` and ``state.json`` (where the run is). It is written to a temporary folder
first and moved into place with ``os.replace``, then ``checkpoints/latest`` is replaced the same
way, so a crash mid-save leaves the last good checkpoint untouched.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import TrainingError
from ..weights import save_safetensors

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "rng_state", "set_rng_state"]

LATEST = "latest"


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------ RNG
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch (CPU and CUDA), numpy and Python RNG states as tensors + JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).view(np.int32).copy())
    version, internal, gauss_next = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [version, list(internal), gauss_next]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().view(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ------------------------------------------------------------------ optimizer
def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        index, _, key = flat.partition(".")
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# ------------------------------------------------------------------ save / load
def save_checkpoint(folder: Path, *, step: int, model_tensors: dict[str, torch.Tensor] | None, optimizer: Any,
                    scheduler: Any, state: dict[str, Any], rank: int, barrier) -> Path:  # fmt: skip
    """Write checkpoint ``step`` under ``folder`` atomically; every process calls it (each saves
    its RNG state), process 0 writes the rest. ``barrier()`` synchronises the processes."""
    final = folder / f"step-{step:08d}"
    tmp = folder / f".tmp-step-{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    rng_tensors, rng_meta = rng_state()
    save_safetensors(rng_tensors, tmp / f"rng-{rank}.safetensors")
    _write_json(tmp / f"rng-{rank}.json", rng_meta)
    barrier()
    if rank == 0:
        save_safetensors(model_tensors or {}, tmp / "weights.safetensors")
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        save_safetensors(opt_tensors, tmp / "optimizer.safetensors")
        _write_json(tmp / "optimizer.json", opt_meta)
        _write_json(tmp / "scheduler.json", scheduler.state_dict())
        _write_json(tmp / "state.json", state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_text(folder / LATEST, final.name + "\n")
    barrier()
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint ``checkpoints/latest`` names, or ``None``."""
    pointer = folder / LATEST
    if not pointer.is_file():
        return None
    path = folder / pointer.read_text(encoding="utf-8").strip()
    if not (path / "state.json").is_file():
        raise TrainingError(f"{pointer} names {path.name}, which is not a complete checkpoint",
                            hint="delete the pointer (and that folder) to resume from an earlier checkpoint")  # fmt: skip
    return path


def load_checkpoint(path: Path, rank: int) -> dict[str, Any]:
    """Everything :func:`save_checkpoint` wrote, read back (safetensors + JSON only)."""
    from safetensors.torch import load_file

    def read(name: str) -> Any:
        return json.loads((path / name).read_text(encoding="utf-8"))

    rng_rank = rank if (path / f"rng-{rank}.json").is_file() else 0
    opt_meta = read("optimizer.json")
    return {
        "state": read("state.json"),
        "weights": load_file(str(path / "weights.safetensors")),
        "optimizer": _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), opt_meta),
        "scheduler": read("scheduler.json"),
        "rng": (load_file(str(path / f"rng-{rng_rank}.safetensors")), read(f"rng-{rng_rank}.json")),
    }
