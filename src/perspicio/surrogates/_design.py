"""From (model, data) to the tables a surrogate learns from and is judged on.

Every surrogate sees the same :class:`Design`: interpretable features and the model's outputs for
the training rows (plus optional generated neighbours of training rows) and for held-out rows that
the surrogate never sees while it is fitted. Features are the table's columns (tabular data), the
values of a user feature function (any data, e.g. concept scores of images), or the presence of
image segments in masked copies of images (:class:`SegmentPresence`, through the core maskers).
The model is any torch module, bundled model or prediction callable (``core.blackbox``); it runs
under ``model_guard`` in chunks of the core ``Engine``, so its flags and gradients are left as
found.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
import torch
from torch import Tensor

from ..core.batching import Engine
from ..core.blackbox import unwrap_model
from ..core.guard import model_guard
from ..core.inputs import as_batch
from ..core.maskers import SEGMENTERS, ImageMasker, image_feature_mask
from ..core.options import check_choice, check_float, check_int
from ..core.targets import name_to_index
from ..errors import InputError, ModelError, OptionError, TargetError, suggest

#: fewest rows a surrogate is fitted on, and fewest held-out rows its fidelity is measured on
MIN_TRAIN = 10
MIN_TEST = 10


def require_sklearn() -> Any:
    """scikit-learn, or a clear error naming the extra that installs it."""
    try:
        import sklearn
    except ImportError as exc:  # pragma: no cover - part of the tabular and test extras
        raise ModelError("surrogates need scikit-learn: pip install 'perspicio[tabular]'.") from exc
    return sklearn


@dataclass(frozen=True)
class SegmentPresence:
    """Interpretable image features: which segments of an image are kept in a masked copy.

    For each image, ``samples`` random coalitions keep each segment with probability ``keep``;
    removed segments take ``baseline`` (a name of ``core.baselines``: zero, mean, blur, ...). The
    surrogate learns the model's prediction on the masked copies from the 0/1 presence vector.
    ``segments`` is a spec of ``core.maskers.image_feature_mask``: ``"grid:G"`` or ``"patch:S"``
    give the same features on every image (a global surrogate over several images); the
    superpixel segmenters (``"slic:N"``, ``"quickshift"``, ``"felzenszwalb"``) differ per image and
    are accepted for one image only (a local surrogate).
    """

    segments: str = "grid:4"
    samples: int = 256
    keep: float = 0.5
    baseline: Any = "blur"

    def __post_init__(self) -> None:
        ImageMasker(self.segments, self.baseline)  # validates the spec and the baseline
        check_int("SegmentPresence samples", self.samples, minimum=2)
        if check_float("SegmentPresence keep", self.keep, minimum=0, maximum=1, strict=True) == 1:
            raise OptionError(
                "SegmentPresence keep must be below 1 (some segments must be removed); got 1."
            )

    @property
    def per_image(self) -> bool:
        return self.segments.split(":")[0].strip().lower() in SEGMENTERS


@dataclass
class Design:
    """Training and held-out tables of one surrogate problem (numpy, float64)."""

    z_train: np.ndarray  # (n_train + neighbours, F) interpretable features
    z_test: np.ndarray  # (n_test, F)
    out_train: np.ndarray  # (n_train + neighbours, K) model outputs
    out_test: np.ndarray  # (n_test, K)
    feature_names: list[str]
    binary: np.ndarray  # (F,) bool: feature takes only the values 0 and 1 (presence)
    output_names: list[str]  # one name per model output column
    n_train: int  # original training rows (the first rows of z_train)
    n_neighbours: int
    train_rows: np.ndarray | None  # indices into ``data`` (None when a separate test set was given)
    test_rows: np.ndarray | None
    labels_test: np.ndarray | None  # true labels of the held-out rows, when given
    source: str  # "columns", "feature function" or "segments <spec>"
    #: SegmentPresence: features are kept (1) / removed (0) segments of ``image`` ((C, H, W), the
    #: first image) numbered as in ``segments`` ((H, W) ids)
    presence: bool = False
    #: a label model (:class:`LabelModel`): the names of its classes, in code order
    label_names: list[str] | None = None
    image: Tensor | None = None
    segments: Tensor | None = None


@dataclass
class Task:
    """What the surrogate imitates: the model's class (``kind="class"``) or one score column."""

    kind: str
    column: int | None
    names: list[str]  # class names (class) or [score name]
    y_train: np.ndarray
    y_test: np.ndarray


