"""The tabular tab's work, run inside a worker process: the bundled tabular demos, one row's
prediction and attributions, and the plots of :mod:`perspicio.viz.shap_plots` as PNG.

Tree models are explained with ``tree_shap``, whose numba kernels compile once per process (tens of
seconds on a busy machine). :class:`TreeWarmup` compiles them in a background thread as soon as the
worker starts, so the first tabular request usually finds them ready; a request that arrives
earlier waits for the compilation and reports it as progress ("compiling the TreeSHAP kernels").
The MLP is explained with ``deeplift`` against the mean of 100 training rows (exact additivity,
one backward pass for all test rows; ``kernel_shap`` takes seconds per row).

Every test row of a model is explained once per worker (all rows at once: the beeswarm needs them
all); a request for one row then only draws its plots.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import InputError, UnknownNameError, suggest

Progress = Callable[[dict[str, Any]], None]

#: model id -> (dataset, demo kind, attribution method)
TABULAR_MODELS: dict[str, tuple[str, str, str]] = {
    "breast_cancer_xgb": ("breast_cancer", "xgb", "tree_shap"),
    "breast_cancer_gbm": ("breast_cancer", "gbm", "tree_shap"),
    "breast_cancer_mlp": ("breast_cancer", "mlp", "deeplift"),
}

DESCRIPTIONS = {
    "breast_cancer_xgb": "XGBoost, breast cancer (TreeSHAP)",
    "breast_cancer_gbm": "scikit-learn gradient boosting, breast cancer (TreeSHAP)",
    "breast_cancer_mlp": "torch MLP, breast cancer (DeepLIFT)",
}

#: features drawn in the waterfall and beeswarm (the rest summed / left out)
MAX_DISPLAY = 10


def available_models() -> list[str]:
    """Model ids whose packages are installed (scikit-learn; xgboost for the XGBoost demo; numba
    for TreeSHAP)."""
    has = {m: importlib.util.find_spec(m) is not None for m in ("sklearn", "xgboost", "numba")}
    out = []
    for model_id, (_, kind, method) in TABULAR_MODELS.items():
        if not has["sklearn"] or (kind == "xgb" and not has["xgboost"]):
            continue
        if method == "tree_shap" and not has["numba"]:
            continue
        out.append(model_id)
    return out


def check_listed(model_id: str, models: list[str], kind: str) -> str:
    """``model_id`` if it is in ``models``, else an UnknownNameError naming the ``kind`` of model
    (shared by the tabular and text tabs)."""
    if model_id not in models:
        raise UnknownNameError(
            f"unknown {kind} model {model_id!r}; this server has: {', '.join(models) or 'none'}."
            + suggest(model_id, models)
        )
    return model_id


def check_model(model_id: str) -> str:
    """``model_id`` if it is an available tabular demo, else an UnknownNameError."""
    return check_listed(model_id, available_models(), "tabular")


def fig_png(fig: Any) -> str:
    """A matplotlib figure as base64 PNG (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class TreeWarmup:
    """Compiles the TreeSHAP kernels in a background thread: one tree_shap call on a small
    gradient boosting demo. ``state`` is ``"idle"``, ``"compiling"``, ``"ready"`` or ``"failed"``."""

    def __init__(self) -> None:
        self.state = "idle"
        self.started: float | None = None
        self.seconds: float | None = None
        self.error = ""
        self.done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        if "breast_cancer_gbm" not in available_models():
            self.state, self.error = "failed", "scikit-learn or numba is not installed."
            self.done.set()
            return
        self.state, self.started = "compiling", time.monotonic()
        self._thread = threading.Thread(target=self._run, name="perspicio-tree-warmup", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import perspicio

        from ..zoo.tabular import load_tabular

        try:
            demo = load_tabular("breast_cancer", "gbm")
            perspicio.explain(demo, demo.X_test[:2], method="tree_shap")
        except Exception as exc:  # noqa: BLE001 - reported in the status and to the next request
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
        else:
            self.state = "ready"
        self.seconds = time.monotonic() - (self.started or time.monotonic())
        self.done.set()

    def info(self) -> dict[str, Any]:
        elapsed = (
            self.seconds
            if self.seconds is not None
            else (time.monotonic() - self.started if self.started is not None else 0.0)
        )
        return {"state": self.state, "seconds": round(float(elapsed), 1), "error": self.error}

    def wait(self, progress: Progress) -> float:
        """Block until the kernels are compiled (starting the compilation if needed), reporting
        progress every second; returns the seconds waited."""
        self.start()
        t0 = time.monotonic()
        while not self.done.wait(1.0):
            progress(
                {
                    "stage": "compiling the TreeSHAP kernels (once per worker)",
                    "seconds": round(time.monotonic() - (self.started or t0), 1),
                }
            )
        return time.monotonic() - t0


class TabularWork:
    """The tabular demos of one worker and their explanations of every test row (kept)."""

    def __init__(self, warmup: TreeWarmup) -> None:
        self.warmup = warmup
        self.demos: dict[str, Any] = {}
        self.explained: dict[str, Any] = {}

    def demo(self, model_id: str) -> Any:
        check_model(model_id)
        if model_id not in self.demos:
            from ..zoo.tabular import load_tabular

            dataset, kind, _ = TABULAR_MODELS[model_id]
            self.demos[model_id] = load_tabular(dataset, kind)
        return self.demos[model_id]

    def status(self, payload: dict[str, Any], progress: Progress) -> dict[str, Any]:
        return {"tree_kernels": self.warmup.info()}

    def rows(self, payload: dict[str, Any], progress: Progress) -> dict[str, Any]:
        model_id = payload["model"]
        progress({"stage": f"loading {model_id}"})
        d = self.demo(model_id)
        proba = probabilities(d, d.X_test)
        return {
            "model": model_id,
            "method": TABULAR_MODELS[model_id][2],
            "features": list(d.feature_names),
            "labels": list(d.labels),
            "rows": [
                {
                    "row": i,
                    "true": d.labels[int(d.y_test[i])],
                    "predicted": d.labels[int(proba[i].argmax())],
                    "values": [float(v) for v in d.X_test[i]],
                }
                for i in range(len(d.X_test))
            ],
        }

    def _explain_all(self, model_id: str, progress: Progress) -> tuple[Any, float]:
        import perspicio

        waited = 0.0
        if model_id not in self.explained:
            d = self.demo(model_id)
            method = TABULAR_MODELS[model_id][2]
            if method == "tree_shap":
                waited = self.warmup.wait(progress)
                if self.warmup.state == "failed":
                    raise InputError(f"TreeSHAP is not available here: {self.warmup.error}")
                opts: dict[str, Any] = {}
            else:
                opts = {"baseline": d.background(100).mean(0, keepdims=True), "target": 1}
            progress({"stage": f"{method} on {len(d.X_test)} test rows"})
            self.explained[model_id] = perspicio.explain(d, d.X_test, method=method, **opts)
        return self.explained[model_id], waited

    def explain(self, payload: dict[str, Any], progress: Progress) -> dict[str, Any]:
        from ..viz import shap_plots

        model_id, row = payload["model"], int(payload["row"])
        d = self.demo(model_id)
        n = len(d.X_test)
        if not 0 <= row < n:
            raise InputError(f"row {row} is out of range: the test set has rows 0 to {n - 1}.")
        t0 = time.monotonic()
        e, waited = self._explain_all(model_id, progress)
        progress({"stage": "drawing the plots"})
        names = list(d.feature_names)
        values, _, _ = shap_plots.feature_table(e, names)
        proba = probabilities(d, d.X_test[row : row + 1])[0]
        base = float(e.base_value[row]) if e.base_value is not None else None
        method = TABULAR_MODELS[model_id][2]
        target = d.labels[-1]  # tree margins and the MLP's target 1 are both this class
        out = {
            "model": model_id,
            "row": row,
            "method": method,
            "explained": f"{'log-odds' if method == 'tree_shap' else 'logit'} of {target}",
            "true": d.labels[int(d.y_test[row])],
            "probabilities": {lab: float(p) for lab, p in zip(d.labels, proba)},
            "score": float(e.scores[row]),
            "base_value": base,
            "features": [
                {"name": nm, "value": float(d.X_test[row, j]), "attribution": float(values[row, j])}
                for j, nm in enumerate(names)
            ],
            "mean_abs": {nm: float(np.abs(values[:, j]).mean()) for j, nm in enumerate(names)},
            "images": {
                "waterfall": fig_png(
                    shap_plots.waterfall(e, row, max_display=MAX_DISPLAY, feature_names=names)
                ),
                "force": fig_png(shap_plots.force(e, row, feature_names=names)),
                "beeswarm": fig_png(
                    shap_plots.beeswarm(e, max_display=MAX_DISPLAY, feature_names=names)
                ),
            },
            "waited_for_compile": round(waited, 1),
            "seconds": round(time.monotonic() - t0, 2),
            "cli": f"perspicio explain-tabular --model {model_id} --method {method} --rows {row}",
        }
        return out


def probabilities(d: Any, x: np.ndarray) -> np.ndarray:
    """Class probabilities (N, K) of a classification demo: its outputs if they already are
    probabilities (the tree demos), else their softmax (the MLP's logits)."""
    out = d.predict(x)
    if out.min() >= 0 and np.allclose(out.sum(1), 1.0, atol=1e-6):
        return out
    z = np.exp(out - out.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)
