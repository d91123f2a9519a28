"""Distil a model into a decision tree (scikit-learn CART) and judge it on held-out rows.

The tree learns the model's class (argmax of its outputs) or one chosen score from interpretable
features (``_design.py``); its fidelity - agreement with the model's class, or R^2 of the model's
score - is measured only on rows it was not fitted on, with a confidence interval. Each leaf is a
rule whose own coverage and fidelity are measured on the held-out rows that reach it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.jsonable import to_jsonable, write_json
from ..core.options import check_choice, check_int
from ..errors import OptionError
from ._design import Design, Options, Task, check_depth, label_indices, require_sklearn, setup
from .fidelity import Fidelity, agreement, r2, r2_fidelity, wilson

if TYPE_CHECKING:
    from typing_extensions import Unpack


def _num(v: float) -> str:
    return f"{v:.4g}"


@dataclass(frozen=True)
class Condition:
    """One feature's range on a rule's path: ``low < feature <= high`` (either bound may be None)."""

    feature: str
    low: float | None
    high: float | None
    binary: bool = False
    presence: bool = False  # a segment kept (1) or removed (0) in a masked image

    def text(self) -> str:
        if self.presence:
            return f"{self.feature} {'removed' if self.high is not None else 'kept'}"
        if self.binary:  # a 0/1 feature split at 0.5
            return f"{self.feature} = {0 if self.high is not None else 1}"
        if self.low is not None and self.high is not None:
            return f"{_num(self.low)} < {self.feature} <= {_num(self.high)}"
        if self.low is not None:
            return f"{self.feature} > {_num(self.low)}"
        return f"{self.feature} <= {_num(self.high)}"  # type: ignore[arg-type]

    def holds(self, column: np.ndarray) -> np.ndarray:
        ok = np.ones(len(column), dtype=bool)
        if self.low is not None:
            ok &= column > self.low
        if self.high is not None:
            ok &= column <= self.high
        return ok


@dataclass(frozen=True)
class Rule:
    """One leaf of the tree as a rule, with its own coverage and fidelity on the held-out rows.

    ``coverage``: held-out rows the rule applies to (``coverage_fraction`` of all held-out rows).
    ``fidelity``: for classes, the agreement of the rule's class with the model's on those rows
    (Wilson interval); for scores, None and ``error`` is the mean absolute difference between the
    rule's value and the model's score on them. Both are None when no held-out row reaches it.
    """

    conditions: tuple[Condition, ...]
    prediction: str | float
    leaf: int
    train_rows: int
    coverage: int
    coverage_fraction: float
    fidelity: Fidelity | None
    error: float | None

    def text(self) -> str:
        cond = " and ".join(c.text() for c in self.conditions) or "always"
        head = f"if {cond} then " if self.conditions else "always "
        if isinstance(self.prediction, str):
            what = self.prediction
            if self.fidelity is None:
                return f"{head}{what} (no held-out rows)"
            return f"{head}{what} (fidelity {self.fidelity.value:.2f} on {self.coverage} held-out rows)"
        what = f"score = {_num(self.prediction)}"
        if self.error is None:
            return f"{head}{what} (no held-out rows)"
        return f"{head}{what} (mean |error| {_num(self.error)} on {self.coverage} held-out rows)"

    def __str__(self) -> str:
        return self.text()

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text(),
            "conditions": [asdict(c) for c in self.conditions],
            "prediction": self.prediction,
            "leaf": self.leaf,
            "train_rows": self.train_rows,
            "coverage": self.coverage,
            "coverage_fraction": self.coverage_fraction,
            "fidelity": self.fidelity.to_dict() if self.fidelity else None,
            "error": self.error,
        }


@dataclass(frozen=True, eq=False)
class TreeSurrogate:
    """A decision tree imitating a model; see :func:`distill_tree`.

    ``tree``: the fitted scikit-learn tree (on the interpretable features, in ``feature_names``
    order). ``fidelity``: on held-out rows only. ``train_fidelity``: the same measure on the
    training rows (optimistic; shown to compare). ``accuracy``: the tree's and the model's accuracy
    on the held-out true labels, when labels were given.
    """

    tree: Any
    fidelity: Fidelity
    train_fidelity: float
    accuracy: dict[str, Any] | None
    kind: str  # "class" or "score"
    feature_names: tuple[str, ...]
    class_names: tuple[str, ...]
    max_depth: int | None
    options: dict[str, Any]
    _design: Design = field(repr=False)
    _task: Task = field(repr=False)

    @property
    def depth(self) -> int:
        return int(self.tree.get_depth())

    @property
    def leaves(self) -> int:
        return int(self.tree.get_n_leaves())

    def predict(self, features: Any) -> np.ndarray:
        """The tree's class names (classes) or scores for rows of interpretable features."""
        pred = self.tree.predict(np.asarray(features, dtype=np.float64))
        return np.array([self.class_names[int(p)] for p in pred]) if self.kind == "class" else pred

    # ------------------------------------------------------------------ rules and nodes

    def rules(self, min_coverage: int = 0) -> list[Rule]:
        """Every leaf as a :class:`Rule`, most covered first (ties: tree order)."""
        t = self.tree.tree_
        d = self._design
        leaf_test = self.tree.apply(d.z_test)
        pred_test = self.tree.predict(d.z_test)
        out: list[Rule] = []
        for leaf, path in _paths(t):
            if t.children_left[leaf] != -1:
                continue
            rows = leaf_test == leaf
            n = int(rows.sum())
            value = _leaf_value(t, leaf, self.kind, self.tree)
            fid = err = None
            if n and self.kind == "class":
                fid = agreement(pred_test[rows], self._task.y_test[rows])
            elif n:
                err = float(np.mean(np.abs(pred_test[rows] - self._task.y_test[rows])))
            out.append(
                Rule(
                    _conditions(path, t, self.feature_names, d.binary, d.presence),
                    self.class_names[value] if self.kind == "class" else float(value),
                    int(leaf),
                    int(t.n_node_samples[leaf]),
                    n,
                    n / len(leaf_test),
                    fid,
                    err,
                )
            )
        out = [r for r in out if r.coverage >= min_coverage]
        return sorted(out, key=lambda r: -r.coverage)

    def rules_text(self, min_coverage: int = 0) -> str:
        """The rules, one per line, most covered first."""
        return "\n".join(r.text() for r in self.rules(min_coverage))

    def nodes(self) -> list[dict[str, Any]]:
        """Every node: question, children, the prediction, held-out rows reaching it and their fidelity."""
        t = self.tree.tree_
        d = self._design
        reach = self.tree.decision_path(d.z_test).T.tocsr()  # (nodes, n_test), sparse
        depths = {i: len(p) for i, p in _paths(t)}
        nodes = []
        for i in range(t.node_count):
            left, right = int(t.children_left[i]), int(t.children_right[i])
            value = _leaf_value(t, i, self.kind, self.tree)
            rows = reach.indices[
                reach.indptr[i] : reach.indptr[i + 1]
            ]  # held-out rows reaching node i
            n = len(rows)
            node: dict[str, Any] = {
                "id": i,
                "depth": depths[i],
                "left": None if left == -1 else left,
                "right": None if right == -1 else right,
                "train_rows": int(t.n_node_samples[i]),
                "held_out": n,
                "prediction": self.class_names[value] if self.kind == "class" else float(value),
                "fidelity": None,
                "error": None,
            }
            if left != -1:
                name, thr = self.feature_names[t.feature[i]], float(t.threshold[i])
                binary = bool(d.binary[t.feature[i]])
                node.update(
                    feature=name,
                    threshold=thr,
                    binary=binary,
                    question=f"{name} kept?"
                    if d.presence
                    else f"{name} = 1?"
                    if binary
                    else f"{name} <= {_num(thr)}?",
                    yes="no" if binary else "yes",
                    no="yes" if binary else "no",
                )
            if n and self.kind == "class":
                node["fidelity"] = float(np.mean(value == self._task.y_test[rows]))
            elif n:
                node["error"] = float(np.mean(np.abs(value - self._task.y_test[rows])))
            nodes.append(node)
        return nodes

    # ------------------------------------------------------------------ output

    def title(self) -> str:
        what = "class" if self.kind == "class" else f"score '{self.class_names[0]}'"
        return (
            f"decision tree imitating the model's {what}: depth {self.depth}, {self.leaves} leaves\n"
            f"fidelity {'R^2 ' if self.kind == 'score' else ''}{self.fidelity.value:.3f} "
            f"[{self.fidelity.low:.3f}, {self.fidelity.high:.3f}] on {self.fidelity.n} held-out rows"
        )

    def figure(self, *, max_leaves: int = 64, wide_leaves: int = 12) -> Any:
        """The tree as a matplotlib Figure: top-down up to ``wide_leaves`` leaves, else left to right;
        subtrees below the depth that keeps ``max_leaves`` boxes are cut (their leaf count shown)."""
        from .plots import draw_tree

        names = self.class_names if self.kind == "class" else ()
        return draw_tree(
            self.nodes(),
            title=self.title(),
            class_names=names,
            wide_leaves=wide_leaves,
            max_leaves=max_leaves,
        )

    def segments_figure(self) -> Any:
        """For image segment features (:class:`SegmentPresence`): the first image with its
        segments outlined and named as in the rules; the segments the tree uses are highlighted."""
        d = self._design
        if not d.presence or d.image is None or d.segments is None:
            raise OptionError(
                "segments_figure needs a surrogate on image segments (features=SegmentPresence)."
            )
        from .plots import segment_figure

        t = self.tree.tree_
        used = {int(t.feature[i]) for i in range(t.node_count) if t.children_left[i] != -1}
        return segment_figure(d.image, d.segments, self.feature_names, used)

    def curve(self, depths: Iterable[int] = range(1, 9)) -> FidelityCurve:
        """The depth/fidelity curve on the same rows and options (see :func:`fidelity_curve`)."""
        return _curve(self._design, self._task, depths, self.options)

    def to_dict(self) -> dict[str, Any]:
        d = self._design
        return {
            "surrogate": "decision_tree",
            "kind": self.kind,
            "classes" if self.kind == "class" else "score": list(self.class_names),
            "feature_names": list(self.feature_names),
            "features": d.source,
            "max_depth": self.max_depth,
            "depth": self.depth,
            "leaves": self.leaves,
            "fidelity": self.fidelity.to_dict(),
            "train_fidelity": self.train_fidelity,
            "accuracy": self.accuracy,
            "rows": {"train": d.n_train, "neighbours": d.n_neighbours, "held_out": len(d.z_test)},
            "options": self.options,
            "rules": [r.to_dict() for r in self.rules()],
            "nodes": self.nodes(),
            "versions": versions(),
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """The surrogate as JSON (fidelity, rules, nodes, options); written to ``path`` if given."""
        return dump_json(self.to_dict(), path)

    def __str__(self) -> str:
        return "\n".join(summary_lines(self))


@dataclass(frozen=True)
class CurvePoint:
    depth: int
    leaves: int
    fidelity: Fidelity
    train_fidelity: float
    accuracy: float | None


@dataclass(frozen=True)
class FidelityCurve:
    """Fidelity on held-out rows (and accuracy on true labels) of trees of increasing depth."""

    points: tuple[CurvePoint, ...]
    kind: str

    def smallest(self, at_least: float = 0.95, *, by: str = "value") -> int | None:
        """The smallest depth whose held-out fidelity (``by="value"``, or its interval's lower
        bound ``by="low"``) reaches ``at_least``; None if none does."""
        check_choice("by", by, ("value", "low"))
        for p in self.points:
            v = getattr(p.fidelity, by)
            if not math.isnan(v) and v >= at_least:
                return p.depth
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "points": [
                {
                    "depth": p.depth,
                    "leaves": p.leaves,
                    "fidelity": p.fidelity.to_dict(),
                    "train_fidelity": p.train_fidelity,
                    "accuracy": p.accuracy,
                }
                for p in self.points
            ],
        }

    def figure(self, title: str = "") -> Any:
        from .plots import curve_figure

        return curve_figure(
            self.to_dict()["points"], title=title or "fidelity of the distilled tree by depth"
        )

    def __str__(self) -> str:
        measure = "agreement" if self.kind == "class" else "R^2"
        rows = [f"depth  leaves  {measure} (held-out)   95% interval      train   accuracy"]
        for p in self.points:
            acc = "" if p.accuracy is None else f"{p.accuracy:.3f}"
            rows.append(
                f"{p.depth:>5}  {p.leaves:>6}  {p.fidelity.value:>18.3f}   [{p.fidelity.low:.3f}, "
                f"{p.fidelity.high:.3f}]   {p.train_fidelity:.3f}   {acc}"
            )
        return "\n".join(rows)


