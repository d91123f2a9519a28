"""What a worker process does: load each model once, then predict, list layers, explain, compare.

Every function here runs inside a worker process of :class:`~perspicio.serve.pool.WorkerPool`
and uses only perspicio's public Python API (``perspicio.explain``, ``metrics.compare``, the zoo,
the registry), so a result of the app is the result of the Python API for the same input. The
answers are plain JSON-ready dicts (images as base64 PNG, maps as base64 float32).
"""

from __future__ import annotations

import base64
import contextlib
import io
import math
import re
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import InputError, LayerError, PerspicioError, TargetError, suggest

#: the faithfulness metrics the trust table runs (cheap: a few dozen forward passes each) plus one
#: complexity score that needs no model pass
TRUST_METRICS = ("deletion", "insertion", "average_drop", "sparseness")

#: metric options of the trust table: 25 points per curve instead of 100 (4x fewer model passes;
#: the CLI line the page shows passes the same options, so the ranking is reproduced exactly)
TRUST_METRIC_OPTIONS = {"deletion": {"steps": 25}, "insertion": {"steps": 25}}

#: colour maps: unsigned maps (CAMs, absolute gradients) sequential, signed maps diverging around 0
UNSIGNED_CMAP = "jet"
SIGNED_CMAP = "RdBu_r"

Progress = Callable[[dict[str, Any]], None]


def b64_png(array: np.ndarray) -> str:
    """An (H, W, 3|4) uint8 array as a base64 PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def cmap_stops(name: str, n: int = 11) -> list[str]:
    """``n`` evenly spaced colours of a matplotlib colour map as #rrggbb (the page's legend)."""
    from matplotlib import colormaps

    rgba = colormaps[name](np.linspace(0.0, 1.0, n))
    return ["#" + "".join(f"{int(round(c * 255)):02x}" for c in row[:3]) for row in rgba]


def cli_line(
    command: str,
    image: str,
    model: str,
    methods: Sequence[str],
    target: int | None,
    layer: str | None,
    metrics: Sequence[str] = (),
    metric_options: dict[str, dict[str, Any]] | None = None,
    method_options: dict[str, dict[str, Any]] | None = None,
) -> str:
    """The ``perspicio explain``/``compare`` command that reproduces a view of the page."""
    parts = ["perspicio", command, image, "--model", model]
    parts += ["--method" if command == "explain" else "--methods", ",".join(methods)]
    if metrics:
        parts += ["--metrics", ",".join(metrics)]
    for flag, table in (("--metric-option", metric_options), ("--method-option", method_options)):
        for name, opts in (table or {}).items():
            for key, value in opts.items():
                parts += [flag, f"{name}.{key}={value}"]
    if target is not None:
        parts += ["--target", str(target)]
    if layer:
        parts += ["--layer", layer]
    return " ".join(shlex.quote(p) for p in parts)


