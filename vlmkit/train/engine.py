"""The training loop: Hugging Face ``accelerate`` (DDP, mixed precision, device placement) under a
small loop of ours (stages, gradient accumulation, checkpoints, resume, metrics).

Data order: the rows are a stream of seeded epoch permutations (``seed + epoch``); micro-batch
``g`` of the run (counted over all stages) is the stream's positions ``[g·W·B, (g+1)·W·B)``, and
process ``r`` of ``W`` takes its ``r``-th slice of ``B`` rows. So 2 processes × batch B see exactly
the rows 1 process × batch 2B sees, and a resumed run continues the stream where it stopped.

Loss: the sum of the answer tokens' cross-entropy over the whole optimizer step (all micro-batches,
all processes) divided by their count, so the gradient does not depend on how the rows are split.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TrainingError
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from .collator import IGNORE_INDEX, Collator
from .data import check_rows, load_rows
from .output import write_run_folder
from .progress import MetricsLog, Progress, plot_losses
from .recipe import StageSpec, TrainRecipe
from .slots import check_fit, load_model, merge_lora, preflight, setup_stage

__all__ = ["TokenLoss", "run", "stream_positions", "lr_factor"]


class TokenLoss(nn.Module):
    """Wraps a VLM for training: ``(B, T)`` batch -> summed cross-entropy of the labelled tokens,
    their count and per-row exact-answer flags. The LM head runs on the labelled positions only."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels, pixel_values=None, pixel_attention_mask=None):  # noqa: ANN001
        """-> ``(loss_sum (), n_tokens (), row_exact (B,) bool)``."""
        embeds = self.model.embed(input_ids, pixel_values, pixel_attention_mask)
        hidden = self.model.backbone(embeds, attention_mask=attention_mask)  # (B, T, D)
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = self.model.backbone.logits(hidden[:, :-1][keep][None])[0].float()  # (N, V)
        wanted = targets[keep]
        loss_sum = F.cross_entropy(logits, wanted, reduction="sum")
        wrong = (logits.argmax(-1) != wanted).float()
        per_row = torch.zeros(labels.shape[0], device=labels.device).index_add_(0, keep.nonzero()[:, 0], wrong)
        return loss_sum, keep.sum(), per_row == 0


def lr_factor(step: int, stage: StageSpec) -> float:
    """Multiplier of ``stage.lr`` after ``step`` optimizer steps (warmup, then the schedule to 0)."""
    if step < stage.warmup_steps:
        return (step + 1) / (stage.warmup_steps + 1)
    if stage.schedule == "constant":
        return 1.0
    frac = (step - stage.warmup_steps) / max(1, stage.steps - stage.warmup_steps)
    return max(0.0, 1.0 - frac) if stage.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))


def stream_positions(n_rows: int, seed: int, start: int, count: int) -> list[int]:
    """Row indices at positions ``[start, start + count)`` of the seeded epoch-permutation stream."""
    out: list[int] = []
    pos = start
    while len(out) < count:
        epoch, offset = divmod(pos, n_rows)
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        take = perm[offset : offset + count - len(out)]
        out += take
        pos += len(take)
    return out


class _Rows(torch.utils.data.Dataset):
    """A ``datasets.Dataset`` as a torch dataset whose rows carry their index (for error messages)."""

    def __init__(self, ds) -> None:  # noqa: ANN001
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        return {**self.ds[int(i)], "_row": int(i)}