class Options(TypedDict, total=False):
    """The options every surrogate shares (documented on :func:`~perspicio.surrogates.distill_tree`)."""

    features: Any
    feature_names: Sequence[str] | None
    target: Any
    softmax: bool
    task: str
    test_data: Any
    labels: Any
    test_labels: Any
    holdout: float
    neighbours: int
    neighbour_scale: float
    class_names: Sequence[str] | None
    seed: int
    batch_size: int | None


#: what a surrogate's provenance records, with the defaults
RECORDED = (
    ("target", None),
    ("softmax", False),
    ("holdout", 0.25),
    ("neighbours", 0),
    ("neighbour_scale", 0.1),
    ("seed", 0),
)


def setup(
    model: Any, data: Any, options: dict[str, Any], own: Sequence[str] = ()
) -> tuple[Design, Task, dict[str, Any]]:
    """The :class:`Design`, the :class:`Task` and the recorded options of one surrogate problem
    (``own``: the calling surrogate's own option names, for the message on a misspelt one)."""
    known = [*own, *Options.__annotations__]
    unknown = [k for k in options if k not in Options.__annotations__]
    if unknown:
        raise OptionError(
            f"unknown option {unknown[0]!r}; expected one of: {', '.join(known)}."
            + suggest(unknown[0], known)
        )
    opts = dict(options)
    target, softmax, task = (
        opts.pop("target", None),
        opts.pop("softmax", False),
        opts.pop("task", "auto"),
    )
    labeller = _label_model(model, data, opts.get("features"), task)
    if labeller is not None:
        if target is not None:
            raise TargetError(
                "the model returns class labels, not scores: target= has no score to regress; "
                "distil its class (no target=)."
            )
        model, task = labeller, "class"
    design = prepare(model, data, **opts)
    if labeller is not None:
        _relabel(design, labeller)
    tsk = make_task(design, target, task, softmax)
    recorded = {k: options.get(k, default) for k, default in RECORDED}
    recorded["task"] = tsk.kind
    if options.get("test_data") is not None or data is None:
        recorded["holdout"] = None
    return design, tsk, recorded


# ----------------------------------------------------------------------------- label models


class LabelModel:
    """A model that returns class labels instead of scores (a scikit-learn classifier without
    ``predict_proba``, a function returning integers, booleans or strings), called through a
    vocabulary: each label becomes a code (the order of ``classes``, else of first appearance) and
    the surrogate imitates the class."""

    def __init__(self, fn: Callable[[Any], Any], classes: Sequence[Any] | None, name: str) -> None:
        self.fn = fn
        self.vocab: dict[Any, int] = {}
        self.fixed = classes is not None
        for c in classes if classes is not None else ():
            self.vocab[_label_key(c)] = len(self.vocab)
        self.__name__ = name

    def __call__(self, a: Any) -> np.ndarray:
        raw = np.asarray(self.fn(a))
        if raw.ndim == 2 and raw.shape[1] == 1:
            raw = raw[:, 0]
        codes = np.empty(len(raw), dtype=np.float64)
        for i, v in enumerate(raw.tolist() if raw.ndim == 1 else raw):
            key = _label_key(v)
            if key not in self.vocab:
                if self.fixed:
                    raise ModelError(
                        f"the model returned the label {v!r}, which is not one of its classes_."
                    )
                self.vocab[key] = len(self.vocab)
            codes[i] = self.vocab[key]
        return codes


def _label_key(v: Any) -> Any:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)) or (isinstance(v, float) and float(v).is_integer()):
        return int(v)
    return str(v)


