"""Test videos written with PyAV, and a tiny random SmolVLM2 checkpoint (built in the test, nothing downloaded)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import torch

from ..conftest import published_folder

__all__ = ["CONTEXT", "tiny_smolvlm2", "write_video"]

#: max_position_embeddings of the tiny model.
CONTEXT = 2048


def write_video(path, n_frames: int, fps: float = 10, width: int = 64, height: int = 48, seed: int = 0):
    """An mpeg4 file of ``n_frames`` gradient-plus-noise frames at ``fps``; returns the path."""
    import av

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=int(fps) if float(fps).is_integer() else fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(n_frames):
            base = np.stack([x * 4 + i * 9, y * 5, (x + y + 3 * i) * 7], -1) + rng.integers(-20, 20, (height, width, 3))
            frame = av.VideoFrame.from_ndarray(np.clip(base, 0, 255).astype(np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def tiny_smolvlm2(folder):
    """The bundled SmolVLM2-500M files with a tiny random smolvlm model: 64-px tiles, 4 tokens each."""
    shutil.copytree(published_folder("SmolVLM2-500M-Video-Instruct"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(scale_factor=2, torch_dtype="float32")
    cfg["text_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, max_position_embeddings=CONTEXT, pixel_shuffle_factor=2)  # fmt: skip
    cfg["text_config"]["perceiver_config"]["resampler_n_latents"] = 4
    cfg["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=64, patch_size=16)  # fmt: skip
    (folder / "config.json").write_text(json.dumps(cfg))
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    pre.update(max_image_size={"longest_edge": 64}, size={"longest_edge": 128})
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    (folder / "processor_config.json").write_text(json.dumps({"image_seq_len": 4, "processor_class": "SmolVLMProcessor"}))
    import transformers

    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(folder)
    model = transformers.AutoModelForImageTextToText.from_config(config).to(torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder)
    return model