class WorkerState:
    """The models of one worker, each loaded once on first use (and kept for the process)."""

    def __init__(self, models: dict[str, str], warmup: Any = None) -> None:
        from .tabular import TabularWork, TreeWarmup
        from .text import TextWork

        self.specs = dict(models)
        self.loaded: dict[str, Any] = {}
        self.layer_lists: dict[str, dict[str, Any]] = {}
        self.tabular = TabularWork(warmup if warmup is not None else TreeWarmup())
        self.text = TextWork()

    def model(self, model_id: str) -> Any:
        if model_id not in self.specs:
            raise InputError(
                f"unknown model {model_id!r}; this server has: {', '.join(self.specs)}."
                + suggest(model_id, list(self.specs))
            )
        if model_id not in self.loaded:
            from ..zoo.sources import resolve_model

            try:
                self.loaded[model_id] = resolve_model(self.specs[model_id], device="cpu")
            except PerspicioError as exc:  # the message without the server's cache folders
                exc.args = (hide_cache_paths(str(exc)),)
                raise
        return self.loaded[model_id]

    # ------------------------------------------------------------------ jobs

    def run(self, kind: str, payload: dict[str, Any], progress: Progress) -> dict[str, Any]:
        handler = {
            "predict": self.predict,
            "layers": self.layers,
            "explain": self.explain,
            "compare": self.compare,
            "labels": self.labels,
            "tabular_status": self.tabular.status,
            "tabular_rows": self.tabular.rows,
            "tabular_explain": self.tabular.explain,
            "text_explain": self.text.explain,
            "text_lines": self.text.lines,
        }.get(kind)
        if handler is None:
            raise InputError(f"unknown job kind {kind!r}")
        return handler(payload, progress)

    def labels(self, payload: dict[str, Any], progress: Progress) -> dict[str, Any]:
        zm = self.model(payload["model"])
        return {"model": payload["model"], "labels": [str(v) for v in zm.labels]}

    def _batch(self, zm: Any, pixels: np.ndarray) -> Any:
        from PIL import Image

        return zm.preprocess(Image.fromarray(pixels))

    def _logits(self, zm: Any, x: Any) -> Any:
        import torch

        from ..core.guard import model_guard

        with torch.no_grad(), model_guard(zm.model):
            out = zm.model(x)
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            raise InputError(
                "the app explains classifiers: the model must return (N, classes) scores."
            )
        return out

    def predict(self, payload: dict[str, Any], progress: Progress) -> dict[str, Any]:
        zm = self.model(payload["model"])
        x = self._batch(zm, payload["pixels"])
        probs = self._logits(zm, x).softmax(dim=1)[0]
        top = probs.topk(min(5, probs.numel()))
        return {
            "model": payload["model"],
            "top": [
                {
                    "index": int(i),
                    "label": str(zm.labels[int(i)]) if int(i) < len(zm.labels) else str(int(i)),
                    "probability": float(p),
                }
                for p, i in zip(top.values.tolist(), top.indices.tolist())
            ],
        }

    def layers(self, payload: dict[str, Any], progress: Progress) -> dict[str, Any]:
        model_id = payload["model"]
        if model_id in self.layer_lists:
            return self.layer_lists[model_id]
        import torch

        from ..core.capture import auto_layer, is_spatial, trace_layers

        zm = self.model(model_id)
        size = tuple(getattr(zm.preprocess, "size", (224, 224)))
        x = torch.zeros(1, 3, *size)
        infos = trace_layers(zm.model, x)
        default = auto_layer(zm.model, x)
        out = {
            "model": model_id,
            "default": default,
            "layers": [
                {
                    "name": i.name,
                    "kind": i.kind,
                    "shape": list(i.shape or ()),
                    "default": i.name == default,
                }
                for i in infos
                if is_spatial(i.shape)
            ],
        }
        self.layer_lists[model_id] = out
        return out

    def _target(self, zm: Any, x: Any, spec: Any) -> tuple[int, str]:
        from ..core.targets import name_to_index

        logits = self._logits(zm, x)
        n = logits.shape[1]
        if spec is None or spec == "":
            index = int(logits[0].argmax())
        elif isinstance(spec, int) or (
            isinstance(spec, str) and spec.strip().lstrip("-").isdigit()
        ):
            index = int(spec)
            if not 0 <= index < n:
                raise TargetError(
                    f"target {index} is out of range: the model has {n} classes (0..{n - 1})."
                )
        else:
            index = name_to_index(str(spec), list(zm.labels))
        name = str(zm.labels[index]) if index < len(zm.labels) else str(index)
        return index, name

    def _layer(self, zm: Any, layer: str | None) -> str | None:
        if not layer:
            return None
        names = [n for n, _ in zm.model.named_modules() if n]
        if layer not in names:
            raise LayerError(f"unknown layer {layer!r}." + suggest(layer, names))
        return layer

    def explain(self, payload: dict[str, Any], progress: Progress) -> dict[str, Any]:
        from PIL import Image

        from .. import explain as run_explain
        from ..core.registry import METHODS

        zm = self.model(payload["model"])
        pixels = payload["pixels"]
        x = self._batch(zm, pixels)
        index, name = self._target(zm, x, payload.get("target"))
        layer = self._layer(zm, payload.get("layer"))
        methods = list(payload["methods"])
        results: list[dict[str, Any]] = []
        first_error: PerspicioError | None = None
        for k, m in enumerate(methods):
            progress({"stage": "explain", "method": m, "done": k, "total": len(methods)})
            entry = METHODS.get(m)
            opts: dict[str, Any] = {}
            if layer is not None and entry.needs_layer:
                opts["layer"] = layer
            t0 = time.perf_counter()

            def passes(done: int, total: int, description: str, k: int = k, m: str = m) -> None:
                # every chunk of the method's passes (IG nodes, occlusion windows, KernelSHAP
                # coalitions) as a progress event of the page
                progress({"stage": "explain", "method": m, "done": k, "total": len(methods),
                          "passes": done, "passes_total": total, "pass_stage": description})

            try:
                e = run_explain(zm, x, method=m, target=index, progress=passes, **opts)
            except PerspicioError as exc:
                first_error = first_error or exc
                results.append({"method": m, "family": entry.family, "error": one_line(exc)})
                continue
            results.append(render_map(e, m, entry.family, time.perf_counter() - t0))
        if first_error is not None and all("error" in r for r in results):
            raise first_error
        h, w = (
            results[0]["shape"]
            if "shape" in results[0]
            else next(r["shape"] for r in results if "shape" in r)
        )
        display = np.asarray(Image.fromarray(pixels).resize((w, h), Image.BILINEAR))
        progress({"stage": "explain", "done": len(methods), "total": len(methods)})
        image_label = payload.get("image_label", "IMAGE.png")
        return {
            "model": payload["model"],
            "target": {"index": index, "name": name},
            "layer": layer,
            "image": {"width": w, "height": h, "png": b64_png(display)},
            "methods": results,
            "cli": cli_line("explain", image_label, payload["model"], methods, index, layer),
        }

    def compare(self, payload: dict[str, Any], progress: Progress) -> dict[str, Any]:
        from ..metrics.evaluate import compare

        zm = self.model(payload["model"])
        x = self._batch(zm, payload["pixels"])
        index, name = self._target(zm, x, payload.get("target"))
        layer = self._layer(zm, payload.get("layer"))
        methods = list(payload["methods"])
        metrics = list(payload.get("metrics") or TRUST_METRICS)
        progress({"stage": "compare", "methods": methods, "metrics": metrics})
        from ..core.registry import METHODS

        method_options = {
            m: {"layer": layer} for m in methods if layer and METHODS.get(m).needs_layer
        }
        metric_options = {k: v for k, v in TRUST_METRIC_OPTIONS.items() if k in metrics}
        # compare(progress=True) prints its plan and one line per finished step (explaining a
        # method, scoring it with a metric) to stderr when that is not a terminal: those lines,
        # read here, are the progress events of the page
        steps = CompareSteps(progress, {"stage": "compare", "methods": methods, "metrics": metrics})
        with contextlib.redirect_stderr(steps):
            comp = compare(
                zm,
                x,
                methods=methods,
                metrics=metrics,
                target=index,
                seed=0,
                method_options=method_options,
                metric_options=metric_options,
                progress=True,
            )
        steps.flush()
        records = comp.records()
        curves: dict[str, dict[str, Any]] = {}
        for m, per in comp.results.items():
            for metric in ("deletion", "insertion"):
                if metric in per and "curve" in per[metric].details:
                    c = per[metric].details["curve"]
                    curves.setdefault(metric, {})[m] = [float(v) for v in c[0].tolist()]
        meta = {}
        from ..core.registry import METRICS

        for metric in metrics:
            entry = METRICS.get(metric)
            meta[metric] = {
                "higher_is_better": comp.higher_is_better(metric),
                "family": entry.family,
                "summary": entry.summary,
            }
        return {
            "model": payload["model"],
            "target": {"index": index, "name": name},
            "methods": methods,
            "metrics": meta,
            "table": [
                {
                    k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                    for k, v in r.items()
                }
                for r in records
            ],
            "best": comp.best(),
            "curves": curves,
            "plain": plain_language(comp, metrics),
            "errors": comp.errors,
            "not_applicable": comp.not_applicable,
            "cli": cli_line(
                "compare",
                payload.get("image_label", "IMAGE.png"),
                payload["model"],
                methods,
                index,
                None,
                metrics,
                metric_options,
                method_options,
            ),
        }


