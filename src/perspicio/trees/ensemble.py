"""One array form for every tree ensemble perspicio explains exactly.

Every reader (:mod:`perspicio.trees.readers`) turns a library's model into a :class:`TreeEnsemble`:
flat numpy arrays over all nodes of all trees (node ids are global; tree ``t`` owns nodes
``tree_start[t]:tree_start[t + 1]`` and its root is the first of them). The model's *margin*
output for a row is ``base_offset + sum over trees of the value of the leaf the row reaches``
(already scaled: learning rates, 1 / n_trees for forests, are folded into the leaf values).

Routing of one row ``x`` at an internal node ``n`` (see :data:`LE`, :data:`CAT_LEFT`, ...):

- ``x[feature[n]]`` is NaN: with :data:`NAN_AS_ZERO` it is replaced by 0 (LightGBM's missing
  type "None"), otherwise the row goes to ``default[n]``;
- :data:`ZERO_MISSING` (LightGBM's missing type "Zero"): |x| <= 1e-35 goes to ``default[n]``;
- categorical nodes (:data:`CAT_LEFT` / :data:`CAT_RIGHT`): the integer part of the value is
  looked up in the node's bitset (``cat_bits[cat_start[n]:cat_start[n] + cat_len[n]]``, 32
  categories per uint32 word); members go left (``CAT_LEFT``) or right (``CAT_RIGHT``), others
  to the other side; with a *known* bitset (``known_len[n] > 0``, scikit-learn's
  HistGradientBoosting) unknown and negative categories go to ``default[n]``;
- numerical nodes: ``x < threshold`` (XGBoost) or ``x <= threshold`` (:data:`LE`: LightGBM,
  scikit-learn) goes left.

Rows are first cast to ``input_dtype`` (float32 for XGBoost and scikit-learn's classic trees,
which compare in float32) and back to float64, so routing matches the library bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError

#: node flag: numerical split ``x <= threshold`` goes left (otherwise ``x < threshold``)
LE = 1
#: node flag: categorical split, members of the bitset go left
CAT_LEFT = 2
#: node flag: categorical split, members of the bitset go right
CAT_RIGHT = 4
#: node flag: NaN is replaced by 0.0 before the comparison (LightGBM missing type None)
NAN_AS_ZERO = 8
#: node flag: |x| <= 1e-35 (and NaN) go to the default child (LightGBM missing type Zero)
ZERO_MISSING = 16


@dataclass(frozen=True, eq=False)
class TreeEnsemble:
    """A tree ensemble as flat arrays (see the module documentation for the routing rules).

    Attributes:
        left, right, default: child node ids (-1 at leaves); ``default`` is where missing values go.
        feature: split feature per node (-1 at leaves).
        threshold: split threshold (float64).
        flags: routing flags per node (:data:`LE`, :data:`CAT_LEFT`, :data:`CAT_RIGHT`,
            :data:`NAN_AS_ZERO`, :data:`ZERO_MISSING`).
        cat_start, cat_len, known_start, known_len, cat_bits: categorical bitsets.
        value: (n_nodes, n_outputs) leaf values (scaled; only leaves are read).
        cover: training weight reaching each node (hessian sums or sample counts), used by
            the path-dependent algorithm.
        tree_start: (n_trees + 1,) first node of each tree.
        tree_output: output column each tree adds to, or -1 for trees with vector leaves.
        base_offset: (n_outputs,) constant added to the margin.
        n_features: number of input columns.
        input_dtype: dtype rows are cast to before routing ("float32" or "float64").
        transform: link from margin to probability (``"logistic"``, ``"softmax"``,
            ``"identity"`` when the margin already is a probability) or None when unknown.
        nan_routing: whether the source library routes NaN inputs (else NaN is an error).
        inf_routing: whether the source library routes +-Inf inputs (else Inf is an error).
        category_codes: whether pandas ``category`` columns are read as category *codes* (XGBoost,
            LightGBM) rather than as their values (scikit-learn).
        categories: the training categories of the categorical columns, if the model stores them:
            a tuple with, per column (or, with ``categories_by_order``, per categorical column of
            the DataFrame in order, as LightGBM's ``pandas_categorical``), None or the categories
            whose codes are 0, 1, ...
        categories_by_order: see ``categories``.
        unknown_category_error: a category not among the training ones is an error (XGBoost)
            rather than a missing value (LightGBM).
        missing_value: a value the library treats as missing besides NaN (XGBoost ``missing``), or NaN.
        source: description of the model that was read.
        feature_names: column names stored in the model, if any.
        output_names: names of the outputs (class labels), if known.
    """

    left: np.ndarray
    right: np.ndarray
    default: np.ndarray
    feature: np.ndarray
    threshold: np.ndarray
    flags: np.ndarray
    cat_start: np.ndarray
    cat_len: np.ndarray
    known_start: np.ndarray
    known_len: np.ndarray
    cat_bits: np.ndarray
    value: np.ndarray
    cover: np.ndarray
    tree_start: np.ndarray
    tree_output: np.ndarray
    base_offset: np.ndarray
    n_features: int
    input_dtype: str = "float64"
    transform: str | None = None
    nan_routing: bool = True
    inf_routing: bool = False
    category_codes: bool = False
    categories: tuple[Any, ...] | None = None
    categories_by_order: bool = False
    unknown_category_error: bool = False
    missing_value: float = float("nan")
    source: str = ""
    feature_names: tuple[str, ...] | None = None
    output_names: tuple[str, ...] | None = None
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def n_trees(self) -> int:
        return len(self.tree_start) - 1

    @property
    def n_nodes(self) -> int:
        return len(self.left)

    @property
    def n_outputs(self) -> int:
        return self.value.shape[1]

    def max_depth(self) -> int:
        """Longest root-to-leaf path over all trees."""
        return int(self.paths().max_steps)

    def paths(self) -> Any:
        """Root-to-leaf paths of every leaf (computed once, see :func:`perspicio.trees._kernels.leaf_paths`)."""
        if "paths" not in self._cache:
            from ._kernels import leaf_paths

            self._cache["paths"] = leaf_paths(self)
        return self._cache["paths"]

    def prepare(self, x: Any, what: str = "inputs") -> np.ndarray:
        """Rows as a C-contiguous float64 (N, F) array, cast through ``input_dtype`` as the library
        does, with the library's ``missing`` value turned into NaN; checks columns and NaN support.

        A pandas DataFrame is read column by column: its columns must not be a reordering of the
        model's feature names, numeric columns (nullable ones too: ``pd.NA`` is NaN) are read as
        numbers, and ``category`` columns as the library reads them (:meth:`_frame_rows`)."""
        if hasattr(x, "to_numpy") and hasattr(x, "columns") and hasattr(x, "iloc"):
            x = self._frame_rows(x, what)
        elif hasattr(x, "to_numpy") and hasattr(x, "columns"):  # another DataFrame library
            x = x.to_numpy()
        elif hasattr(x, "detach"):
            x = x.detach().cpu().numpy()
        try:
            a = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InputError(
                f"{what} must be a numeric array of shape (N, {self.n_features}); "
                f"got {type(x).__name__}."
            ) from exc
        if a.ndim == 1:
            a = a[None]
        if a.ndim != 2 or a.shape[0] == 0:
            raise InputError(
                f"{what} must be a 2-D array (N, {self.n_features}) with at least one row; "
                f"got shape {a.shape}."
            )
        if a.shape[1] != self.n_features:
            raise InputError(
                f"{what} have {a.shape[1]} columns; the model ({self.source}) was trained on "
                f"{self.n_features} features."
            )
        # values beyond float32's range become Inf, as in the library
        with np.errstate(over="ignore"):
            a = np.ascontiguousarray(a.astype(self.input_dtype).astype(np.float64))
        if not np.isnan(self.missing_value):
            a[a == self.missing_value] = np.nan
        if not self.inf_routing and np.isinf(a).any():
            raise InputError(
                f"{what} contain {int(np.isinf(a).sum())} Inf value(s), but {self.source} does not "
                "accept them (the library itself refuses them)."
            )
        if not self.nan_routing and np.isnan(a).any():
            raise InputError(
                f"{what} contain {int(np.isnan(a).sum())} NaN value(s), but {self.source} cannot route "
                "missing values (the library itself refuses them). Impute them first."
            )
        return a

    def _frame_rows(self, df: Any, what: str) -> np.ndarray:
        """A DataFrame's rows as float64, read the way the model's library reads DataFrames.

        ``category`` columns: XGBoost and LightGBM see category *codes*; when the model stores its
        training categories (XGBoost 3, LightGBM's ``pandas_categorical``) each value is coded by
        its position among them (as the libraries re-code a frame whose categories differ from the
        training ones), otherwise by the frame's own codes; missing values are NaN. scikit-learn
        sees the values themselves."""
        cols = [str(c) for c in df.columns]
        names = self.feature_names
        if (
            names is not None
            and len(cols) == len(names)
            and cols != list(names)
            and sorted(cols) == sorted(names)
        ):
            raise InputError(
                f"the columns of the {what} DataFrame are the model's features in another order; "
                f"{self.source} expects {list(names)[:8]}{' ...' if len(names) > 8 else ''}: "
                "select them in that order (df[model_feature_names])."
            )
        out = np.empty((len(df), len(cols)))
        n_cat = 0
        for j in range(len(cols)):
            col = df.iloc[:, j]
            if getattr(col.dtype, "name", "") == "category":
                out[:, j] = self._category_column(col, j, n_cat, cols[j], what)
                n_cat += 1
                continue
            try:
                out[:, j] = col.to_numpy(dtype=np.float64, na_value=np.nan)
            except (TypeError, ValueError) as exc:
                raise InputError(
                    f"column {cols[j]!r} of the {what} has dtype {col.dtype}, which is not numeric; "
                    "tree models read numbers (and pandas 'category' columns)."
                ) from exc
        return out

    def _category_column(self, col: Any, j: int, n_cat: int, name: str, what: str) -> np.ndarray:
        if not self.category_codes:  # scikit-learn reads the category values themselves
            try:
                return np.asarray(col.astype(object).where(col.notna(), np.nan), dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise InputError(
                    f"categorical column {name!r} of the {what} has non-numeric categories; "
                    f"{self.source} reads category values as numbers."
                ) from exc
        train = None
        if self.categories is not None:
            i = n_cat if self.categories_by_order else j
            if i < len(self.categories):
                train = self.categories[i]
        if train is None:
            codes = np.asarray(col.cat.codes, dtype=np.float64)
            codes[codes < 0] = np.nan
            return codes
        index = {_category_key(v): k for k, v in enumerate(train)}
        cats = col.cat.categories
        lookup = np.full(len(cats), np.nan)
        for k, v in enumerate(cats):
            code = index.get(_category_key(v))
            if (
                code is None
                and self.unknown_category_error
                and (np.asarray(col.cat.codes) == k).any()
            ):
                raise InputError(
                    f"categorical column {name!r} of the {what} holds {v!r}, which is not among the "
                    f"model's training categories ({list(train)[:8]}{' ...' if len(train) > 8 else ''}); "
                    f"{self.source} refuses unknown categories."
                )
            lookup[k] = np.nan if code is None else code
        codes = np.asarray(col.cat.codes, dtype=np.int64)
        return np.where(codes >= 0, lookup[np.maximum(codes, 0)], np.nan)

    def predict(self, x: Any) -> np.ndarray:
        """Margin output (N, n_outputs) in float64: base_offset plus the reached leaf values."""
        from ._kernels import predict_margin

        return predict_margin(self, self.prepare(x))

    def validate(self) -> TreeEnsemble:
        """Check array shapes and child ids; returns self."""
        n = self.n_nodes
        for name in (
            "right",
            "default",
            "feature",
            "threshold",
            "flags",
            "cat_start",
            "cat_len",
            "known_start",
            "known_len",
            "cover",
        ):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"TreeEnsemble.{name} has {len(getattr(self, name))} entries for {n} nodes"
                )
        internal = self.left >= 0
        if (
            (self.left[internal] >= n).any()
            or (self.right[internal] >= n).any()
            or (self.right[internal] < 0).any()
        ):
            raise ValueError("TreeEnsemble child ids out of range")
        ids = np.arange(n)
        if (self.left[internal] <= ids[internal]).any() or (
            self.right[internal] <= ids[internal]
        ).any():
            raise ValueError(
                "TreeEnsemble nodes must come after their parents (children ids > parent id)"
            )
        if (self.feature[internal] >= self.n_features).any() or (self.feature[internal] < 0).any():
            raise ValueError("TreeEnsemble split features out of range")
        if len(self.tree_output) != self.n_trees or len(self.base_offset) != self.n_outputs:
            raise ValueError("TreeEnsemble tree_output/base_offset sizes do not match")
        return self


def build_ensemble(
    trees: list[dict[str, Any]], *, n_features: int, n_outputs: int, base_offset: Any, **meta: Any
) -> TreeEnsemble:
    """Concatenate per-tree dicts into one :class:`TreeEnsemble`.

    Each tree dict holds per-node arrays with tree-local child ids: ``left``, ``right``,
    ``default`` (-1 at leaves), ``feature``, ``threshold``, ``value`` ((n, n_outputs) or (n,)),
    ``cover``, optional ``flags`` and categorical ``cats`` (a list, per node, of None or a
    (set_bits, known_bits) pair of uint32 arrays), and ``output`` (the tree's output column, -1 for
    vector leaves).
    """
    parts: dict[str, list[np.ndarray]] = {
        k: []
        for k in (
            "left",
            "right",
            "default",
            "feature",
            "threshold",
            "flags",
            "value",
            "cover",
            "cat_start",
            "cat_len",
            "known_start",
            "known_len",
        )
    }
    bits: list[np.ndarray] = []
    nbits = 0
    starts = [0]
    outputs = []
    for t in trees:
        off = starts[-1]
        left = np.asarray(t["left"], dtype=np.int64)
        n = len(left)
        leaf = left < 0
        for k in ("left", "right", "default"):
            a = np.asarray(t[k], dtype=np.int64)
            parts[k].append(np.where(leaf, -1, a + off).astype(np.int32))
        parts["feature"].append(
            np.where(leaf, -1, np.asarray(t["feature"], dtype=np.int64)).astype(np.int32)
        )
        parts["threshold"].append(np.asarray(t["threshold"], dtype=np.float64))
        parts["flags"].append(np.asarray(t.get("flags", np.zeros(n)), dtype=np.uint8))
        v = np.asarray(t["value"], dtype=np.float64)
        if v.ndim == 1:
            v = v[:, None]
        if v.shape[1] != n_outputs:
            col = int(t.get("output", 0))
            full = np.zeros((n, n_outputs))
            full[:, col] = v[:, 0]
            v = full
        parts["value"].append(v)
        parts["cover"].append(np.asarray(t["cover"], dtype=np.float64))
        cs, cl, ks, kl = (np.zeros(n, dtype=np.int32) for _ in range(4))
        for i, c in enumerate(t.get("cats") or []):
            if c is None:
                continue
            s, known = c
            s = np.asarray(s, dtype=np.uint32)
            cs[i], cl[i] = nbits, len(s)
            bits.append(s)
            nbits += len(s)
            if known is not None and len(known):
                known = np.asarray(known, dtype=np.uint32)
                ks[i], kl[i] = nbits, len(known)
                bits.append(known)
                nbits += len(known)
        parts["cat_start"].append(cs)
        parts["cat_len"].append(cl)
        parts["known_start"].append(ks)
        parts["known_len"].append(kl)
        starts.append(off + n)
        outputs.append(int(t.get("output", -1)))
    cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    return TreeEnsemble(
        left=cat["left"],
        right=cat["right"],
        default=cat["default"],
        feature=cat["feature"],
        threshold=cat["threshold"],
        flags=cat["flags"],
        cat_start=cat["cat_start"],
        cat_len=cat["cat_len"],
        known_start=cat["known_start"],
        known_len=cat["known_len"],
        cat_bits=np.concatenate(bits).astype(np.uint32) if bits else np.zeros(0, dtype=np.uint32),
        value=np.ascontiguousarray(cat["value"].reshape(-1, n_outputs)),
        cover=cat["cover"],
        tree_start=np.asarray(starts, dtype=np.int32),
        tree_output=np.asarray(outputs, dtype=np.int32),
        base_offset=np.broadcast_to(np.asarray(base_offset, dtype=np.float64), (n_outputs,)).copy(),
        n_features=int(n_features),
        **meta,
    ).validate()


def _category_key(v: Any) -> Any:
    """A category value as a dictionary key: numbers by value (10 == 10.0), others as strings."""
    if isinstance(v, (bool, np.bool_)):
        return str(v)
    if isinstance(v, (int, float, np.integer, np.floating)):
        return float(v)
    return str(v)


def bitset(categories: Any) -> np.ndarray:
    """uint32 words with the bits of the given non-negative integer categories set."""
    cats = np.asarray(list(categories), dtype=np.int64)
    if len(cats) == 0:
        return np.zeros(1, dtype=np.uint32)
    words = np.zeros(int(cats.max()) // 32 + 1, dtype=np.uint32)
    for c in cats:
        words[c // 32] |= np.uint32(1) << np.uint32(c % 32)
    return words
