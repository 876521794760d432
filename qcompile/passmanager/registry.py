"""The pass registry: names -> Pass classes, with third-party passes found through the
entry-point group `qcompile.passes`.

The core never imports the built-in catalogue (qcompile.passes): importing it
registers its passes, and only the composition root (qcompile/cli.py) does so. Plugins
are loaded lazily, once, the first time the registry is asked for the full list or for
a name it does not know. A plugin package declares, in its pyproject.toml:

    [project.entry-points."qcompile.passes"]
    my-pass = "my_package.passes:MyPass"

The entry point's value is the Pass class; if the class is not decorated with
`register_pass`, it is registered under the entry point's name. A plugin that fails
to load is skipped with a warning naming it.
"""
from __future__ import annotations

import difflib
import importlib.metadata
import re
import warnings
from typing import Callable, Dict, Optional, Set, Type, TypeVar

from ..errors import PipelineError
from .base import Pass

__all__ = ["ENTRY_POINT_GROUP", "register_pass", "get_pass", "available_passes"]

ENTRY_POINT_GROUP = "qcompile.passes"
_NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")

_registry: Dict[str, Type[Pass]] = {}
_plugin_names: Set[str] = set()
_plugins_loaded = False

P = TypeVar("P", bound=Type[Pass])


def register_pass(name: str) -> Callable[[P], P]:
    """Class decorator registering a Pass subclass under `name` (kebab-case:
    `fold`, `upgrade-opset`). A name already taken by another class is an error;
    re-registering the same class (a module reloaded) replaces it."""
    _check_name(name)

    def decorate(cls: P) -> P:
        _add(name, cls)
        return cls

    return decorate


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"pass name {name!r} is not kebab-case: use lowercase letters and digits "
            "in words joined by '-', e.g. 'fold' or 'upgrade-opset'"
        )


def _add(name: str, cls: type) -> None:
    _check_name(name)
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise TypeError(f"register_pass({name!r}) decorates {cls!r}, which is not a subclass of Pass")
    if cls.name != name and _registry.get(cls.name) is cls:
        raise ValueError(f"{_qualified(cls)} is already registered as {cls.name!r}; a pass has one name")
    old = _registry.get(name)
    if old is not None and old is not cls and _qualified(old) != _qualified(cls):
        raise ValueError(
            f"pass name {name!r} is already registered by {_qualified(old)}; "
            f"{_qualified(cls)} needs another name"
        )
    cls.name = name
    _registry[name] = cls


def get_pass(name: str) -> Type[Pass]:
    """The Pass class registered as `name`. PipelineError when unknown, suggesting
    a near match and listing the available passes."""
    cls = _registry.get(name)
    if cls is None:
        _load_plugins()
        cls = _registry.get(name)
    if cls is None:
        raise PipelineError(unknown_pass_message(name))
    return cls


def available_passes() -> Dict[str, Type[Pass]]:
    """Every registered pass by name (plugins included), sorted by name."""
    _load_plugins()
    return dict(sorted(_registry.items()))


def unknown_pass_message(name: str, where: str = "") -> str:
    """`unknown pass 'fodl'[ at column 3]; did you mean 'fold'? (available passes: ...)`."""
    names = sorted(available_passes())
    close = difflib.get_close_matches(name.lower(), names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    listing = ", ".join(names) if names else "none are registered (import qcompile.passes)"
    return f"unknown pass {name!r}{where}{hint} (available passes: {listing})"


def _load_plugins() -> None:
    """Import the passes of the `qcompile.passes` entry-point group, once."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        _load_plugin(ep)


def _load_plugin(ep: importlib.metadata.EntryPoint) -> None:
    dist = _dist_name(ep)
    label = f"qcompile pass plugin {ep.name!r} ({ep.value}{', from ' + dist if dist else ''})"
    try:
        cls = ep.load()
    except Exception as e:  # a broken plugin must not take the compiler down
        warnings.warn(f"{label} failed to load and is skipped: {type(e).__name__}: {e}", stacklevel=3)
        return
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        warnings.warn(f"{label} is skipped: it names {cls!r}, not a Pass subclass", stacklevel=3)
        return
    if _registry.get(cls.name) is cls:  # registered itself with @register_pass
        _plugin_names.add(cls.name)
        return
    try:
        _add(ep.name, cls)
    except (ValueError, TypeError) as e:
        warnings.warn(f"{label} is skipped: {e}", stacklevel=3)
        return
    _plugin_names.add(ep.name)


def _dist_name(ep: importlib.metadata.EntryPoint) -> Optional[str]:
    dist = getattr(ep, "dist", None)
    return getattr(dist, "name", None) if dist is not None else None


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _reset_plugins() -> None:
    """Forget the plugins loaded so far (for tests): the next lookup loads them again."""
    global _plugins_loaded
    for name in _plugin_names:
        _registry.pop(name, None)
    _plugin_names.clear()
    _plugins_loaded = False


def _unregister(name: str) -> None:
    """Remove a registration (for tests that register throwaway passes)."""
    _registry.pop(name, None)
