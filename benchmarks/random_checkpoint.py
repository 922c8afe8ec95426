#!/usr/bin/env python
"""A checkpoint folder with a bundled SmolVLM model's published config and tokenizer files and
random weights (transformers' own initialisation under a fixed seed), for benchmarks on machines
that real weights cannot reach (the GPU machine: nothing outside it can be fetched, and the
SmolLM2 GGUF is too large to carry). Speed depends on the shapes, which are the real ones; the
continuations are noise.

    python benchmarks/random_checkpoint.py FOLDER [--model SmolVLM-256M-Instruct] [--seed 0] [--dtype bfloat16]

``--model`` names a folder under ``vlmkit/data/hf-configs``; the weights are saved as safetensors in
``--dtype`` (the published checkpoints' bfloat16 by default).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "vlmkit" / "data" / "hf-configs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("folder", type=Path)
    models = sorted(p.name for p in CONFIGS.iterdir() if (p / "config.json").is_file())
    parser.add_argument("--model", default="SmolVLM-256M-Instruct", choices=models)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args(argv)

    import torch
    import transformers

    source = CONFIGS / args.model
    config = transformers.AutoConfig.from_pretrained(source)
    torch.manual_seed(args.seed)
    model = transformers.AutoModelForImageTextToText.from_config(config).to(getattr(torch, args.dtype))
    args.folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.folder)  # config.json and the safetensors weights
    for path in source.iterdir():
        if path.name != "config.json":
            shutil.copy2(path, args.folder / path.name)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.folder}: {args.model} shapes, {n / 1e6:.1f} M random parameters ({args.dtype}, seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
