"""Hub repo ids resolve through huggingface_hub's real cache, offline, against local folders."""

from __future__ import annotations

import shutil

import pytest

import vlmkit
from vlmkit.errors import SourceNotFoundError
from vlmkit.hub import resolve_source

from ..conftest import published_folder

REVISION = "0123456789abcdef0123456789abcdef01234567"


def _fake_hf_cache(root, repo_id: str, folder):
    """Lay ``folder``'s files out as huggingface_hub caches a downloaded snapshot."""
    repo_dir = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo_dir / "snapshots" / REVISION
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        if f.is_file():
            shutil.copyfile(f, snap / f.name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(REVISION)
    return snap


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return tmp_path


def test_cached_repo_id_resolves_offline(hf_cache):
    snap = _fake_hf_cache(hf_cache, "someone/tiny-vlm", published_folder("SmolVLM-256M-Instruct"))
    assert resolve_source("someone/tiny-vlm", weights=False).resolve() == snap.resolve()
    spec = vlmkit.spec_from_hf("someone/tiny-vlm")
    assert spec.backbone.params.hidden_size == 576 and spec.weights == "someone/tiny-vlm"


def test_uncached_repo_id_offline_says_so(hf_cache):
    with pytest.raises(SourceNotFoundError) as info:
        resolve_source("someone/not-here")
    assert "not in the local Hugging Face cache" in str(info.value)
    assert info.value.hint and "local folder" in info.value.hint


def test_bundled_repo_id_falls_back_with_a_warning(hf_cache, caplog):
    from vlmkit.hf import resolve_config_folder

    folder, bundled = resolve_config_folder("HuggingFaceTB/SmolVLM-256M-Instruct")
    assert bundled and (folder / "config.json").is_file()
    assert "bundled" in caplog.text
    with pytest.raises(SourceNotFoundError):  # weights are never bundled
        resolve_config_folder("HuggingFaceTB/SmolVLM-256M-Instruct", weights=True)


@pytest.mark.parametrize("bad", ["not a repo id", "../relative/but/missing", "a/b/c"])
def test_not_a_folder_nor_a_repo_id(bad):
    with pytest.raises(SourceNotFoundError, match="no folder"):
        resolve_source(bad)
