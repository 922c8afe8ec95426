"""vlmkit never unpickles a checkpoint: loading a pickle can run arbitrary code.

The payload below is a real malicious pickle: unpickling it writes a marker file (as an attacker's
``os.system`` would). Every test asserts the marker never appears; ``no_unpickling`` also makes
every unpickling entry point (``pickle.load(s)``, ``pickle.Unpickler``, ``torch.load``) fail the
test if anything calls it.
"""

from __future__ import annotations

import fnmatch
import json
import pickle
from pathlib import Path

import pytest
import torch

import vlmkit
from vlmkit.errors import WeightLoadError
from vlmkit.hub import CHECKPOINT_PATTERNS

from ._tiny_ckpt import copy_checkpoint


class _Payload:
    """Unpickling this runs ``open(marker, "w").write(...)`` -- arbitrary code, as in a real attack."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned by a pickle')",)


def _malicious(marker: Path) -> bytes:
    return pickle.dumps({"model.text_model.norm.weight": _Payload(marker)})


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("vlmkit tried to unpickle something")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)


@pytest.fixture
def pickle_folder(tmp_path):
    """A checkpoint folder (config.json etc.) whose only weights are a malicious pytorch_model.bin."""
    folder = copy_checkpoint(tmp_path / "ckpt")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    (folder / "pytorch_model.bin").write_bytes(_malicious(marker))
    return folder, marker


def test_the_payload_is_live(tmp_path):
    """Guard against a toothless test: unpickling the payload really does run code."""
    marker = tmp_path / "proof"
    pickle.loads(_malicious(marker))
    assert marker.read_text() == "pwned by a pickle"


def test_pickle_only_checkpoint_is_refused(pickle_folder, no_unpickling):
    folder, marker = pickle_folder
    with pytest.raises(WeightLoadError) as info:
        vlmkit.build_from_hf(folder)
    msg = str(info.value)
    assert "pickle" in msg and "pytorch_model.bin" in msg and "never unpickles" in msg
    assert "safetensors" in msg  # what to do instead
    assert not marker.exists()


@pytest.mark.parametrize("name", ["model.pt", "weights.pth", "last.ckpt", "state.pkl", "pytorch_model-00001-of-00002.bin"])
def test_every_pickle_suffix_is_refused(tmp_path, name, no_unpickling):
    folder = copy_checkpoint(tmp_path / "ckpt")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    (folder / name).write_bytes(_malicious(marker))
    with pytest.raises(WeightLoadError, match="pickle"):
        vlmkit.build_from_hf(folder)
    assert not marker.exists()


def test_pickle_only_without_weights_builds_from_config_alone(pickle_folder, no_unpickling):
    folder, marker = pickle_folder
    model = vlmkit.build_from_hf(folder, load_weights=False)
    assert model.untrained_parameters()  # fresh init, said so
    assert not marker.exists()


def test_safetensors_is_read_and_the_pickle_beside_it_never(tmp_path, no_unpickling):
    folder = copy_checkpoint(tmp_path / "ckpt")
    marker = tmp_path / "PWNED"
    (folder / "pytorch_model.bin").write_bytes(_malicious(marker))
    model = vlmkit.build_from_hf(folder)
    assert model.load_report.ok and not model.untrained_parameters()
    assert not marker.exists()


def test_index_pointing_at_a_pickle_shard_is_refused(tmp_path, no_unpickling):
    folder = copy_checkpoint(tmp_path / "ckpt")
    marker = tmp_path / "PWNED"
    (folder / "pytorch_model-00001-of-00001.bin").write_bytes(_malicious(marker))
    index = {"metadata": {}, "weight_map": {"model.text_model.norm.weight": "pytorch_model-00001-of-00001.bin"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightLoadError, match="never unpickles"):
        vlmkit.build_from_hf(folder)
    assert not marker.exists()


def test_cli_inspect_of_a_pickle_checkpoint(pickle_folder, no_unpickling, capsys):
    from vlmkit.cli import main

    folder, marker = pickle_folder
    assert main(["inspect", str(folder)]) == 0  # default: weights only when safetensors exist
    assert "weights: none loaded" in capsys.readouterr().out
    assert main(["inspect", str(folder), "--weights"]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "pickle" in err and "Traceback" not in err
    assert not marker.exists()


PICKLE_NAMES = [
    "pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "training_args.bin", "optimizer.pt", "model.pt",
    "rng_state.pth", "scheduler.pt", "model.ckpt", "data.pkl", "sub/pytorch_model.bin", "vision/model.pth",
]  # fmt: skip


@pytest.mark.parametrize("name", PICKLE_NAMES)
def test_download_patterns_never_match_pickles(name):
    assert not [p for p in CHECKPOINT_PATTERNS if fnmatch.fnmatch(name, p)]


def test_download_patterns_still_fetch_what_vlmkit_reads():
    for name in ["config.json", "model.safetensors", "model-00001-of-00002.safetensors", "tokenizer.json", "merges.txt"]:
        assert [p for p in CHECKPOINT_PATTERNS if fnmatch.fnmatch(name, p)], name


@pytest.mark.parametrize("weights", [True, False])
def test_hub_download_asks_only_for_the_safe_patterns(monkeypatch, tmp_path, weights):
    import huggingface_hub

    from vlmkit.hub import resolve_source

    seen = {}

    def fake_snapshot_download(repo_id, *, revision=None, allow_patterns=None, **kwargs):
        seen.update(repo_id=repo_id, allow_patterns=list(allow_patterns or []), kwargs=kwargs)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_source("someone/some-model", weights=weights) == tmp_path
    patterns = seen["allow_patterns"]
    assert patterns, "an empty allow list would fetch every file"
    assert set(patterns) <= set(CHECKPOINT_PATTERNS)
    assert ("*.safetensors" in patterns) is weights
    for name in PICKLE_NAMES:
        assert not [p for p in patterns if fnmatch.fnmatch(name, p)], name
    assert "ignore_patterns" not in seen["kwargs"] or seen["kwargs"]["ignore_patterns"]