def _fingerprint(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Run:
    """One training run; :func:`run` drives it."""

    def __init__(self, recipe: TrainRecipe, output_dir: Path, *, resume: bool, data: dict | None = None) -> None:
        self.recipe, self.out, self.resume = recipe, output_dir, resume
        self.accelerator = self._accelerator()
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.main = self.accelerator.is_main_process
        self.model, self.processor, self.processor_folder = load_model(recipe.model, recipe.seed)
        check_fit(self.model, self.processor)
        preflight(self.model, recipe)
        self.train_ds, self.eval_ds = self._data(data or {})
        self.spec_hash = _fingerprint(self.model.spec.to_dict())
        self.ckpt_dir = self.out / "checkpoints"
        self.progress = Progress(enabled=self.main, log_every=recipe.log_every)

    # ------------------------------------------------------------------ setup
    def _accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[self.recipe.precision]
        if mixed == "fp16" and not torch.cuda.is_available():
            raise TrainingError("precision fp16 needs a GPU (fp16 autocast is not supported on CPU)",
                                hint="use precision: bf16 or fp32 on a CPU")  # fmt: skip
        tracker = self.recipe.report_to
        if tracker == "auto":
            import importlib.util

            tracker = "tensorboard" if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX") else "none"
        kwargs = {"log_with": tracker, "project_dir": str(self.out)} if tracker != "none" else {}
        self.tracking = tracker != "none"
        return Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available(),
                           kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)], **kwargs)  # fmt: skip

    def _data(self, given: dict) -> tuple[Any, Any]:
        out = []
        for split in ("train", "eval"):
            source = given.get(split, getattr(self.recipe.data, split))
            if source is None:
                out.append(None)
                continue
            ds, root = load_rows(source)
            name = source if isinstance(source, str) else f"data.{split}"
            check_rows(ds, root, name)
            kwargs = {} if self.recipe.image_splitting is None else {"do_image_splitting": self.recipe.image_splitting}
            out.append((ds, Collator(self.processor, image_root=root, source=name, **kwargs)))
        if len(out[0][0]) == 0:
            raise TrainingError(f"{self.recipe.data.train}: no training rows", hint="check data.train")
        return out[0], out[1]

    # ------------------------------------------------------------------ batches
    def _loader(self, ds_and_collator, first_micro: int, n_micro: int):
        ds, collator = ds_and_collator
        b, w = self.recipe.batch_size, self.world
        batches = []
        for g in range(first_micro, first_micro + n_micro):
            rows = stream_positions(len(ds), self.recipe.seed, g * w * b, w * b)
            batches.append(rows[self.rank * b : (self.rank + 1) * b])
        return self._data_loader(ds, batches, collator)

    def _data_loader(self, ds, batches: list[list[int]], collator):  # noqa: ANN001
        """A DataLoader over fixed batches; its own generator, so creating it never draws from the
        global torch RNG (which dropout uses, and a resumed run restores)."""
        return torch.utils.data.DataLoader(_Rows(ds), batch_sampler=batches, collate_fn=collator,
                                           num_workers=self.recipe.num_workers,
                                           generator=torch.Generator().manual_seed(self.recipe.seed))  # fmt: skip

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    # ------------------------------------------------------------------ one stage
    def _stage(self, index: int, stage: StageSpec, state: dict, restored: dict | None) -> None:
        where = f"stages.{index}"
        setup_stage(self.model, stage, where, gradient_checkpointing=self.recipe.gradient_checkpointing)
        self.model.train()
        state["changed"] = sorted({*state["changed"], *stage.train, *(stage.lora.slots if stage.lora else [])})
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, stage))
        if restored is not None:
            self._restore(restored, optimizer, scheduler)
        wrapped, optimizer = self.accelerator.prepare(TokenLoss(self.model), optimizer)
        done = state["stage_step"]
        self.progress.start(stage.name, done, stage.steps)
        accum = self.recipe.grad_accum
        loader = iter(self._loader(self.train_ds, state["micro"], (stage.steps - done) * accum))
        clock = time.perf_counter()
        for step in range(done + 1, stage.steps + 1):
            micro = [self._to_device(next(loader)) for _ in range(accum)]
            lr = optimizer.param_groups[0]["lr"]
            loss, tokens = self._step(wrapped, optimizer, micro, params, state, stage)
            scheduler.step()
            state["stage_step"], state["step"], state["micro"] = step, state["step"] + 1, state["micro"] + accum
            now = time.perf_counter()
            self._log(state, stage, loss, lr, tokens, now - clock)
            clock = now
            if self.recipe.eval_every and state["step"] % self.recipe.eval_every == 0:
                self._evaluate(wrapped, state)
            if (self.recipe.save_every and state["step"] % self.recipe.save_every == 0) or step == stage.steps:
                self._save(state, optimizer, scheduler)
        self.progress.stop()
        if stage.lora is not None and index < len(self.recipe.stages) - 1:
            merge_lora(self.model)  # the next stage starts from the merged weights

    def _step(self, wrapped, optimizer, micro: list[dict], params, state: dict, stage: StageSpec) -> tuple[float, int]:
        acc = self.accelerator
        local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        total = float(acc.reduce(torch.tensor(float(local), device=acc.device), "sum"))
        loss_sum = torch.zeros((), device=acc.device)
        for k, batch in enumerate(micro):
            sync = contextlib.nullcontext() if k == len(micro) - 1 else acc.no_sync(wrapped)
            with sync:
                part, _, _ = wrapped(**batch)
                acc.backward(part * self.world / max(total, 1.0))
            loss_sum += part.detach()
        loss = float(acc.reduce(loss_sum, "sum")) / max(total, 1.0)
        if not math.isfinite(loss):
            last = latest_checkpoint(self.ckpt_dir) if self.main else None
            raise TrainingError(
                f"the loss is {loss} at step {state['step'] + 1} (stage {stage.name!r}, its step "
                f"{state['stage_step'] + 1}); training stopped before this step changed any weight",
                hint=(f"the last good checkpoint is {last}; " if last else "no checkpoint was saved yet; ")
                + "lower the lr, add warmup_steps or max_grad_norm, or check the rows of this step",
            )
        if self.recipe.max_grad_norm is not None:
            acc.clip_grad_norm_(params, self.recipe.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens = int(acc.reduce(torch.tensor(sum(int(b["attention_mask"].sum()) for b in micro), device=acc.device), "sum"))
        return loss, tokens

    # ------------------------------------------------------------------ eval, log, save
    def _evaluate(self, wrapped, state: dict) -> None:
        if self.eval_ds is None:
            return
        ds, collator = self.eval_ds
        self.model.eval()
        sums = torch.zeros(4, device=self.accelerator.device)  # loss sum, tokens, exact rows, rows
        mine = list(range(self.rank, len(ds), self.world))
        batches = [mine[i : i + self.recipe.batch_size] for i in range(0, len(mine), self.recipe.batch_size)]
        loader = self._data_loader(ds, batches, collator)
        with torch.no_grad():
            for batch in loader:
                loss_sum, n, exact = self.accelerator.unwrap_model(wrapped)(**self._to_device(batch))
                sums += torch.stack([loss_sum.float(), n.float(), exact.float().sum(), torch.tensor(float(len(exact)))])
        sums = self.accelerator.reduce(sums, "sum")
        self.model.train()
        record = {"step": state["step"], "stage": self.recipe.stages[state["stage"]].name,
                  "eval_loss": float(sums[0] / sums[1].clamp(min=1)), "eval_accuracy": float(sums[2] / sums[3].clamp(min=1))}  # fmt: skip
        self.metrics.write(record)
        self.progress.note(f"eval at step {record['step']}: loss {record['eval_loss']:.4f}, "
                           f"exact answers {record['eval_accuracy']:.1%} of {int(sums[3])}")  # fmt: skip
        state["last_eval"] = record
        if self.tracking:
            self.accelerator.log({"eval/loss": record["eval_loss"], "eval/accuracy": record["eval_accuracy"]}, step=state["step"])

    def _log(self, state: dict, stage: StageSpec, loss: float, lr: float, tokens: int, seconds: float) -> None:
        state["tokens"] += tokens
        state["train_seconds"] += seconds
        tps = tokens / max(seconds, 1e-9)
        self.metrics.write({"step": state["step"], "stage": stage.name, "stage_step": state["stage_step"],
                            "loss": loss, "lr": lr, "tokens": state["tokens"], "tokens_per_s": tps})  # fmt: skip
        self.progress.update(state["stage_step"], loss, lr, tps)
        if self.tracking:
            self.accelerator.log({"train/loss": loss, "train/lr": lr, "train/tokens_per_s": tps}, step=state["step"])

    def _save(self, state: dict, optimizer, scheduler) -> None:
        slots = state["changed"]
        tensors = {k: v for k, v in self.model.state_dict().items() if k.split(".", 1)[0] in slots} if self.main else None
        save_checkpoint(self.ckpt_dir, step=state["step"], model_tensors=tensors, optimizer=optimizer,
                        scheduler=scheduler, state=state, rank=self.rank, barrier=self.accelerator.wait_for_everyone)  # fmt: skip

    def _restore(self, restored: dict, optimizer, scheduler) -> None:
        want = {k for k in self.model.state_dict() if k.split(".", 1)[0] in restored["state"]["changed"]}
        got = set(restored["weights"])
        if want != got:
            raise TrainingError(f"the checkpoint's tensors do not fit the model: missing {sorted(want - got)[:4]}, "
                                f"unexpected {sorted(got - want)[:4]}", hint="resume with the recipe and model of the run")  # fmt: skip
        self.model.load_state_dict(restored["weights"], strict=False)
        optimizer.load_state_dict(restored["optimizer"])
        scheduler.load_state_dict(restored["scheduler"])
        set_rng_state(*restored["rng"])

    # ------------------------------------------------------------------ the whole run
    def _start_state(self) -> tuple[dict, dict | None]:
        fresh = {"stage": 0, "stage_step": 0, "step": 0, "micro": 0, "tokens": 0, "train_seconds": 0.0, "changed": [],
                 "spec": self.spec_hash, "recipe": _fingerprint(self.recipe.fingerprint())}  # fmt: skip
        path = latest_checkpoint(self.ckpt_dir) if self.ckpt_dir.is_dir() else None
        if not self.resume:
            if path is not None or (self.out / "vlmkit.yaml").is_file():
                raise TrainingError(f"{self.out} already holds a run", hint="pass --resume to continue it, or another --output-dir")
            return fresh, None
        if path is None:
            raise TrainingError(f"nothing to resume: {self.ckpt_dir} holds no checkpoint",
                                hint="run without --resume to start; checkpoints are written every save_every steps")  # fmt: skip
        restored = load_checkpoint(path, self.rank)
        state = restored["state"]
        for key, what in (("spec", "model spec"), ("recipe", "stages, data, batch size or seed")):
            if state.get(key) != fresh[key]:
                raise TrainingError(f"{path} is a checkpoint of another run: its {what} differ from this recipe's",
                                    hint="resume with the recipe (and model) that started the run, or use another --output-dir")  # fmt: skip
        return state, restored

    def run(self) -> Path:
        state, restored = self._start_state()
        self.metrics = MetricsLog(self.out / "metrics.jsonl", enabled=self.main, keep_until=state["step"] if restored else None)
        if self.tracking:
            self.accelerator.init_trackers("vlmkit-train")
        for index, stage in enumerate(self.recipe.stages):
            if index < state["stage"]:
                continue
            if restored is not None and state["stage_step"] >= stage.steps:  # saved at the very end of a stage
                setup_stage(self.model, stage, f"stages.{index}")
                self._restore_weights_only(restored)
                if stage.lora is not None and index < len(self.recipe.stages) - 1:
                    merge_lora(self.model)
                restored = None
            else:
                self._stage(index, stage, state, restored)
                restored = None
            if index < len(self.recipe.stages) - 1:
                state.update(stage=index + 1, stage_step=0)
        if self.eval_ds is not None and state.get("last_eval", {}).get("step") != state["step"]:
            self._evaluate(TokenLoss(self.model), state)
        return self._finish(state)

    def _restore_weights_only(self, restored: dict) -> None:
        self.model.load_state_dict(restored["weights"], strict=False)
        set_rng_state(*restored["rng"])

    def _finish(self, state: dict) -> Path:
        self.accelerator.wait_for_everyone()
        if self.main:
            if not self.recipe.save_adapter:
                merge_lora(self.model)
            self.model.eval()
            write_run_folder(self.out, self.model, self.processor_folder, self.recipe, save_adapter=self.recipe.save_adapter)
            plot_losses(self.out / "metrics.jsonl", self.out / "loss.png")
            self.progress.note(f"trained {state['step']} steps ({state['tokens']:,} tokens); model in {self.out}")
        if self.tracking:
            self.accelerator.end_training()
        self.accelerator.wait_for_everyone()
        return self.out


def run(recipe: TrainRecipe, output_dir: Path, *, resume: bool = False, data: dict | None = None) -> Path:
    """Train ``recipe`` into ``output_dir``; see :func:`vlmkit.train.train`."""
    return Run(recipe, output_dir, resume=resume, data=data).run()
