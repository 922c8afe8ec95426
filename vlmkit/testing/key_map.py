"""The key-map check every ``check_*`` runs: state-dict stability, exact key-map coverage, the
``KeyMap.export`` round trip, and loading the exported weights into a copy built on ``meta``."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..keymap import KeyMap
from .common import seeded


def check_key_map(make: Callable[[], nn.Module], who: str, run: Callable[[nn.Module], torch.Tensor], slot: str) -> None:
    """State-dict stability, exact key-map coverage, export round trip and meta-device loading.

    ``make()`` constructs the component; ``run(module)`` returns its output on a fixed input.
    """
    first = _build_twice(make, who)
    km = first.key_map()
    assert isinstance(km, KeyMap), f"{who}: key_map() must return a vlmkit.keymap.KeyMap; got {type(km).__name__}"
    state = first.state_dict()
    sources = _check_coverage(km, state, who)
    _check_fused_rows(km, state, who)
    exported = _check_export(km, state, sources, who)
    meta = _load_on_meta(make, exported, slot, who)
    first.eval()
    meta.eval()
    with torch.no_grad():
        torch.testing.assert_close(run(meta), run(first), msg=lambda m: f"{who}: reloaded copy computes differently: {m}")


def _build_twice(make: Callable[[], nn.Module], who: str) -> nn.Module:
    """Two constructions (seeds 0 and 1) must have the same ``state_dict`` keys and shapes; returns the first."""
    with seeded(0):
        first = make()
    with seeded(1):
        second = make()
    shapes_1 = [(k, tuple(v.shape)) for k, v in first.state_dict().items()]
    shapes_2 = [(k, tuple(v.shape)) for k, v in second.state_dict().items()]
    assert shapes_1 == shapes_2, (
        f"{who}: state_dict keys/shapes differ between two constructions with the same params: "
        f"{sorted(set(shapes_1) ^ set(shapes_2))[:6]}"
    )
    return first


def _check_coverage(km: KeyMap, state: Mapping[str, torch.Tensor], who: str) -> list[str]:
    """One rule per ``state`` key, none for other keys, each checkpoint key read once; returns those keys."""
    local = [r.local for r in km]
    missing = sorted(set(state) - set(local))
    extra = sorted(set(local) - set(state))
    assert not missing, f"{who}: key_map() has no rule for state_dict keys {missing[:6]} (they could never be loaded)"
    assert not extra, f"{who}: key_map() has rules for keys not in the state_dict: {extra[:6]}"
    sources = km.checkpoint_keys()
    dupes = sorted({s for s in sources if sources.count(s) > 1})
    assert not dupes, f"{who}: key_map() reads checkpoint keys {dupes[:6]} more than once"
    return sources


def _check_fused_rows(km: KeyMap, state: Mapping[str, torch.Tensor], who: str) -> None:
    """A rule fusing several checkpoint keys splits exactly the rows (dim 0) of its local tensor."""
    for rule in km:
        if len(rule.sources) > 1:
            rows = sum(rule.rows or ())
            assert rows == state[rule.local].shape[0], (
                f"{who}: fused rule {rule.local!r} splits {rule.rows} rows but the tensor has {state[rule.local].shape[0]}"
            )


def _check_export(km: KeyMap, state: Mapping[str, torch.Tensor], sources: list[str], who: str) -> dict[str, torch.Tensor]:
    """``km.export(state)`` writes exactly ``sources`` and concatenates back to ``state``; returns the export."""
    exported = km.export(state)
    assert set(exported) == set(sources), f"{who}: KeyMap.export wrote {sorted(set(exported) ^ set(sources))[:6]} unexpectedly"
    for rule in km:
        back = torch.cat([exported[s] for s in rule.sources], dim=0) if len(rule.sources) > 1 else exported[rule.sources[0]]
        assert torch.equal(back, state[rule.local]), f"{who}: KeyMap.export does not round-trip {rule.local!r}"
    return exported


def _load_on_meta(make: Callable[[], nn.Module], exported: dict[str, torch.Tensor], slot: str, who: str) -> nn.Module:
    """Build on the ``meta`` device and load ``exported`` (saved as safetensors) as the builder does; returns
    the loaded copy, on the CPU in float32, with nothing left on ``meta``."""
    from ..weights import Checkpoint, LoadReport, load_component, save_safetensors

    with tempfile.TemporaryDirectory(prefix="vlmkit-conformance-") as tmp:
        save_safetensors(exported, Path(tmp) / "model.safetensors")
        with torch.device("meta"):
            meta = make()
        report = LoadReport()
        load_component(slot, meta, meta.key_map(), Checkpoint(tmp), torch.float32, report)
    assert report.ok, f"{who}: loading its own exported weights through key_map() failed:\n{report.summary()}"
    with contextlib.suppress(NotImplementedError):  # "cannot copy out of meta tensor": reported below
        meta.to(device="cpu", dtype=torch.float32)  # as the builder does after loading
    on_meta = [n for n, t in [*meta.named_parameters(), *meta.named_buffers()] if t.is_meta]
    assert not on_meta, (
        f"{who}: built on the meta device and loaded from a checkpoint, {on_meta[:6]} are still on meta -- "
        "compute such buffers in forward (or make them persistent so the key map covers them)"
    )
    return meta
