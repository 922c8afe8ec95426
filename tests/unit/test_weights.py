"""vlmkit.weights: fused tensors read from safetensors files, as views or as copies."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save_file

from vlmkit import weights
from vlmkit.weights import Checkpoint


@pytest.fixture
def folder(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(rows, 8, generator=g) for name, rows in
               [("mlp.gate_proj.weight", 6), ("mlp.up_proj.weight", 6), ("attn.k_proj.weight", 2),
                ("attn.o_proj.weight", 4), ("attn.q_proj.weight", 4), ("attn.v_proj.weight", 2)]}  # fmt: skip
    save_file(tensors, str(tmp_path / "model.safetensors"))  # sorted names: gate, up back to back; k, o, q, v
    return tmp_path, tensors


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _copies(monkeypatch) -> list:
    calls = []
    real = weights._copy_from_file
    monkeypatch.setattr(weights, "_copy_from_file", lambda *a: (calls.append(a[0]), real(*a)))
    return calls


def test_back_to_back_parts_become_one_view_of_the_file(folder, monkeypatch):
    path, tensors = folder
    copies = _copies(monkeypatch)
    before = _digest(path / "model.safetensors")
    fused = Checkpoint(path).read_fused(["mlp.gate_proj.weight", "mlp.up_proj.weight"], torch.float32)
    assert copies == []
    assert torch.equal(fused, torch.cat([tensors["mlp.gate_proj.weight"], tensors["mlp.up_proj.weight"]]))
    fused.mul_(0.0)  # copy-on-write: the file is never written
    assert _digest(path / "model.safetensors") == before
    again = Checkpoint(path).read_fused(["mlp.gate_proj.weight", "mlp.up_proj.weight"], torch.float32)
    assert torch.equal(again[:6], tensors["mlp.gate_proj.weight"])


def test_parts_apart_or_out_of_order_are_copied(folder, monkeypatch):
    path, tensors = folder
    copies = _copies(monkeypatch)
    ckpt = Checkpoint(path)
    qkv = ckpt.read_fused(["attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"], torch.float32)
    assert len(copies) == 3
    assert torch.equal(qkv, torch.cat([tensors[f"attn.{p}_proj.weight"] for p in "qkv"]))
    up_gate = ckpt.read_fused(["mlp.up_proj.weight", "mlp.gate_proj.weight"], torch.float32)
    assert len(copies) == 5
    assert torch.equal(up_gate, torch.cat([tensors["mlp.up_proj.weight"], tensors["mlp.gate_proj.weight"]]))


def test_other_dtype_is_left_to_the_general_path(folder):
    path, _ = folder
    assert Checkpoint(path).read_fused(["mlp.gate_proj.weight", "mlp.up_proj.weight"], torch.float16) is None


class _Retie(torch.nn.Module):
    """A component whose load_state_dict does more than assign (like hf_causal_lm's re-tie)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(4, 3)
        self.head = torch.nn.Linear(3, 4, bias=False)
        self.head.weight = self.embed.weight

    def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: ANN001
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.head.weight = self.embed.weight
        return out


def test_assign_sets_parameters_and_defers_to_custom_loading():
    plain = torch.nn.Sequential(torch.nn.Linear(3, 2))
    plain[0].bias.requires_grad_(False)
    w, b = torch.ones(2, 3), torch.zeros(2)
    weights._assign(plain, {"0.weight": w, "0.bias": b})
    assert plain[0].weight.data_ptr() == w.data_ptr() and isinstance(plain[0].weight, torch.nn.Parameter)
    assert plain[0].weight.requires_grad and not plain[0].bias.requires_grad
    tied = _Retie()
    weights._assign(tied, {"embed.weight": torch.full((4, 3), 2.0)})
    assert tied.head.weight is tied.embed.weight and float(tied.head.weight[0, 0]) == 2.0
