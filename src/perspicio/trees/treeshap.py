"""Exact SHAP values and interaction values of a :class:`~perspicio.trees.ensemble.TreeEnsemble`.

See :mod:`perspicio.trees._kernels` for the algorithm. :func:`tree_shap` returns plain numpy
arrays; the registered method (:class:`perspicio.methods.tree.TreeSHAP`) wraps them in an
:class:`~perspicio.Explanation`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import OptionError
from .ensemble import TreeEnsemble

PERTURBATIONS = ("tree_path_dependent", "interventional")
OUTPUTS = ("raw", "probability")
_TRANSFORM_CODES = {"identity": 0, "logistic": 1, "softmax": 2}


@dataclass(frozen=True)
class TreeShapResult:
    """values: (N, F, K); interactions: (N, F, F, K) or None; base: (K,); output: (N, K) the
    explained output (margin, or probability) of each row."""

    values: np.ndarray
    interactions: np.ndarray | None
    base: np.ndarray
    output: np.ndarray
    stats: dict[str, Any]


def _table_plan(
    ens: TreeEnsemble, paths: Any, n_rows: int, inter: bool
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, list[int]]:
    """Which leaves get a pattern table, and chunks of trees whose tables fit the budget."""
    from . import _kernels

    tree_budget = _kernels.TREE_TABLE_BUDGET

    d = paths.leaf_d.astype(np.int64)
    width = d * d if inter else d
    limit = max(16, min(2 * n_rows, 1024))
    use = (d > 0) & (d <= 20)
    use &= (np.int64(1) << np.minimum(d, 40)) <= limit
    size = np.where(use, (np.int64(1) << np.minimum(d, 40)) * width, 0) * 8
    chunks: list[np.ndarray] = []
    sizes: list[int] = []
    cur: list[int] = []
    cur_bytes = 0
    for t in range(ens.n_trees):
        a, b = paths.tree_leaf[t], paths.tree_leaf[t + 1]
        tb = int(size[a:b].sum())
        if (
            tb > tree_budget
        ):  # a tree's tables must stay in cache: its largest become per-row computations
            order = np.argsort(-size[a:b], kind="stable")
            for i in order:
                if tb <= tree_budget:
                    break
                tb -= int(size[a + i])
                size[a + i] = 0
                use[a + i] = False
        if cur and cur_bytes + tb > _kernels.TABLE_BUDGET:
            chunks.append(np.asarray(cur, dtype=np.int64))
            sizes.append(cur_bytes)
            cur, cur_bytes = [], 0
        cur.append(t)
        cur_bytes += tb
    if cur:
        chunks.append(np.asarray(cur, dtype=np.int64))
        sizes.append(cur_bytes)
    return use, chunks, size // 8, sizes


def tree_shap(
    ens: TreeEnsemble,
    x: Any,
    *,
    feature_perturbation: str = "tree_path_dependent",
    background: Any = None,
    interactions: bool = False,
    model_output: str = "raw",
    block: int = 64,
) -> TreeShapResult:
    """SHAP values (and optionally interaction values) of every row of ``x`` for every output.

    Args:
        ens: the model, read by :func:`perspicio.trees.read_model`.
        x: rows (N, F); NaN where the model routes missing values.
        feature_perturbation: ``"tree_path_dependent"`` (the training covers stand in for the data
            distribution, no background) or ``"interventional"`` (features outside a coalition take
            each background row's values; needs ``background``).
        background: (K, F) rows for the interventional game (all of them are used).
        interactions: also compute SHAP interaction values (rows sum to the SHAP values).
        model_output: ``"raw"`` (the margin) or ``"probability"`` (interventional only; the
            model's link applied to the margin: logistic, softmax, or none for forests that
            average probabilities).
    """
    from . import _kernels as K

    if feature_perturbation not in PERTURBATIONS:
        raise OptionError(
            f"feature_perturbation must be one of {', '.join(PERTURBATIONS)}; got {feature_perturbation!r}."
        )
    if model_output not in OUTPUTS:
        raise OptionError(
            f"model_output must be one of {', '.join(OUTPUTS)}; got {model_output!r}."
        )
    interventional = feature_perturbation == "interventional"
    if interventional and background is None:
        raise OptionError(
            "feature_perturbation='interventional' needs background= rows (K, features)."
        )
    if not interventional and background is not None:
        raise OptionError(
            "background= is used only with feature_perturbation='interventional'; the path-dependent "
            "algorithm uses the training covers stored in the trees."
        )
    if not interventional and not np.isfinite(ens.cover).all():
        raise OptionError(
            f"{ens.source} stores no node covers (ONNX trees carry no training counts), so the "
            "path-dependent game is undefined: use feature_perturbation='interventional' with "
            "background= rows (command line: --background N)."
        )
    transform = 0
    if model_output == "probability":
        if not interventional:
            raise OptionError(
                "model_output='probability' needs feature_perturbation='interventional' (the "
                "path-dependent game is defined on the additive margin only)."
            )
        if ens.transform not in _TRANSFORM_CODES:
            raise OptionError(
                f"model_output='probability' is not defined for {ens.source}: its objective has no "
                "known link to probabilities (binary logistic, multi-class softmax, or a forest of "
                "class probabilities)."
            )
        if interactions:
            raise OptionError(
                "interaction values are computed for model_output='raw' only (the probability output "
                "is not additive over trees)."
            )
        transform = _TRANSFORM_CODES[ens.transform]
    xs = ens.prepare(x)
    paths = ens.paths()
    if paths.max_d > K.MAX_PATH_FEATURES:
        raise OptionError(
            f"a path of this model splits on {paths.max_d} distinct features; the exact tree explainer "
            f"handles up to {K.MAX_PATH_FEATURES}."
        )
    ni = K.node_table(ens)
    n, f, k_out = xs.shape[0], ens.n_features, ens.n_outputs
    w = K.shapley_weights(paths.max_d + 1)
    output = K.predict_margin(ens, xs)
    leaf_vals = ens.value[paths.leaf_node]  # (L, K)
    leaf_tree = np.repeat(np.arange(ens.n_trees), np.diff(paths.tree_leaf))
    cols = ens.tree_output[leaf_tree]
    mask = np.where(cols[:, None] >= 0, np.arange(k_out)[None, :] == cols[:, None], True)
    leaf_vals = leaf_vals * mask
    stats: dict[str, Any] = {
        "trees": ens.n_trees,
        "leaves": int(len(paths.leaf_node)),
        "max_depth": paths.max_steps,
    }
    z_start = np.zeros(1, np.int64)
    zpat = np.zeros(1, np.int64)
    zcnt = np.zeros(1)
    if interventional:
        bg = ens.prepare(background, "background")
        stats["background_rows"] = int(bg.shape[0])
        full = (np.int64(1) << paths.leaf_d.astype(np.int64)) - 1
        mb = K.predict_margin(ens, bg)
        if transform:
            bgpat = np.empty((bg.shape[0], len(paths.leaf_node)), np.int64)
            _leaf_patterns(ens, paths, ni, bg, 0, ens.n_trees, bgpat)
            phi = np.zeros((n, f, k_out))
            from numpy.polynomial.legendre import leggauss

            t_nodes, t_w = leggauss(64)
            K._iv_pairs(
                xs,
                output,
                ni,
                ens.threshold,
                ens.cat_bits,
                ens.tree_start,
                paths.tree_leaf,
                paths.leaf_node,
                paths.node_bit,
                paths.uf_start,
                paths.uf_feat,
                paths.leaf_d,
                ens.value,
                ens.tree_output,
                w,
                bgpat,
                mb,
                transform,
                (t_nodes + 1) / 2,
                t_w / 2,
                paths.max_tree_nodes,
                f,
                phi,
            )
            prob = _link(output, transform)
            base = _link(mb, transform).mean(axis=0)
            return TreeShapResult(phi, None, base, prob, stats)
        z_start, zpat, zcnt, reach = _background_histograms(ens, paths, ni, bg, full)
        base = ens.base_offset + reach @ leaf_vals
    else:
        base = ens.base_offset + paths.reach @ leaf_vals
    use, chunks, sizes, chunk_bytes = _table_plan(ens, paths, n, interactions)
    stats["table_leaves"] = int(use.sum())
    stats["table_bytes"] = int(max(chunk_bytes, default=0))
    phi = np.zeros((n, f, k_out)) if not interactions else np.zeros((1, 1, 1))
    phi2 = np.zeros((n, f, f, k_out)) if interactions else np.zeros((1, 1, 1, 1))
    tab_start = np.zeros(len(paths.leaf_node), np.int64)
    for trees in chunks:
        leaves = np.concatenate(
            [np.arange(paths.tree_leaf[t], paths.tree_leaf[t + 1]) for t in trees]
        )
        tabbed = leaves[use[leaves]]
        offs = np.cumsum(sizes[tabbed]) - sizes[tabbed]
        tab_start[tabbed] = offs
        tab = np.empty(int(sizes[tabbed].sum()) or 1)
        if len(tabbed):
            K._build_tables(
                tabbed,
                tab_start,
                paths.leaf_d,
                paths.uf_start,
                paths.uf_p,
                w,
                interactions,
                interventional,
                z_start,
                zpat,
                zcnt,
                tab,
                paths.max_d,
            )
        K._apply(
            xs,
            trees,
            ni,
            ens.threshold,
            ens.cat_bits,
            ens.tree_start,
            paths.tree_leaf,
            paths.leaf_node,
            paths.node_bit,
            paths.uf_start,
            paths.uf_feat,
            paths.uf_p,
            paths.leaf_d,
            use,
            tab_start,
            tab,
            ens.value,
            ens.tree_output,
            w,
            interactions,
            interventional,
            z_start,
            zpat,
            zcnt,
            paths.max_d,
            paths.max_tree_nodes,
            block,
            phi,
            phi2,
        )
        del tab  # before the next chunk allocates its own: one chunk of tables alive at a time
    if interactions:
        values = phi2.sum(axis=2)
        return TreeShapResult(values, phi2, base, output, stats)
    return TreeShapResult(phi, None, base, output, stats)


def _background_histograms(
    ens: TreeEnsemble, paths: Any, ni: np.ndarray, bg: np.ndarray, full: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per leaf, the distinct patterns of the background rows and their weights (z_start, zpat,
    zcnt), and the fraction of background rows reaching each leaf.

    Trees are taken in chunks whose (rows, leaves) pattern block stays under PATTERN_BUDGET; a first
    pass counts the distinct patterns, so zpat/zcnt are allocated at their exact size (the
    full (rows, leaves) matrix and its upper-bound-sized histograms are never held).
    """
    from . import _kernels as K

    n_bg, n_leaves = bg.shape[0], len(paths.leaf_node)
    weights = np.full(n_bg, 1.0 / n_bg)
    per_tree = np.diff(paths.tree_leaf)
    chunks: list[tuple[int, int]] = []
    t0 = 0
    while t0 < ens.n_trees:
        t1, cols = t0, 0
        while t1 < ens.n_trees and (t1 == t0 or (cols + per_tree[t1]) * n_bg * 8 <= PATTERN_BUDGET):
            cols += int(per_tree[t1])
            t1 += 1
        chunks.append((t0, t1))
        t0 = t1
    z_start = np.zeros(n_leaves + 1, np.int64)
    reach = np.empty(n_leaves)
    zpat = np.zeros(1, np.int64)
    zcnt = np.zeros(1)
    for count_only in (True, False):
        pos = 0
        for t0, t1 in chunks:
            l0, l1 = int(paths.tree_leaf[t0]), int(paths.tree_leaf[t1])
            pat = np.empty((n_bg, l1 - l0), np.int64)
            _leaf_patterns(ens, paths, ni, bg, t0, t1, pat)
            if count_only:
                reach[l0:l1] = (pat == full[None, l0:l1]).mean(axis=0)
            pos = K._histograms(pat, weights, l0, pos, z_start, zpat, zcnt, count_only)
        if count_only:
            zpat = np.empty(pos, np.int64)
            zcnt = np.empty(pos)
    z_start[n_leaves] = pos
    return z_start, zpat, zcnt, reach


def _leaf_patterns(
    ens: TreeEnsemble,
    paths: Any,
    ni: np.ndarray,
    rows: np.ndarray,
    t0: int,
    t1: int,
    out: np.ndarray,
) -> None:
    """Fill ``out`` (rows, leaves of trees t0..t1-1) with each row's pattern at each leaf."""
    from . import _kernels as K

    K._patterns(
        rows,
        ni,
        ens.threshold,
        ens.cat_bits,
        ens.tree_start,
        paths.tree_leaf,
        paths.leaf_node,
        paths.node_bit,
        paths.leaf_d,
        paths.max_tree_nodes,
        t0,
        t1,
        out,
    )


#: bytes of one chunk's (background rows, leaves) pattern block
PATTERN_BUDGET = 4 << 20


def _link(margin: np.ndarray, code: int) -> np.ndarray:
    if code == 1:
        return 1.0 / (1.0 + np.exp(-margin))
    if code == 2:
        e = np.exp(margin - margin.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return margin
