#!/usr/bin/env python
"""Decode tokens/s of vlmkit's float32 decode layout against plain row-major weights, A/B
alternated in one process, with the memory floor measured in the same run.

    python benchmarks/decode_layout_ab.py FOLDER [--threads 2] [--tokens 32] [--rounds 4]

FOLDER is a checkpoint folder (e.g. the README's ``smolvlm-256m-smollm2``). Two copies of the
model are loaded: one keeps row-major weights (``prepare_decode(..., "rows")``), the other gets
the per-shape layout (``"auto"``, what vlmkit's decode loop does). Both decode the same greedy
prompt; the tokens must be identical. Prints the median tokens/s of each, their ratio, and the
fraction of the floor (read bandwidth / bytes of weights read per token).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _decode_rate(model, ids, tokens: int) -> tuple[float, list[int]]:
    import torch

    from vlmkit.generation import generate

    with torch.inference_mode():
        start = time.perf_counter()
        out = generate(model, ids, max_new_tokens=tokens, do_sample=False, eos_token_id=[])
        elapsed = time.perf_counter() - start
    info = model.last_generation
    decode_s = max(elapsed - info.prefill_s, 1e-9)
    return (info.new_tokens - 1) / decode_s, out[0, ids.shape[1]:].tolist()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    import torch

    import vlmkit
    from vlmkit.bench.measure import decode_bytes_per_token, measure_bandwidth
    from vlmkit.decode_layout import prepare_decode

    torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = {"rows": vlmkit.build_from_hf(args.folder), "layout": vlmkit.build_from_hf(args.folder)}
        processor = vlmkit.load_processor(args.folder)
    chosen = {name: prepare_decode(m.backbone, "rows" if name == "rows" else "auto") for name, m in models.items()}
    text = processor.apply_chat_template([{"role": "user", "content": "Tell me a story about a lighthouse."}])
    ids = processor(text=text)["input_ids"]
    rates: dict[str, list[float]] = {name: [] for name in models}
    outputs = {}
    for _ in range(args.rounds):
        for name, model in models.items():
            rate, out = _decode_rate(model, ids, args.tokens)
            rates[name].append(rate)
            outputs[name] = out
    gbps = measure_bandwidth()
    floor = gbps * 1e9 / decode_bytes_per_token(models["layout"].backbone)
    med = {name: statistics.median(v) for name, v in rates.items()}
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}")  # fmt: skip
    print(f"layouts chosen: {sorted(set(chosen['layout'].values()))} over {len(chosen['layout'])} weight shapes")
    for name in models:
        print(f"{name:>7}: {med[name]:6.1f} tok/s  ({med[name] / floor:.0%} of the floor)  samples {[round(r, 1) for r in rates[name]]}")
    print(f"layout / rows: {med['layout'] / med['rows']:.2f}x; floor {floor:.1f} tok/s ({gbps:.1f} GB/s read)")
    print("tokens identical:", outputs["rows"] == outputs["layout"])
    return 0 if outputs["rows"] == outputs["layout"] else 1


if __name__ == "__main__":
    sys.exit(main())
