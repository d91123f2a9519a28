"""Bundled tabular demos: scikit-learn's breast-cancer (classification) and diabetes (regression)
data with a small torch MLP, a scikit-learn gradient boosting model or an XGBoost model.

Models are trained on first use in a few seconds (deterministically from ``seed``, without
touching any global random state). The MLP's weights are cached under ``$PERSPICIO_CACHE``
(default ``$XDG_CACHE_HOME/perspicio`` or ``~/.cache/perspicio``) in ``tabular/`` as a tensors-only
state dict (``torch.load(weights_only=True)``). The XGBoost model is cached in XGBoost's own
UBJSON format (data, not code) with a sidecar recording its SHA-256 and its margins on the test
rows; a cached file whose hash or margins do not match is retrained and replaced. The gradient
boosting model is retrained on every call (under a second) and never cached: scikit-learn models
only serialise through pickle, and unpickling a file from a cache directory runs whatever code
whoever can write there put in it. Nothing downloads: both data sets ship with scikit-learn.

Also here: :func:`read_table` (CSV/Parquet rows for the command line),
:func:`load_model_file` (a user's model file, never unpickled unless asked to) and
:class:`OnnxModel` (an ONNX model run with onnxruntime).

    from perspicio.zoo.tabular import load_tabular
    demo = load_tabular("breast_cancer", "gbm")
    e = perspicio.explain(demo, demo.X_test[:5], method="kernel_shap", background=demo.background())
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..core.blackbox import onnx_output_name
from ..errors import InputError, ModelError, UnknownNameError, suggest

DATASETS = {"breast_cancer": "classification", "diabetes": "regression"}
MODEL_KINDS = ("mlp", "gbm", "xgb")
CACHE_VERSION = 1


def cache_dir() -> Path:
    """Root of perspicio's cache: $PERSPICIO_CACHE, else $XDG_CACHE_HOME/perspicio, else ~/.cache/perspicio."""
    env = os.environ.get("PERSPICIO_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "perspicio"


@dataclass(frozen=True, eq=False)
class TabularModel:
    """A trained demo model with its data; usable directly as ``perspicio.explain(demo, rows, ...)``.

    ``model`` is an ``nn.Module`` taking raw feature rows (N, F) (the MLP standardises
    internally; the gradient boosting model is wrapped in a :class:`~perspicio.core.blackbox.BlackBox`
    returning class probabilities or the regression prediction). ``estimator`` is the
    scikit-learn model (None for the MLP).
    """

    model: nn.Module
    estimator: Any
    X_train: np.ndarray
    X_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray
    feature_names: tuple[str, ...]
    labels: tuple[str, ...]
    task: str
    name: str

    def background(self, size: int = 100, seed: int = 0) -> np.ndarray:
        """``size`` training rows chosen with ``seed`` (the whole training set if smaller)."""
        if size >= len(self.X_train):
            return self.X_train.copy()
        rng = np.random.default_rng(seed)
        return self.X_train[np.sort(rng.choice(len(self.X_train), size=size, replace=False))]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Model outputs (N, K) as numpy (probabilities or logits for the MLP, see ``output``)."""
        with torch.no_grad():
            return self.model(torch.as_tensor(np.asarray(x))).double().cpu().numpy()

    def score(self) -> float:
        """Test accuracy (classification) or R^2 (regression)."""
        out = self.predict(self.X_test)
        if self.task == "classification":
            return float((out.argmax(1) == self.y_test).mean())
        y = self.y_test
        return float(1 - ((out[:, 0] - y) ** 2).sum() / ((y - y.mean()) ** 2).sum())

    def __repr__(self) -> str:
        return f"TabularModel(name={self.name!r}, task={self.task}, features={len(self.feature_names)})"


class TabularMLP(nn.Module):
    """Standardise -> Linear(F, 64) -> ReLU -> Linear(64, 32) -> ReLU -> Linear(32, K) -> unscale.

    Classification outputs logits; regression outputs the prediction in the target's units.
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        mean: Tensor,
        std: Tensor,
        y_mean: float = 0.0,
        y_std: float = 1.0,
    ) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float())
        self.register_buffer("y_mean", torch.tensor(float(y_mean)))
        self.register_buffer("y_std", torch.tensor(float(y_std)))
        self.net = nn.Sequential(
            nn.Linear(n_in, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, n_out)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.mean.dtype)
        return self.net((x - self.mean) / self.std) * self.y_std + self.y_mean