def _label_model(model: Any, data: Any, features: Any, task: str) -> LabelModel | None:
    """A :class:`LabelModel` for a model whose outputs are class labels, else None (scores)."""
    if (
        isinstance(model, torch.nn.Module)
        or features is not None
        or task == "score"
        or data is None
    ):
        return None
    if hasattr(model, "predict_proba") or not (callable(model) or hasattr(model, "predict")):
        return None
    classes = getattr(model, "classes_", None)
    if hasattr(model, "predict"):
        if classes is None:  # a regressor
            return None
        named = _named_columns(model)  # called with a DataFrame if it was fitted on one
        fn = model.predict if named is model else named
        return LabelModel(fn, list(np.asarray(classes).tolist()), f"{type(model).__name__}.predict")
    try:  # a plain function: what does it return on two rows?
        table, _ = _as_table(data, "data")
    except InputError:
        return None
    try:
        raw = np.asarray(model(table[:2]))
    except Exception:  # the real call reports it with context
        return None
    if raw.ndim == 2 and raw.shape[1] == 1:
        raw = raw[:, 0]
    if raw.ndim != 1 or raw.dtype.kind not in "biuOSU":
        return None
    return LabelModel(model, None, getattr(model, "__name__", type(model).__name__))


def _relabel(design: Design, labeller: LabelModel) -> None:
    """Codes in order of first appearance -> codes in sorted label order (given ``classes_``:
    theirs); the output is named by the labels."""
    keys = list(labeller.vocab)
    if not labeller.fixed:
        numeric = all(isinstance(k, (bool, int)) for k in keys)
        keys = sorted(keys, key=(lambda k: (int(k),)) if numeric else (lambda k: (str(k),)))
    new = np.array([keys.index(k) for k in labeller.vocab], dtype=np.float64)
    design.out_train = new[design.out_train.astype(np.int64)]
    design.out_test = new[design.out_test.astype(np.int64)]
    design.label_names = [str(k) for k in keys]
    if design.labels_test is not None:  # true labels are values of the same kind: read as names
        design.labels_test = np.array([str(_label_key(v)) for v in design.labels_test.tolist()])


# ----------------------------------------------------------------------------- validation


def check_depth(max_depth: Any, name: str = "max_depth") -> int | None:
    """A tree depth: an integer >= 1, or None (unbounded)."""
    return check_int(name, max_depth, minimum=1, allow_none=True)


def _as_table(data: Any, what: str) -> tuple[np.ndarray, list[str] | None]:
    """A 2-D float64 array and the column names a DataFrame carries."""
    names = None
    if hasattr(data, "columns") and hasattr(data, "to_numpy"):  # pandas DataFrame
        names = [str(c) for c in data.columns]
        data = data.to_numpy()
    if isinstance(data, Tensor):
        data = data.detach().cpu().numpy()
    try:
        arr = np.array(data, dtype=np.float64)  # a copy: the caller's data is never aliased
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"{what} must be a numeric array of shape (rows, features); got {type(data).__name__} "
            f"that does not convert to numbers ({exc})."
        ) from None
    if arr.ndim != 2:
        raise InputError(
            f"{what} must have shape (rows, features); got shape {arr.shape}. For images pass "
            "features=SegmentPresence(...) or a feature function."
        )
    _check_finite(arr, what)
    return arr, names