# ----------------------------------------------------------------------------- public functions


def distill_tree(
    model: Any,
    data: Any = None,
    *,
    max_depth: int | None = 4,
    min_samples_leaf: int = 1,
    max_leaf_nodes: int | None = None,
    **options: Unpack[Options],
) -> TreeSurrogate:
    """Fit a decision tree that imitates ``model`` and measure how faithfully it does.

    Args:
        model: a torch module, a bundled model (``load_tabular(...)`` carries its data, so ``data``
            may be omitted), a scikit-learn model or any prediction callable on arrays.
        data: rows (N, F) as an array, tensor or DataFrame; with ``features``, whatever the model takes.
        max_depth: the tree's depth (>= 1; None: unbounded).
        features: None (the columns of ``data``); a function ``inputs -> (N, F)`` of interpretable
            features (e.g. concept scores; its ``feature_names`` attribute names them); a segment
            spec (``"grid:4"``) or a :class:`SegmentPresence` for images.
        target: None imitates the model's class (argmax); an output index or name regresses that score.
        softmax: regress the softmax of the outputs (probabilities) instead of the raw outputs (logits).
        task: ``"auto"``; ``"class"`` for a one-output model returning class labels; ``"score"``.
        test_data, test_labels: explicit held-out rows; otherwise ``holdout`` of ``data``'s rows
            (a seeded split) are held out.
        labels: true labels of ``data`` (the tree's and the model's accuracy are reported beside
            the fidelity).
        neighbours: generated rows per training row (Gaussian noise of ``neighbour_scale`` x each
            column's standard deviation), labelled by the model and used for fitting only.
        feature_names, class_names: names of the features and of the model's outputs (default:
            from a DataFrame, a bundled model, a scikit-learn ``classes_``, else ``x0``/``class 0``).
        min_samples_leaf: the fewest training rows a leaf may hold.
        max_leaf_nodes: at most this many leaves (>= 2; best-first growth, scikit-learn's option);
            None: only ``max_depth`` bounds the tree.
        seed: the split, the neighbours, the tree's tie-breaking and the bootstrap.
        batch_size: rows per model call (default: the core Engine's memory budget).

    Unknown option names are an error naming the ones that exist (:class:`_design.Options`).
    """
    require_sklearn()
    max_depth = check_depth(max_depth)
    _check_leaf(min_samples_leaf)
    check_int("max_leaf_nodes", max_leaf_nodes, minimum=2, allow_none=True)
    design, tsk, recorded = setup(
        model, data, dict(options), ("max_depth", "min_samples_leaf", "max_leaf_nodes")
    )
    recorded.update(
        max_depth=max_depth, min_samples_leaf=min_samples_leaf, max_leaf_nodes=max_leaf_nodes
    )
    return _fit(design, tsk, max_depth, recorded)


