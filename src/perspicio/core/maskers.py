"""What "removing a feature" means, and the masked-model game every perturbation method plays.

A *masker* binds one input sample to a set of M features and builds masked copies
of it from coalitions ``z`` (B, M) of kept features:

- images (C, H, W): features are pixels, square patches, a grid, or superpixels from
  scikit-image (SLIC, quickshift, Felzenszwalb); removed features take a baseline
  (zero, per-channel mean, blurred image, a constant, or a user image);
- tabular rows (F,): features are columns or named groups of columns; removed features
  take the values of every row of a background set (interventional), so one coalition
  costs K model rows and its value is their mean;
- any other tensor: features from an integer ``feature_mask``, baseline replacement;
- text: features are the tokens of a user tokenizer; removed tokens become a mask token
  or are deleted.

:class:`MaskedGame` evaluates v(z) = mean_k target(model(mask(x, z, background_k))) through
the one batching :class:`~perspicio.core.batching.Engine`, chunking rows under the
batch size / memory budget and counting evaluations (one per coalition).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError, OptionError
from . import incremental
from .baselines import BASELINES, check_baseline, make_baseline
from .batching import Engine
from .options import check_int

SEGMENTERS = ("slic", "quickshift", "felzenszwalb")
IMAGE_FEATURES = ("pixel", "patch", "grid", *SEGMENTERS)


# ============================================================================ feature masks


def check_feature_mask(mask: Any, shape: Sequence[int], *, what: str = "feature_mask") -> Tensor:
    """Validate an integer id mask broadcastable to ``shape`` with contiguous ids 0..M-1.

    Returns the mask expanded to ``shape`` (long, on CPU).
    """
    shape = tuple(shape)
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    elif isinstance(mask, (list, tuple)):
        try:
            mask = torch.as_tensor(mask)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise OptionError(f"{what} must be an integer array; got {type(mask).__name__}.") from exc
    if not isinstance(mask, Tensor):
        raise OptionError(f"{what} must be an integer tensor/array of shape {shape}; got {type(mask).__name__}.")
    if mask.is_floating_point() or mask.is_complex() or mask.dtype == torch.bool:
        if mask.is_floating_point() and torch.equal(mask, mask.round()):
            mask = mask.long()
        else:
            raise OptionError(f"{what} must hold integer feature ids; got dtype {mask.dtype}.")
    mask = mask.long().cpu()
    while mask.ndim < len(shape) and mask.ndim >= 1:
        mask = mask[None]
    try:
        mask = mask.expand(shape)
    except RuntimeError:
        raise OptionError(
            f"{what} has shape {tuple(mask.shape)}; expected the input's per-sample shape {shape} "
            "(or a shape broadcastable to it, e.g. (H, W) for images)."
        ) from None
    ids = torch.unique(mask)
    m = len(ids)
    if ids[0].item() != 0 or ids[-1].item() != m - 1:
        raise OptionError(
            f"{what} ids must be contiguous integers 0..M-1; got {m} distinct ids from {ids[0].item()} to "
            f"{ids[-1].item()}. Relabel with torch.unique(mask, return_inverse=True)[1]."
        )
    return mask.contiguous()


def relabel(mask: np.ndarray | Tensor) -> Tensor:
    """Map arbitrary integer ids to contiguous 0..M-1 (order preserved)."""
    t = torch.as_tensor(np.asarray(mask))
    return torch.unique(t, return_inverse=True)[1].long()


def _image_for_segmentation(img: Tensor) -> np.ndarray:
    """(C, H, W) tensor -> (H, W, 3) float array in [0, 1] (min-max per image)."""
    a = img.detach().float().cpu()
    a = (a - a.min()) / (a.max() - a.min()).clamp_min(1e-12)
    arr = a.permute(1, 2, 0).numpy().astype(np.float64)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return arr[..., :3]


def _parse_spec(spec: str, names: Sequence[str], what: str) -> tuple[str, float | None]:
    m = re.fullmatch(r"\s*([a-z_]+)\s*(?:[:=]\s*([0-9.]+))?\s*", spec.lower())
    if not m or m.group(1) not in names:
        example = "'slic:50', 'patch:16', 'grid:4'"
        raise OptionError(f"unknown {what} {spec!r}; expected one of {', '.join(names)}, optionally with ':N' "
                          f"(e.g. {example}).")
    return m.group(1), (float(m.group(2)) if m.group(2) else None)


def image_feature_mask(image: Tensor, spec: str = "slic") -> Tensor:
    """Feature ids (H, W) for one image (C, H, W) from a spec string.

    ``"pixel"``; ``"patch:S"`` (S x S squares, default 16); ``"grid:G"`` (G x G cells, default 4);
    ``"slic:N"`` (about N SLIC superpixels, default 50); ``"quickshift"`` (kernel_size 4,
    max_dist 200, ratio 0.2, as LIME); ``"felzenszwalb:SCALE"`` (default 100).
    """
    kind, arg = _parse_spec(spec, IMAGE_FEATURES, "feature_mask")
    _, h, w = image.shape
    if kind == "pixel":
        return torch.arange(h * w).view(h, w)
    if kind in ("patch", "grid"):
        if kind == "patch":
            ph = pw = int(arg or 16)
        else:
            g = int(arg or 4)
            ph, pw = math.ceil(h / g), math.ceil(w / g)
        if ph < 1:
            raise OptionError(f"patch size must be >= 1; got {spec!r}.")
        rows = torch.arange(h) // ph
        cols = torch.arange(w) // pw
        return rows[:, None] * (int(cols.max()) + 1) + cols[None, :]
    try:
        from skimage import segmentation
    except ImportError as exc:  # pragma: no cover - scikit-image is a dependency of the image extras
        raise OptionError(f"feature_mask={spec!r} needs scikit-image (pip install scikit-image).") from exc
    arr = _image_for_segmentation(image)
    if kind == "slic":
        seg = segmentation.slic(arr, n_segments=int(arg or 50), compactness=10.0, start_label=0)
    elif kind == "quickshift":
        seg = segmentation.quickshift(arr, kernel_size=int(arg or 4), max_dist=200, ratio=0.2, rng=0)
    else:
        seg = segmentation.felzenszwalb(arr, scale=float(arg or 100), sigma=0.5, min_size=50)
    return relabel(seg)


def image_baseline(image: Tensor, baseline: Any) -> Tensor:
    """Replacement image (C, H, W) for one image: a name of :mod:`perspicio.core.baselines`
    (``None`` = zero), a number, or a tensor."""
    if baseline is None or isinstance(baseline, str):
        return make_baseline(baseline, image[None])[0]
    return constant_baseline(baseline, image)


def constant_baseline(baseline: Any, sample: Tensor) -> Tensor:
    """A number, or a tensor/array broadcastable to the sample's shape, as a replacement."""
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(sample, float(baseline))
    if isinstance(baseline, np.ndarray):
        baseline = torch.from_numpy(np.ascontiguousarray(baseline))
    if isinstance(baseline, Tensor):
        b = baseline.detach().to(sample.device, sample.dtype)
        if b.ndim == sample.ndim + 1 and b.shape[0] == 1:
            b = b[0]
        if b.ndim == 1 and sample.ndim == 3 and b.shape[0] == sample.shape[0]:
            b = b[:, None, None]  # per-channel values
        try:
            return b.expand_as(sample).clone()
        except RuntimeError:
            raise OptionError(f"baseline has shape {tuple(baseline.shape)}; expected a number or a tensor "
                              f"broadcastable to the sample shape {tuple(sample.shape)}.") from None
    raise OptionError(f"baseline must be a name ({', '.join(BASELINES)}; images), a number, or a tensor; "
                      f"got {type(baseline).__name__}.")


