"""The float32 decode layouts (vlmkit.decode_layout) keep vlmkit equal to transformers: logits
within 1e-4 and identical greedy tokens, with every weight stored transposed and with none."""

from __future__ import annotations

import contextlib

import pytest
import torch

import vlmkit
from vlmkit import native
from vlmkit.components.llama_fused import FusedDecode, plan_of
from vlmkit.decode_layout import GemvLinear, is_transposed, prepare_decode
from vlmkit.generation import default_pad_id, default_stop_ids

from .tiny_hf import IMAGE_TOKEN, SHAPES, make_checkpoint

transformers = pytest.importorskip("transformers")

NEW = 10
PICKED = [SHAPES[0], SHAPES[1]]  # untied GQA and tied MHA


@pytest.fixture(scope="module", params=PICKED, ids=[s.name for s in PICKED])
def hf_and_folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param.name) / "ckpt"
    return make_checkpoint(request.param, folder), folder


@pytest.mark.parametrize(
    "layout,kernels", [("transposed", "vlmkit"), ("rows", "vlmkit"), ("rows", "torch")], ids=["transposed-vlmkit", "rows-vlmkit", "rows-torch"]
)
def test_layout_keeps_greedy_tokens_and_step_logits(hf_and_folder, layout, kernels):
    """``*-vlmkit``: one-token steps through vlmkit.native (the fused Llama step, its one-row
    kernels); ``rows-torch``: the modules with torch's kernels (F.linear)."""
    if kernels == "vlmkit" and not native.available():
        pytest.skip(f"vlmkit's one-row kernels are not available here: {native.status()}")
    with contextlib.nullcontext() if kernels == "vlmkit" else native.disabled():
        bb = _check_layout(hf_and_folder, layout)
    # with vlmkit's kernels every one-token step ran the native Llama step (llama_fused)
    assert isinstance(plan_of(bb), FusedDecode) == (kernels == "vlmkit"), plan_of(bb)


def _check_layout(hf_and_folder, layout):
    hf, folder = hf_and_folder
    ours = vlmkit.build_from_hf(folder)
    chosen = prepare_decode(ours.backbone, layout)
    assert set(chosen.values()) == {layout}
    linears = [m for m in ours.backbone.modules() if isinstance(m, GemvLinear)]
    assert linears and all(is_transposed(m.weight) == (layout == "transposed") for m in linears)
    ids = torch.randint(3, IMAGE_TOKEN - 10, (1, 9), generator=torch.Generator().manual_seed(0))
    stops = default_stop_ids(ours)
    with torch.no_grad():
        want = hf.generate(input_ids=ids, do_sample=False, max_new_tokens=NEW, eos_token_id=stops,
                           pad_token_id=default_pad_id(ours), output_logits=True, return_dict_in_generate=True)
    got = ours.generate(ids, max_new_tokens=NEW)
    assert torch.equal(got, want.sequences)
    # one-row logits of every step, teacher-forced on the same tokens, through the mv path
    bb = ours.backbone
    seq = want.sequences
    with torch.inference_mode():
        cache = bb.new_cache(1, seq.shape[1])
        bb(bb.embed(seq[:, : ids.shape[1] - 1]), cache=cache)
        for step in range(NEW):
            pos = ids.shape[1] - 1 + step
            logits = bb.logits(bb(bb.embed(seq[:, pos : pos + 1]), cache=cache))[:, -1]
            assert (logits - want.logits[step]).abs().max() < 1e-4
    return bb


def test_tied_head_stays_tied_and_embedding_lookup_unchanged(hf_and_folder):
    hf, folder = hf_and_folder
    ours = vlmkit.build_from_hf(folder)
    bb = ours.backbone
    ids = torch.tensor([[3, 4, 5, 6]])
    before = bb.embed(ids).detach().clone()
    prepare_decode(bb, "transposed")
    assert torch.equal(bb.embed(ids), before)
    if bb.lm_head is None:
        assert is_transposed(bb.embed_tokens.weight)
    # the state dict keeps its keys and (out, in) shapes: tied stays tied
    assert ("backbone.lm_head.weight" in ours.state_dict()) == (bb.lm_head is not None)
    assert bb.embed_tokens.weight.shape == (bb.vocab_size, bb.hidden_size)