def _load_data(dataset: str, seed: int) -> tuple[np.ndarray, ...]:
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    if dataset == "breast_cancer":
        d = datasets.load_breast_cancer()
        labels = tuple(str(n) for n in d.target_names)
        strat = d.target
    else:
        d = datasets.load_diabetes()
        labels = ("target",)
        strat = None
    x_tr, x_te, y_tr, y_te = train_test_split(
        d.data.astype(np.float64), d.target, test_size=0.2, random_state=seed, stratify=strat
    )
    return x_tr, x_te, y_tr, y_te, tuple(str(n) for n in d.feature_names), labels


def _train_mlp(
    x: np.ndarray, y: np.ndarray, task: str, seed: int, epochs: int | None = None
) -> TabularMLP:
    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # tiny full-batch steps: one thread is fastest and immune to contention
    try:
        return _fit_mlp(x, y, task, seed, epochs or (200 if task == "classification" else 60))
    finally:
        torch.set_num_threads(threads)


def _fit_mlp(x: np.ndarray, y: np.ndarray, task: str, seed: int, epochs: int) -> TabularMLP:
    g = torch.Generator().manual_seed(seed)
    xt = torch.as_tensor(x, dtype=torch.float32)
    mean, std = xt.mean(0), xt.std(0).clamp_min(1e-6)
    if task == "classification":
        n_out, y_mean, y_std = int(y.max()) + 1, 0.0, 1.0
    else:
        n_out, y_mean, y_std = 1, float(y.mean()), float(y.std())
    model = TabularMLP(x.shape[1], n_out, mean, std, y_mean, y_std)
    with torch.no_grad():  # local-generator init (no global seeding)
        for mod in model.net:
            if isinstance(mod, nn.Linear):
                bound = 1.0 / mod.in_features**0.5
                mod.weight.copy_(
                    (torch.rand(mod.weight.shape, generator=g) * 2 - 1) * bound * 3**0.5
                )
                mod.bias.zero_()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    target = torch.as_tensor(y, dtype=torch.long if task == "classification" else torch.float32)
    model.train()
    for _ in range(epochs):
        opt.zero_grad()
        out = model(xt)
        if task == "classification":
            loss = nn.functional.cross_entropy(out, target)
        else:
            loss = nn.functional.mse_loss((out[:, 0] - y_mean) / y_std, (target - y_mean) / y_std)
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _train_gbm(x: np.ndarray, y: np.ndarray, task: str, seed: int) -> Any:
    from sklearn.ensemble import GradientBoostingClassifier, GradientBoostingRegressor

    cls = GradientBoostingClassifier if task == "classification" else GradientBoostingRegressor
    return cls(n_estimators=100, max_depth=3, learning_rate=0.1, random_state=seed).fit(x, y)


def _train_xgb(x: np.ndarray, y: np.ndarray, task: str, seed: int) -> Any:
    import xgboost

    cls = xgboost.XGBClassifier if task == "classification" else xgboost.XGBRegressor
    return cls(
        n_estimators=100,
        max_depth=4,
        learning_rate=0.1,
        tree_method="hist",
        n_jobs=1,
        random_state=seed,
    ).fit(x, y)


def _xgb_margins(model: Any, x: np.ndarray) -> np.ndarray:
    import xgboost

    booster = model.get_booster()
    return np.asarray(
        booster.predict(xgboost.DMatrix(x), output_margin=True), dtype=np.float64
    ).reshape(len(x), -1)


