"""The validated model spec: which registered component fills each slot, with its typed params.

The YAML form (also what ``spec_from_hf`` produces)::

    vision_tower: {name: navit, hidden_size: 768, image_size: 512, patch_size: 16, ...}
    connector:    {name: <connector>, scale_factor: 4}
    aligner:      {name: hidden_align}          # optional: inserted from the widths
    packer:       {name: image_packer, image_token_id: 49190, tokens_per_image: 64}
    backbone:     {name: llama, hidden_size: 576, ...}
    weights: owner/checkpoint        # optional: a folder or Hub repo id, or one per slot
    tokenizer: owner/checkpoint      # optional
    freeze: [vision_tower, backbone]               # optional

Each slot's params are validated by that component's pydantic ``Params`` (unknown keys are
errors), so a spec never holds an unchecked value.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import PluginError, SourceNotFoundError, SpecError, UnknownComponentError, VlmkitError, short_repr
from .protocols import SLOTS
from .strict import coercion_problem

__all__ = ["ComponentSpec", "VLMSpec", "validate_spec", "load_yaml", "dump_yaml", "json_schema", "DEFAULT_ALIGNER"]

DEFAULT_ALIGNER = "hidden_align"


class ComponentSpec(BaseModel):
    """One slot: the registry ``name`` and the validated ``params`` of that component."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    name: str
    params: BaseModel

    def to_dict(self) -> dict[str, Any]:
        """The YAML form: ``{"name": ..., **params}``."""
        return {"name": self.name, **self.params.model_dump(mode="json")}