# ============================================================================ bound maskers


@dataclass
class TensorBound:
    """One tensor sample bound to features: ``build(z, k)`` keeps ``z``'s features of ``x`` and
    takes the others from replacement row ``k`` (a baseline, or background row ``k``)."""

    x: Tensor  # (*shape)
    feature_mask: Tensor  # (*shape) long ids 0..M-1, on x.device
    replacement: Tensor  # (K, *shape)
    feature_names: list[str] | None = None
    feature_values: Tensor | None = None  # (M,) value of each feature when it is one element (tabular)

    def __post_init__(self) -> None:
        self.n_features = int(self.feature_mask.max()) + 1
        self._flat = self.feature_mask.reshape(-1)

    @property
    def rows(self) -> int:
        return self.replacement.shape[0]

    def build(self, z: Tensor, k: Tensor) -> Tensor:
        keep = z[:, self._flat].view(z.shape[0], *self.x.shape)
        return torch.where(keep, self.x, self.replacement[k])

    def scatter(self, values: Tensor) -> Tensor:
        """Per-feature values (M,) broadcast to every element of the feature: (*shape)."""
        return values.to(self.x.dtype)[self.feature_mask]

    def chunk_sample(self) -> Tensor:
        return self.x[None]


@dataclass
class TextBound:
    """One text bound to its tokens; removed tokens become ``mask_token`` or are deleted (None)."""

    tokens: list[str]
    mask_token: str | None
    joiner: str
    feature_names: list[str] | None = None
    feature_values: Tensor | None = None
    feature_mask: Tensor | None = None

    def __post_init__(self) -> None:
        self.n_features = len(self.tokens)
        if self.feature_names is None:
            self.feature_names = list(self.tokens)

    @property
    def rows(self) -> int:
        return 1

    def build(self, z: Tensor, k: Tensor) -> list[str]:
        out = []
        for row in z.cpu().tolist():
            if self.mask_token is None:
                out.append(self.joiner.join(t for t, keep in zip(self.tokens, row) if keep))
            else:
                out.append(self.joiner.join(t if keep else self.mask_token for t, keep in zip(self.tokens, row)))
        return out

    def scatter(self, values: Tensor) -> Tensor:
        return values.clone()

    def chunk_sample(self) -> Tensor:
        return torch.zeros(1, max(1, self.n_features))


