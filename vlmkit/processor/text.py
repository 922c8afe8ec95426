"""Text side of the processor: the tokenizer and the chat template (a family supplies the image layout).

Tokenization uses the ``tokenizers`` library directly on the checkpoint's ``tokenizer.json``;
special-token roles (bos/eos/pad/unk, padding side) come from ``tokenizer_config.json`` and
``special_tokens_map.json``. The chat template is rendered with a sandboxed Jinja environment
configured like the reference (``trim_blocks``, ``lstrip_blocks``, ``tojson``, ``raise_exception``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from ..errors import ProcessorError, SpecError
from ..hub import read_json

__all__ = ["ChatTemplate", "SpecWarning", "TextTokenizer", "load_chat_template", "token_text"]


class SpecWarning(UserWarning):
    """Checkpoint files disagree in a way vlmkit can resolve; the message says which value wins."""


_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")


def token_text(value: Any) -> str | None:
    """A token given as a string or as an AddedToken-like dict ``{"content": ...}``."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the special-token roles of its checkpoint.

    ``encode`` returns ids for one string; ``decode`` turns ids back into text. Role tokens
    (``bos_token``, ``eos_token``, ``pad_token``, ``unk_token``) are strings or ``None``.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        roles: Mapping[str, str | None],
        padding_side: str = "right",
        source: str = "tokenizer.json",
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.backend = tokenizer
        self.source = source
        self.config = dict(config or {})
        self.roles = {role: roles.get(role) for role in _ROLES}
        if padding_side not in ("left", "right"):
            raise SpecError(
                f"padding_side must be 'left' or 'right', got {padding_side!r}",
                key_path="padding_side",
                source=source,
            )
        self.padding_side = padding_side
        self._special = {tok.content for tok in tokenizer.get_added_tokens_decoder().values() if tok.special}
        self._added = {tok.content for tok in tokenizer.get_added_tokens_decoder().values()}

    @classmethod
    def from_folder(cls, folder: Path) -> TextTokenizer:
        """Read ``tokenizer.json`` (required), ``tokenizer_config.json`` and ``special_tokens_map.json``."""
        path = Path(folder) / "tokenizer.json"
        backend = _load_backend(path)
        config = read_json(folder, "tokenizer_config.json", required=False) or {}
        special_map = read_json(folder, "special_tokens_map.json", required=False) or {}
        roles = {role: token_text(config.get(role)) or token_text(special_map.get(role)) for role in _ROLES}
        marked = [token_text(t) for t in config.get("additional_special_tokens") or []]
        marked += [token_text(t) for t in special_map.get("additional_special_tokens") or []]
        marked += [token_text(v) for v in (config.get("added_tokens_decoder") or {}).values() if v.get("special")]
        _mark_special(backend, [*marked, *roles.values()])
        side = config.get("padding_side", "right")
        if side not in ("left", "right"):
            raise SpecError(
                f"padding_side must be 'left' or 'right', got {side!r}",
                key_path="padding_side",
                source=str(Path(folder) / "tokenizer_config.json"),
            )
        return cls(backend, roles=roles, padding_side=side, source=str(path), config=config)

    # ---------------------------------------------------------------- vocabulary

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """The id of ``token`` (whole token, no splitting), or ``None``."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def is_added(self, token: str) -> bool:
        """Whether ``token`` is an added token, i.e. matched whole in raw text."""
        return token in self._added

    def is_special(self, token: str) -> bool:
        return token in self._special

    def role_id(self, role: str) -> int | None:
        """The id of the ``bos_token`` / ``eos_token`` / ``pad_token`` / ``unk_token`` role."""
        token = self.roles.get(role)
        return None if token is None else self.token_to_id(token)

    # ---------------------------------------------------------------- encode / decode

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (added tokens such as ``<image>`` are matched whole)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[int]]:
        return [enc.ids for enc in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list or 1-D tensor)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"TextTokenizer({self.source!r}, vocab_size={self.vocab_size}, padding_side={self.padding_side!r})"


def _load_backend(path: Path) -> Any:
    """``tokenizers.Tokenizer`` from ``tokenizer.json``; :class:`SpecError` when absent or malformed."""
    from tokenizers import Tokenizer

    if not path.is_file():
        raise SpecError(
            "no tokenizer.json in the checkpoint folder",
            source=str(path.parent),
            hint="vlmkit reads the fast-tokenizer file tokenizer.json; save it with tokenizer.save_pretrained()",
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise SpecError(f"cannot be read by the tokenizers library: {exc}", source=str(path)) from exc


def _mark_special(backend: Any, tokens: Sequence[str | None]) -> None:
    """Mark as special the tokens the config files call special but tokenizer.json does not.

    Only tokens already in the vocabulary are marked (as transformers does); none is added.
    """
    from tokenizers import AddedToken

    special = {tok.content for tok in backend.get_added_tokens_decoder().values() if tok.special}
    todo = [t for t in dict.fromkeys(tokens) if t and t not in special and backend.token_to_id(t) is not None]
    if todo:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in todo])


# ----------------------------------------------------------------------------- chat template


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _generation_extension():
    """A Jinja extension that accepts ``{% generation %}...{% endgeneration %}`` and renders the body."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationTag(Extension):
        tags: ClassVar[set[str]] = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    return GenerationTag


