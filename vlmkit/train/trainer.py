"""Interop with transformers' ``Trainer`` (and TRL's trainers built on it)."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["trainer_model"]


class _TrainerModel(nn.Module):
    """A VLM whose forward returns ``{"loss", "logits"}``, the output ``Trainer`` reads."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, labels=None, pixel_values=None, pixel_attention_mask=None):  # noqa: ANN001
        """``(B, T)`` ids (+ images, labels) -> ``{"loss": (), "logits": (B, T, V)}``."""
        out = self.model(input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                         pixel_attention_mask=pixel_attention_mask, labels=labels)  # fmt: skip
        result = {"logits": out.logits}
        if out.loss is not None:
            result["loss"] = out.loss
        return result


def trainer_model(model: nn.Module) -> Any:
    """``model`` (a :class:`~vlmkit.model.VLM`) wrapped for ``transformers.Trainer``: pass it as
    ``model=`` with ``data_collator=vlmkit.train.Collator(processor)`` and
    ``TrainingArguments(remove_unused_columns=False)`` (the collator reads the ``images`` and
    ``messages`` columns). The wrapper shares the VLM's parameters: train, then use the VLM."""
    return _TrainerModel(model)
