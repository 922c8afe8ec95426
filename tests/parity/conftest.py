"""Fixtures the processor parity modules share: the published SmolVLM-256M files and vlmkit's
processor on them (each module builds its own transformers reference, with the options it needs)."""

from __future__ import annotations

import warnings

import pytest

from vlmkit.processor import load_processor

from ..conftest import published_folder


@pytest.fixture(scope="module")
def folder():
    return published_folder("SmolVLM-256M-Instruct")


@pytest.fixture(scope="module")
def ours(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the published bos/eos disagreement; asserted in the unit tests
        return load_processor(folder)
