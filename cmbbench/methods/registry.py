"""The registry of installed methods: the ``cmbbench.methods`` entry-point group.

Any installed distribution can add a method by declaring an entry point in that group whose
value is a :class:`cmbbench.methods.api.Method` subclass::

    [project.entry-points."cmbbench.methods"]
    mymethod = "mypackage.module:MyMethod"

The entry-point name is the registry name (``cmbbench evaluate --method mymethod``). Entry
points are listed without importing anything; a method's module is imported only when the
method is loaded, so one broken plugin never hides the others.
"""

from __future__ import annotations

import json
from importlib.metadata import EntryPoint, entry_points

from ..errors import ConfigurationError
from .api import Method

__all__ = [
    "GROUP",
    "available_methods",
    "describe_methods",
    "load_method",
    "load_method_class",
    "method_info",
]

GROUP = "cmbbench.methods"


def available_methods() -> dict[str, EntryPoint]:
    """Installed methods by registry name (entry-point name), sorted by name.

    Nothing is imported. When two distributions register the same name, the first one found on
    ``sys.path`` wins (as for console scripts).
    """
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=GROUP):
        found.setdefault(ep.name, ep)
    return dict(sorted(found.items()))


def _unknown(name: str, known: dict[str, EntryPoint]) -> ConfigurationError:
    listing = ", ".join(known) if known else "none installed"
    return ConfigurationError(f"unknown method {name!r}; available methods: {listing}")


def load_method_class(name: str) -> type[Method]:
    """Import and return the :class:`Method` subclass registered as ``name``.

    Raises
    ------
    ConfigurationError
        No method has that name (the message lists the available ones), its module cannot be
        imported, or the entry point is not a :class:`Method` subclass.
    """
    known = available_methods()
    ep = known.get(name)
    if ep is None:
        # be forgiving about case, never about anything else
        matches = [n for n in known if n.lower() == name.lower()]
        if len(matches) != 1:
            raise _unknown(name, known)
        ep = known[matches[0]]
    try:
        obj = ep.load()
    except Exception as exc:  # noqa: BLE001 - any import-time failure of a plugin
        raise ConfigurationError(
            f"method {ep.name!r} ({ep.value}) cannot be loaded: {type(exc).__name__}: {exc}"
        ) from None
    if not (isinstance(obj, type) and issubclass(obj, Method)):
        raise ConfigurationError(
            f"method {ep.name!r} ({ep.value}) is not a subclass of cmbbench.methods.api.Method")
    return obj


def load_method(name: str, **params: object) -> Method:
    """Instantiate the method registered as ``name`` with ``params`` (not yet ``load()``-ed).

    Raises
    ------
    ConfigurationError
        Unknown name (the message lists the available methods), an import failure, or
        parameters the method's constructor rejects.
    """
    cls = load_method_class(name)
    try:
        method = cls(**params)
    except TypeError as exc:
        raise ConfigurationError(f"method {name!r} rejects its parameters: {exc}") from None
    if not getattr(method, "name", ""):
        # a plugin that forgot its class attribute still gets a usable name
        method.name = name  # type: ignore[misc]
    return method


def _distribution_of(ep: EntryPoint) -> dict:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return {}
    return {"name": dist.metadata["Name"], "version": dist.version}


def method_info(name: str, **params: object) -> dict:
    """Everything ``cmbbench methods info NAME`` shows (the method's :meth:`Method.info` plus
    its entry point and the distribution that provides it)."""
    known = available_methods()
    method = load_method(name, **params)
    info = method.info()
    ep = known.get(name) or next(ep for n, ep in known.items() if n.lower() == name.lower())
    info = {"registry_name": ep.name, **info, "entry_point": ep.value,
            "distribution": _distribution_of(ep)}
    return json.loads(json.dumps(info, default=str))


def describe_methods() -> list[dict]:
    """One row per installed method for ``cmbbench methods list``: name, version, citation,
    entry point, distribution, and ``error`` (None, or why the method cannot be loaded)."""
    rows = []
    for name, ep in available_methods().items():
        row: dict = {"name": name, "version": None, "citation": None, "entry_point": ep.value,
                     "distribution": _distribution_of(ep), "error": None}
        try:
            cls = load_method_class(name)
            row["version"] = cls.version
            row["citation"] = cls.citation
        except ConfigurationError as exc:
            row["error"] = exc.problem
        rows.append(row)
    return rows