def fidelity_curve(
    model: Any,
    data: Any = None,
    *,
    depths: Iterable[int] = range(1, 9),
    min_samples_leaf: int = 1,
    **options: Unpack[Options],
) -> FidelityCurve:
    """Held-out fidelity of trees of each depth in ``depths`` (the model runs once), to pick the
    smallest tree that is faithful enough. ``options`` are those of :func:`distill_tree`."""
    depths = list(depths)
    surrogate = distill_tree(
        model, data, max_depth=max(depths, default=1), min_samples_leaf=min_samples_leaf, **options
    )
    return surrogate.curve(depths)


# ----------------------------------------------------------------------------- internals


def _check_leaf(min_samples_leaf: Any) -> None:
    check_int("min_samples_leaf", min_samples_leaf, minimum=1)


def _fit(
    design: Design, tsk: Task, max_depth: int | None, options: dict[str, Any]
) -> TreeSurrogate:
    from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

    cls = DecisionTreeClassifier if tsk.kind == "class" else DecisionTreeRegressor
    tree = cls(
        max_depth=max_depth,
        min_samples_leaf=options["min_samples_leaf"],
        max_leaf_nodes=options.get("max_leaf_nodes"),
        random_state=options["seed"],
    )
    tree.fit(design.z_train, tsk.y_train)
    pred_test = tree.predict(design.z_test)
    pred_train = tree.predict(design.z_train[: design.n_train])
    if tsk.kind == "class":
        fid = agreement(pred_test, tsk.y_test)
        train_fid = float(np.mean(pred_train == tsk.y_train[: design.n_train]))
    else:
        fid = r2_fidelity(pred_test, tsk.y_test, seed=options["seed"])
        train_fid = r2(pred_train, tsk.y_train[: design.n_train])
    return TreeSurrogate(
        tree,
        fid,
        train_fid,
        _accuracy(design, tsk, pred_test),
        tsk.kind,
        tuple(design.feature_names),
        tuple(tsk.names),
        max_depth,
        dict(options),
        design,
        tsk,
    )