def _check_finite(arr: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        rows = np.unique(np.nonzero(bad.reshape(len(arr), -1))[0])
        shown = ", ".join(str(r) for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
        raise InputError(
            f"{what} contains {int(bad.sum())} NaN/Inf value(s) (rows {shown}); surrogates need "
            "finite rows: impute or drop them first."
        )


def _as_input(data: Any, what: str) -> Tensor:
    if isinstance(data, Tensor):
        x = data.detach()
    else:
        try:
            x = torch.as_tensor(np.asarray(data, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise InputError(
                f"{what} must be a numeric array or tensor; got {type(data).__name__} ({exc})."
            ) from None
    if x.ndim < 2:
        raise InputError(f"{what} must be a batch (rows, ...); got shape {tuple(x.shape)}.")
    if not torch.isfinite(x).all():
        raise InputError(
            f"{what} contains {int((~torch.isfinite(x)).sum())} NaN/Inf value(s); surrogates need "
            "finite inputs."
        )
    return x


def _check_labels(labels: Any, n: int, what: str) -> np.ndarray | None:
    if labels is None:
        return None
    if isinstance(labels, Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1 or len(arr) != n:
        raise InputError(f"{what} must hold one label per row ({n}); got shape {arr.shape}.")
    return arr


def _names(
    given: Sequence[str] | None, found: Sequence[str] | None, n: int, what: str
) -> list[str]:
    names = given if given is not None else found
    if names is None:
        return [f"x{i}" for i in range(n)]
    names = [str(s) for s in names]
    if len(names) != n:
        raise InputError(f"{what} has {len(names)} names; the data has {n} features.")
    if len(set(names)) != len(names):
        dup = sorted({s for s in names if names.count(s) > 1})
        raise InputError(f"{what} must be unique; repeated: {', '.join(dup)}.")
    return names


# ----------------------------------------------------------------------------- the model


def model_outputs(
    net: torch.nn.Module,
    n: int,
    build: Callable[[int, int], Tensor],
    sample: Tensor,
    batch_size: int | None = None,
) -> np.ndarray:
    """Outputs (n, K) float64 of ``net`` on the inputs ``build(start, stop)`` builds chunk by chunk."""
    with model_guard(net):
        engine = Engine(net, batch_size=batch_size)
        out = engine.map(
            lambda a, b: _output(engine.forward(build(a, b))),
            n,
            sample=sample,
            description="evaluating the model",
        )
    arr = out.double().cpu().numpy()
    _check_finite_output(arr)
    return arr


def _output(raw: Any) -> Tensor:
    if not isinstance(raw, Tensor):
        raise ModelError(
            f"surrogates need a model returning one tensor of scores; got {type(raw).__name__}."
        )
    if raw.ndim == 1:
        raw = raw[:, None]
    if raw.ndim != 2:
        raise ModelError(
            f"surrogates need model outputs of shape (rows, outputs); got {tuple(raw.shape)}."
        )
    return raw.detach()


def _check_finite_output(arr: np.ndarray) -> None:
    if not np.isfinite(arr).all():
        raise ModelError(
            f"the model returned {int((~np.isfinite(arr)).sum())} NaN/Inf output(s); a surrogate "
            "cannot imitate non-finite scores."
        )


def output_names(
    model: Any,
    net: torch.nn.Module,
    labels: Sequence[str] | None,
    k: int,
    class_names: Sequence[str] | None,
) -> list[str]:
    """Names of the model's K outputs: ``class_names``, the bundled labels, a scikit-learn
    ``classes_``, else ``class 0`` ..."""
    for cand in (
        class_names,
        labels,
        getattr(model, "classes_", None),
        getattr(getattr(net, "fn", None), "__self__", None)
        and getattr(net.fn.__self__, "classes_", None),
    ):
        if cand is not None and len(cand) == k:
            return [str(c) for c in cand]
    if class_names is not None:
        raise InputError(f"class_names has {len(class_names)} names; the model has {k} outputs.")
    return [f"class {i}" for i in range(k)] if k > 1 else ["score"]


def make_task(design: Design, target: Any, task: str, softmax: bool = False) -> Task:
    """Classes (argmax of the outputs) or one score column, from ``target`` and ``task``;
    ``softmax``: scores are the softmax of the outputs (probabilities from logits)."""
    check_choice("task", task, ("auto", "class", "score"))
    check_choice("softmax", softmax, (False, True))
    if softmax:
        if design.out_train.shape[1] < 2:
            raise OptionError("softmax=True needs a model with several outputs (class logits).")
        design.out_train, design.out_test = _softmax(design.out_train), _softmax(design.out_test)
    k = design.out_train.shape[1]
    if target is not None:
        if task == "class":
            raise OptionError(
                "target= picks one score to regress; it cannot be combined with task='class'."
            )
        if isinstance(target, str):
            col = name_to_index(target, design.output_names)
        elif isinstance(target, (int, np.integer)) and not isinstance(target, bool):
            col = int(target)
        else:
            raise TargetError(
                f"target must be an output index or name ({', '.join(design.output_names)}); "
                f"got {target!r}."
            )
        if not -k <= col < k:
            raise TargetError(f"target {target!r} is out of range: the model has {k} output(s).")
        col %= k
        return Task(
            "score",
            col,
            [design.output_names[col]],
            design.out_train[:, col],
            design.out_test[:, col],
        )
    if k == 1 and task != "class":
        return Task(
            "score", 0, list(design.output_names), design.out_train[:, 0], design.out_test[:, 0]
        )
    if k == 1:  # the model returns labels: integers 0..C-1
        y_tr, y_te = design.out_train[:, 0], design.out_test[:, 0]
        both = np.concatenate([y_tr, y_te])
        if not np.array_equal(both, np.round(both)) or both.min() < 0:
            raise ModelError(
                "task='class' with a one-output model needs integer class labels 0..C-1 as outputs."
            )
        n_cls = int(both.max()) + 1
        names = [f"class {i}" for i in range(n_cls)]
        if design.label_names is not None:
            names = list(design.label_names)
        return Task("class", None, names, y_tr.astype(np.int64), y_te.astype(np.int64))
    if task == "score":
        raise OptionError(f"task='score' needs target= (which of the {k} outputs to regress).")
    return Task(
        "class",
        None,
        list(design.output_names),
        design.out_train.argmax(1),
        design.out_test.argmax(1),
    )


def _softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def label_indices(labels: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """True labels (indices or class names) as class indices."""
    if labels.dtype.kind in "iub" or (
        labels.dtype.kind == "f" and np.array_equal(labels, np.round(labels))
    ):
        idx = labels.astype(np.int64)
        if idx.min() < 0 or idx.max() >= len(names):
            raise InputError(
                f"labels must be class indices 0..{len(names) - 1} or class names; got values "
                f"from {idx.min()} to {idx.max()}."
            )
        return idx
    lookup = {n: i for i, n in enumerate(names)}
    bad = sorted({str(v) for v in labels if str(v) not in lookup})
    if bad:
        raise InputError(f"labels {', '.join(bad[:5])} are not class names ({', '.join(names)}).")
    return np.array([lookup[str(v)] for v in labels], dtype=np.int64)


# ----------------------------------------------------------------------------- the design


def prepare(
    model: Any,
    data: Any,
    *,
    features: Any = None,
    feature_names: Sequence[str] | None = None,
    test_data: Any = None,
    labels: Any = None,
    test_labels: Any = None,
    holdout: float = 0.25,
    neighbours: int = 0,
    neighbour_scale: float = 0.1,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int | None = None,
) -> Design:
    """Validate everything at the boundary and build the :class:`Design` (see the module documentation)."""
    if data is None:  # a bundled tabular demo carries its data
        if getattr(model, "X_train", None) is None:
            raise InputError(
                "data is required (rows to distil on); only a bundled tabular model carries its own."
            )
        data, test_data = model.X_train, model.X_test if test_data is None else test_data
        labels = model.y_train if labels is None else labels
        test_labels = model.y_test if test_labels is None else test_labels
    seed = check_int("seed", seed, minimum=0)
    neighbours = check_int(
        "neighbours", neighbours, minimum=0, hint="generated rows per training row"
    )
    neighbour_scale = check_float("neighbour_scale", neighbour_scale, minimum=0, strict=True)
    if test_data is None:
        holdout = check_float(
            "holdout", holdout, minimum=0, maximum=1, strict=True, hint="a fraction of the rows"
        )
    net, bundled_labels = unwrap_model(_named_columns(model) if features is None else model)
    rng = np.random.default_rng(seed)
    if isinstance(features, str):
        features = SegmentPresence(features)
    if isinstance(features, SegmentPresence):
        if test_data is not None or labels is not None or neighbours:
            raise OptionError(
                "with SegmentPresence the held-out rows are masked copies of the same images: "
                "test_data, labels and neighbours do not apply."
            )
        return _segment_design(
            net, model, data, features, bundled_labels, class_names, holdout, rng, batch_size
        )
    if features is not None and not callable(features):
        raise OptionError(
            "features must be None (the table's columns), a feature function rows -> (rows, F), "
            f"a segment spec like 'grid:4', or a SegmentPresence; got {type(features).__name__}."
        )
    if features is not None and neighbours:
        raise OptionError(
            "neighbours are generated in the table's columns; they need features=None."
        )

    sets = [data] if test_data is None else [data, test_data]
    zs, xs = [], []
    found_names: list[str] | None = None
    for i, d in enumerate(sets):
        what = "data" if i == 0 else "test_data"
        if features is None:
            z, cols = _as_table(d, what)
            x = torch.from_numpy(z)
            found_names = found_names or cols
        else:
            x = _as_input(d, what)
            try:
                raw = features(d)
            except Exception as exc:
                raise InputError(
                    f"the feature function failed on {what}: {type(exc).__name__}: {exc}"
                ) from exc
            z, cols = _as_table(raw, f"the feature function's output on {what}")
            if len(z) != len(x):
                raise InputError(
                    f"the feature function returned {len(z)} rows for {len(x)} inputs; "
                    "expected one row per input."
                )
            found_names = found_names or cols
        zs.append(z)
        xs.append(x)
    if len(zs) == 2 and zs[0].shape[1] != zs[1].shape[1]:
        raise InputError(
            f"data has {zs[0].shape[1]} features and test_data {zs[1].shape[1]}; they must match."
        )
    n_feat = zs[0].shape[1]
    if features is None:
        found_names = found_names or list(getattr(model, "feature_names", None) or []) or None
    else:
        found_names = found_names or getattr(features, "feature_names", None)
    names = _names(feature_names, found_names, n_feat, "feature_names")
    y = _check_labels(labels, len(zs[0]), "labels")
    y_test_given = _check_labels(test_labels, len(zs[1]), "test_labels") if len(zs) == 2 else None

    if len(zs) == 1:
        n = len(zs[0])
        n_test = int(round(holdout * n))
        if n - n_test < MIN_TRAIN or n_test < MIN_TEST:
            raise InputError(
                f"a surrogate needs at least {MIN_TRAIN} training and {MIN_TEST} held-out rows; "
                f"{n} rows with holdout={holdout} give {n - n_test} and {n_test}. Pass more rows "
                "(or test_data=)."
            )
        perm = rng.permutation(n)
        test_rows, train_rows = np.sort(perm[:n_test]), np.sort(perm[n_test:])
        z_tr, z_te = zs[0][train_rows], zs[0][test_rows]
        x_tr, x_te = xs[0][torch.from_numpy(train_rows)], xs[0][torch.from_numpy(test_rows)]
        labels_test = y[test_rows] if y is not None else None
    else:
        if len(zs[0]) < MIN_TRAIN or len(zs[1]) < MIN_TEST:
            raise InputError(
                f"a surrogate needs at least {MIN_TRAIN} training rows and {MIN_TEST} held-out rows; "
                f"got {len(zs[0])} and {len(zs[1])}."
            )
        train_rows = test_rows = None
        z_tr, z_te, x_tr, x_te = zs[0], zs[1], xs[0], xs[1]
        labels_test = y_test_given
    n_train = len(z_tr)
    if neighbours:
        scale = z_tr.std(0) * float(neighbour_scale)
        base = np.repeat(z_tr, neighbours, axis=0)
        extra = base + rng.standard_normal(base.shape) * scale
        z_tr = np.concatenate([z_tr, extra])
        x_tr = torch.from_numpy(z_tr)
    out_tr = _run(net, x_tr, batch_size)
    out_te = _run(net, x_te, batch_size)
    if out_tr.shape[1] != out_te.shape[1]:
        raise ModelError("the model returned a different number of outputs for the held-out rows.")
    outs = output_names(model, net, bundled_labels, out_tr.shape[1], class_names)
    binary = np.all((z_tr == 0) | (z_tr == 1), axis=0)
    return Design(
        z_tr,
        z_te,
        out_tr,
        out_te,
        names,
        binary,
        outs,
        n_train,
        len(z_tr) - n_train,
        train_rows,
        test_rows,
        labels_test,
        "columns" if features is None else "feature function",
    )


def _named_columns(model: Any) -> Any:
    """A scikit-learn model fitted on a DataFrame, called with DataFrames of its column names (it
    warns on bare arrays); any other model as given."""
    names = getattr(model, "feature_names_in_", None)
    fn = getattr(model, "predict_proba", None) or getattr(model, "predict", None)
    if names is None or isinstance(model, torch.nn.Module) or fn is None:
        return model
    import pandas as pd  # a model fitted on a DataFrame implies pandas

    def predict(a: np.ndarray) -> Any:
        return fn(pd.DataFrame(a, columns=names))

    return predict


def _run(net: torch.nn.Module, x: Tensor, batch_size: int | None) -> np.ndarray:
    xb = as_batch(x, net, ndim=None)
    return model_outputs(net, len(xb), lambda a, b: xb[a:b], xb[:1], batch_size)


def _segment_design(
    net: torch.nn.Module,
    model: Any,
    data: Any,
    spec: SegmentPresence,
    bundled_labels: Sequence[str] | None,
    class_names: Sequence[str] | None,
    holdout: float,
    rng: np.random.Generator,
    batch_size: int | None,
) -> Design:
    images = as_batch(_as_input(data, "data"), net, ndim=4)
    if spec.per_image and len(images) > 1:
        raise OptionError(
            f"segments={spec.segments!r} segments every image differently, so its features mean "
            "nothing across images: pass one image, or a fixed layout like 'grid:4' / 'patch:32'."
        )
    masker = ImageMasker(spec.segments, spec.baseline)
    zs, outs = [], []
    n_seg = None
    for i in range(len(images)):
        bound = masker.bind(images[i], i)
        if i == 0:
            first_ids = bound.feature_mask[0].detach().cpu()
        if n_seg is not None and bound.n_features != n_seg:
            raise InputError(
                f"image {i} has {bound.n_features} segments, image 0 has {n_seg}; use images of one size."
            )
        n_seg = bound.n_features
        z = rng.random((spec.samples, n_seg)) < spec.keep
        z[0] = True  # the image itself is one of the rows
        zt = torch.from_numpy(z).to(images.device)
        zeros = torch.zeros(spec.samples, dtype=torch.long, device=images.device)

        def build(
            a: int, b: int, bound: Any = bound, zt: Tensor = zt, zeros: Tensor = zeros
        ) -> Tensor:
            return bound.build(zt[a:b], zeros[a:b])

        outs.append(model_outputs(net, spec.samples, build, images[i : i + 1], batch_size))
        zs.append(z.astype(np.float64))
    z_all, out_all = np.concatenate(zs), np.concatenate(outs)
    n = len(z_all)
    n_test = int(round(holdout * n))
    if n - n_test < MIN_TRAIN or n_test < MIN_TEST:
        raise InputError(
            f"{n} masked copies with holdout={holdout} leave {n - n_test} training and {n_test} held-out "
            f"rows; a surrogate needs at least {MIN_TRAIN} and {MIN_TEST}: raise samples."
        )
    perm = rng.permutation(n)
    test_rows, train_rows = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    names = _segment_names(spec.segments, images[0], n_seg or 0)
    k = out_all.shape[1]
    return Design(
        z_all[train_rows],
        z_all[test_rows],
        out_all[train_rows],
        out_all[test_rows],
        names,
        np.ones(n_seg or 0, dtype=bool),
        output_names(model, net, bundled_labels, k, class_names),
        len(train_rows),
        0,
        train_rows,
        test_rows,
        None,
        f"segments {spec.segments}",
        presence=True,
        image=images[0].detach().cpu(),
        segments=first_ids,
    )


def _segment_names(segments: str, image: Tensor, m: int) -> list[str]:
    kind = segments.split(":")[0].strip().lower()
    if kind not in ("grid", "patch"):
        return [f"segment {i}" for i in range(m)]
    ncols = int(image_feature_mask(image, segments)[0].max()) + 1  # ids are row * ncols + column
    return [f"cell r{i // ncols} c{i % ncols}" for i in range(m)]