class ChatTemplate:
    """A checkpoint's Jinja chat template, compiled in an immutable sandbox.

    ``variables`` are the names the template reads (``messages``, ``add_generation_prompt``, ...).
    """

    def __init__(self, source_text: str, *, origin: str) -> None:
        from jinja2 import TemplateSyntaxError, meta
        from jinja2.ext import loopcontrols
        from .sandbox import BoundedSandbox

        self.text = source_text
        self.origin = origin
        env = BoundedSandbox(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _generation_extension()]
        )
        env.add_filter("tojson", _tojson)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source_text)
            self.variables = frozenset(meta.find_undeclared_variables(env.parse(source_text)))
        except TemplateSyntaxError as exc:
            raise SpecError(f"chat template is not valid Jinja: {exc}", source=origin) from exc

    def render(self, messages: Sequence[Mapping[str, Any]], **variables: Any) -> str:
        """Render one conversation; ``variables`` (add_generation_prompt, bos_token, ...) are visible."""
        from jinja2.exceptions import TemplateError

        from ..limits import LIMITS
        from .sandbox import TemplateBoundError, render_bounded

        try:
            return render_bounded(self._template, messages=list(messages), **variables)
        except TemplateBoundError as exc:
            names = ", ".join(LIMITS[n].env for n in ("template_output", "template_steps", "template_seconds"))
            raise ProcessorError(
                f"the chat template ({self.origin}) was stopped: {exc}",
                hint=f"use the checkpoint's published chat template; if this one is trusted, raise {names} (docs/limits.md)",
            ) from None
        except TemplateError as exc:
            raise ProcessorError(
                f"the chat template ({self.origin}) rejected the messages: {exc}",
                hint="messages are dicts with 'role' and 'content'; content is a list of "
                "{'type': 'text', 'text': ...} / {'type': 'image'} items",
            ) from exc
        except OverflowError as exc:  # the sandbox's bound on range() and on repeated strings
            raise ProcessorError(
                f"the chat template ({self.origin}) went past the sandbox's limits: {exc}",
                hint="check the template for runaway loops",
            ) from exc


def _template_from_tokenizer_config(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        return named.get("default")
    return None


def load_chat_template(folder: Path, tokenizer_config: Mapping[str, Any]) -> ChatTemplate | None:
    """The chat template from ``chat_template.jinja``, ``chat_template.json`` or ``tokenizer_config.json``.

    The first found wins; when a later file holds a different template a :class:`SpecWarning`
    says which one is used. ``None`` when the checkpoint has none.
    """
    found: list[tuple[str, str]] = []
    jinja_path = Path(folder) / "chat_template.jinja"
    if jinja_path.is_file():
        from ..limits import read_text

        found.append((str(jinja_path), read_text(jinja_path, kind="chat template", bound="template_bytes")))
    json_cfg = read_json(folder, "chat_template.json", required=False) or {}
    if isinstance(json_cfg.get("chat_template"), str):
        found.append((str(Path(folder) / "chat_template.json"), json_cfg["chat_template"]))
    from_tok = _template_from_tokenizer_config(tokenizer_config.get("chat_template"))
    if from_tok:
        found.append((str(Path(folder) / "tokenizer_config.json"), from_tok))
    if not found:
        return None
    origin, text = found[0]
    others = [o for o, t in found[1:] if t != text]
    if others:
        warnings.warn(
            f"chat templates differ between {origin} and {', '.join(others)}; using the one in {origin} "
            "(a dedicated chat-template file takes precedence, as in transformers)",
            SpecWarning,
            stacklevel=3,
        )
    return ChatTemplate(text, origin=origin)