def _accuracy(design: Design, tsk: Task, pred_test: np.ndarray) -> dict[str, Any] | None:
    """The surrogate's and the model's agreement with the true held-out labels."""
    y = design.labels_test
    if y is None:
        return None
    if tsk.kind == "class":
        idx = label_indices(y, tsk.names)
        sur, mod = float(np.mean(pred_test == idx)), float(np.mean(tsk.y_test == idx))
        return {
            "measure": "accuracy",
            "surrogate": sur,
            "model": mod,
            "n": len(y),
            "surrogate_interval": list(wilson(int(np.sum(pred_test == idx)), len(y))),
        }
    if design.out_test.shape[1] == 1 and y.dtype.kind in "iuf":
        return {
            "measure": "r2",
            "surrogate": r2(pred_test, y),
            "model": r2(tsk.y_test, y),
            "n": len(y),
        }
    return None


def summary_lines(s: Any) -> list[str]:
    """The first title line, the fidelity, the training fidelity and the accuracy of a surrogate."""
    lines = [
        s.title().split("\n")[0],
        f"fidelity {s.fidelity}",
        f"training fidelity {s.train_fidelity:.3f}",
    ]
    if s.accuracy:
        lines.append(_accuracy_text(s.accuracy))
    return lines


def _accuracy_text(acc: dict[str, Any]) -> str:
    what = "accuracy" if acc["measure"] == "accuracy" else "R^2"
    return f"{what} on {acc['n']} held-out true labels: surrogate {acc['surrogate']:.3f}, model {acc['model']:.3f}"


