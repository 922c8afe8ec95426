"""``apply_chat_template``'s keywords: which template, continuing the final message, which keywords are
template variables and which go to the processor call, and the images a conversation carries.

As in transformers, a keyword the template reads is a template variable and any other is a
processor keyword (checked by :mod:`vlmkit.processor.options`, so a misspelt one is an error).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ProcessorError, closest, short_repr
from .inputs import IMAGE_TYPES, normalize_messages
from .options import CALL_KEYWORDS
from .text import ChatTemplate

__all__ = [
    "CHAT_KEYWORDS",
    "CONTINUE_TAG",
    "REFUSED_CHAT",
    "TEMPLATE_ONLY",
    "refuse_untokenized",
    "chat_images",
    "render_conversations",
    "split_chat_keywords",
    "template_from_text",
]

#: Marker appended to the final message's last text, so the render can be cut right after it.
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "

#: apply_chat_template keywords that only ever go to the template (never to the processor call).
TEMPLATE_ONLY = ("tools", "documents", "reasoning_effort")

#: apply_chat_template keywords refused, with the reason.
REFUSED_CHAT = {
    "return_assistant_tokens_mask": "not implemented: the assistant mask needs the template's {% generation %} "
    "spans mapped to token offsets",
    "load_audio_from_video": "this processor has no audio input",
    "sanitize_control_tokens": "not implemented: control tokens in the messages are tokenized as control tokens",
}


@functools.lru_cache(maxsize=16)
def template_from_text(text: str) -> ChatTemplate:
    """A chat template passed as ``chat_template=`` (compiled once per distinct text)."""
    if not isinstance(text, str) or not text.strip():
        raise ProcessorError(f"chat_template={short_repr(text)} is not a Jinja template string")
    return ChatTemplate(text, origin="the chat_template argument")


def split_chat_keywords(template: ChatTemplate, kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(template variables, processor keywords)``; refused chat keywords raise."""
    for name, why in REFUSED_CHAT.items():
        if kwargs.get(name) not in (None, False):
            raise ProcessorError(f"{name}={short_repr(kwargs[name])} is not supported: {why}")
    rest = {k: v for k, v in kwargs.items() if k not in REFUSED_CHAT}
    for name in TEMPLATE_ONLY:
        if rest.get(name) is not None and name not in template.variables:
            raise ProcessorError(
                f"{name}= was passed but the chat template ({template.origin}) never reads {name!r}, so it would "
                "be ignored",
                hint=f"drop {name}, or pass a chat_template= that uses it",
            )
    variables = {k: v for k, v in rest.items() if k in template.variables or (k in TEMPLATE_ONLY and v is None)}
    return variables, {k: v for k, v in rest.items() if k not in variables}


#: apply_chat_template's own keywords (for "did you mean" suggestions).
CHAT_KEYWORDS = ("chat_template", "add_generation_prompt", "continue_final_message", "tokenize", "return_dict",
                 "processor_kwargs", *TEMPLATE_ONLY)  # fmt: skip


def refuse_untokenized(template: ChatTemplate, call_kwargs: Mapping[str, Any], return_dict: bool) -> None:
    """Without ``tokenize=True`` every keyword must be the template's or apply_chat_template's own."""
    names = sorted(call_kwargs) + (["return_dict"] if return_dict else [])
    if not names:
        return
    known = [n for n in names if n in CALL_KEYWORDS or n in ("return_dict", "images")]
    if len(known) < len(names):
        name = next(n for n in names if n not in known)
        choices = [*CHAT_KEYWORDS, *sorted(template.variables), *CALL_KEYWORDS]
        near = closest(name, choices)
        raise ProcessorError(
            f"unknown apply_chat_template keyword {name!r}: neither the chat template ({template.origin}) nor the "
            "processor reads it" + (f"; did you mean {near!r}?" if near else ""),
            hint=f"the template reads: {', '.join(sorted(template.variables)) or '(nothing)'}",
        )
    raise ProcessorError(
        f"{', '.join(names)} only apply with tokenize=True, and the template reads none of them",
        hint="pass tokenize=True, or drop them",
    )