class CompareSteps(io.TextIOBase):
    """A text stream for :func:`perspicio.metrics.compare`'s progress lines: ``compare [k/n] step``
    becomes a progress event ``{done: k, total: n, step}``, the plan's ``estimated total`` an event
    ``{estimate}``; any other line (another thread's warning) goes on to the real stderr."""

    STEP = re.compile(r"^compare \[(\d+)/(\d+)\] (.*)$")
    ESTIMATE = re.compile(r"^\s*estimated total ([^;]+)")

    def __init__(self, progress: Progress, base: dict[str, Any]) -> None:
        super().__init__()
        self.progress = progress
        self.base = base
        self.buffer = ""
        self.estimate: str | None = None
        self.stderr = sys.stderr

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        self.buffer += text
        while "\n" in self.buffer:
            line, self.buffer = self.buffer.split("\n", 1)
            self.line(line)
        return len(text)

    def flush(self) -> None:
        if self.buffer:
            line, self.buffer = self.buffer, ""
            self.line(line)

    def line(self, line: str) -> None:
        step = self.STEP.match(line)
        estimate = self.ESTIMATE.match(line)
        if step:
            done, total, what = int(step.group(1)), int(step.group(2)), step.group(3)
            event = {**self.base, "done": done, "total": total, "step": what}
            if self.estimate:
                event["estimate"] = self.estimate
            self.progress(event)
        elif estimate:
            self.estimate = estimate.group(1).strip()
            self.progress({**self.base, "estimate": self.estimate})
        elif line.startswith("compare") or line.startswith("  "):
            return  # the rest of the plan and the closing line: nothing for the page
        elif line.strip():
            print(line, file=self.stderr)