def _curve(
    design: Design, tsk: Task, depths: Iterable[int], options: dict[str, Any]
) -> FidelityCurve:
    points = []
    depths = sorted({check_depth(d, "depths") for d in depths})  # type: ignore[type-var]
    if not depths:
        raise OptionError("depths must name at least one depth >= 1.")
    for d in depths:
        s = _fit(design, tsk, d, {**options, "max_depth": d})
        acc = s.accuracy["surrogate"] if s.accuracy else None
        points.append(CurvePoint(d, s.leaves, s.fidelity, s.train_fidelity, acc))
    return FidelityCurve(tuple(points), tsk.kind)


def _paths(t: Any) -> list[tuple[int, list[tuple[int, bool]]]]:
    """(node, [(ancestor, went_left), ...]) for every node, depth-first, left before right."""
    out = []
    stack: list[tuple[int, list[tuple[int, bool]]]] = [(0, [])]
    while stack:
        i, path = stack.pop()
        out.append((i, path))
        if t.children_left[i] != -1:
            stack.append((int(t.children_right[i]), [*path, (i, False)]))
            stack.append((int(t.children_left[i]), [*path, (i, True)]))
    return out


def _conditions(
    path: list[tuple[int, bool]],
    t: Any,
    names: Sequence[str],
    binary: np.ndarray,
    presence: bool = False,
) -> tuple[Condition, ...]:
    """A path's splits merged per feature into one range each, in order of first use."""
    bounds: dict[int, list[float | None]] = {}
    for node, left in path:
        f, thr = int(t.feature[node]), float(t.threshold[node])
        lo, hi = bounds.setdefault(f, [None, None])
        if left:
            bounds[f][1] = thr if hi is None else min(hi, thr)
        else:
            bounds[f][0] = thr if lo is None else max(lo, thr)
    return tuple(
        Condition(names[f], lo, hi, bool(binary[f]), presence) for f, (lo, hi) in bounds.items()
    )


def _leaf_value(t: Any, node: int, kind: str, tree: Any) -> Any:
    v = t.value[node]
    if kind == "class":
        return int(tree.classes_[int(np.argmax(v[0]))])
    return float(v[0][0])


def versions() -> dict[str, str]:
    """Versions that determine a surrogate (for the JSON export)."""
    from importlib.metadata import PackageNotFoundError, version

    import sklearn
    import torch

    try:
        own = version("perspicio")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        own = "unknown"
    return {"perspicio": own, "scikit-learn": sklearn.__version__, "torch": torch.__version__}


def dump_json(data: dict[str, Any], path: str | Path | None) -> str:
    """JSON text of ``data`` (``core.jsonable``: non-finite numbers become null); written
    atomically to ``path`` if given."""
    if path is not None:
        write_json(path, data, indent=2)
    return json.dumps(to_jsonable(data), indent=2, allow_nan=False)
