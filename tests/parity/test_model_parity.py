"""Whole-model parity: vlmkit.build_from_hf(folder) vs transformers on the same saved weights."""

from __future__ import annotations

import pytest
import torch

import vlmkit

from .tiny_hf import SHAPES, make_batch, make_checkpoint

pytest.importorskip("transformers")
TOL = 1e-4


@pytest.fixture(params=SHAPES, ids=[s.name for s in SHAPES])
def pair(request, tmp_path):
    shape = request.param
    hf = make_checkpoint(shape, tmp_path / "ckpt")
    ours = vlmkit.build_from_hf(tmp_path / "ckpt")
    return shape, hf, ours, tmp_path


def test_logits_match_on_a_hard_batch(pair):
    shape, hf, ours, _ = pair
    ids, mask, pixels, pmask = make_batch(shape)
    assert (pixels.flatten(2).abs().sum(-1) == 0).any(), "batch must hold a padding image"
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, pixel_attention_mask=pmask).logits
        got = ours(ids, attention_mask=mask, pixel_values=pixels, pixel_attention_mask=pmask).logits
    real = mask.bool()
    diff = (got - want).abs()[real].max().item()
    assert diff < TOL, f"{shape.name}: max abs diff {diff:.2e}"
    assert ours.load_report.ok and not ours.untrained_parameters()


def test_loss_matches(pair):
    shape, hf, ours, _ = pair
    ids, mask, pixels, pmask = make_batch(shape, images_per_sample=(1, 1), left_pad=(0, 0))
    labels = ids.clone()
    labels[ids == hf.config.image_token_id] = -100
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, pixel_attention_mask=pmask, labels=labels).loss
        got = ours(ids, attention_mask=mask, pixel_values=pixels, pixel_attention_mask=pmask, labels=labels).loss
    assert abs(got.item() - want.item()) < TOL


def test_export_round_trip(pair):
    shape, _, ours, tmp_path = pair
    import transformers

    out = ours.save_pretrained(tmp_path / "export")
    back = transformers.AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    ids, mask, pixels, pmask = make_batch(shape, seed=7)
    with torch.no_grad():
        want = ours(ids, attention_mask=mask, pixel_values=pixels, pixel_attention_mask=pmask).logits
        got = back(input_ids=ids, attention_mask=mask, pixel_values=pixels, pixel_attention_mask=pmask).logits
    diff = (got - want).abs()[mask.bool()].max().item()
    assert diff < TOL, f"{shape.name}: export round trip diff {diff:.2e}"
    again = vlmkit.build_from_hf(out)
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_text_only_forward_matches(pair):
    shape, hf, ours, _ = pair
    ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        diff = (hf(input_ids=ids).logits - ours(ids).logits).abs().max().item()
    assert diff < TOL
