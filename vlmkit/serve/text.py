"""Incremental detokenization with OpenAI ``stop`` strings.

:class:`TextTracker` gets one generated token id at a time and returns the text that can be sent
now: the decoded text grows token by token; an unfinished multi-byte character waits for the next
token; text that could be the start of a stop string is held back until it is known not to be
one; when a stop string appears, the text ends just before it and :attr:`TextTracker.stopped`
is set (OpenAI never returns the stop string itself).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["TextTracker"]


class TextTracker:
    """Text of a growing token sequence; ``decode(ids) -> str`` (special tokens skipped)."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = [s for s in stop if s]
        self._tokens: list[int] = []
        self._text = ""
        self._sent = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """Everything sent so far."""
        return self._text[: self._sent]

    def push(self, token: int) -> str:
        """Add ``token``; return the new text that is safe to send (maybe empty)."""
        if self.stopped:
            return ""
        self._tokens.append(token)
        text = self._decode(self._tokens)
        if text.endswith("\ufffd"):  # an unfinished multi-byte character
            return ""
        self._text = text
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped = True
            self._text = text[:cut]
            return self._take(cut)
        return self._take(len(text) - self._held_back(text))

    def finish(self) -> str:
        """The text still held back (generation ended without a stop string)."""
        return "" if self.stopped else self._take(len(self._text))

    def _take(self, end: int) -> str:
        end = max(end, self._sent)
        out = self._text[self._sent : end]
        self._sent = end
        return out

    def _stop_at(self, text: str) -> int | None:
        """Where the first stop string starts, searching only text that was not yet sent."""
        start = max(0, self._sent - max((len(s) for s in self._stop), default=0))
        hits = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
