"""The immutable result of an explanation method.

An :class:`Explanation` carries the raw (unnormalised) attributions, the
resolved targets, the model's score for each target, the base value where the
method has one (so additivity can be checked), the options used and the
provenance (versions, timings, passes). Normalisation happens only for display.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor

from .jsonable import to_jsonable

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image


def _freeze(d: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True, eq=False)
class Explanation:
    """Attributions for a batch of inputs, plus everything needed to trust and reproduce them.

    Attributes:
        attributions: raw attributions; (N, 1, H, W) for CAMs (upsampled to the input),
            the input's shape for input attributions.
        method: registry name of the method.
        targets: resolved class index per sample (None for callable targets).
        scores: model score of the explained target per sample, (N,).
        inputs: the (detached) inputs that were explained.
        raw: the map before upsampling (CAMs: (N, 1, h, w) at the layer's resolution).
        layer: layer name(s) used, if any.
        base_value: reference output where additivity holds (Shapley, DeepLIFT, IG).
        target_names: class names of the targets when known.
        options: method options as given.
        provenance: versions, timings, pass counts, device, and checks such as completeness error.
        extras: method-specific side results (e.g. per-layer maps, channel weights).
    """

    attributions: Tensor
    method: str
    scores: Tensor
    targets: Tensor | None = None
    inputs: Tensor | None = None
    raw: Tensor | None = None
    layer: str | tuple[str, ...] | None = None
    base_value: Tensor | None = None
    target_names: tuple[str, ...] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    extras: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("options", "provenance", "extras"):
            object.__setattr__(self, name, _freeze(getattr(self, name)))

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return self.attributions.shape[0]

    def __getitem__(self, i: int | slice) -> Explanation:
        """The explanation of sample(s) ``i`` (same metadata)."""
        sl = slice(i, i + 1) if isinstance(i, int) else i

        def cut(t: Tensor | None) -> Tensor | None:
            return t[sl] if isinstance(t, Tensor) and t.ndim > 0 and t.shape[0] == len(self) else t

        names = self.target_names[sl] if self.target_names is not None else None
        prov = self.provenance
        probs = prov.get("probabilities")
        if probs is not None and len(probs) == len(self):
            prov = dict(prov, probabilities=list(probs)[sl])
        return dataclasses.replace(
            self,
            provenance=prov,
            attributions=self.attributions[sl],
            scores=self.scores[sl],
            targets=cut(self.targets),
            inputs=cut(self.inputs),
            raw=cut(self.raw),
            base_value=cut(self.base_value),
            target_names=names,
        )

    def replace(self, **changes: Any) -> Explanation:
        """A copy with some fields changed (the object itself is immutable)."""
        return dataclasses.replace(self, **changes)

    def normalized(self, *, positive: bool = True) -> Tensor:
        """Attributions summed over channels and scaled to [0, 1] per sample, for display."""
        return display().normalize_map(self.attributions, positive=positive)

    @property
    def score_unit(self) -> str:
        """What :attr:`scores` measure: ``"logit"``, ``"probability"``, ``"margin (log-odds)"``,
        ``"prediction"``, ``"activation"`` (neuron methods) or ``"output"`` when unknown (a model's
        raw output; see :meth:`with_score_unit`, which callers that know the model use)."""
        unit = self.provenance.get("score_unit")
        if unit:
            return str(unit)
        return "activation" if self.provenance.get("neuron") else "output"

    @property
    def probabilities(self) -> list[float] | None:
        """The model's probability of each row's target when known (a classifier's softmax), else None."""
        p = self.provenance.get("probabilities")
        return [float(v) for v in p] if p is not None else None

    def with_score_unit(
        self, unit: str, probabilities: Sequence[float] | Tensor | None = None
    ) -> Explanation:
        """A copy recording what :attr:`scores` measure (``unit``, e.g. ``"logit"``) and, for a
        classifier, the probability of each row's target (shown next to the score in figures)."""
        if not isinstance(unit, str) or not unit.strip():
            from ..errors import OptionError

            raise OptionError(
                f"unit must be a non-empty string such as 'logit' or 'probability'; got {unit!r}."
            )
        prov = dict(self.provenance, score_unit=unit.strip())
        if probabilities is not None:
            probs = [
                float(v)
                for v in (
                    probabilities.tolist() if isinstance(probabilities, Tensor) else probabilities
                )
            ]
            if len(probs) != len(self):
                from ..errors import OptionError

                raise OptionError(
                    f"probabilities needs one value per row ({len(self)}); got {len(probs)}."
                )
            prov["probabilities"] = probs
        return dataclasses.replace(self, provenance=prov)

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly description (no tensors); ``score_unit`` says what ``scores`` are."""
        return {
            "method": self.method,
            "layer": self.layer,
            "targets": self.targets.tolist() if self.targets is not None else None,
            "target_names": list(self.target_names) if self.target_names else None,
            "scores": self.scores.tolist(),
            "score_unit": self.score_unit,
            "probabilities": self.probabilities,
            "base_value": self.base_value.tolist()
            if isinstance(self.base_value, Tensor)
            else self.base_value,
            "shape": list(self.attributions.shape),
            "options": to_jsonable(dict(self.options), max_elements=64),
            "provenance": to_jsonable(dict(self.provenance), max_elements=64),
        }

    # ------------------------------------------------------------------ display and I/O
    @property
    def is_image(self) -> bool:
        """True when attributions are image-shaped (N, C, H, W) and can be drawn as overlays."""
        return self.attributions.ndim == 4

    def overlay(
        self, image: Any = None, index: int = 0, *, cmap: str | None = None, alpha: float = 0.5
    ) -> Image.Image:
        """Heatmap of sample ``index`` blended over ``image`` (PIL, array, or tensor in [0, 1]);
        ``cmap=None``: diverging around 0 for signed maps, sequential for unsigned ones.

        Without ``image`` the explained input, min-max scaled, is used as background.
        """
        if not self.is_image:
            from ..errors import OptionError

            raise OptionError(
                f"overlay needs image attributions (N, C, H, W); these have shape {tuple(self.attributions.shape)}. "
                "Use perspicio.viz.shap_plots for tabular and text attributions."
            )

        background = (
            image if image is not None else self.inputs[index] if self.inputs is not None else None
        )
        return display().overlay(self.attributions[index], background, cmap=cmap, alpha=alpha)

    def figure(self, image: Any = None, index: int = 0, **kw: Any) -> Figure:
        """A matplotlib figure: input, heatmap and overlay side by side."""
        return display().explanation_figure(self, image=image, index=index, **kw)

    def _repr_png_(self) -> bytes | None:
        if not self.is_image:
            return None  # notebooks fall back to the text repr
        import io

        buf = io.BytesIO()
        self.overlay().save(buf, format="PNG")
        return buf.getvalue()

    def _repr_html_(self) -> str:
        """Notebook display drawn by the display layer: the overlay with its title and colorbar and
        the scores with their unit (images), a token heatmap (text) or a table (tabular rows); the
        first few rows of a large batch. Never raises: falls back to the escaped text repr."""
        try:
            return display().explanation_html(self)
        except Exception as exc:  # a notebook display must never raise
            import html

            return f"<pre>{html.escape(repr(self))}</pre><p><small>(display failed: {html.escape(str(exc))})</small></p>"

    def __repr__(self) -> str:
        n = len(self)
        what = (
            self.target_names[0]
            if self.target_names
            else (int(self.targets[0]) if self.targets is not None else None)
        )
        more = f" (+{n - 1} more rows)" if n > 1 else ""
        score = (
            f", {self.score_unit} {float(self.scores[0]):.4g}"
            if self.scores is not None and self.scores.numel()
            else ""
        )
        return (
            f"Explanation(method={self.method!r}, shape={tuple(self.attributions.shape)}, "
            f"target={what!r}{score}{more})"
        )

    def save(
        self, path: str | Path, image: Any = None, *, format: str = "npy", bare: bool = True
    ) -> list[Path]:
        """Write ``<path>.png`` (overlay of sample 0, or ``<path>_<i>.png`` per sample; images only),
        ``<path>.npy`` or ``<path>.safetensors`` (raw attributions) and ``<path>.json``.

        ``bare=True`` writes the overlay alone, at the size of ``image`` (or of the map);
        ``bare=False`` a figure of it with a title (method, target, score with its unit) and a
        colorbar. Files are first written to temporary names and renamed, so a failure never
        leaves half-written output.
        """
        path = Path(path)
        if path.suffix in (".png", ".npy", ".json", ".safetensors"):
            path = path.with_suffix("")
        path.parent.mkdir(parents=True, exist_ok=True)
        written: list[tuple[Path, Path]] = []
        try:
            n = len(self)
            images: Sequence[Any] = image if isinstance(image, (list, tuple)) else [image] * n
            for i in range(n if self.is_image else 0):  # tabular/text: arrays + JSON only
                out = path.with_name(path.name + (f"_{i}" if n > 1 else "") + ".png")
                tmp = out.with_name(out.name + ".tmp")
                if bare:
                    self.overlay(images[i], index=i).save(tmp, format="PNG")
                else:
                    display().method_figure(self, image=images[i], index=i).savefig(
                        tmp, format="png", dpi=100
                    )
                written.append((tmp, out))
            if format == "safetensors":
                from safetensors.torch import save_file

                out = path.with_suffix(".safetensors")
                tmp = out.with_name(out.name + ".tmp")
                tensors = {"attributions": self.attributions.detach().cpu().contiguous()}
                if self.raw is not None:
                    tensors["raw"] = self.raw.detach().cpu().contiguous()
                save_file(tensors, str(tmp))
            elif format == "npy":
                import numpy as np

                out = path.with_suffix(".npy")
                tmp = out.with_name(out.name + ".tmp")
                with open(tmp, "wb") as fh:
                    np.save(fh, self.attributions.detach().cpu().numpy())
            else:
                from ..errors import OptionError

                raise OptionError(f"format must be 'npy' or 'safetensors'; got {format!r}.")
            written.append((tmp, out))
            out = path.with_suffix(".json")
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(json.dumps(self.summary(), indent=2))
            written.append((tmp, out))
        except BaseException:
            for tmp, _ in written:
                tmp.unlink(missing_ok=True)
            raise
        for tmp, out in written:
            tmp.replace(out)
        return [out for _, out in written]


def classify_output(output: Tensor) -> tuple[str, Tensor | None]:
    """What a model's output rows are, for labelling scores: ``("probability", output)`` when every
    row of a 2-D output is non-negative and sums to 1, ``("logit", softmax(output))`` for any other
    output with two or more columns, ``("output", None)`` otherwise (one column, other shapes)."""
    import torch

    out = output.detach()
    if out.ndim != 2 or out.shape[1] < 2 or not out.is_floating_point():
        return "output", None
    o = out.double()
    if bool((o >= 0).all()) and bool(torch.allclose(o.sum(1), torch.ones_like(o[:, 0]), atol=1e-4)):
        return "probability", out
    return "logit", out.float().softmax(dim=1)


class Display(Protocol):
    """What :class:`Explanation`'s display methods need from the display layer (``perspicio.viz``).

    The core never imports ``viz``: the package's ``__init__`` registers the implementation with
    :func:`set_display` (each function imports matplotlib/PIL only when called)."""

    def normalize_map(self, attributions: Tensor, *, positive: bool = True) -> Tensor: ...

    def overlay(
        self, attributions: Tensor, image: Any, *, cmap: str | None, alpha: float
    ) -> Image.Image: ...

    def explanation_figure(
        self, explanation: Explanation, *, image: Any, index: int, **kw: Any
    ) -> Figure: ...

    def method_figure(self, explanation: Explanation, *, image: Any, index: int) -> Figure: ...

    def explanation_html(self, explanation: Explanation) -> str: ...

    def comparison_html(self, comparison: Any) -> str: ...


_DISPLAY: list[Display] = []


def set_display(impl: Display) -> None:
    """Register the display layer used by :meth:`Explanation.overlay`, ``figure`` and ``normalized``."""
    _DISPLAY[:] = [impl]


def display() -> Display:
    """The registered display layer (``perspicio/__init__.py`` registers ``perspicio.viz``'s)."""
    if not _DISPLAY:  # pragma: no cover - perspicio/__init__ always registers one
        raise RuntimeError(
            "no display layer registered: import perspicio (it registers perspicio.viz)."
        )
    return _DISPLAY[0]