def _cached_xgb(
    path: Path,
    x_tr: np.ndarray,
    y_tr: np.ndarray,
    x_te: np.ndarray,
    task: str,
    seed: int,
    cache: bool,
) -> Any:
    """The XGBoost demo from its verified UBJSON cache, else trained (and cached when ``cache``)."""
    import hashlib
    import json

    import xgboost

    cls = xgboost.XGBClassifier if task == "classification" else xgboost.XGBRegressor
    meta_path = path.with_suffix(".json")
    if cache and path.is_file() and meta_path.is_file():
        try:
            raw = path.read_bytes()
            meta = json.loads(meta_path.read_text())
            if hashlib.sha256(raw).hexdigest() == meta["sha256"]:
                model = cls()
                model.load_model(bytearray(raw))  # UBJSON: parsed as data, no code runs
                if np.array_equal(
                    _xgb_margins(model, x_te), np.asarray(meta["test_margins"], dtype=np.float64)
                ):
                    return model
        except Exception:  # noqa: BLE001 - a stale, corrupt or foreign cache entry is retrained
            pass
    model = _train_xgb(x_tr, y_tr, task, seed)
    if cache:
        raw = bytes(model.get_booster().save_raw("ubj"))
        meta = {
            "sha256": hashlib.sha256(raw).hexdigest(),
            "xgboost": xgboost.__version__,
            "test_margins": _xgb_margins(model, x_te).tolist(),
        }
        _atomic_write(path, raw)
        _atomic_write(meta_path, json.dumps(meta).encode())
    return model


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def load_tabular(
    dataset: str = "breast_cancer", model: str = "mlp", *, seed: int = 0, cache: bool = True
) -> TabularModel:
    """The demo ``model`` (``"mlp"``, ``"gbm"`` or ``"xgb"``) trained on ``dataset``
    (``"breast_cancer"`` or ``"diabetes"``).

    The MLP is trained on the first call (seconds) and its weights cached; later calls load them
    (tensors only). The XGBoost model is cached as UBJSON and verified (hash and test-set margins)
    when read. ``cache=False`` trains in memory only. The gradient boosting model is always
    retrained (deterministic, under a second): it is never read from, or written to, the cache.
    Needs scikit-learn (``pip install 'perspicio[tabular]'``; also xgboost for ``"xgb"``).
    """
    from ..core.blackbox import BlackBox

    key = str(dataset).strip().lower().replace("-", "_")
    if key not in DATASETS:
        raise UnknownNameError(
            f"unknown tabular dataset {dataset!r}; expected one of: {', '.join(DATASETS)}."
            + suggest(key, DATASETS)
        )
    kind = str(model).strip().lower()
    if kind not in MODEL_KINDS:
        raise UnknownNameError(
            f"unknown tabular model {model!r}; expected one of: {', '.join(MODEL_KINDS)}."
            + suggest(kind, MODEL_KINDS)
        )
    task = DATASETS[key]
    require_tabular(xgboost=kind == "xgb")
    x_tr, x_te, y_tr, y_te, names, labels = _load_data(key, seed)
    import sklearn

    stem = f"{key}_{kind}_seed{seed}_v{CACHE_VERSION}_sklearn{sklearn.__version__}"
    path = cache_dir() / "tabular" / (stem + ".pt")
    estimator = None
    if kind == "mlp":
        net: nn.Module | None = None
        if cache and path.is_file():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                n_out = state["net.4.weight"].shape[0]
                net = TabularMLP(x_tr.shape[1], n_out, state["mean"], state["std"])
                net.load_state_dict(state)
                net.eval().requires_grad_(False)
            except Exception:  # noqa: BLE001 - a stale or corrupt cache is retrained
                net = None
        if net is None:
            net = _train_mlp(x_tr, y_tr, task, seed)
            if cache:
                import io

                buf = io.BytesIO()
                torch.save(net.state_dict(), buf)
                _atomic_write(path, buf.getvalue())
        wrapped: nn.Module = net
    elif kind == "xgb":
        import xgboost

        estimator = _cached_xgb(
            path.with_name(f"{stem}_xgboost{xgboost.__version__}.ubj"),
            x_tr,
            y_tr,
            x_te,
            task,
            seed,
            cache,
        )
        wrapped = BlackBox(
            estimator.predict_proba if task == "classification" else estimator.predict
        )
    else:  # retrained, never unpickled (see the module documentation); bit-identical for a seed
        estimator = _train_gbm(x_tr, y_tr, task, seed)
        wrapped = BlackBox(
            estimator.predict_proba if task == "classification" else estimator.predict
        )
    return TabularModel(
        model=wrapped,
        estimator=estimator,
        X_train=x_tr,
        X_test=x_te,
        y_train=y_tr,
        y_test=y_te,
        feature_names=names,
        labels=labels,
        task=task,
        name=f"{key}/{kind}",
    )


