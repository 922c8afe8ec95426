"""Shared fixtures: the published SmolVLM config folders and tiny model helpers."""

from __future__ import annotations

import os
from pathlib import Path

# huggingface_hub reads HF_HUB_OFFLINE once, at import: set it before anything imports it.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

REPO = Path(__file__).resolve().parents[1]
#: The published SmolVLM / SmolVLM2 config, processor and tokenizer files, bundled with vlmkit
#: (byte-identical to the Hub: vlmkit/data/hf-configs/SHA256SUMS, checked by test_bundled_files).
BUNDLED = REPO / "vlmkit" / "data" / "hf-configs"

PUBLISHED = {
    "SmolVLM-256M-Instruct": "HuggingFaceTB/SmolVLM-256M-Instruct",
    "SmolVLM-500M-Instruct": "HuggingFaceTB/SmolVLM-500M-Instruct",
    "SmolVLM2-256M-Video-Instruct": "HuggingFaceTB/SmolVLM2-256M-Video-Instruct",
    "SmolVLM2-500M-Video-Instruct": "HuggingFaceTB/SmolVLM2-500M-Video-Instruct",
}


def published_folder(name: str) -> Path:
    """The folder of a published checkpoint's files, inside the repository."""
    folder = BUNDLED / name
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing from the repository (it ships with vlmkit)")
    return folder


@pytest.fixture(params=list(PUBLISHED))
def published(request) -> tuple[str, Path]:
    """(name, folder) for each published SmolVLM config."""
    return request.param, published_folder(request.param)


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    """Tests never reach the Hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _own_quant_cache(monkeypatch, tmp_path_factory):
    """Quantized-weight caches (``--int8``, ``--quantize`` on a folder) go to a temporary folder,
    never the user's ``~/.cache/vlmkit``; a test that wants its own sets ``VLMKIT_CACHE`` again."""
    monkeypatch.setenv("VLMKIT_CACHE", str(tmp_path_factory.mktemp("vlmkit-cache")))


@pytest.fixture
def one_thread():
    """Tiny ops: one torch thread is as fast, and immune to OpenMP spin-waits on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
