"""Per-request token choice for a batch whose rows each have their own settings.

OpenAI's semantics: ``temperature`` 0 is greedy (argmax); otherwise the logits are divided by the
temperature, ``top_p`` keeps the smallest set of tokens whose probability reaches it (the most
likely token always stays), and one token is drawn with the request's own ``torch.Generator``
(seeded by ``seed``, or at random), so a seeded request draws the same tokens whatever else runs
beside it. The order of operations is :func:`vlmkit.generation.generate`'s (temperature, then
top-p).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["Sampling", "choose"]

#: OpenAI's defaults when a request gives no temperature / top_p.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0


@dataclass
class Sampling:
    """One request's settings; ``generator`` is made on first use from ``seed``."""

    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    seed: int | None = None
    generator: torch.Generator | None = field(default=None, repr=False)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def draw(self, logits: torch.Tensor) -> int:
        """``(V,)`` logits -> one token id."""
        if self.greedy:
            return int(logits.argmax())
        if self.generator is None:
            self.generator = torch.Generator(device=logits.device)
            if self.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(self.seed % 2**64)
        scores = logits.float()
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=False)
            drop = ordered.softmax(-1).cumsum(-1) <= (1 - self.top_p)
            drop[-1:] = False  # always keep the most likely token
            scores = scores.masked_fill(drop.scatter(-1, order, drop), -math.inf)
        return int(torch.multinomial(scores.softmax(-1), 1, generator=self.generator))


def choose(logits: torch.Tensor, rows: list[Sampling]) -> list[int]:
    """``(B, V)`` logits -> each row's next token: one argmax for the greedy rows, a draw each
    for the others."""
    greedy = logits.argmax(-1).tolist()
    return [g if s.greedy else s.draw(logits[b]) for b, (g, s) in enumerate(zip(greedy, rows))]
