"""Options of methods and metrics: automatic recording and the one set of validators.

The outermost ``__init__`` of a subclass records its bound arguments in
``self.options`` (minus the names in ``_options_exclude``), so every result can
report the exact options used without each class repeating them.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Sequence
from typing import Any, ClassVar

from ..errors import OptionError


def _signature(func: Any) -> inspect.Signature:
    """``inspect.signature`` of a constructor, memoised (read on every construction)."""
    from .calls import signature

    sig = signature(func)
    return sig if sig is not None else inspect.signature(func)


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
                sig = _signature(init)
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
            for p in _signature(inspect.unwrap(init)).parameters.values():
                if p.name not in skip and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in names:
                    names.append(p.name)
        return names


# ----------------------------------------------------------------------------- validation
#
# One validator per kind of option value, all with the argument order (name, value, ...), all
# raising OptionError with a message that names the option, states what is expected and shows
# what was given: "steps must be an integer >= 1; got 0."


def _hint(hint: str) -> str:
    return f" ({hint})" if hint else ""


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None,
              allow_none: bool = False, hint: str = "") -> Any:
    """``value`` as a Python int within ``[minimum, maximum]`` (either bound optional).

    Python and numpy integers are accepted; ``bool`` is refused (``True`` is not a count).
    With ``allow_none`` None passes through unchanged. ``hint`` (e.g. ``"pixels"``) is added to
    the message in parentheses.
    """
    if value is None and allow_none:
        return None
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok and ((minimum is not None and value < minimum) or (maximum is not None and value > maximum)):
        ok = False
    if not ok:
        if minimum is not None and maximum is not None:
            what = f"an integer in {minimum}..{maximum}"
        elif minimum is not None:
            what = f"an integer >= {minimum}"
        elif maximum is not None:
            what = f"an integer <= {maximum}"
        else:
            what = "an integer"
        raise OptionError(f"{name} must be {what}{_hint(hint)}{' or None' if allow_none else ''}; got {value!r}.")
    return int(value)


def check_float(name: str, value: Any, *, minimum: float | None = None, maximum: float | None = None,
                strict: bool = False, allow_none: bool = False, hint: str = "") -> Any:
    """``value`` as a finite Python float within the bounds.

    ``minimum`` is inclusive unless ``strict`` (then the value must be above it); ``maximum`` is
    inclusive. Python and numpy reals are accepted; ``bool``, NaN and infinities are refused.
    ``minimum=0, strict=True`` reads "a positive number".
    """
    if value is None and allow_none:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and minimum is not None and (value <= minimum if strict else value < minimum):
        ok = False
    if ok and maximum is not None and value > maximum:
        ok = False
    if not ok:
        if minimum is not None and maximum is not None:
            what = f"a number in {'(' if strict else '['}{minimum}, {maximum}]"
        elif minimum == 0 and strict:
            what = "a positive number"
        elif minimum is not None:
            what = f"a number {'>' if strict else '>='} {minimum}"
        elif maximum is not None:
            what = f"a number <= {maximum}"
        else:
            what = "a finite number"
        raise OptionError(f"{name} must be {what}{_hint(hint)}{' or None' if allow_none else ''}; got {value!r}.")
    return float(value)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices`` (compared with ``==``), else an OptionError listing them."""
    try:
        ok = any(value is c or (not isinstance(value, bool) and bool(value == c)) for c in choices)
    except (TypeError, ValueError, RuntimeError):  # e.g. a tensor compared with a string
        ok = False
    if ok:
        return value
    raise OptionError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}.")
