"""The collator: chat rows -> model inputs with labels, on vlmkit's processor and the checkpoint's
own chat template.

Labels are ``-100`` everywhere except the tokens of the assistant turns: the answer and its
end-of-turn token (the first of the processor's ``eos_token_ids`` inside the turn, e.g.
``<end_of_utterance>``), so the model learns to answer and to stop. Whatever the template adds
after that token (a newline) and everything the user or system wrote does not count, and image,
layout (``<fake_token_around_image>``, ``<global-img>``, ``<row_r_col_c>``) and pad tokens never
count. The assistant spans are found from the template itself: the text the template adds for
turn ``i`` is ``render(messages[: i + 1])`` minus ``render(messages[:i], add_generation_prompt=True)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError, ProcessorError
from .data import check_row, open_image

__all__ = ["Collator", "IGNORE_INDEX"]

IGNORE_INDEX = -100


class Collator:
    """``collator(rows)`` -> ``input_ids``/``attention_mask``/``labels`` ``(B, T)`` (right-padded)
    and, when a row has images, ``pixel_values`` ``(B, N, 3, H, W)`` / ``pixel_attention_mask``
    ``(B, N, H, W)``. Usable as a ``DataLoader`` ``collate_fn`` and as transformers' ``Trainer``
    ``data_collator`` (pass ``remove_unused_columns=False`` so the rows keep their columns)."""

    def __init__(
        self,
        processor: Any,
        *,
        image_root: str | os.PathLike | None = None,
        do_image_splitting: bool | None = None,
        source: str = "rows",
    ) -> None:
        if processor.template is None:
            raise ProcessorError("the checkpoint has no chat template, so assistant turns cannot be found",
                                 hint="train from a checkpoint (or tokenizer folder) with a chat template")  # fmt: skip
        self.processor = processor
        self.image_root = Path(image_root) if image_root is not None else Path.cwd()
        self.split = processor.image_splitting if do_image_splitting is None else bool(do_image_splitting)
        if do_image_splitting is not None and processor.image_splitting is None:
            raise ProcessorError(
                f"do_image_splitting={do_image_splitting} was given but this checkpoint's image processor never "
                "splits images (one image, one input to the vision tower)",
                hint="drop image_splitting from the recipe for this model",
            )
        #: the image keywords of every processor call (none when the image side has no splitting knob)
        self.image_options = {} if self.split is None else {"do_image_splitting": self.split}
        self.source = source
        self.end_ids = set(processor.eos_token_ids)
        self.never = _layout_ids(processor)

    # ------------------------------------------------------------------ one row
    def encode(self, row: Mapping[str, Any], where: str | None = None) -> tuple[list[int], list[int], list[Any]]:
        """``(input_ids, labels, images)`` of one row (no padding, no pixels)."""
        where = where or f"{self.source}: a row"
        check_row(row, where)
        messages = _normalize(row["messages"])
        images = [open_image(e, self.image_root, f"{where}: images[{j}]") for j, e in enumerate(row.get("images") or [])]
        text, spans = self._render(messages, where)
        costs = [self.processor.image_cost(img, **self.image_options) for img in images]
        expanded, spans, regions = self._expand(text, spans, costs)
        enc = self.processor.tokenizer.backend.encode(expanded, add_special_tokens=True)
        return list(enc.ids), self._labels(enc.ids, enc.offsets, spans, regions), images

    def _render(self, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
        """The conversation text and the ``[start, end)`` character span of each assistant turn."""
        template = self.processor.template
        roles = {k: v for k, v in self.processor.tokenizer.roles.items() if v is not None}
        full = template.render(messages, add_generation_prompt=False, **roles)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = template.render(messages[:i], add_generation_prompt=True, **roles)
            upto = template.render(messages[: i + 1], add_generation_prompt=False, **roles)
            if not (full.startswith(upto) and upto.startswith(before)):
                raise DataError(
                    f"{where}: the chat template ({template.origin}) does not render conversations turn by turn "
                    f"(messages[{i}] changes the text before it), so the assistant tokens cannot be located",
                    hint="train with a chat template whose output for a conversation starts with that of its first turns",
                )
            spans.append((len(before), len(upto)))
        return full, spans

    def _expand(self, text: str, spans: list[tuple[int, int]], costs: list) -> tuple[str, list, list]:
        """Replace each image placeholder with its token layout; move the spans along. Also returns
        the ``[start, end)`` character region of each image's layout in the expanded text."""
        token = self.processor.image_token
        parts = text.split(token)
        if len(parts) - 1 != len(costs):
            raise DataError(f"{self.source}: the rendered conversation holds {len(parts) - 1} {token} placeholder(s) "
                            f"for {len(costs)} image(s)", hint="do not write the placeholder in message text")  # fmt: skip
        layout, seq_len = self.processor.spec.layout, self.processor.image_seq_len
        pieces, shifts, pos = [parts[0]], [], len(parts[0])
        for cost, rest in zip(costs, parts[1:]):
            run = layout.expand(cost, seq_len)
            shifts.append((pos, len(run) - len(token)))
            pieces += [run, rest]
            pos += len(token) + len(rest)
        def move(p: int) -> int:  # noqa: E306
            return p + sum(extra for at, extra in shifts if at < p)
        regions = [(move(at), move(at) + extra + len(token)) for at, extra in shifts]
        return "".join(pieces), [(move(a), move(b)) for a, b in spans], regions

    def _labels(self, ids: Sequence[int], offsets: Sequence[tuple[int, int]], spans: list, regions: list) -> list[int]:
        """Token ids inside the assistant spans up to their end-of-turn token, else -100; never
        an image-layout token (placeholders, framing tokens, the newlines between tile rows)."""
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in spans:
            for t, (tok_id, (a, b)) in enumerate(zip(ids, offsets)):
                if b > a and start <= a < end:
                    if tok_id not in self.never and not any(r0 <= a < r1 for r0, r1 in regions):
                        labels[t] = tok_id
                    if tok_id in self.end_ids:
                        break  # the end-of-turn token counts; what the template adds after it does not
        return labels

    # ------------------------------------------------------------------ a batch
    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """``(B, T)`` ids/mask/labels (+ pixels) for ``rows``."""
        encoded = [self.encode(row, self._where(row)) for row in rows]
        longest = max(len(ids) for ids, _, _ in encoded)
        pad = self.processor.pad_token_id
        if pad is None:
            pad = 0  # padded positions are masked out and carry no label: any valid id does
        ids = torch.full((len(encoded), longest), pad, dtype=torch.long)
        labels = torch.full((len(encoded), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(encoded), longest), dtype=torch.long)
        for b, (row_ids, row_labels, _) in enumerate(encoded):
            ids[b, : len(row_ids)] = torch.tensor(row_ids)
            labels[b, : len(row_labels)] = torch.tensor(row_labels)
            mask[b, : len(row_ids)] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        nested = [images for _, _, images in encoded]
        if any(nested):
            pixels = self.processor(images=nested, **self.image_options)
            batch["pixel_values"] = pixels["pixel_values"]
            batch["pixel_attention_mask"] = pixels["pixel_attention_mask"]
        return batch


    def _where(self, row: Any) -> str | None:
        index = row.get("_row") if isinstance(row, Mapping) else None
        return f"{self.source}: row {index}" if index is not None else None


def _normalize(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """String contents as ``[{"type": "text", "text": ...}]``; ``None`` fields that datasets adds
    to image items (``{"type": "image", "text": None}``) dropped."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        items = [{k: v for k, v in item.items() if v is not None} if isinstance(item, Mapping) else item for item in content]
        out.append({**{k: v for k, v in message.items() if v is not None}, "content": items})
    return out


def _layout_ids(processor: Any) -> set[int]:
    """Ids that never count as labels: the image placeholder, the layout tokens, the pad token."""
    tok, layout = processor.tokenizer, processor.spec.layout
    ids = {tok.token_to_id(n) for n in layout.tokens}
    ids |= {processor.image_token_id, processor.pad_token_id}
    return {i for i in ids if i is not None}
