#!/usr/bin/env python
"""Time to first token of a follow-up chat turn: vlmkit's ChatSession (KV cache of the
conversation reused) against the first turn, and against transformers re-running the whole
conversation (what ``model.generate`` on the rendered history does).

    python benchmarks/chat_reuse.py FOLDER [--repeats 3] [--threads N] [--split]

FOLDER is a SmolVLM checkpoint folder (e.g. the README's ``smolvlm-256m-smollm2``). The image
is one 512 px tile (``--split`` uses the checkpoint's splitting instead). Goal (issue 19): the
second turn's time to first token <= 0.1x the first turn's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _image():
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8))


def _vlmkit_turns(folder: str, options: dict, repeats: int) -> tuple[list[float], list[float], int, int]:
    import vlmkit
    from vlmkit.chat import ChatSession

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, processor = vlmkit.build_from_hf(folder), vlmkit.load_processor(folder)
    first, second = [], []
    for _ in range(repeats):
        chat = ChatSession(model, processor, max_new_tokens=1, processor_options=options)
        chat.ask("Describe this image.", [_image()])
        first.append(chat.last_turn.first_token_s)
        chat.ask("What colours does it have?")
        second.append(chat.last_turn.first_token_s)
    return first, second, chat.last_turn.prompt_tokens, chat.last_turn.reused_tokens


def _transformers_second_turn(folder: str, options: dict, repeats: int) -> list[float]:
    import torch
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(folder)
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]},
        {"role": "assistant", "content": [{"type": "text", "text": " A picture."}]},
        {"role": "user", "content": [{"type": "text", "text": "What colours does it have?"}]},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        batch = processor(text=prompt, images=[_image()], return_tensors="pt", **options)
        with torch.inference_mode():
            model.generate(**batch, max_new_tokens=1, do_sample=False)
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--split", action="store_true")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    options = {} if args.split else {"do_image_splitting": False}
    first, second, prompt, reused = _vlmkit_turns(args.folder, options, args.repeats)
    hf = _transformers_second_turn(args.folder, options, args.repeats)
    med = statistics.median
    print(f"torch threads {torch.get_num_threads()}; second turn: {prompt} prompt tokens, {reused} reused")
    print(f"{'':34}{'median s':>10}{'min s':>10}")
    for name, values in (("vlmkit turn 1 (image + question)", first), ("vlmkit turn 2 (follow-up)", second),
                         ("transformers turn 2 (re-run all)", hf)):  # fmt: skip
        print(f"{name:34}{med(values):10.3f}{min(values):10.3f}")
    print(f"turn 2 / turn 1 (vlmkit): {med(second) / med(first):.3f}  (goal <= 0.1)")
    print(f"vlmkit turn 2 / transformers turn 2: {med(second) / med(hf):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