def hide_cache_paths(message: str) -> str:
    """``message`` with the torch hub and Hugging Face cache folders replaced by their names (a
    model's loading error names the file it read; the client needs the file, not the folder)."""
    import torch

    folders = {str(torch.hub.get_dir()): "<torch hub cache>"}
    try:
        from huggingface_hub import constants

        folders[str(constants.HF_HUB_CACHE)] = "<Hugging Face cache>"
    except ImportError:
        pass
    for folder, name in sorted(folders.items(), key=lambda kv: -len(kv[0])):
        message = message.replace(folder, name)
    return message


def one_line(exc: BaseException) -> str:
    """The first line of an error message (never a traceback)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def render_map(e: Any, method: str, family: str, seconds: float) -> dict[str, Any]:
    """One explanation as the page draws it: the coloured map (PNG), the channel-summed raw values
    (float32, for the value under the cursor), whether it is signed, and its legend."""
    from ..viz.overlay import colorize, normalize_map

    a = e.attributions[:1].detach().float().cpu()
    raw = a.sum(dim=1)[0]
    signed = bool((raw < 0).any())
    heat = normalize_map(a, positive=not signed)[0]
    heat01 = ((heat + 1) / 2) if signed else heat
    cmap = SIGNED_CMAP if signed else UNSIGNED_CMAP
    rgb = (colorize(heat01.numpy(), cmap) * 255).round().astype(np.uint8)
    # the legend's ends in raw units, as normalize_map scaled them (its "auto" clip: multi-channel
    # maps at the 99.5th percentile, single-channel maps at their maximum)
    import torch

    flat = raw.flatten().double()
    q = 0.995 if a.shape[1] > 1 else 1.0
    if signed:
        top = float(torch.quantile(flat.abs(), q))
        lo, hi = -top, top
    else:
        pos = flat.clamp_min(0)
        lo, hi = float(pos.min()), float(torch.quantile(pos, q))
    h, w = raw.shape
    return {
        "method": method,
        "family": family,
        "layer": e.layer,
        "signed": signed,
        "cmap": cmap,
        "legend": {"colors": cmap_stops(cmap), "low": lo, "high": hi},
        "shape": [int(h), int(w)],
        "heat_png": b64_png(rgb),
        "values": base64.b64encode(raw.numpy().astype("<f4").tobytes()).decode("ascii"),
        "range": [float(raw.min()), float(raw.max())],
        "seconds": round(seconds, 3),
        "summary": _json_safe(e.summary()),
    }


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return str(value)


PLAIN_SENTENCES: dict[str, Callable[[float], str]] = {
    "deletion": lambda v: (
        f"Deleting the pixels it marks as most important first, the model's confidence "
        f"averages {v:.2f} along the way: the lower, the more the marked pixels are what "
        "the model relies on."
    ),
    "insertion": lambda v: (
        f"Adding its most important pixels first to a blurred image, the confidence "
        f"averages {v:.2f}: the higher, the faster the marked pixels alone bring the "
        "prediction back."
    ),
    "average_drop": lambda v: (
        f"Showing the model only what the map highlights, its confidence drops by "
        f"{v:.1f}% on average: lower is better."
    ),
    "sparseness": lambda v: (
        f"Concentration {v:.2f} (0 = spread evenly, 1 = one pixel): a focused map is "
        "easier to read, but says nothing alone about faithfulness."
    ),
}


def plain_language(comp: Any, metrics: Sequence[str]) -> dict[str, str]:
    """One sentence per metric about the best method on it."""
    out: dict[str, str] = {}
    best = comp.best()
    for metric in metrics:
        winners = best.get(metric) or []
        if not winners:
            out[metric] = "Not defined for the chosen methods."
            continue
        value = comp.value(winners[0], metric)
        text = PLAIN_SENTENCES.get(metric)
        sentence = text(value) if text else f"{metric}: {value:.3g}."
        out[metric] = f"Best: {', '.join(winners)}. {sentence}"
    return out


def worker_main(
    conn: Any,
    models: dict[str, str],
    threads: int,
    preload: Sequence[str],
    warm_tree: bool = False,
) -> None:
    """Entry point of a worker process: answer jobs from ``conn`` until it closes.

    Messages in: ``("job", id, kind, payload)``; out: ``("ready",)``, ``("started", id)``,
    ``("progress", id, dict)``, ``("done", id, result)``, ``("error", id, status, message)``.
    ``warm_tree`` starts compiling the TreeSHAP kernels in a background thread at once.
    Errors the user can fix go back as their one-line message; anything else as a generic line
    (the traceback goes to this process's stderr, the server log, never to a client).
    """
    import torch

    from .tabular import TreeWarmup

    torch.set_num_threads(max(1, int(threads)))
    warmup = TreeWarmup()
    if warm_tree:
        warmup.start()
    state = WorkerState(models, warmup)
    for model_id in preload:
        try:
            state.model(model_id)
        except Exception:  # noqa: BLE001 - reported when a job asks for the model
            traceback.print_exc(file=sys.stderr)
    conn.send(("ready",))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        if msg[0] != "job":
            return
        _, job_id, kind, payload = msg
        conn.send(("started", job_id))

        def progress(info: dict[str, Any], job_id: str = job_id) -> None:
            conn.send(("progress", job_id, info))

        try:
            result = state.run(kind, payload, progress)
        except PerspicioError as exc:
            conn.send(("error", job_id, getattr(exc, "status", 422), one_line(exc)))
        except Exception as exc:  # noqa: BLE001 - a server error: one line out, the traceback in the log
            traceback.print_exc(file=sys.stderr)
            conn.send(
                (
                    "error",
                    job_id,
                    500,
                    f"internal error ({type(exc).__name__}); see the server log.",
                )
            )
        else:
            conn.send(("done", job_id, result))
