"""Exceptions raised at perspicio's boundary.

Every user-facing mistake (bad input, unknown name, unsupported model) raises a
subclass of :class:`PerspicioError` with a message that says what was expected
and what was given. The CLI prints that message on one line and exits non-zero.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PerspicioError(Exception):
    """Base class of all errors perspicio raises on purpose."""


class InputError(PerspicioError, ValueError):
    """The input tensor/image/array is not usable (shape, dtype, NaN, file)."""


class OptionError(PerspicioError, ValueError):
    """A method or metric option has an invalid value."""


class TargetError(PerspicioError, ValueError):
    """The explained target (class index, name, callable) is invalid."""


class LayerError(PerspicioError, ValueError):
    """A layer was not found, or is not suitable for the method."""


class ModelError(PerspicioError, ValueError):
    """A model could not be loaded, or does not support what the method needs."""


class UnknownNameError(PerspicioError, KeyError):
    """An unknown method, metric, model or sample name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def suggest(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """Return ' Did you mean: a, b?' for the closest candidates, or ''."""
    close = difflib.get_close_matches(str(name), list(candidates), n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""


class ConvergenceWarning(UserWarning):
    """An estimate did not converge to the accuracy its method promises (e.g. Integrated
    Gradients' completeness error above 1%: raise ``steps`` or use ``quadrature="adaptive"``).
    Silence with ``warnings.filterwarnings("ignore", category=perspicio.errors.ConvergenceWarning)``."""