# ============================================================================ maskers


class ImageMasker:
    """Images (C, H, W): features from ``features`` (spec string or id mask), removed ones take ``baseline``."""

    def __init__(self, features: Any = "slic", baseline: Any = "zero") -> None:
        if isinstance(features, str):
            _parse_spec(features, IMAGE_FEATURES, "feature_mask")
        check_baseline(baseline, allow_callable=False)
        self.features = features
        self.baseline = baseline

    def bind(self, x: Tensor, index: int = 0) -> TensorBound:
        if x.ndim != 3:
            raise InputError(f"ImageMasker expects images (N, C, H, W); got a sample of shape {tuple(x.shape)}.")
        if isinstance(self.features, str):
            fm = image_feature_mask(x, self.features)
        else:
            fm = _per_sample(self.features, index, x.ndim)
        fm = check_feature_mask(fm, x.shape).to(x.device)
        repl = image_baseline(x, self.baseline)[None]
        return TensorBound(x=x, feature_mask=fm, replacement=repl)


class TensorMasker:
    """Any tensor sample: features from an integer ``feature_mask`` (default: every element),
    removed ones take ``baseline`` (a number or a tensor) or, row by row, a ``background`` set."""

    def __init__(self, feature_mask: Any = None, baseline: Any = 0.0, background: Tensor | None = None,
                 feature_names: Sequence[str] | None = None) -> None:
        self.feature_mask = feature_mask
        self.baseline = baseline
        self.background = background
        self.feature_names = list(feature_names) if feature_names is not None else None

    def bind(self, x: Tensor, index: int = 0) -> TensorBound:
        if self.feature_mask is None:
            fm = torch.arange(x.numel()).view(x.shape)
        else:
            fm = _per_sample(self.feature_mask, index, x.ndim)
        fm = check_feature_mask(fm, x.shape).to(x.device)
        if self.background is not None:
            repl = self.background.to(x.device, x.dtype)
        else:
            repl = constant_baseline(self.baseline if self.baseline is not None else 0.0, x)[None]
        m = int(fm.max()) + 1
        names = self.feature_names
        if names is not None and len(names) != m:
            raise OptionError(f"feature_names has {len(names)} names; there are {m} features.")
        values = x.reshape(-1)[_first_index(fm)] if m == x.numel() else None
        return TensorBound(x=x, feature_mask=fm, replacement=repl, feature_names=names, feature_values=values)


class TabularMasker(TensorMasker):
    """Tabular rows (F,): features are columns or named groups; removed ones take every row of
    ``background`` (interventional: v(S) = mean_k f(x_S, b_k,rest)), or ``baseline`` without one.

    Args:
        background: (K, F) rows; more than ``background_size`` rows are subsampled with ``seed``.
        feature_mask: None (one feature per column), ids per column (F,), or a mapping
            ``{name: [column, ...]}`` (columns in no group stay their own feature).
        feature_names: column names (length F).
    """

    def __init__(self, background: Any = None, feature_mask: Any = None, *, n_columns: int,
                 feature_names: Sequence[str] | None = None, baseline: Any = None,
                 background_size: int | None = 100, seed: int = 0) -> None:
        columns = list(feature_names) if feature_names is not None else None
        if columns is not None and len(columns) != n_columns:
            raise OptionError(f"feature_names has {len(columns)} names; the inputs have {n_columns} columns.")
        self.columns = columns
        if isinstance(feature_mask, Mapping):
            feature_mask, group_names = _groups_to_mask(feature_mask, n_columns, columns)
        elif feature_mask is not None:
            feature_mask = check_feature_mask(feature_mask, (n_columns,))
            group_names = None if columns is None else _group_names(feature_mask, columns)
        else:
            group_names = columns
        bg = None
        if background is not None:
            if baseline is not None:
                raise OptionError("pass either background (rows) or baseline (one replacement row), not both.")
            bg = as_background(background, n_columns, background_size=background_size, seed=seed)
        elif baseline is None:
            baseline = 0.0
        super().__init__(feature_mask=feature_mask, baseline=baseline, background=bg, feature_names=group_names)


