"""Compiled kernels of the exact tree explainer (numba, ``parallel=True``, never ``cache=True``).

The algorithm works on root-to-leaf *paths*. For a leaf with value ``v`` whose path splits on the
distinct features ``f_1..f_d``, let ``p_j`` be the product of the cover fractions
``cover(child) / cover(node)`` over the path's splits on ``f_j`` and ``o_j(x)`` in {0, 1} whether
``x`` satisfies all of them. The tree-path-dependent game of one leaf is
``v(S) = v * prod_{j in S} o_j * prod_{j not in S} p_j`` (Lundberg et al. 2020), and the tree's
game is the sum over its leaves. Because the ``o_j`` are 0 or 1, a leaf's Shapley values depend
on ``x`` only through its *pattern* ``s`` (bit j = o_j): with Z the zero bits, A the one bits
and ``G_m(B) = sum_k w_m(k) e_{|B| - k}(p_B)`` (``w_m(k) = k! (m - k - 1)! / m!``, ``e`` the
elementary symmetric polynomials),

- ``phi_j = -v * prod_Z p * G_d(A)`` for j in Z,
- ``phi_j = v * (1 - p_j) * prod_Z p * G_d(A minus j)`` for j in A,

and the interaction values of a pair are
``phi_ij = v / 2 * (o_i - p_i) (o_j - p_j) prod_{Z minus i, j} p * G_{d-1}(A minus i, j)``
(the diagonal takes the rest of ``phi_i``). For shallow paths every pattern's values are
tabulated once per leaf (``2^d`` patterns, the idea of Fast TreeSHAP v2, Yang 2021); a row then
costs one routing decision per internal node, one pattern per leaf and ``d`` (or ``d^2``)
additions per leaf. Deep paths compute their pattern's values per row in O(d^2) (polynomial
products and top-down deflation, which is stable because ``0 <= p <= 1``).

Interventional values use the same tables: for a background row with pattern ``z`` the leaf's
game is ``v`` when every path feature is satisfied by x (if in S) or by the background row (if
not), a unanimity-style game whose Shapley values are ``v (n_x - 1)! n_b! / n!`` for the features
only x satisfies and ``-v n_x! (n_b - 1)! / n!`` for those only the background row satisfies.
Background rows are aggregated per leaf into a histogram of patterns, so the cost per explained
row does not depend on the background size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ModelError

try:
    from numba import njit, prange
except ImportError as exc:  # pragma: no cover - exercised only without numba
    raise ModelError(
        "the exact tree explainer needs numba: pip install 'perspicio[trees]' "
        "(or pip install numba)."
    ) from exc

from .ensemble import CAT_LEFT, CAT_RIGHT, LE, NAN_AS_ZERO, ZERO_MISSING

#: longest distinct-feature path the kernels handle (patterns are int64 bit masks)
MAX_PATH_FEATURES = 62
#: table memory per chunk of trees (bytes); every table is built once whatever the budget, so a
#: smaller budget costs only more passes of the rows over fewer trees each
TABLE_BUDGET = 16 << 20
#: table memory per tree (bytes): a row looks up one pattern per leaf, so a tree's tables must stay in
#: the core's cache while a block of rows passes; beyond this, the deepest leaves compute per row
TREE_TABLE_BUDGET = 512 << 10


# ============================================================================ routing


@njit(cache=False)
def _route(x, n, ni, thr, bits):
    """Child of internal node ``n`` that row ``x`` goes to (see the ensemble's routing rules)."""
    v = x[ni[n, 3]]
    fl = ni[n, 4]
    if v != v:
        if fl & NAN_AS_ZERO:
            v = 0.0
        else:
            return ni[n, 2]
    if (fl & ZERO_MISSING) and abs(v) <= 1e-35:
        return ni[n, 2]
    if fl & (CAT_LEFT | CAT_RIGHT):
        if ni[n, 8] > 0 and (v < 0 or v != math.floor(v)):
            return ni[n, 2]
        c = -1
        if v > -1.0 and v < 2147483647.0:
            c = int(v)
        member = False
        if c >= 0:
            w = c >> 5
            if w < ni[n, 6]:
                member = ((bits[ni[n, 5] + w] >> np.uint32(c & 31)) & np.uint32(1)) != 0
        if member:
            return ni[n, 0] if fl & CAT_LEFT else ni[n, 1]
        if ni[n, 8] > 0:
            known = False
            if c >= 0:
                w = c >> 5
                if w < ni[n, 8]:
                    known = ((bits[ni[n, 7] + w] >> np.uint32(c & 31)) & np.uint32(1)) != 0
            if not known:
                return ni[n, 2]
        return ni[n, 1] if fl & CAT_LEFT else ni[n, 0]
    if fl & LE:
        return ni[n, 0] if v <= thr[n] else ni[n, 1]
    return ni[n, 0] if v < thr[n] else ni[n, 1]


@njit(cache=False)
def _fail_masks(xr, ts, te, ni, thr, bits, node_bit, mask):
    """For every node of one tree (parents before children), the bits of the path features the row
    fails on the way to it: a leaf's pattern is ``full & ~mask[leaf]``."""
    mask[0] = 0
    for n in range(ts, te):
        if ni[n, 0] >= 0:
            c = _route(xr, n, ni, thr, bits)
            m = mask[n - ts]
            o = ni[n, 0] + ni[n, 1] - c
            mask[c - ts] = m
            mask[o - ts] = m | (np.int64(1) << node_bit[n])


@njit(cache=False, parallel=True)
def _predict(x, ni, thr, bits, tree_start, tree_output, value, base, out):
    n_out = value.shape[1]
    for r in prange(x.shape[0]):
        row = x[r]
        for k in range(n_out):
            out[r, k] = base[k]
        for t in range(len(tree_start) - 1):
            n = tree_start[t]
            while ni[n, 0] >= 0:
                n = _route(row, n, ni, thr, bits)
            k = tree_output[t]
            if k >= 0:
                out[r, k] += value[n, k]
            else:
                for kk in range(n_out):
                    out[r, kk] += value[n, kk]


def node_table(ens: Any) -> np.ndarray:
    """The per-node integer columns packed as one (n_nodes, 9) int32 array (cached)."""
    if "ni" not in ens._cache:
        ens._cache["ni"] = np.ascontiguousarray(
            np.stack(
                [
                    ens.left,
                    ens.right,
                    ens.default,
                    ens.feature,
                    ens.flags.astype(np.int32),
                    ens.cat_start,
                    ens.cat_len,
                    ens.known_start,
                    ens.known_len,
                ],
                axis=1,
            ).astype(np.int32)
        )
    return ens._cache["ni"]


def predict_margin(ens: Any, x: np.ndarray) -> np.ndarray:
    """Margin output (N, n_outputs) of prepared rows ``x``."""
    out = np.empty((x.shape[0], ens.n_outputs))
    _predict(
        x,
        node_table(ens),
        ens.threshold,
        ens.cat_bits,
        ens.tree_start,
        ens.tree_output,
        ens.value,
        ens.base_offset,
        out,
    )
    return out


# ============================================================================ paths


@dataclass(frozen=True)
class Paths:
    """Root-to-leaf paths of every leaf, as flat arrays (leaves are numbered tree by tree)."""

    leaf_node: np.ndarray  # (L,) node id of each leaf
    tree_leaf: np.ndarray  # (T + 1,) first leaf of each tree
    step_start: np.ndarray  # (L + 1,) first step of each leaf's path
    step_node: np.ndarray  # internal node of each step
    step_child: np.ndarray  # child taken at that step
    step_bit: np.ndarray  # position of the step's feature among the leaf's distinct features
    uf_start: np.ndarray  # (L + 1,) first distinct feature of each leaf
    uf_feat: np.ndarray  # distinct features of each path, in order of first split
    uf_p: np.ndarray  # product of the cover fractions of the path's splits on that feature
    leaf_d: np.ndarray  # (L,) number of distinct features on each path
    node_bit: (
        np.ndarray
    )  # (n_nodes,) bit of an internal node's feature in the patterns of the leaves below
    reach: np.ndarray  # (L,) product of all cover fractions (probability of reaching the leaf)
    max_steps: int
    max_d: int
    max_tree_nodes: int


@njit(cache=False)
def _count_paths(left, right, tree_start):
    n_leaves = 0
    n_steps = 0
    max_steps = 0
    depth = np.zeros(len(left), np.int64)
    for t in range(len(tree_start) - 1):
        root = tree_start[t]
        stack = [root]
        depth[root] = 0
        while len(stack) > 0:
            n = stack.pop()
            if left[n] < 0:
                n_leaves += 1
                n_steps += depth[n]
                if depth[n] > max_steps:
                    max_steps = depth[n]
            else:
                depth[left[n]] = depth[n] + 1
                depth[right[n]] = depth[n] + 1
                stack.append(right[n])
                stack.append(left[n])
    return n_leaves, n_steps, max_steps


@njit(cache=False)
def _fill_paths(
    left,
    right,
    feature,
    cover,
    tree_start,
    n_leaves,
    n_steps,
    max_steps,
    leaf_node,
    tree_leaf,
    step_start,
    step_node,
    step_child,
    step_bit,
    uf_start,
    uf_feat,
    uf_p,
    leaf_d,
    reach,
    node_bit,
):
    path_node = np.zeros(max_steps + 1, np.int64)
    path_child = np.zeros(max_steps + 1, np.int64)
    feats = np.zeros(max_steps + 1, np.int64)
    ps = np.zeros(max_steps + 1)
    stack_n = np.zeros(2 * max_steps + 4, np.int64)
    stack_d = np.zeros(2 * max_steps + 4, np.int64)
    li = 0
    si = 0
    ui = 0
    for t in range(len(tree_start) - 1):
        tree_leaf[t] = li
        sp = 0
        stack_n[0] = tree_start[t]
        stack_d[0] = 0
        while sp >= 0:
            n = stack_n[sp]
            dd = stack_d[sp]
            sp -= 1
            if dd > 0:
                path_child[dd - 1] = n
            if left[n] < 0:
                leaf_node[li] = n
                step_start[li] = si
                uf_start[li] = ui
                d = 0
                r = 1.0
                for k in range(dd):
                    a = path_node[k]
                    c = path_child[k]
                    f = feature[a]
                    pos = -1
                    for q in range(d):
                        if feats[q] == f:
                            pos = q
                            break
                    if pos < 0:
                        pos = d
                        feats[d] = f
                        ps[d] = 1.0
                        d += 1
                    frac = cover[c] / cover[a] if cover[a] > 0 else 0.5
                    ps[pos] *= frac
                    r *= frac
                    step_node[si] = a
                    step_child[si] = c
                    step_bit[si] = pos
                    node_bit[a] = (
                        pos  # the same for every leaf below a: positions follow first appearance
                    )
                    si += 1
                for q in range(d):
                    uf_feat[ui] = feats[q]
                    uf_p[ui] = ps[q]
                    ui += 1
                leaf_d[li] = d
                reach[li] = r
                li += 1
            else:
                path_node[dd] = n
                sp += 1
                stack_n[sp] = right[n]
                stack_d[sp] = dd + 1
                sp += 1
                stack_n[sp] = left[n]
                stack_d[sp] = dd + 1
    tree_leaf[len(tree_start) - 1] = li
    step_start[li] = si
    uf_start[li] = ui
    return ui


def leaf_paths(ens: Any) -> Paths:
    """Every leaf's path, distinct features, cover fractions and reach probability."""
    left = ens.left.astype(np.int64)
    right = ens.right.astype(np.int64)
    n_leaves, n_steps, max_steps = _count_paths(left, right, ens.tree_start.astype(np.int64))
    leaf_node = np.zeros(n_leaves, np.int32)
    tree_leaf = np.zeros(ens.n_trees + 1, np.int64)
    step_start = np.zeros(n_leaves + 1, np.int64)
    step_node = np.zeros(n_steps, np.int32)
    step_child = np.zeros(n_steps, np.int32)
    step_bit = np.zeros(n_steps, np.int32)
    uf_start = np.zeros(n_leaves + 1, np.int64)
    uf_feat = np.zeros(n_steps, np.int32)
    uf_p = np.zeros(n_steps)
    leaf_d = np.zeros(n_leaves, np.int32)
    reach = np.zeros(n_leaves)
    node_bit = np.zeros(len(left), np.int64)
    used = _fill_paths(
        left,
        right,
        ens.feature.astype(np.int64),
        ens.cover,
        ens.tree_start.astype(np.int64),
        n_leaves,
        n_steps,
        max_steps,
        leaf_node,
        tree_leaf,
        step_start,
        step_node,
        step_child,
        step_bit,
        uf_start,
        uf_feat,
        uf_p,
        leaf_d,
        reach,
        node_bit,
    )
    sizes = np.diff(ens.tree_start)
    return Paths(
        leaf_node,
        tree_leaf,
        step_start,
        step_node,
        step_child,
        step_bit,
        uf_start,
        uf_feat[:used].copy(),
        uf_p[:used].copy(),
        leaf_d,
        node_bit,
        reach,
        int(max_steps),
        int(leaf_d.max(initial=0)),
        int(sizes.max(initial=1)),
    )


def shapley_weights(max_players: int) -> np.ndarray:
    """W[m, k] = k! (m - k - 1)! / m! for 0 <= k < m <= max_players (float64, exact to rounding)."""
    w = np.zeros((max_players + 2, max_players + 2))
    for m in range(1, max_players + 2):
        for k in range(m):
            w[m, k] = 1.0 / (m * math.comb(m - 1, k))
    return w


# ============================================================================ per-pattern values


@njit(cache=False)
def _deflate(q, deg, pj, r):
    """``r`` = ``q`` divided by the factor (pj + x): ``q`` of degree ``deg`` is a product that
    contains it, ``r`` gets degree ``deg - 1`` (synthetic division from the top coefficient)."""
    r[deg - 1] = q[deg]
    for m in range(deg - 1, 0, -1):
        r[m - 1] = q[m] - pj * r[m]


@njit(cache=False)
def _pd_values(s, d, p, w, out, q, r):
    """Path-dependent Shapley values of one leaf (value 1) for pattern ``s``; leaves the product
    polynomial of the satisfied features in ``q`` and returns (prod_Z p, |A|)."""
    pz = 1.0
    a = 0
    q[0] = 1.0
    for j in range(d):
        if (s >> j) & 1:
            q[a + 1] = q[a]
            for m in range(a, 0, -1):
                q[m] = q[m] * p[j] + q[m - 1]
            q[0] = q[0] * p[j]
            a += 1
        else:
            pz *= p[j]
    gz = 0.0
    if a < d:
        for m in range(a + 1):
            gz += w[d, m] * q[m]
    for j in range(d):
        if (s >> j) & 1:
            _deflate(q, a, p[j], r)
            g = 0.0
            for m in range(a):
                g += w[d, m] * r[m]
            out[j] = (1.0 - p[j]) * pz * g
        else:
            out[j] = -pz * gz
    return pz, a


@njit(cache=False)
def _pd_interactions(s, d, p, w, vals, out, q, r, r2):
    """Path-dependent interaction values (d x d, row-major into ``out``) of one leaf for pattern
    ``s``; ``vals``/``q`` are what :func:`_pd_values` left for the same pattern."""
    a = 0
    for j in range(d):
        a += (s >> j) & 1
    for i in range(d):
        oi = (s >> i) & 1
        # polynomial of A minus i
        if oi:
            _deflate(q, a, p[i], r)
            deg_i = a - 1
        else:
            for m in range(a + 1):
                r[m] = q[m]
            deg_i = a
        for j in range(i + 1, d):
            oj = (s >> j) & 1
            if oj:
                _deflate(r, deg_i, p[j], r2)
                deg = deg_i - 1
            else:
                for m in range(deg_i + 1):
                    r2[m] = r[m]
                deg = deg_i
            g = 0.0
            for m in range(deg + 1):
                g += w[d - 1, m] * r2[m]
            pz = 1.0
            for k in range(d):
                if k != i and k != j and not ((s >> k) & 1):
                    pz *= p[k]
            v = 0.5 * (oi - p[i]) * (oj - p[j]) * pz * g
            out[i * d + j] = v
            out[j * d + i] = v
    for i in range(d):
        rest = vals[i]
        for j in range(d):
            if j != i:
                rest -= out[i * d + j]
        out[i * d + i] = rest


@njit(cache=False)
def _popcount(v):
    c = 0
    while v:
        v &= v - 1
        c += 1
    return c


@njit(cache=False)
def _iv_add(o, z, full, d, w, c, vals, inter, out2):
    """Add ``c`` times the interventional Shapley (and interaction) values of one leaf (value 1)
    for the explained pattern ``o`` and a background pattern ``z``."""
    if (o | z) != full:
        return
    xo = o & ~z
    bo = z & ~o
    nx = _popcount(xo)
    nb = _popcount(bo)
    n = nx + nb
    if n == 0:
        return
    wx = w[n, nx - 1] if nx > 0 else 0.0
    wb = w[n, nx] if nb > 0 else 0.0
    for j in range(d):
        if (xo >> j) & 1:
            vals[j] += c * wx
        elif (bo >> j) & 1:
            vals[j] -= c * wb
    if inter and n >= 2:
        wxx = 0.5 * w[n - 1, nx - 2] if nx >= 2 else 0.0
        wxb = 0.5 * w[n - 1, nx - 1] if (nx >= 1 and nb >= 1) else 0.0
        wbb = 0.5 * w[n - 1, nx] if nb >= 2 else 0.0
        for i in range(d):
            if (xo >> i) & 1:
                for j in range(d):
                    if j != i:
                        if (xo >> j) & 1:
                            out2[i * d + j] += c * wxx
                        elif (bo >> j) & 1:
                            out2[i * d + j] -= c * wxb
            elif (bo >> i) & 1:
                for j in range(d):
                    if j != i:
                        if (bo >> j) & 1:
                            out2[i * d + j] += c * wbb
                        elif (xo >> j) & 1:
                            out2[i * d + j] -= c * wxb


@njit(cache=False)
def _iv_leaf(o, d, zs, ze, zpat, zcnt, w, inter, vals, out2):
    full = (np.int64(1) << d) - 1
    for j in range(d):
        vals[j] = 0.0
    if inter:
        for j in range(d * d):
            out2[j] = 0.0
    for zi in range(zs, ze):
        _iv_add(o, zpat[zi], full, d, w, zcnt[zi], vals, inter, out2)
    if inter:
        for i in range(d):
            rest = vals[i]
            for j in range(d):
                if j != i:
                    rest -= out2[i * d + j]
            out2[i * d + i] = rest


# ============================================================================ tables


@njit(cache=False, parallel=True)
def _build_tables(
    leaves,
    tab_start,
    leaf_d,
    uf_start,
    uf_p,
    w,
    inter,
    interventional,
    z_start,
    zpat,
    zcnt,
    tab,
    max_d,
):
    for ii in prange(len(leaves)):
        lf = leaves[ii]
        d = leaf_d[lf]
        if d == 0:
            continue
        p = uf_p[uf_start[lf] : uf_start[lf] + d]
        q = np.zeros(max_d + 2)
        r = np.zeros(max_d + 2)
        r2 = np.zeros(max_d + 2)
        vals = np.zeros(max_d + 1)
        out2 = np.zeros((max_d + 1) * (max_d + 1))
        width = d * d if inter else d
        base = tab_start[lf]
        for s in range(np.int64(1) << d):
            off = base + s * width
            if interventional:
                _iv_leaf(s, d, z_start[lf], z_start[lf + 1], zpat, zcnt, w, inter, vals, out2)
            else:
                _pd_values(s, d, p, w, vals, q, r)
                if inter:
                    _pd_interactions(s, d, p, w, vals, out2, q, r, r2)
            if inter:
                for j in range(d * d):
                    tab[off + j] = out2[j]
            else:
                for j in range(d):
                    tab[off + j] = vals[j]


# ============================================================================ rows


@njit(cache=False, parallel=True)
def _apply(
    x,
    trees,
    ni,
    thr,
    bits,
    tree_start,
    tree_leaf,
    leaf_node,
    node_bit,
    uf_start,
    uf_feat,
    uf_p,
    leaf_d,
    use_tab,
    tab_start,
    tab,
    value,
    tree_output,
    w,
    inter,
    interventional,
    z_start,
    zpat,
    zcnt,
    max_d,
    max_tree_nodes,
    block,
    phi,
    phi2,
):
    n_rows = x.shape[0]
    n_out = value.shape[1]
    n_blocks = (n_rows + block - 1) // block
    for b in prange(n_blocks):
        r0 = b * block
        r1 = min(n_rows, r0 + block)
        dec = np.zeros(max_tree_nodes, np.int64)
        q = np.zeros(max_d + 2)
        r = np.zeros(max_d + 2)
        r2 = np.zeros(max_d + 2)
        vals = np.zeros(max_d + 1)
        out2 = np.zeros((max_d + 1) * (max_d + 1))
        for ti in range(len(trees)):
            t = trees[ti]
            ts = tree_start[t]
            te = tree_start[t + 1]
            k = tree_output[t]
            for row in range(r0, r1):
                _fail_masks(x[row], ts, te, ni, thr, bits, node_bit, dec)
                for lf in range(tree_leaf[t], tree_leaf[t + 1]):
                    d = leaf_d[lf]
                    if d == 0:
                        continue
                    s = ((np.int64(1) << d) - 1) & ~dec[leaf_node[lf] - ts]
                    u0 = uf_start[lf]
                    node = leaf_node[lf]
                    if use_tab[lf]:
                        if inter:
                            off = tab_start[lf] + s * d * d
                            for i in range(d):
                                fi = uf_feat[u0 + i]
                                for j in range(d):
                                    c = tab[off + i * d + j]
                                    fj = uf_feat[u0 + j]
                                    if k >= 0:
                                        phi2[row, fi, fj, k] += value[node, k] * c
                                    else:
                                        for kk in range(n_out):
                                            phi2[row, fi, fj, kk] += value[node, kk] * c
                        else:
                            off = tab_start[lf] + s * d
                            for j in range(d):
                                c = tab[off + j]
                                fj = uf_feat[u0 + j]
                                if k >= 0:
                                    phi[row, fj, k] += value[node, k] * c
                                else:
                                    for kk in range(n_out):
                                        phi[row, fj, kk] += value[node, kk] * c
                        continue
                    p = uf_p[u0 : u0 + d]
                    if interventional:
                        _iv_leaf(
                            s, d, z_start[lf], z_start[lf + 1], zpat, zcnt, w, inter, vals, out2
                        )
                    else:
                        _pd_values(s, d, p, w, vals, q, r)
                        if inter:
                            _pd_interactions(s, d, p, w, vals, out2, q, r, r2)
                    if inter:
                        for i in range(d):
                            fi = uf_feat[u0 + i]
                            for j in range(d):
                                c = out2[i * d + j]
                                fj = uf_feat[u0 + j]
                                if k >= 0:
                                    phi2[row, fi, fj, k] += value[node, k] * c
                                else:
                                    for kk in range(n_out):
                                        phi2[row, fi, fj, kk] += value[node, kk] * c
                    else:
                        for j in range(d):
                            c = vals[j]
                            fj = uf_feat[u0 + j]
                            if k >= 0:
                                phi[row, fj, k] += value[node, k] * c
                            else:
                                for kk in range(n_out):
                                    phi[row, fj, kk] += value[node, kk] * c


@njit(cache=False, parallel=True)
def _patterns(
    x,
    ni,
    thr,
    bits,
    tree_start,
    tree_leaf,
    leaf_node,
    node_bit,
    leaf_d,
    max_tree_nodes,
    t0,
    t1,
    out,
):
    """Pattern of every leaf of trees t0..t1-1 for every row: out (N, leaves of those trees) int64."""
    l0 = tree_leaf[t0]
    for row in prange(x.shape[0]):
        dec = np.zeros(max_tree_nodes, np.int64)
        xr = x[row]
        for t in range(t0, t1):
            ts = tree_start[t]
            _fail_masks(xr, ts, tree_start[t + 1], ni, thr, bits, node_bit, dec)
            for lf in range(tree_leaf[t], tree_leaf[t + 1]):
                d = leaf_d[lf]
                out[row, lf - l0] = ((np.int64(1) << d) - 1) & ~dec[leaf_node[lf] - ts]


@njit(cache=False)
def _histograms(pat, weights, l0, pos, z_start, zpat, zcnt, count_only):
    """Per leaf (columns of ``pat``, leaves l0, l0 + 1, ...), the distinct background patterns and
    their summed weights, sorted, written from ``pos`` on; returns the next free position.
    ``count_only`` only counts them (to size zpat/zcnt exactly before filling them)."""
    n_bg, n_leaves = pat.shape
    col = np.zeros(n_bg, np.int64)
    for lf in range(n_leaves):
        z_start[l0 + lf] = pos
        for b in range(n_bg):
            col[b] = pat[b, lf]
        order = np.argsort(col)
        prev = np.int64(-1)
        for bi in range(n_bg):
            b = order[bi]
            v = col[b]
            if bi == 0 or v != prev:
                if not count_only:
                    zpat[pos] = v
                    zcnt[pos] = weights[b]
                pos += 1
                prev = v
            elif not count_only:
                zcnt[pos - 1] += weights[b]
    return pos


@njit(cache=False, parallel=True)
def _iv_pairs(
    x,
    mx,
    ni,
    thr,
    bits,
    tree_start,
    tree_leaf,
    leaf_node,
    node_bit,
    uf_start,
    uf_feat,
    leaf_d,
    value,
    tree_output,
    w,
    bgpat,
    mb,
    transform,
    gl_t,
    gl_w,
    max_tree_nodes,
    n_features,
    phi,
):
    """Interventional values of a transformed output (per background row: the margin game's values
    rescaled by the secant of the link; softmax: by the path-averaged Jacobian)."""
    n_rows = x.shape[0]
    n_leaves = bgpat.shape[1]
    n_bg = bgpat.shape[0]
    n_out = value.shape[1]
    for row in prange(n_rows):
        dec = np.zeros(max_tree_nodes, np.int64)
        o = np.zeros(n_leaves, np.int64)
        xr = x[row]
        for t in range(len(tree_start) - 1):
            ts = tree_start[t]
            _fail_masks(xr, ts, tree_start[t + 1], ni, thr, bits, node_bit, dec)
            for lf in range(tree_leaf[t], tree_leaf[t + 1]):
                o[lf] = ((np.int64(1) << leaf_d[lf]) - 1) & ~dec[leaf_node[lf] - ts]
        tmp = np.zeros((n_features, n_out))
        jac = np.zeros((n_out, n_out))
        pr = np.zeros(n_out)
        for b in range(n_bg):
            tmp[:, :] = 0.0
            for t in range(len(tree_start) - 1):
                k = tree_output[t]
                for lf in range(tree_leaf[t], tree_leaf[t + 1]):
                    d = leaf_d[lf]
                    if d == 0:
                        continue
                    full = (np.int64(1) << d) - 1
                    z = bgpat[b, lf]
                    ol = o[lf]
                    if (ol | z) != full:
                        continue
                    xo = ol & ~z
                    bo = z & ~ol
                    nx = _popcount(xo)
                    nb = _popcount(bo)
                    nn = nx + nb
                    if nn == 0:
                        continue
                    wx = w[nn, nx - 1] if nx > 0 else 0.0
                    wb = w[nn, nx] if nb > 0 else 0.0
                    node = leaf_node[lf]
                    u0 = uf_start[lf]
                    for j in range(d):
                        c = 0.0
                        if (xo >> j) & 1:
                            c = wx
                        elif (bo >> j) & 1:
                            c = -wb
                        else:
                            continue
                        f = uf_feat[u0 + j]
                        if k >= 0:
                            tmp[f, k] += value[node, k] * c
                        else:
                            for kk in range(n_out):
                                tmp[f, kk] += value[node, kk] * c
            if transform == 1:  # logistic, per output: secant slope of the sigmoid
                for kk in range(n_out):
                    a = mx[row, kk]
                    bb = mb[b, kk]
                    sa = 1.0 / (1.0 + math.exp(-a))
                    sb = 1.0 / (1.0 + math.exp(-bb))
                    if a != bb:
                        scale = (sa - sb) / (a - bb)
                    else:
                        scale = sa * (1.0 - sa)
                    for f in range(n_features):
                        phi[row, f, kk] += tmp[f, kk] * scale / n_bg
            elif transform == 2:  # softmax: J = integral over the segment of d softmax / d margin
                jac[:, :] = 0.0
                for g in range(len(gl_t)):
                    mmax = -1e300
                    for kk in range(n_out):
                        pr[kk] = mb[b, kk] + gl_t[g] * (mx[row, kk] - mb[b, kk])
                        if pr[kk] > mmax:
                            mmax = pr[kk]
                    tot = 0.0
                    for kk in range(n_out):
                        pr[kk] = math.exp(pr[kk] - mmax)
                        tot += pr[kk]
                    for kk in range(n_out):
                        pr[kk] /= tot
                    for kk in range(n_out):
                        for cc in range(n_out):
                            jac[kk, cc] += gl_w[g] * pr[kk] * ((1.0 if kk == cc else 0.0) - pr[cc])
                for f in range(n_features):
                    for kk in range(n_out):
                        acc = 0.0
                        for cc in range(n_out):
                            acc += jac[kk, cc] * tmp[f, cc]
                        phi[row, f, kk] += acc / n_bg
            else:
                for f in range(n_features):
                    for kk in range(n_out):
                        phi[row, f, kk] += tmp[f, kk] / n_bg
