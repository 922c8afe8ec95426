"""Bounded YAML: safe tags only, duplicate keys refused, alias expansion and depth bounded.

``yaml.safe_load`` never runs code, but it lets the last of two equal keys win silently, and
a few lines of nested anchors (a "billion laughs") expand into billions of nodes once anything
walks the result (``dump_yaml``, ``vlmkit inspect``, pydantic). :func:`load` refuses both, and a
self-referencing anchor, before any value is built. :func:`check_expansion` bounds the same
for Python data that reaches a spec by another road (a dict built in code).
"""

from __future__ import annotations

from typing import Any

import yaml

from .errors import SpecError
from .limits import LIMITS, limit, raise_hint

__all__ = ["load", "check_expansion", "BoundedLoader"]


class BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that checks the composed node graph before constructing values."""

    source = "<yaml>"

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _check_graph(node, self.source)
        return self.construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class says so
                    continue
                if first is not None:
                    line = key_node.start_mark.line + 1
                    raise SpecError(
                        f"key {key!r} appears twice in one mapping (lines {first} and {line}); YAML would keep "
                        "only the last one silently",
                        source=self.source, hint="delete or rename one of the two keys",
                    )
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _check_graph(root: yaml.Node, source: str) -> None:
    """Refuse a node graph whose expansion (aliases followed) exceeds the node bound or the depth
    bound, or that refers to itself. Linear in the distinct nodes (sizes are memoised)."""
    cap, max_depth = limit("yaml_nodes"), limit("yaml_depth")
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool, int]] = [(root, False, 1)]
    while stack:
        node, done, depth = stack.pop()
        key = id(node)
        children = _children(node)
        if done:
            on_path.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            if size[key] > cap:
                raise SpecError(
                    f"this YAML expands to more than {cap:,.0f} nodes once its aliases (*name) are followed "
                    f"(at line {node.start_mark.line + 1}); nested anchors like this are a 'billion laughs' attack",
                    source=source, hint="write the values out instead of nesting aliases; " + raise_hint("yaml_nodes"),
                )
            continue
        if key in size:
            continue
        if key in on_path:
            raise SpecError(
                f"an anchor refers to itself (line {node.start_mark.line + 1}): the value would be infinite",
                source=source, hint="remove the alias that points back into its own anchor",
            )
        if depth > max_depth:
            raise SpecError(
                f"nested more than {max_depth:,.0f} levels deep (line {node.start_mark.line + 1})",
                source=source, hint="flatten the file; " + raise_hint("yaml_depth"),
            )
        on_path.add(key)
        stack.append((node, True, depth))
        stack.extend((c, False, depth + 1) for c in children if id(c) not in size)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def load(text: str, *, source: str) -> Any:
    """Parse YAML ``text`` with :class:`BoundedLoader`; errors name ``source``.

    Raises :class:`SpecError` for duplicate keys, over-expanding aliases, recursion, undue depth
    and malformed YAML; YAML tags that would build Python objects are refused, never run.
    """
    loader = None
    try:
        loader = BoundedLoader(text)  # the reader checks the characters here already
        loader.source = source
        return loader.get_single_data()
    except yaml.constructor.ConstructorError as exc:
        raise SpecError(f"not valid YAML: {exc}", source=source,
                        hint="model YAML is plain data: tags such as !!python/... are refused, never run") from None  # fmt: skip
    except yaml.YAMLError as exc:
        raise SpecError(f"not valid YAML: {exc}", source=source, hint="check the indentation and quoting") from None
    except RecursionError:
        raise SpecError("nested too deeply to parse", source=source, hint="flatten the file; " + raise_hint("yaml_depth")) from None
    finally:
        if loader is not None:
            loader.dispose()


def check_expansion(data: Any, *, source: str | None = None) -> None:
    """Refuse Python ``data`` (dicts, lists, tuples) that reaches more than the node bound once
    shared objects are counted at each use, or that contains itself (memoised: linear time)."""
    cap = limit("yaml_nodes")
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:
        value, done = stack.pop()
        key = id(value)
        kids = _py_children(value)
        if done:
            on_path.discard(key)
            size[key] = 1 + sum(size.get(id(c), 1) for c in kids)
            if size[key] > cap:
                raise SpecError(
                    f"this spec holds more than {cap:,.0f} values once shared ones are counted at each use "
                    f"({LIMITS['yaml_nodes'].what})",
                    source=source, hint="a spec is a few hundred values; " + raise_hint("yaml_nodes"),
                )
            continue
        if not kids or key in size:
            continue
        if key in on_path:
            raise SpecError("this spec contains itself (a value refers back to its own container)", source=source,
                            hint="build the spec from plain, non-circular data")  # fmt: skip
        on_path.add(key)
        stack.append((value, True))
        stack.extend((c, False) for c in kids if _py_children(c) and id(c) not in size)


def _py_children(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [*value.keys(), *value.values()]
    if isinstance(value, (list, tuple)):
        return list(value)
    return []