def as_background(background: Any, n_columns: int, *, background_size: int | None = 100, seed: int = 0) -> Tensor:
    """Validate a background set (K, F) and subsample it to ``background_size`` rows."""
    if hasattr(background, "to_numpy") and not isinstance(background, Tensor):
        background = background.to_numpy()
    if isinstance(background, np.ndarray):
        background = torch.from_numpy(np.ascontiguousarray(background))
    if not isinstance(background, Tensor):
        raise OptionError(f"background must be an array of shape (K, {n_columns}); got {type(background).__name__}.")
    bg = background.detach()
    if bg.ndim == 1:
        bg = bg[None]
    if bg.ndim != 2 or bg.shape[1] != n_columns or bg.shape[0] == 0:
        raise OptionError(f"background must have shape (K, {n_columns}) - one row per reference sample with the "
                          f"same {n_columns} columns as the inputs; got {tuple(background.shape)}.")
    if not bg.is_floating_point():
        bg = bg.double()
    if not torch.isfinite(bg).all():
        raise OptionError("background contains NaN/Inf values.")
    if background_size is not None:
        check_int("background_size", background_size, minimum=1)
        if bg.shape[0] > background_size:
            rng = np.random.default_rng(seed)
            keep = np.sort(rng.choice(bg.shape[0], size=background_size, replace=False))
            bg = bg[torch.from_numpy(keep)]
    return bg


class TextMasker:
    """Text: features are the tokens of ``tokenizer(text) -> list[str]`` (default: whitespace split);
    removed tokens become ``mask_token``, or are deleted when it is None. Tokens are re-joined with ``joiner``."""

    def __init__(self, tokenizer: Callable[[str], Sequence[str]] | None = None, mask_token: str | None = "[MASK]",
                 joiner: str = " ") -> None:
        if tokenizer is not None and not callable(tokenizer):
            raise OptionError(f"tokenizer must be a callable str -> list[str]; got {type(tokenizer).__name__}.")
        self.tokenizer = tokenizer or str.split
        self.mask_token = mask_token
        self.joiner = joiner

    def bind(self, text: str, index: int = 0) -> TextBound:
        tokens = self.tokenizer(text)
        if not isinstance(tokens, (list, tuple)) or not all(isinstance(t, str) for t in tokens):
            raise OptionError(f"tokenizer must return a list of strings; got {type(tokens).__name__}.")
        if not tokens:
            raise InputError(f"text {text!r} has no tokens to explain.")
        return TextBound(tokens=list(tokens), mask_token=self.mask_token, joiner=self.joiner)


def _per_sample(mask: Any, index: int, sample_ndim: int) -> Any:
    """A mask given for the whole batch (N, *shape) -> the mask of sample ``index``."""
    if isinstance(mask, (np.ndarray, Tensor)) and mask.ndim == sample_ndim + 1 and mask.shape[0] > 1:
        return mask[index]
    if isinstance(mask, (np.ndarray, Tensor)) and mask.ndim == sample_ndim + 1:
        return mask[0]
    return mask


def _first_index(fm: Tensor) -> Tensor:
    flat = fm.reshape(-1)
    idx = torch.empty(int(flat.max()) + 1, dtype=torch.long, device=flat.device)
    idx[flat] = torch.arange(len(flat), device=flat.device)
    return idx


def _group_names(mask: Tensor, columns: Sequence[str]) -> list[str]:
    names = []
    for g in range(int(mask.max()) + 1):
        cols = [columns[i] for i in torch.nonzero(mask == g).flatten().tolist()]
        names.append(cols[0] if len(cols) == 1 else "+".join(cols))
    return names


