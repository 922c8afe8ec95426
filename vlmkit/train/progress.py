"""Progress and metrics: a rich bar on a terminal, plain lines otherwise, ``metrics.jsonl``, trackers."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["Progress", "MetricsLog", "plot_losses"]


class Progress:
    """Step, loss, lr, tokens/s and ETA of one stage; silent on processes other than the main one."""

    def __init__(self, *, enabled: bool, log_every: int, stream: Any = None) -> None:
        self.enabled = enabled
        self.log_every = log_every
        self.stream = stream or sys.stderr
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._bar = None
        self._task = None

    def start(self, stage: str, first: int, total: int) -> None:
        """A new stage of ``total`` steps, resuming after step ``first``."""
        self.stage, self.total, self.t0, self.first = stage, total, time.perf_counter(), first
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                     console=Console(file=self.stream))  # fmt: skip
            self._bar.start()
            self._task = self._bar.add_task(stage, total=total, completed=first, info="")
        elif self.enabled:
            self._line(f"stage {stage}: {total} steps" + (f" (resuming after step {first})" if first else ""))

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        info = f"loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        elif self.enabled and (step % self.log_every == 0 or step == self.total):
            done = step - self.first
            eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.total - step)
            self._line(f"{self.stage} step {step}/{self.total}  {info}  eta {eta:,.0f} s")

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        elif self.enabled:
            self._line(text)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (main process only)."""

    def __init__(self, path: Path, *, enabled: bool, keep_until: int | None) -> None:
        self.path = path
        self.enabled = enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() and keep_until is not None else []
            kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= keep_until]
            path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")  # a resumed run drops later lines

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def plot_losses(metrics: Path, out: Path) -> Path | None:
    """``loss.png``: training (and eval) loss per step, when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(ln) for ln in metrics.read_text(encoding="utf-8").splitlines() if ln.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ends = {}
    for r in rows:
        if "loss" in r:
            ends[r["stage"]] = r["step"]
    for stage, step in list(ends.items())[:-1]:
        ax.axvline(step, color="grey", linestyle=":", linewidth=1)
        ax.text(step, ax.get_ylim()[1], f" end of {stage}", fontsize=7, va="top")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (answer tokens)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
