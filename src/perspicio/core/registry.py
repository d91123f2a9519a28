"""Registries of methods and metrics.

A decorator records each class with its metadata; the CLI choices, the README
table and ``perspicio.methods.names()`` are all generated from here, so there is
never a second hand-kept list.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import OptionError, UnknownNameError, suggest


@dataclass(frozen=True)
class Entry:
    """Metadata of one registered method or metric."""

    name: str
    cls: type
    family: str
    summary: str
    needs_gradients: bool = False
    needs_layer: bool = False
    model_agnostic: bool = False
    paper: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Registry:
    """A name -> :class:`Entry` mapping with helpful lookup errors."""

    def __init__(self, kind: str, populate: str | None = None, class_attributes: Sequence[str] = ()) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._populate = populate  # module whose import registers the built-in entries
        # metadata the registered class also carries as class attributes, set from the entry
        # (the decorator is the one place it is stated)
        self._class_attributes = tuple(class_attributes)

    def _loaded(self) -> dict[str, Entry]:
        """The entries, after importing the module that registers the built-in ones (once):
        lookups work whatever the caller imported first (the CLI looks names up early)."""
        if self._populate is not None:
            module, self._populate = self._populate, None
            importlib.import_module(module)
        return self._entries

    def register(self, name: str, *, family: str, summary: str = "", **meta: Any) -> Callable[[type], type]:
        known = {f for f in Entry.__dataclass_fields__ if f not in ("name", "cls", "family", "summary", "extra")}
        extra = {k: meta.pop(k) for k in list(meta) if k not in known}

        def decorator(cls: type) -> type:
            if name in self._entries:
                raise RuntimeError(f"{self.kind} {name!r} registered twice")
            doc = (cls.__doc__ or "").strip().splitlines()
            entry = Entry(name=name, cls=cls, family=family, summary=summary or (doc[0] if doc else ""), extra=extra, **meta)
            self._entries[name] = entry
            cls.name = name  # type: ignore[attr-defined]
            for attr in self._class_attributes:
                value = getattr(entry, attr) if attr in Entry.__dataclass_fields__ else entry.extra.get(attr)
                if value is not None:
                    setattr(cls, attr, tuple(value) if isinstance(value, list) else value)
            return cls

        return decorator

    def unregister(self, name: str) -> Entry:
        """Remove and return an entry (plugins and tests that register temporary entries)."""
        entry = self.get(name)
        del self._entries[entry.name]
        return entry

    def get(self, name: str) -> Entry:
        if isinstance(name, str):
            key = name.strip().lower().replace("-", "_")
            if key in self._loaded():
                return self._entries[key]
        raise UnknownNameError(
            f"unknown {self.kind} {name!r}; expected one of: {', '.join(sorted(self._entries))}."
            + suggest(str(name), self._entries)
        )

    def names(self, family: str | None = None) -> list[str]:
        return [n for n, e in self._loaded().items() if family is None or e.family == family]

    def select(self, spec: str | Sequence[str] | None, default: Sequence[str] = ()) -> list[str]:
        """Names from a user selection: names, comma-separated strings, "all" (every entry that
        works on a neural network), or a family ("family:cam", or a bare family name that is not
        also an entry's name). Empty -> ``default``.
        Unknown names raise :class:`UnknownNameError` with suggestions."""
        items: list[str] = []
        for s in [spec] if isinstance(spec, str) else list(spec or []):
            if not isinstance(s, str):
                raise OptionError(f"{self.kind} names must be strings; got {type(s).__name__}.")
            items += [p.strip() for p in s.split(",") if p.strip()]
        families = {e.family for e in self._loaded().values()}
        chosen: list[str] = []
        for item in items or list(default):
            key = item.strip().lower().replace("-", "_")
            fam = key.removeprefix("family:")
            if key == "all":  # every entry for neural networks: those that need another kind of
                # model (a tree ensemble, a linear model: ``needs=...``) are chosen by name or family
                chosen += [n for n, e in self._entries.items() if not e.extra.get("needs")]
            elif fam in families and (key.startswith("family:") or key not in self._entries):
                chosen += self.names(fam)
            else:
                chosen.append(self.get(key).name)
        return list(dict.fromkeys(chosen))

    def entries(self) -> list[Entry]:
        return list(self._loaded().values())

    def __contains__(self, name: object) -> bool:
        return name in self._loaded()


METHODS = Registry("method", populate="perspicio.methods")
METRICS = Registry("metric", populate="perspicio.metrics",
                   class_attributes=("family", "higher_is_better", "needs"))
register_method = METHODS.register
register_metric = METRICS.register