def _continue_field(continue_final_message: bool | str) -> str:
    if isinstance(continue_final_message, str):
        return continue_final_message
    return "content"


def _tag_final(conversation: list[dict[str, Any]], field: str, template: ChatTemplate, k: int) -> str:
    """Append :data:`CONTINUE_TAG` to the final message's last text; return that text."""
    if not conversation:
        raise ProcessorError(f"conversation {k} is empty; continue_final_message needs a message to continue")
    final = conversation[-1].get(field)
    if final is None or field not in template.text:
        raise ProcessorError(
            f"continue_final_message={field!r}: conversation {k}'s final message has no {field!r}"
            + ("" if final is None else " the template reads"),
            hint="continue_final_message=True continues the final message's 'content'",
        )
    if isinstance(final, str):
        conversation[-1] = {**conversation[-1], field: final + CONTINUE_TAG}
        return final
    items = [dict(item) for item in final]
    for item in reversed(items):
        if isinstance(item.get("text"), str):
            text, item["text"] = item["text"], item["text"] + CONTINUE_TAG
            conversation[-1] = {**conversation[-1], field: items}
            return text
    raise ProcessorError(f"continue_final_message: conversation {k}'s final message has no text to continue")


def _cut_at_tag(rendered: str, final: str, k: int) -> str:
    tag = CONTINUE_TAG.strip()
    if final.strip() not in rendered or tag not in rendered:
        raise ProcessorError(
            f"continue_final_message: the template dropped (part of) conversation {k}'s final message, so it "
            "cannot be continued",
            hint="check that the template writes the final message's text unchanged",
        )
    at = rendered.rindex(tag)
    return rendered[:at] if rendered[at : at + len(CONTINUE_TAG)] == CONTINUE_TAG else rendered[:at].rstrip()


def render_conversations(
    template: ChatTemplate,
    conversations: Sequence[Sequence[Mapping[str, Any]]],
    *,
    add_generation_prompt: bool,
    continue_final_message: bool | str,
    variables: Mapping[str, Any],
) -> list[str]:
    """One rendered prompt per conversation; ``continue_final_message`` leaves the last turn open."""
    if continue_final_message and add_generation_prompt:
        raise ProcessorError(
            "continue_final_message and add_generation_prompt were both set",
            hint="continue_final_message continues the last message; add_generation_prompt opens a new assistant "
            "turn: pass one of them",
        )
    out = []
    for k, conversation in enumerate(conversations):
        chat = normalize_messages(conversation)
        final = None
        if continue_final_message:
            final = _tag_final(chat, _continue_field(continue_final_message), template, k)
        rendered = template.render(chat, add_generation_prompt=add_generation_prompt, **variables)
        out.append(rendered if final is None else _cut_at_tag(rendered, final, k))
    return out


def chat_images(conversations: Sequence[Sequence[Mapping[str, Any]]]) -> list[list[Any]]:
    """The images carried by ``{"type": "image", "image": <PIL image / array>}`` items, per conversation."""
    out = []
    for k, conversation in enumerate(conversations):
        found = []
        for message in conversation:
            content = message.get("content") if isinstance(message, Mapping) else None
            for item in content if isinstance(content, list) else ():
                if not isinstance(item, Mapping) or item.get("type") != "image":
                    continue
                for key in ("url", "path", "base64"):
                    if item.get(key) is not None:
                        raise ProcessorError(
                            f"conversation {k}: an image item gives {key}={short_repr(item[key])}; vlmkit does not "
                            "fetch or open images named in messages",
                            hint="open it yourself (PIL.Image.open) and pass it as {'type': 'image', 'image': img}",
                        )
                image = item.get("image")
                if image is not None and not isinstance(image, IMAGE_TYPES):
                    raise ProcessorError(
                        f"conversation {k}: an image item holds a {type(image).__name__}",
                        hint="pass a PIL image, or a uint8 numpy array / torch tensor",
                    )
                if image is not None:
                    found.append(image)
        out.append(found)
    return out
