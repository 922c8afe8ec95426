"""Shared fixtures: the published SmolVLM config folders and tiny model helpers."""

from __future__ import annotations

import os
from pathlib import Path

# huggingface_hub reads HF_HUB_OFFLINE once, at import: set it before anything imports it.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "vlmkit" / "data" / "hf-configs"
SHARED = Path(os.environ.get("VLMKIT_SHARED", REPO.parent / "shared")) / "hf-configs"

PUBLISHED = {
    "SmolVLM-256M-Instruct": "HuggingFaceTB__SmolVLM-256M-Instruct",
    "SmolVLM-500M-Instruct": "HuggingFaceTB__SmolVLM-500M-Instruct",
    "SmolVLM2-256M-Video-Instruct": "HuggingFaceTB__SmolVLM2-256M-Video-Instruct",
    "SmolVLM2-500M-Video-Instruct": "HuggingFaceTB__SmolVLM2-500M-Video-Instruct",
}


def published_folder(name: str) -> Path:
    """The folder of a published checkpoint's files (shared/ first, then vlmkit's bundled copy)."""
    shared = SHARED / PUBLISHED[name]
    if shared.is_dir():
        return shared
    bundled = BUNDLED / name
    if bundled.is_dir():
        return bundled
    pytest.skip(f"{name} config files not found under {SHARED} or {BUNDLED}")


@pytest.fixture(params=list(PUBLISHED))
def published(request) -> tuple[str, Path]:
    """(name, folder) for each published SmolVLM config."""
    return request.param, published_folder(request.param)


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    """Tests never reach the Hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
