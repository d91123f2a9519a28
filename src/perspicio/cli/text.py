"""`perspicio explain "a sentence" --model minilm ...`: explanations of a text model.

Called by ``perspicio explain`` when the model is a bundled text model; writes per text and
method a token heatmap (HTML and PNG) and the raw values (JSON), and for the attention family the
attention matrices per layer and per head (PNG) and the lines view (HTML).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

#: files written for the attention pictures of each text
ATTENTION_FILES = ("attention_layers.png", "attention_heads.png", "attention_lines.html")


#: methods run when --method is not given
TEXT_DEFAULT_METHODS = ("attention_rollout", "transformer_attribution", "integrated_gradients")


def is_text_model(model_spec: str) -> bool:
    """True when ``model_spec`` names a bundled text model (its inputs are sentences, not images)."""
    from ..zoo.text import TEXT_MODELS

    return (
        isinstance(model_spec, str) and model_spec.strip().lower().replace("-", "_") in TEXT_MODELS
    )


def _target(value: str | None) -> Any:
    """--target: a class index, 'zeroshot:label one|label two' or another sentence."""
    if value is None:
        return None
    v = value.strip()
    if v.lstrip("-").isdigit():
        return int(v)
    if v.lower().startswith("zeroshot:"):
        from ..text import ZeroShot

        return ZeroShot([s.strip() for s in v[len("zeroshot:") :].split("|") if s.strip()])
    return v


def run(
    texts: list[str],
    model_spec: str,
    device: str,
    random_init: bool,
    methods: list[str],
    target: str | None,
    out_dir: str,
    options: dict[str, Any],
) -> None:
    """Explain ``texts`` with each of ``methods`` and write the pictures to ``out_dir``."""
    from ..core.registry import METHODS
    from ..errors import InputError
    from ..text import explain_text
    from ..viz.text_plots import (
        attention_matrix_figure,
        lines_view_html,
        token_heatmap_figure,
        token_heatmap_html,
    )
    from ..zoo import load

    if not texts:
        raise InputError(
            'give the text(s) to explain: perspicio explain "a sentence" --model minilm.'
        )
    zm = load(model_spec, device, pretrained=not random_init)
    tgt = _target(target)
    results: dict[str, Any] = {}
    for m in methods:
        allowed = set(METHODS.get(m).cls.option_names()) | {"baseline_token", "merge_words"}
        opts = {k: v for k, v in options.items() if k in allowed}
        t0 = time.perf_counter()
        results[m] = explain_text(zm, texts, method=m, target=tgt, **opts)
        click.echo(f"  {m:<24} {time.perf_counter() - t0:6.2f} s")
    attention = None
    if any(METHODS.get(m).family == "attention" for m in methods):
        attention = results.get("attention") or explain_text(
            zm, texts, method="attention", target=tgt
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    summary: dict[str, Any] = {}
    for i, text in enumerate(texts):
        name = f"text{i + 1}"
        summary[name] = {"text": text, "methods": {}}
        for m, e in results.items():
            toks = list(e.extras["tokens"][i])
            values = e.attributions[i, : len(toks)].tolist()
            top = sorted(zip(toks, values), key=lambda p: -abs(p[1]))[:5]
            click.echo(f"{name} {m}: " + ", ".join(f"{t} {v:+.3g}" for t, v in top))
            html_path = out / f"{name}_{m}.html"
            html_path.write_text(token_heatmap_html(e, i), encoding="utf-8")
            png_path = out / f"{name}_{m}.png"
            token_heatmap_figure(e, i).savefig(png_path, dpi=110)
            summary[name]["methods"][m] = {**e[i].summary(), "tokens": toks, "attributions": values}
            written += [html_path, png_path]
        if attention is not None:
            layers, heads, lines = (out / f"{name}_{f}" for f in ATTENTION_FILES)
            attention_matrix_figure(attention, index=i).savefig(layers, dpi=100)
            attention_matrix_figure(attention, index=i, layer=-1).savefig(heads, dpi=100)
            lines.write_text(
                lines_view_html(attention, index=i, title=f"{zm.name}: {text}"), encoding="utf-8"
            )
            written += [layers, heads, lines]
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    click.echo(f"wrote {len(written) + 1} files to {out}/")
