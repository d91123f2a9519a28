"""Embedding projection: a layer's features over a data set, projected to 2-D.

Features are the layer's activations, spatially averaged (``pool="mean"``), max-pooled
(``"max"``) or flattened (``"flatten"``). Projection methods: ``"pca"`` (exact, via an SVD
in torch), ``"tsne"`` (scikit-learn) and ``"umap"`` (the optional ``umap-learn`` package).
Labels come from the data (``(x, y)`` batches) or the ``labels`` argument; predictions
from the same forward pass (when ``predict=True`` the network runs to the end; otherwise
it stops at the layer). Small thumbnails of the inputs can be kept for scatter plots.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.batching import Engine
from ..core.guard import model_guard
from ..core.options import check_choice, check_int
from ..errors import LayerError, ModelError
from ._common import LayerGrab, resolve, unwrap
from ._data import scan

PROJECTIONS = ("pca", "tsne", "umap")
POOLS = ("mean", "max", "flatten")


@dataclass(frozen=True)
class Projection:
    """``coords`` (N, 2) projected points; ``features`` (N, D); ``labels`` / ``predictions``
    (N,) when known; ``explained_variance`` (2,) fraction for PCA; ``thumbnails``
    (N, C, t, t) in [0, 1] when requested; ``sources`` file names for folders."""

    layer: str
    method: str
    coords: Tensor
    features: Tensor
    labels: Tensor | None
    predictions: Tensor | None
    explained_variance: Tensor | None
    thumbnails: Tensor | None
    sources: list[str] | None
    skipped: list[tuple[str, str]]


def pca(features: Tensor, k: int = 2) -> tuple[Tensor, Tensor]:
    """Top-``k`` principal-component scores of ``features`` (N, D) and the fraction of
    variance each explains. Signs are fixed so each component's largest |loading| is positive."""
    x = features.double() - features.double().mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    comps = vh[:k]
    idx = comps.abs().argmax(dim=1)
    signs = torch.sign(comps.gather(1, idx[:, None]))[:, 0]
    comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)[:, None]
    var = s.pow(2)
    ratio = var[:k] / var.sum().clamp_min(1e-300)
    return (x @ comps.T).float(), ratio.float()


def _reduce(act: Tensor, pool: str) -> Tensor:
    if act.ndim <= 2 or pool == "flatten":
        return act.reshape(act.shape[0], -1)
    dims = tuple(range(2, act.ndim))
    return act.mean(dim=dims) if pool == "mean" else act.amax(dim=dims)


def project(
    model: Any,
    data: Any,
    layer: Any,
    *,
    method: str = "pca",
    labels: Any = None,
    pool: str = "mean",
    predict: bool = True,
    thumbnails: int = 0,
    seed: int | None = 0,
    perplexity: float = 30.0,
    preprocess: Callable[[Any], Tensor] | None = None,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    progress: bool = False,
) -> Projection:
    """Collect ``layer``'s features over ``data`` and project them to 2-D with ``method``.

    ``thumbnails`` > 0 keeps (t x t) thumbnails of every input; ``perplexity`` is t-SNE's
    (clipped below the number of points).
    """
    bundle = unwrap(model)
    net = bundle.model
    name, module = resolve(net, layer)
    method = str(method).lower()
    check_choice("method", method, PROJECTIONS)
    check_choice("pool", pool, POOLS)
    thumbnails = check_int("thumbnails", thumbnails, minimum=0)
    engine = Engine(net, batch_size=batch_size, memory_budget=memory_budget, progress=progress)
    feats: list[Tensor] = []
    preds: list[Tensor] = []
    ys: list[Tensor] = []
    thumbs: list[Tensor] = []
    grab = LayerGrab([module], stop_after=None if predict else module)
    with model_guard(net), torch.no_grad():

        def collect(x: Tensor, y: Tensor | None, offset: int) -> None:
            with grab:  # hooks only around our forward (the engine's memory probe runs unhooked)
                out = grab.run(engine.forward, x)
            feats.append(_reduce(grab.get(0, [name]), pool).float().cpu())
            if out is not None and out.ndim == 2:
                preds.append(out.argmax(dim=1).cpu())
            if y is not None:
                ys.append(torch.as_tensor(y).reshape(-1).cpu())
            if thumbnails:
                px = bundle.space.to_pixels(x).clamp(0, 1) if bundle.preprocess is not None else x
                thumbs.append(F.interpolate(px.float(), size=(thumbnails, thumbnails), mode="area").cpu())

        report = scan(bundle, data, engine, collect, preprocess=preprocess, labels=labels, description=f"features of {name}")
    features = torch.cat(feats)
    n = features.shape[0]
    if n < 3:
        raise LayerError(f"projection needs at least 3 items; the data set gave {n}.")
    y_all = torch.cat(ys) if ys and sum(len(t) for t in ys) == n else None
    explained = None
    if method == "pca":
        coords, explained = pca(features)
    elif method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError as exc:
            raise ModelError("method='tsne' needs scikit-learn: pip install scikit-learn (or 'perspicio[tabular]').") from exc
        perp = float(min(perplexity, max(1.0, (n - 1) / 3)))
        emb = TSNE(n_components=2, perplexity=perp, random_state=seed, init="pca").fit_transform(features.double().numpy())
        coords = torch.from_numpy(emb).float()
    else:
        try:
            import umap  # type: ignore[import-not-found]
        except ImportError as exc:
            raise ModelError("method='umap' needs the optional package umap-learn: pip install umap-learn.") from exc
        emb = umap.UMAP(n_components=2, random_state=seed).fit_transform(features.numpy())
        coords = torch.as_tensor(emb).float()
    return Projection(
        layer=name, method=method, coords=coords, features=features, labels=y_all,
        predictions=torch.cat(preds) if preds else None, explained_variance=explained,
        thumbnails=torch.cat(thumbs) if thumbs else None, sources=report.sources, skipped=report.skipped,
    )


__all__ = ["PROJECTIONS", "Projection", "pca", "project"]