def require_tabular(*, xgboost: bool = False, what: str = "the tabular demo") -> None:
    """Raise a one-line :class:`~perspicio.errors.ModelError` naming the extra to install when
    scikit-learn (or xgboost) is missing, instead of a bare ModuleNotFoundError deep inside."""
    missing = []
    for module, needed in (("sklearn", True), ("xgboost", xgboost)):
        if needed:
            try:
                __import__(module)
            except ImportError:
                missing.append(module)
    if missing:
        pkgs = " and ".join({"sklearn": "scikit-learn"}.get(m, m) for m in missing)
        raise ModelError(f"{what} needs {pkgs}: pip install 'perspicio[tabular]'.")


def datasets() -> Sequence[str]:
    return list(DATASETS)


# ----------------------------------------------------------------------------- user files

PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".sav")


def csv_rows(path: Path, delimiter: str = ",") -> list[list[str]]:
    """The rows of a UTF-8 (optionally BOM-prefixed) CSV file; an :class:`InputError` for other
    encodings or malformed CSV, naming the file and the first bad byte."""
    import csv

    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            return list(csv.reader(fh, delimiter=delimiter))
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path.name} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
            "save it as UTF-8 CSV."
        ) from None
    except csv.Error as exc:
        raise InputError(f"{path.name} is not a readable CSV file: {exc}.") from None


