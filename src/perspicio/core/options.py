"""Automatic recording of constructor options, shared by methods and metrics.

The outermost ``__init__`` of a subclass records its bound arguments in
``self.options`` (minus the names in ``_options_exclude``), so every result can
report the exact options used without each class repeating them.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, ClassVar


class RecordsOptions:
    """Mixin: ``self.options`` holds the arguments the outermost constructor was called with."""

    _options_exclude: ClassVar[tuple[str, ...]] = ("self",)
    _options_with_defaults: ClassVar[bool] = False

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def wrapped(self: RecordsOptions, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **kwargs)
            if type(self).__init__ is wrapped:  # only the outermost constructor records
                sig = inspect.signature(init)
                bound = sig.bind(self, *args, **kwargs)
                if cls._options_with_defaults:
                    bound.apply_defaults()
                opts = {k: v for k, v in bound.arguments.items() if k not in cls._options_exclude}
                for p in sig.parameters.values():  # **common / **options: recorded as plain options
                    if p.kind is p.VAR_KEYWORD:
                        opts.update(opts.pop(p.name, {}) or {})
                self.options = opts

        cls.__init__ = wrapped  # type: ignore[method-assign]

    @classmethod
    def option_names(cls) -> list[str]:
        """Every keyword the constructors along the MRO accept (what ``build()`` validates against)."""
        skip = set(cls._options_exclude) | {"common"}
        names: list[str] = []
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None or klass is object or klass is RecordsOptions:
                continue
            for p in inspect.signature(inspect.unwrap(init)).parameters.values():
                if p.name not in skip and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in names:
                    names.append(p.name)
        return names
