"""The terminal loop of ``vlmkit chat``: read a line, answer it (streamed), keep the conversation.

Lines starting with ``/`` are commands (:data:`COMMANDS`); anything else is the next user turn,
sent with the images attached since the last turn. Ctrl-C while an answer streams stops that
answer (the partial answer stays in the history); Ctrl-C at the prompt clears the line; Ctrl-D
or ``/quit`` leaves.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import VlmkitError

__all__ = ["COMMANDS", "run_repl"]

COMMANDS = {
    "/image PATH": "attach an image file to your next message (repeat for several)",
    "/reset": "forget the conversation and its images",
    "/help": "show these commands",
    "/quit": "leave (Ctrl-D too)",
}


class Repl:
    """One chat loop over a :class:`~vlmkit.chat.ChatSession`; I/O through the given callables."""

    def __init__(self, session: Any, *, read: Callable[[str], str], write: Callable[[str], None],
                 note: Callable[[str], None], open_images: Callable[[list[Path]], list],
                 describe_image: Callable[[Path, Any], str], waiting: Callable[[], Any] | None = None) -> None:  # fmt: skip
        self.session, self.read, self.write, self.note = session, read, write, note
        self.waiting = waiting  # makes a spinner (start()/stop()) shown until the first chunk
        self.open_images, self.describe_image = open_images, describe_image
        self.pending: list[Any] = []

    def run(self) -> None:
        self.note("chat: type a message; " + ", ".join(c.split()[0] for c in COMMANDS) + " (Ctrl-C stops an answer)")
        while True:
            try:
                line = self.read("you> ")
            except EOFError:
                self.write("\n")
                return
            except KeyboardInterrupt:
                self.write("\n")
                continue
            if not self._handle(line.strip()):
                return

    def _handle(self, line: str) -> bool:
        """Act on one input line; False to leave."""
        if not line:
            return True
        if line.startswith("/"):
            return self._command(line)
        self._turn(line)
        return True

    def _command(self, line: str) -> bool:
        name, _, rest = line.partition(" ")
        if name in ("/quit", "/exit"):
            return False
        if name == "/reset":
            self.session.reset()
            self.pending = []
            self.note("conversation reset")
        elif name == "/image":
            self._attach(rest)
        elif name == "/help":
            for usage, what in COMMANDS.items():
                self.note(f"  {usage:<12} {what}")
        else:
            self.note(f"unknown command {name!r}; commands: " + ", ".join(c.split()[0] for c in COMMANDS))
        return True

    def _attach(self, rest: str) -> None:
        try:
            paths = [Path(p).expanduser() for p in shlex.split(rest)]
        except ValueError as exc:
            self.note(f"cannot read the path: {exc}")
            return
        if not paths:
            self.note("usage: /image PATH")
            return
        try:
            images = self.open_images(paths)
        except VlmkitError as exc:
            self.note(f"error: {exc.message}" + (f" (hint: {exc.hint})" if exc.hint else ""))
            return
        for path, image in zip(paths, images):
            self.note(self.describe_image(path, image))
        self.pending.extend(images)

    def _turn(self, text: str) -> None:
        images, self.pending = self.pending, []
        try:
            self._ask(text, images)
        except KeyboardInterrupt:
            self.write("\n")
            self.note("[answer stopped]")
            return
        except VlmkitError as exc:
            self.pending = images  # the turn did not happen: keep its images for the next try
            self.note(f"error: {exc.message}" + (f" (hint: {exc.hint})" if exc.hint else ""))
            if "context" in exc.message:
                self.note("the conversation is longer than the model's context: /reset to start over")
            return
        self.write("\n")
        info = self.session.last_turn
        self.note(f"[{info.new_tokens} tokens, first after {info.first_token_s:.2f} s, "
                  f"{info.reused_tokens} of {info.prompt_tokens} prompt tokens reused]")  # fmt: skip

    def _ask(self, text: str, images: list) -> None:
        """One ``session.ask``, with the spinner shown until its first chunk."""
        spinner = self.waiting().start() if self.waiting is not None else None

        def on_text(chunk: str) -> None:
            if spinner is not None:
                spinner.stop()
            self.write(chunk)

        try:
            self.session.ask(text, images, on_text=on_text)
        finally:
            if spinner is not None:
                spinner.stop()


def run_repl(session: Any, *, images: list | None = None, **io: Any) -> None:
    """Run the chat loop on ``session`` until ``/quit`` or end of input; ``images`` go with the
    first message; ``io`` as :class:`Repl`."""
    repl = Repl(session, **io)
    repl.pending = list(images or [])
    repl.run()
