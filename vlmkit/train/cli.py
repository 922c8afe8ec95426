"""The body of ``vlmkit train`` (the command itself is declared in :mod:`vlmkit.cli`)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["train_command"]


def train_command(recipe: Path, output_dir: Path | None, resume: bool, save_adapter: bool | None) -> Path:
    """Run the recipe file (relaunching under accelerate's multi-process launcher when asked)."""
    from .launch import relaunch_if_needed

    relaunch_if_needed()
    from . import train

    return train(recipe, output_dir=output_dir, resume=resume, save_adapter=save_adapter)
