"""End to end: vlmkit's processor + model generate what transformers' processor + model generate."""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image

import vlmkit
from vlmkit.generation import default_pad_id, default_stop_ids

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")


def test_split_image_prompt_generates_the_same_tokens(smolvlm_real_folder):
    image = Image.radial_gradient("L").convert("RGB").resize((700, 300))  # 1x2 tiles + global at longest_edge 1024
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the published files disagree on bos/eos, by design
        ours_proc = vlmkit.load_processor(smolvlm_real_folder)
    ours = vlmkit.build_from_hf(smolvlm_real_folder)
    ours_in = ours_proc(text=ours_proc.apply_chat_template(messages, add_generation_prompt=True),
                        images=[image], longest_edge=1024)
    assert ours_in["pixel_values"].shape[1] == 3

    hf_proc = transformers.AutoProcessor.from_pretrained(smolvlm_real_folder)
    hf = transformers.AutoModelForImageTextToText.from_pretrained(smolvlm_real_folder, dtype=torch.float32).eval()
    hf_in = hf_proc(text=hf_proc.apply_chat_template(messages, add_generation_prompt=True), images=[image],
                    return_tensors="pt", size={"longest_edge": 1024})

    stops, pad = default_stop_ids(ours), default_pad_id(ours)
    got = ours.generate(ours_in["input_ids"], attention_mask=ours_in["attention_mask"], pixel_values=ours_in["pixel_values"],
                        pixel_attention_mask=ours_in["pixel_attention_mask"], max_new_tokens=8)
    with torch.no_grad():
        want = hf.generate(**hf_in, do_sample=False, max_new_tokens=8, eos_token_id=stops, pad_token_id=pad)
    assert torch.equal(got, want), (got.tolist(), want.tolist())
