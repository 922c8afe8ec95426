"""Tests never reach the network (timm pretrained weights live on the Hugging Face Hub)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
