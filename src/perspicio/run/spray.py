"""Spectral relevance analysis (SpRAy; Lapuschkin et al., "Unmasking Clever Hans predictors and
assessing what machines really learn", Nature Communications 10, 2019).

The explanations of one class are downsized, normalised and compared with each other; spectral
clustering of their k-nearest-neighbour graph groups samples the model decided for the same
*reason*. The number of clusters is read off the eigengap of the graph Laplacian: a large gap
after the k-th smallest eigenvalue means k well-separated groups. A small cluster whose mean map
sits on something that is not the object (a watermark, a border, a corner mark) is a "Clever
Hans" strategy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..core.options import check_int
from ..errors import InputError


@dataclass(frozen=True)
class SprayResult:
    """Clusters of one class's explanations.

    Attributes:
        labels: cluster of each map (n,), clusters numbered by decreasing size.
        k: number of clusters (from the eigengap unless given).
        eigenvalues: the smallest eigenvalues of the normalised Laplacian (ascending).
        eigengaps: differences between consecutive eigenvalues (``eigengaps[i] = ev[i+1] - ev[i]``).
        mean_maps: mean downsized map per cluster (k, h, w).
        typical: per cluster, indices (into the given maps) of the members nearest its centre.
        embedding: the spectral embedding used for clustering (n, k).
    """

    labels: np.ndarray
    k: int
    eigenvalues: np.ndarray
    eigengaps: np.ndarray
    mean_maps: np.ndarray
    typical: tuple[tuple[int, ...], ...]
    embedding: np.ndarray

    @property
    def sizes(self) -> list[int]:
        return [int((self.labels == c).sum()) for c in range(self.k)]


def prepare_maps(maps: np.ndarray | torch.Tensor, size: int = 16) -> np.ndarray:
    """(n, [c,] h, w) attributions -> (n, size', size') float64: channels summed, area-downsized
    to at most ``size`` per side, each map scaled to unit L2 norm (so clusters compare *where*
    the evidence is, not how strong it is)."""
    t = torch.as_tensor(np.asarray(maps, dtype=np.float32))
    if t.ndim == 4:
        t = t.sum(1)
    if t.ndim != 3 or len(t) == 0:
        raise InputError(f"SpRAy needs a stack of 2-D maps (n, h, w) or (n, c, h, w); got shape {tuple(t.shape)}.")
    t = torch.nan_to_num(t)
    h, w = t.shape[-2:]
    if max(h, w) > size:
        t = F.adaptive_avg_pool2d(t[:, None], (min(h, size), min(w, size)))[:, 0]
    a = t.double().numpy()
    norms = np.sqrt((a.reshape(len(a), -1) ** 2).sum(1))
    norms[norms == 0] = 1.0
    return a / norms[:, None, None]


def _knn_affinity(x: np.ndarray, k: int) -> np.ndarray:
    """Symmetric binary k-nearest-neighbour affinity (Euclidean; no self loops)."""
    sq = (x ** 2).sum(1)
    d = sq[:, None] + sq[None, :] - 2 * x @ x.T
    np.fill_diagonal(d, np.inf)
    nn_idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    w = np.zeros_like(d)
    rows = np.repeat(np.arange(len(x)), k)
    w[rows, nn_idx.ravel()] = 1.0
    return np.maximum(w, w.T)


def _kmeans(x: np.ndarray, k: int, seed: int, restarts: int = 10, iters: int = 100) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding; the best of ``restarts`` runs (lowest inertia)."""
    rng = np.random.default_rng(seed)
    best, best_inertia = None, math.inf
    for _ in range(restarts):
        centres = [x[rng.integers(len(x))]]
        for _ in range(1, k):
            d2 = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
            p = d2 / d2.sum() if d2.sum() > 0 else np.full(len(x), 1 / len(x))
            centres.append(x[rng.choice(len(x), p=p)])
        c = np.array(centres)
        labels = np.zeros(len(x), dtype=int)
        for it in range(iters):
            d = ((x[:, None, :] - c[None]) ** 2).sum(-1)
            new = d.argmin(1)
            if it and np.array_equal(new, labels):
                break
            labels = new
            for j in range(k):
                if (labels == j).any():
                    c[j] = x[labels == j].mean(0)
        inertia = float(((x - c[labels]) ** 2).sum())
        if inertia < best_inertia - 1e-12:
            best, best_inertia = labels.copy(), inertia
    assert best is not None
    return best


def spray(maps: np.ndarray | torch.Tensor, *, k: int | None = None, max_k: int = 8, neighbours: int | None = None,
          size: int = 16, n_typical: int = 6, seed: int = 0) -> SprayResult:
    """Cluster explanations of one class (see the module docstring).

    Args:
        maps: (n, h, w) or (n, c, h, w) attributions of samples of one class (n >= 4).
        k: number of clusters; None picks it from the largest eigengap among the first ``max_k``.
        neighbours: k of the k-nearest-neighbour graph (default: ceil(log2 n) + 1, at least 3).
        size: maps are downsized to at most ``size`` x ``size``.
        n_typical: members listed per cluster, nearest to its centre first.
    """
    x3 = prepare_maps(maps, size)
    n = len(x3)
    if n < 4:
        raise InputError(f"SpRAy needs at least 4 maps of a class; got {n}.")
    max_k = check_int("max_k", max_k, minimum=2)
    if k is not None:
        k = check_int("k", k, minimum=1, maximum=n)
    nb = check_int("neighbours", neighbours, minimum=1) if neighbours is not None else max(3, math.ceil(math.log2(n)) + 1)
    nb = min(nb, n - 1)
    x = x3.reshape(n, -1)
    w = _knn_affinity(x, nb)
    deg = w.sum(1)
    inv = 1.0 / np.sqrt(np.maximum(deg, 1e-12))
    lap = np.eye(n) - inv[:, None] * w * inv[None, :]
    evals, evecs = np.linalg.eigh(lap)
    m = min(max_k + 1, n)
    gaps = np.diff(evals[:m])
    if k is None:
        k = int(np.argmax(gaps)) + 1
    emb = evecs[:, :k].copy()
    rn = np.linalg.norm(emb, axis=1, keepdims=True)
    rn[rn == 0] = 1.0
    emb = emb / rn
    raw = _kmeans(emb, k, seed) if k > 1 else np.zeros(n, dtype=int)
    order = sorted(range(k), key=lambda c: (-(raw == c).sum(), c))  # biggest cluster first
    labels = np.empty(n, dtype=int)
    for new, old in enumerate(order):
        labels[raw == old] = new
    mean_maps = np.stack([x3[labels == c].mean(0) for c in range(k)])
    typical = []
    for c in range(k):
        members = np.flatnonzero(labels == c)
        centre = emb[members].mean(0)
        dist = ((emb[members] - centre) ** 2).sum(1)
        typical.append(tuple(int(i) for i in members[np.argsort(dist, kind="stable")[:n_typical]]))
    return SprayResult(labels, k, evals[:m], gaps, mean_maps, tuple(typical), emb)


__all__ = ["SprayResult", "prepare_maps", "spray"]