def read_table(path: str | os.PathLike[str]) -> tuple[np.ndarray, list[str]]:
    """Rows (N, C) as float64 and the column names of a CSV (header row; empty/NA cells are NaN)
    or Parquet file (needs pandas and pyarrow). A non-numeric column raises InputError naming it."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"data file {str(p)!r} does not exist.")
    suffix = p.suffix.lower()
    if suffix in (".parquet", ".pq"):
        try:
            import pandas as pd

            frame = pd.read_parquet(p)
        except ImportError as exc:
            raise InputError(
                f"reading {p.name} needs pandas and pyarrow: pip install pandas pyarrow ({exc})."
            ) from None
        cols = [str(c) for c in frame.columns]
        bad = [
            c
            for c, t in zip(cols, frame.dtypes)
            if not (np.issubdtype(t, np.number) or np.issubdtype(t, np.bool_))
        ]
        if bad:
            raise InputError(
                f"{p.name}: column(s) {', '.join(bad)} are not numeric; encode them as numbers first."
            )
        return frame.to_numpy(dtype=np.float64, na_value=np.nan), cols
    if suffix not in (".csv", ".tsv", ".txt"):
        raise InputError(f"cannot read {p.name}: expected a .csv or .parquet file.")
    rows = csv_rows(p, delimiter="\t" if suffix == ".tsv" else ",")
    if len(rows) < 2:
        raise InputError(f"{p.name} has no data rows under its header.")
    cols = [c.strip() for c in rows[0]]
    out = np.empty((len(rows) - 1, len(cols)))
    missing = {"", "na", "nan", "null", "none", "?"}
    for i, row in enumerate(rows[1:]):
        if len(row) != len(cols):
            raise InputError(f"{p.name}, line {i + 2}: {len(row)} fields for {len(cols)} columns.")
        for j, cell in enumerate(row):
            cell = cell.strip()
            try:
                out[i, j] = np.nan if cell.lower() in missing else float(cell)
            except ValueError:
                raise InputError(
                    f"{p.name}, line {i + 2}: column {cols[j]!r} has the non-numeric value {cell!r}; "
                    "encode it as a number first."
                ) from None
    return out, cols


def load_model_file(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> Any:
    """A user's model file: XGBoost ``.json``/``.ubj``, LightGBM text models and ONNX tree ensembles
    are read as data (a :class:`~perspicio.trees.TreeEnsemble`, explained exactly by tree_shap);
    any other ``.onnx`` model becomes an :class:`OnnxModel` (run with onnxruntime, a black box for
    the sampling methods); a pickle (``.pkl``, ``.joblib``...) is loaded only with
    ``trust_pickle=True`` (unpickling runs code stored in the file), with a warning."""
    import warnings

    from ..trees.readers import read_model

    p = Path(path)
    if not p.is_file():
        raise ModelError(f"model file {str(p)!r} does not exist.")
    suffix = p.suffix.lower()
    if suffix == ".onnx":
        from ..trees.onnx_reader import is_tree_model, read_onnx

        return read_onnx(p) if is_tree_model(p) else OnnxModel(p)
    if suffix in PICKLE_SUFFIXES:
        if not trust_pickle:
            raise ModelError(
                f"{p.name} is a pickle: loading it runs whatever code the file contains. If you trust it, "
                "pass --trust-pickle; better, save the model as XGBoost JSON/UBJSON or LightGBM text."
            )
        warnings.warn(
            f"unpickling {p.name} (--trust-pickle): this runs code stored in the file.",
            stacklevel=2,
        )
        if suffix == ".joblib":
            try:
                import joblib
            except ImportError:
                raise ModelError(f"loading {p.name} needs joblib (pip install joblib).") from None
            return joblib.load(p)
        import pickle

        with p.open("rb") as fh:
            return pickle.load(fh)  # noqa: S301 - explicitly trusted by the user (--trust-pickle)
    return read_model(p)


ORT_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64}


class OnnxModel:
    """An ONNX model run with onnxruntime on the CPU, as a callable on (N, F) rows returning the
    explained output (N, K) as float64 - a black box for kernel_shap, LIME and the other sampling
    methods (tree ensembles are read exactly instead: :func:`perspicio.trees.onnx_reader.read_onnx`).

    The explained output is the graph's floating-point tensor output, preferring one whose name
    contains "prob"; a ZipMap (scikit-learn converters' list of {class: probability} dicts) is
    replaced by the tensor it is built from, and its class labels become :attr:`labels`.

    Attributes:
        n_features: the input's declared column count (None if not declared).
        labels: class labels from a ZipMap, else None.
        output_name: the graph output that is explained.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from ..trees.onnx_reader import INSTALL, load_proto

        try:
            import onnxruntime
        except ImportError:
            raise ModelError(f"running ONNX models needs onnxruntime: {INSTALL}.") from None
        import onnx

        model, name = load_proto(path)
        self.name = name
        self.labels: tuple[str, ...] | None = None
        graph = model.graph
        for node in graph.node:
            if node.op_type == "ZipMap" and node.output[0] in {o.name for o in graph.output}:
                graph.output.append(onnx.ValueInfoProto(name=node.input[0]))
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                raw = attrs.get("classlabels_int64s") or attrs.get("classlabels_strings") or []
                self.labels = tuple(v.decode() if isinstance(v, bytes) else str(v) for v in raw)
        try:
            self.session = onnxruntime.InferenceSession(
                model.SerializeToString(), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own error types
            raise ModelError(
                f"onnxruntime cannot load {name}: {str(exc).splitlines()[0][:300]}"
            ) from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(
                f"{name} has {len(inputs)} inputs; a tabular model takes one (N, features) input."
            )
        inp = inputs[0]
        if inp.type not in ORT_FLOAT_TYPES or len(inp.shape) != 2:
            raise ModelError(
                f"{name}: the input {inp.name!r} is {inp.type} of shape {inp.shape}; a tabular model "
                "takes a float or double (N, features) tensor."
            )
        self.input_name = inp.name
        self.input_dtype = ORT_FLOAT_TYPES[inp.type]
        f = inp.shape[1]
        self.n_features: int | None = f if isinstance(f, int) and f > 0 else None
        # the float output, probabilities preferred (the ZipMap's tensor was made an output above)
        self.output_name = onnx_output_name(self.session, zipmap_hint=False)
        if self.labels is not None and "prob" not in self.output_name.lower():
            self.labels = None

    def __call__(self, rows: Any) -> np.ndarray:
        x = np.asarray(rows, dtype=self.input_dtype)
        if x.ndim == 1:
            x = x[None]
        out = self.session.run([self.output_name], {self.input_name: x})[0]
        out = np.asarray(out, dtype=np.float64)
        return out.reshape(len(x), -1)

    def __repr__(self) -> str:
        return f"OnnxModel({self.name}, output {self.output_name!r})"