def _groups_to_mask(groups: Mapping[str, Any], n_columns: int, columns: Sequence[str] | None) -> tuple[Tensor, list[str]]:
    owner = [-1] * n_columns
    names: list[str] = []
    for gname, cols in groups.items():
        gid = len(names)
        names.append(str(gname))
        for c in ([cols] if isinstance(cols, (int, str)) else list(cols)):
            if isinstance(c, str):
                if columns is None or c not in columns:
                    raise OptionError(f"feature group {gname!r} names column {c!r}, but "
                                      + ("no feature_names were given." if columns is None else "there is no such column."))
                c = columns.index(c)
            if not isinstance(c, (int, np.integer)) or not 0 <= c < n_columns:
                raise OptionError(f"feature group {gname!r}: column {c!r} is not in 0..{n_columns - 1}.")
            if owner[c] != -1:
                raise OptionError(f"column {c} is in two feature groups ({names[owner[c]]!r} and {gname!r}).")
            owner[c] = gid
    for c in range(n_columns):
        if owner[c] == -1:
            owner[c] = len(names)
            names.append(columns[c] if columns is not None else f"x{c}")
    return torch.tensor(owner), names


# ============================================================================ the masked-model game



@dataclass
class MaskedGame:
    """v(z) for coalitions z (B, M) of one bound sample: the mean target score over replacement rows.

    ``score`` maps a model output (rows, ...) to one score per row. ``evaluations`` counts
    coalitions evaluated (each costs ``bound.rows`` model rows, counted by the engine).
    """

    bound: TensorBound | TextBound
    engine: Engine
    score: Callable[[Tensor], Tensor]
    description: str = "evaluating coalitions"
    evaluations: int = 0
    _device: torch.device = field(default=torch.device("cpu"))
    _areas: Tensor | None = None  # per feature: bounding box small enough for incremental evaluation

    @property
    def n_features(self) -> int:
        return self.bound.n_features

    def _local(self, z: Tensor) -> Tensor | None:
        """Per coalition: it keeps or removes exactly one image feature whose bounding box is at
        most ``incremental.LOCAL_FRACTION`` of the image (None: not an image game)."""
        b = self.bound
        if not isinstance(b, TensorBound) or b.x.ndim != 3:
            return None
        if self._areas is None:
            ids = b.feature_mask.reshape(-1, *b.x.shape[-2:])  # (C, H, W)
            h, w = ids.shape[-2:]
            r = torch.arange(h, device=ids.device)[:, None].expand(h, w).expand_as(ids).reshape(-1)
            c = torch.arange(w, device=ids.device)[None, :].expand(h, w).expand_as(ids).reshape(-1)
            flat, m = ids.reshape(-1), b.n_features
            lo_r = torch.full((m,), h, device=ids.device).scatter_reduce(0, flat, r, "amin")
            hi_r = torch.full((m,), -1, device=ids.device).scatter_reduce(0, flat, r, "amax")
            lo_c = torch.full((m,), w, device=ids.device).scatter_reduce(0, flat, c, "amin")
            hi_c = torch.full((m,), -1, device=ids.device).scatter_reduce(0, flat, c, "amax")
            self._areas = ((hi_r - lo_r + 1) * (hi_c - lo_c + 1)).cpu() <= incremental.LOCAL_FRACTION * h * w
        zc = z.cpu()
        kept = zc.sum(1)
        one_out, one_in = kept == self.n_features - 1, kept == 1
        which = torch.where(one_out, zc.to(torch.uint8).argmin(1), zc.to(torch.uint8).argmax(1))
        return (one_out | one_in) & self._areas[which]

    def __call__(self, z: Tensor) -> Tensor:
        """Values (B,) float64 of the coalitions ``z`` (B, M) (bool; True = feature kept)."""
        z = z.to(torch.bool)
        if z.ndim != 2 or z.shape[1] != self.n_features:
            raise ValueError(f"coalitions must be (B, {self.n_features}); got {tuple(z.shape)}")
        b = z.shape[0]
        if b == 0:
            return torch.zeros(0, dtype=torch.float64)
        k = self.bound.rows
        dev = self.bound.x.device if isinstance(self.bound, TensorBound) else torch.device("cpu")
        z = z.to(dev)
        local = self._local(z) if k == 1 else None

        def run(start: int, stop: int) -> Tensor:
            r = torch.arange(start, stop, device=dev)
            batch = self.bound.build(z[r // k], r % k)
            # mostly coalitions that differ from the sample (or the baseline) in one small feature
            # (feature ablation of patches, KernelSHAP's enumerated sizes): incrementally evaluated
            offer = local is not None and 2 * int(local[start:stop].sum()) >= stop - start
            out = self.engine.evaluate(batch, around=(self.bound.x, self.bound.replacement[0]) if offer else ())
            s = self.score(out)
            return s.detach().to(torch.float64).reshape(-1)

        values = self.engine.map(run, b * k, sample=self.bound.chunk_sample(), description=self.description)
        self.evaluations += b
        return values.view(b, k).mean(dim=1).cpu()
