"""The plugin manager: built-ins first, then entry points, built lazily on first use.

Environment switches (handy in tests):

- ``VLMKIT_DISABLE_ENTRYPOINTS=1``: load only the built-in components.
- ``VLMKIT_BLOCK_PLUGINS=name,other``: skip these entry-point names or distribution names.

A third-party plugin that fails to import or to register (for example a duplicate name) is
recorded in :func:`failures` and skipped; everything that does not need it keeps working.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError
from .registry import Registry

__all__ = [
    "BUILTIN_MODULES",
    "PluginFailure",
    "get_plugin_manager",
    "get_registry",
    "register_plugin",
    "failures",
    "plugin_sources",
    "unknown_name_error",
    "reset",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "vlmkit"

def _builtin_modules() -> tuple[str, ...]:
    """Every module of :mod:`vlmkit.components` (sorted). Each is a plugin; a module of building
    blocks simply implements no hook."""
    import pkgutil

    from . import components

    return tuple(sorted(f"{components.__name__}.{m.name}" for m in pkgutil.iter_modules(components.__path__)))


#: Built-in component and family modules; each is a plugin with its own ``vlmkit_register_components``.
BUILTIN_MODULES = _builtin_modules()


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be used: entry-point name, distribution and the error text."""

    name: str
    distribution: str
    error: str


class _State:
    def __init__(self) -> None:
        self.pm: pluggy.PluginManager | None = None
        self.registry: Registry | None = None
        self.failures: list[PluginFailure] = []
        self.sources: dict[str, str] = {}  # plugin name -> distribution ("vlmkit" for built-ins)
        self.lock = threading.RLock()


_state = _State()


def _blocked() -> set[str]:
    return {s.strip() for s in os.environ.get("VLMKIT_BLOCK_PLUGINS", "").split(",") if s.strip()}


def _load_builtins(pm: pluggy.PluginManager) -> None:
    for modname in BUILTIN_MODULES:
        module = importlib.import_module(modname)
        pm.register(module, name=modname)
        _state.sources[modname] = "vlmkit"


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    if os.environ.get("VLMKIT_DISABLE_ENTRYPOINTS", "").lower() in {"1", "true", "yes"}:
        return
    blocked = _blocked()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "?"
        if ep.name in blocked or dist in blocked or pm.has_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - a broken plugin (even one calling sys.exit) must not end the host
            _fail(ep.name, dist, exc)
            continue
        _state.sources[ep.name] = dist


def _fail(name: str, dist: str, exc: BaseException) -> None:
    failure = PluginFailure(name, dist, f"{type(exc).__name__}: {exc}")
    _state.failures.append(failure)
    log.warning("vlmkit plugin %r (%s) was skipped: %s", name, dist, failure.error)


def _run_registration(pm: pluggy.PluginManager, registry: Registry, only: Any = None) -> None:
    for impl in pm.hook.vlmkit_register_components.get_hookimpls():
        if only is not None and impl.plugin is not only:
            continue
        registry.current_plugin = impl.plugin_name
        dist = _state.sources.get(impl.plugin_name, "?")
        try:
            impl.function(registry=registry)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - sys.exit in a hook is a failed plugin, not the host's exit
            if dist == "vlmkit" or (only is not None and isinstance(exc, Exception)):
                raise
            if only is not None:
                raise PluginError(f"plugin {impl.plugin_name!r} tried to end the process while registering "
                                  f"({type(exc).__name__}: {exc})", hint="fix the plugin's vlmkit_register_components hook") from exc  # fmt: skip
            _fail(impl.plugin_name, dist, exc)
            pm.unregister(impl.plugin)
            _drop_entries(impl.plugin_name, registry)  # nothing half-registered stays behind
        finally:
            registry.current_plugin = "<direct>"


def _build() -> None:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    _state.failures = []
    _state.sources = {}
    _load_builtins(pm)
    _load_entry_points(pm)
    registry = Registry()
    _run_registration(pm, registry)
    _state.pm, _state.registry = pm, registry


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (built on first call)."""
    with _state.lock:
        if _state.pm is None:
            _build()
        return _state.pm  # type: ignore[return-value]


def get_registry() -> Registry:
    """The process-wide component registry (built on first call)."""
    get_plugin_manager()
    return _state.registry  # type: ignore[return-value]


def register_plugin(plugin: Any, name: str | None = None) -> str:
    """Register a plugin object or module now (e.g. in a test or a notebook) and run its hooks.

    Errors (such as a duplicate component name) raise :class:`PluginError` and leave the plugin
    unregistered. Returns the plugin's name.
    """
    pm = get_plugin_manager()
    with _state.lock:
        try:
            plugin_name = pm.register(plugin, name=name)
        except ValueError as exc:
            raise PluginError(f"cannot register plugin {name or plugin!r}: {exc}") from exc
        _state.sources[plugin_name] = "<runtime>"
        try:
            _run_registration(pm, _state.registry, only=plugin)  # type: ignore[arg-type]
        except Exception as exc:
            pm.unregister(plugin)
            _drop_entries(plugin_name)
            if isinstance(exc, PluginError):
                raise
            raise PluginError(
                f"plugin {plugin_name!r} failed while registering its components: {type(exc).__name__}: {exc}",
                hint="fix the plugin's vlmkit_register_components hook",
            ) from exc
        return plugin_name  # type: ignore[return-value]


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered with :func:`register_plugin` and its components."""
    pm = get_plugin_manager()
    with _state.lock:
        plugin = pm.get_plugin(name)
        if plugin is None:
            raise PluginError(f"no plugin named {name!r} is registered")
        pm.unregister(plugin)
        _drop_entries(name)


def _drop_entries(plugin_name: str, registry: Registry | None = None) -> None:
    (registry if registry is not None else _state.registry).drop_plugin(plugin_name)


def failures() -> list[PluginFailure]:
    """Plugins that were skipped because they failed to import or register."""
    get_plugin_manager()
    return list(_state.failures)


def unknown_name_error(exc: Exception) -> Exception:
    """``exc`` (an unknown component name) as a :class:`PluginError` naming the plugins that failed
    to load, when some did (the name may well be theirs); else ``exc`` unchanged."""
    failed = failures()
    if not failed:
        return exc
    names = "; ".join(f"{f.name!r} from {f.distribution} ({f.error})" for f in failed)
    return PluginError(
        f"{exc}; note that plugin(s) failed to load and may provide it: {names}",
        hint="fix or reinstall the failed plugin (`vlmkit plugins` lists it), or block it with VLMKIT_BLOCK_PLUGINS",
    )


def plugin_sources() -> dict[str, str]:
    """Plugin name -> distribution that provides it (``vlmkit`` for built-ins)."""
    get_plugin_manager()
    return dict(_state.sources)


def reset() -> None:
    """Forget the manager and registry; the next use rebuilds them (re-reading entry points)."""
    with _state.lock:
        _state.pm = None
        _state.registry = None
        _state.failures = []
        _state.sources = {}