class VLMSpec(BaseModel):
    """A whole model. Build one with :func:`validate_spec`, ``spec_from_hf`` or :func:`load_yaml`."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    vision_tower: ComponentSpec
    connector: ComponentSpec
    aligner: ComponentSpec
    packer: ComponentSpec
    backbone: ComponentSpec
    weights: str | dict[str, str] | None = Field(
        default=None, description="Folder or Hub repo id holding the weights, or one per slot."
    )
    tokenizer: str | None = Field(default=None, description="Folder or repo id of tokenizer/processor files.")
    freeze: list[str] = Field(default_factory=list, description="Slots whose parameters do not train.")

    @model_validator(mode="before")
    @classmethod
    def _resolve_components(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError(f"a spec is a mapping of the slots {', '.join(SLOTS)}; got {type(data).__name__}")
        data = dict(data)
        data.setdefault("aligner", {"name": DEFAULT_ALIGNER})
        for slot in SLOTS:
            if slot in data and not isinstance(data[slot], ComponentSpec):
                data[slot] = _component(slot, data[slot])
        return data

    @model_validator(mode="after")
    def _check_slots(self) -> VLMSpec:
        for slot in self.freeze:
            if slot not in SLOTS:
                raise _KeyPathError("freeze", f"unknown slot {slot!r}; slots are {', '.join(SLOTS)}")
        if isinstance(self.weights, dict):
            for slot in self.weights:
                if slot not in SLOTS:
                    raise _KeyPathError(f"weights.{slot}", f"unknown slot {slot!r}; slots are {', '.join(SLOTS)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The YAML form of the whole spec (defaults included, so it is self-describing)."""
        out: dict[str, Any] = {slot: getattr(self, slot).to_dict() for slot in SLOTS}
        for key in ("weights", "tokenizer"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.freeze:
            out["freeze"] = list(self.freeze)
        return out

    def weights_for(self, slot: str) -> str | None:
        """Where ``slot``'s weights come from, or ``None`` (fresh init)."""
        if isinstance(self.weights, dict):
            return self.weights.get(slot)
        return self.weights


class _SlotError(ValueError):
    def __init__(self, slot: str, exc: Exception) -> None:
        self.slot, self.exc = slot, exc
        super().__init__(str(exc))


class _KeyPathError(ValueError):
    """A validator's complaint about one key (pydantic would otherwise lose the key path)."""

    def __init__(self, key_path: str, message: str, hint: str | None = None) -> None:
        self.key_path, self.message, self.hint = key_path, message, hint
        super().__init__(message)


def _component(slot: str, raw: Any) -> ComponentSpec:
    from .plugins import get_registry

    if not isinstance(raw, dict) or "name" not in raw:
        raise _KeyPathError(
            slot, f"expected a mapping with a `name` (the registry name) and its params; got {short_repr(raw)}"
        )
    raw = dict(raw)
    name = raw.pop("name")
    if not isinstance(name, str):
        raise _KeyPathError(f"{slot}.name", f"expected a registry name (a string), got {short_repr(name)}")
    try:
        entry = get_registry().get(slot, name)
    except UnknownComponentError as exc:  # not a ValueError: pydantic lets it through
        from .plugins import unknown_name_error

        raise unknown_name_error(UnknownComponentError(exc.kind, exc.name, exc.choices, where=f"{slot}.name")) from None
    try:
        params = entry.cls.Params.model_validate(raw)
    except pydantic.ValidationError as exc:
        raise _SlotError(slot, exc) from exc
    except (TypeError, KeyError, AttributeError, IndexError, ArithmeticError) as exc:  # a validator that choked
        raise _KeyPathError(slot, f"{name!r} cannot take these params ({type(exc).__name__}: {short_repr(str(exc), 200)})") from exc
    except (VlmkitError, KeyboardInterrupt):
        raise
    except BaseException as exc:  # noqa: BLE001 - a plugin's validator may not take the host down (even sys.exit)
        raise PluginError(
            f"{slot} {name!r} (plugin {entry.plugin!r}) crashed while validating its params: "
            f"{type(exc).__name__}: {short_repr(str(exc), 200)}",
            hint=f"this is a bug in the plugin {entry.plugin!r}; report it, or block it with VLMKIT_BLOCK_PLUGINS",
        ) from exc
    problem = coercion_problem(raw, params)
    if problem is not None:
        raise _KeyPathError(f"{slot}.{problem[0]}", problem[1], hint="write the value as the type the key takes "
                            "(`vlmkit schema` lists them): numbers unquoted, integers without a decimal point")
    return ComponentSpec(name=name, params=params)


def validate_spec(data: Any, *, source: str | None = None) -> VLMSpec:
    """Validate a YAML-form mapping into a :class:`VLMSpec`; errors become :class:`SpecError`."""
    from .yaml_safe import check_expansion

    check_expansion(data, source=source)
    try:
        return VLMSpec.model_validate(data)
    except pydantic.ValidationError as exc:
        raise _to_spec_error(exc, source) from None
    except UnknownComponentError as exc:
        if not source or (exc.where and exc.where.startswith(source)):
            raise
        where = f"{source}: {exc.where}" if exc.where else source
        raise UnknownComponentError(exc.kind, exc.name, exc.choices, where=where) from None


def _clip(text: str, limit: int = 400) -> str:
    """``text`` cut in the middle when longer than ``limit`` (a message quoting a huge value)."""
    return text if len(text) <= limit else f"{text[: limit // 2]} ... {text[-limit // 4 :]}"


#: pydantic's names for the branches of a union (``eos_token_id.int``), not keys the user wrote.
_UNION_TAG = re.compile(r"^(int|float|str|bool|none|list\[.*\]|dict\[.*\]|function-\w+\[.*\]|constrained-\w+)$")


def _to_spec_error(exc: pydantic.ValidationError, source: str | None, prefix: str = "") -> SpecError:
    err = exc.errors()[0]
    ctx_exc = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_exc, _SlotError):
        return _to_spec_error(ctx_exc.exc, source, prefix=f"{ctx_exc.slot}.")  # type: ignore[arg-type]
    if isinstance(ctx_exc, _KeyPathError):
        hint = ctx_exc.hint or f"slots are {', '.join(SLOTS)}; `vlmkit schema` prints every valid key"
        return SpecError(_clip(ctx_exc.message), key_path=prefix + ctx_exc.key_path, source=source, hint=hint)
    loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and _UNION_TAG.match(p)))
    key_path = prefix + loc if loc else prefix.rstrip(".") or None
    got = err.get("input")
    msg = _clip(err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, "))
    if err["type"] == "extra_forbidden":
        msg = "unknown key (this component does not take it)"
    elif err["type"] != "missing" and not isinstance(got, dict):
        msg += f" (got {short_repr(got)})"
    more = f" (and {len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
    return SpecError(msg + more, key_path=key_path, source=source, hint="fix this key; `vlmkit schema` prints every valid key")


def load_yaml(path: str | Path) -> VLMSpec:
    """Read and validate a YAML model file: a regular file within the size bound, parsed by
    :func:`vlmkit.yaml_safe.load` (YAML tags never run code; duplicate keys and over-expanding
    aliases are refused; see docs/limits.md)."""
    from .limits import read_text
    from .yaml_safe import load

    if not isinstance(path, (str, os.PathLike)):
        raise SourceNotFoundError(
            f"expected the path of a model YAML file, got {type(path).__name__} {short_repr(path)}",
            hint="pass the path of a model YAML file (see configs/), a VLMSpec or its dict form",
        )
    if os.path.isdir(path) if len(os.fspath(path)) < 4096 else False:
        raise SourceNotFoundError(
            f"{os.fspath(path)!r} is a folder, not a model YAML file",
            hint="for a checkpoint folder use build_from_hf(folder) (or `vlmkit inspect FOLDER`)",
        )
    text = read_text(path, kind="YAML", bound="yaml_bytes")
    path = Path(path)
    data = load(text, source=str(path))
    if not isinstance(data, dict):
        got = "an empty file" if data is None else type(data).__name__
        raise SpecError(
            f"a model YAML is a mapping with keys {', '.join(SLOTS)}; got {got}", source=str(path),
            hint="see the YAML files in configs/ for the layout; `vlmkit schema` prints every valid key",
        )
    return validate_spec(data, source=str(path))


def dump_yaml(spec: VLMSpec, path: str | Path | None = None) -> str:
    """The YAML text of ``spec`` (written to ``path`` when given); ``load_yaml`` reads it back equal."""
    import yaml

    from .yaml_safe import check_expansion

    check_expansion({slot: dict(getattr(spec, slot).params) for slot in SLOTS})  # before to_dict() copies it out
    text = yaml.safe_dump(spec.to_dict(), sort_keys=False)
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text


def json_schema() -> dict[str, Any]:
    """A JSON schema for model YAML files, covering every registered component's params."""
    from .plugins import get_registry

    registry = get_registry()
    defs: dict[str, Any] = {}
    props: dict[str, Any] = {}
    for slot in SLOTS:
        choices = []
        for name in registry.names(slot):
            schema = registry.get(slot, name).cls.Params.model_json_schema(ref_template="#/$defs/{model}")
            defs.update(schema.pop("$defs", {}))
            schema.setdefault("properties", {})
            schema["properties"] = {"name": {"const": name}, **schema["properties"]}
            schema["required"] = ["name", *schema.get("required", [])]
            schema["additionalProperties"] = False
            choices.append(schema)
        props[slot] = {"oneOf": choices}
    base = VLMSpec.model_json_schema()
    for key in ("weights", "tokenizer", "freeze"):
        props[key] = base["properties"][key]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "vlmkit model",
        "type": "object",
        "properties": props,
        "required": [s for s in SLOTS if s != "aligner"],
        "additionalProperties": False,
        "$defs": defs,
    }
