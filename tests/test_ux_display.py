"""Issue 19, what a user sees: single-method figures with a title and a colorbar (or bare), the
model's input at the photo's aspect ratio, scores labelled with their unit (logit, probability,
margin), the comparison grid without empty slots, and the notebook display of explanations and
comparisons."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import perspicio
from perspicio import Explanation
from perspicio.core.explanation import classify_output
from perspicio.errors import OptionError
from perspicio.viz.overlay import SIGNED_CMAP, UNSIGNED_CMAP
from perspicio.viz.plots import (
    comparison_figure,
    display_size,
    explanation_figure,
    method_figure,
    model_view,
)


def _colorbars(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def _texts_inside(fig) -> None:
    """Everything drawn (titles, colorbar labels and ticks) lies inside the figure: its tight
    bounding box is within the figure, and every axes title line is inside it too."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    w, h = fig.get_size_inches()
    tight = fig.get_tightbbox(renderer)
    assert (
        tight.x0 >= -0.01 and tight.y0 >= -0.01 and tight.x1 <= w + 0.01 and tight.y1 <= h + 0.01
    ), (tight, w, h)
    W, H = fig.bbox.width, fig.bbox.height
    titles = [ax.title for ax in fig.axes if ax.get_title()]
    assert titles
    for t in titles:
        bb = t.get_window_extent(renderer)
        assert bb.x0 >= 0 and bb.y0 >= 0 and bb.x1 <= W and bb.y1 <= H, (t.get_text(), bb, W, H)


# ----------------------------------------------------------------------------- units


def test_classify_output_reads_logits_probabilities_and_other_outputs() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    unit, p = classify_output(logits)
    assert unit == "logit" and torch.allclose(p, logits.softmax(1))
    probs = logits.softmax(1)
    unit, p = classify_output(probs)
    assert unit == "probability" and torch.equal(p, probs)
    assert classify_output(torch.tensor([[1.5], [2.0]])) == ("output", None)
    assert classify_output(torch.zeros(2, 3, 4, 4))[0] == "output"


def test_with_score_unit_is_recorded_validated_and_sliced() -> None:
    e = Explanation(
        torch.zeros(3, 1, 4, 4), "m", torch.tensor([1.0, 2.0, 3.0]), targets=torch.tensor([0, 1, 2])
    )
    assert e.score_unit == "output" and e.probabilities is None
    u = e.with_score_unit("logit", torch.tensor([0.1, 0.2, 0.7]))
    assert u.score_unit == "logit" and u.probabilities == pytest.approx([0.1, 0.2, 0.7])
    assert e.score_unit == "output"  # the original is untouched (immutable)
    assert u[2].probabilities == pytest.approx([0.7]) and u[1:].probabilities == pytest.approx(
        [0.2, 0.7]
    )
    s = u.summary()
    assert s["score_unit"] == "logit" and s["probabilities"] == pytest.approx([0.1, 0.2, 0.7])
    with pytest.raises(OptionError, match="one value per row"):
        e.with_score_unit("logit", [0.5])
    with pytest.raises(OptionError, match="non-empty string"):
        e.with_score_unit("")


def test_compare_labels_scores_as_logits_with_probabilities(tiny_cnn, tiny_input) -> None:
    comp = perspicio.metrics.compare(
        tiny_cnn, tiny_input, methods=["gradcam", "saliency"], metrics=["sparseness"]
    )
    with torch.no_grad():
        probs = tiny_cnn(tiny_input).softmax(1)
    for e in comp.explanations.values():
        assert e.score_unit == "logit"
        expected = probs[torch.arange(2), e.targets].tolist()
        assert e.probabilities == pytest.approx(expected, abs=1e-6)
    assert comp.to_dict()["explanations"]["gradcam"]["score_unit"] == "logit"


# ----------------------------------------------------------------------------- figures


def test_method_figure_titles_score_with_unit_and_colorbar_per_scale(tiny_cnn, tiny_input) -> None:
    cam = perspicio.explain(tiny_cnn, tiny_input, method="gradcam").with_score_unit(
        "logit", [0.25, 0.5]
    )
    ig = perspicio.explain(tiny_cnn, tiny_input, method="integrated_gradients")
    fig = method_figure(cam, index=1)
    title = fig.axes[0].get_title()
    assert (
        title.startswith("gradcam: class ")
        and f"logit {float(cam.scores[1]):.4g}, probability 0.500" in title
    )
    (bar,) = _colorbars(fig)
    assert bar._colorbar.cmap.name == UNSIGNED_CMAP and bar._colorbar.norm.vmin == 0
    _texts_inside(fig)
    fig = method_figure(ig, index=0)
    assert f"output {float(ig.scores[0]):.4g}" in fig.axes[0].get_title()  # unit unknown: "output"
    (bar,) = _colorbars(fig)
    assert bar._colorbar.cmap.name == SIGNED_CMAP and bar._colorbar.norm.vmin == -1
    _texts_inside(fig)


def test_save_writes_a_titled_figure_or_the_bare_overlay(tiny_cnn, tiny_input, tmp_path) -> None:
    e = perspicio.explain(tiny_cnn, tiny_input[:1], method="gradcam")
    bg = np.random.default_rng(0).random((8, 12, 3))
    (bare_png, *_) = e.save(tmp_path / "bare", image=bg)
    assert Image.open(bare_png).size == (12, 8)  # the overlay alone, at the background's size
    (fig_png, *_) = e.save(tmp_path / "fig", image=bg, bare=False)
    w, h = Image.open(fig_png).size
    assert w > 200 and h > 200  # a figure: title and colorbar around the map
    assert w > h  # drawn at the background's 3:2 aspect ratio


def test_comparison_grid_fills_every_slot_and_keeps_titles_inside(tiny_cnn, tiny_input) -> None:
    methods = ("gradcam", "saliency", "gradcampp", "xgradcam", "hirescam", "integrated_gradients")
    exps = [perspicio.explain(tiny_cnn, tiny_input, method=m) for m in methods]
    fig = comparison_figure(exps, image=tiny_input[0], title="a long input title.png")
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    legend = [ax for ax in panels if ax.get_label() == "legend"]
    assert len(panels) == 8 and len(legend) == 1  # 7 panels + the legend fill the 2 x 4 grid
    spec = legend[0].get_subplotspec()
    assert spec.rowspan == range(1, 2) and spec.colspan == range(3, 4)
    text = legend[0].texts[0].get_text()
    assert "signed maps" in text and "unsigned maps" in text
    _texts_inside(fig)
    fig = comparison_figure(exps[:4], image=tiny_input[0])  # 5 panels: 2 x 3 with a legend slot
    assert len([ax for ax in fig.axes if ax.get_label() == "legend"]) == 1
    fig = comparison_figure(exps[:5], image=tiny_input[0])  # 6 panels: 2 x 3, no legend needed
    assert not [ax for ax in fig.axes if ax.get_label() == "legend"]


def test_display_size_keeps_the_aspect_ratio_without_shrinking() -> None:
    assert display_size((224, 224), (300, 451)) == (224, 337)  # chelsea
    assert display_size((224, 224), (427, 640)) == (224, 336)  # rocket
    assert display_size((224, 224), (640, 427)) == (336, 224)  # portrait
    assert display_size((224, 224), (50, 50)) == (224, 224)
    assert display_size((100, 200), (100, 100)) == (200, 200)


@pytest.mark.parametrize("sample", ["chelsea", "rocket"])
def test_figures_show_the_models_input_at_the_photos_aspect_ratio(zoo_model, sample) -> None:
    from perspicio import zoo
    from perspicio.cli.explain import model_display

    pil = zoo.load_image(sample)
    x = zoo_model.preprocess(pil)
    view = model_display(zoo_model, x, pil)
    h, w = view.shape[:2]
    assert h == 224 and abs(w / h - pil.width / pil.height) < 0.01  # not squashed to a square
    # exactly the model's input, de-normalised by the preprocessing and stretched back
    seen = zoo_model.preprocess.denormalize(x)
    expected = F.interpolate(seen, size=(h, w), mode="bilinear", align_corners=False)[0].permute(
        1, 2, 0
    )
    assert np.abs(view - expected.clamp(0, 1).numpy()).max() < 1e-5
    # and it looks like the photo: close to the photo resized (by PIL) to the same size
    photo = np.asarray(pil.convert("RGB").resize((w, h), Image.BILINEAR), dtype=np.float32) / 255
    assert np.abs(view - photo).mean() < 0.03
    # the figures draw this background as given
    e = Explanation(torch.rand(1, 1, 7, 7), "gradcam", torch.tensor([1.0]), inputs=x)
    fig = explanation_figure(e, image=view)
    assert np.array_equal(np.asarray(fig.axes[0].images[0].get_array()), view)
    fig = comparison_figure([e], image=view)
    assert np.array_equal(np.asarray(fig.axes[0].images[0].get_array()), view)


def test_model_view_without_statistics_min_max_scales() -> None:
    x = torch.tensor([[[-1.0, 1.0]]]).expand(3, 1, 2)
    v = model_view(x)
    assert v.shape == (1, 2, 3) and v.min() == 0 and v.max() == 1


@pytest.mark.slow
def test_cli_explain_writes_titled_pngs_bare_on_request_and_units_in_json(tmp_path, capsys) -> None:
    from perspicio.cli import main

    assert (
        main(["explain", "--method", "gradcam", "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    )
    out = capsys.readouterr().out
    assert "target Egyptian cat (logit 11.04, probability 0.800)" in out
    w, h = Image.open(tmp_path / "a" / "chelsea_gradcam.png").size
    assert w > 337 and h > 224  # title and colorbar around the 337 x 224 view
    data = json.loads((tmp_path / "a" / "chelsea_gradcam.json").read_text())
    assert data["score_unit"] == "logit" and 0.5 < data["probabilities"][0] < 1
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["chelsea"][0]["score_unit"] == "logit"
    assert (
        main(
            [
                "explain",
                "--method",
                "gradcam",
                "--bare",
                "--out",
                str(tmp_path / "b"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert Image.open(tmp_path / "b" / "chelsea_gradcam.png").size == (
        337,
        224,
    )  # bare, aspect kept


@pytest.mark.slow
def test_cli_tabular_says_logit_and_probability(tmp_path, capsys) -> None:
    from perspicio.cli import main

    assert (
        main(
            [
                "explain-tabular",
                "--method",
                "feature_ablation",
                "--rows",
                "0:2",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert re.search(r"row 0: \w+ logit -?[\d.]+, probability [\d.]+", out), out
    assert " score " not in out
    rows = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert rows[0]["prediction_unit"] == "logit" and 0 <= rows[0]["probability"] <= 1


# ----------------------------------------------------------------------------- notebook display


def _images(html: str) -> list[str]:
    return re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)


def _self_contained(html: str) -> None:
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert not re.search(r'src="(?!data:)', html)


def test_repr_html_of_an_image_explanation(tiny_cnn, tiny_input) -> None:
    import base64

    e = perspicio.explain(tiny_cnn, tiny_input, method="gradcam").with_score_unit(
        "logit", [0.3, 0.6]
    )
    html = e._repr_html_()
    _self_contained(html)
    imgs = _images(html)
    assert len(imgs) == 2
    Image.open(io.BytesIO(base64.b64decode(imgs[0]))).verify()  # a real PNG
    assert "<th" in html and ">logit<" in html and ">probability<" in html and "0.600" in html
    assert "gradcam" in html and "more" not in html


def test_repr_html_of_a_large_batch_is_bounded(tiny_cnn) -> None:
    from perspicio.viz.notebook import MAX_ITEMS

    x = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    e = perspicio.explain(tiny_cnn, x, method="gradcam")
    html = e._repr_html_()
    assert len(_images(html)) == MAX_ITEMS and f"and {10 - MAX_ITEMS} more rows" in html
    assert len(html) < 400_000


def test_repr_html_of_a_text_explanation() -> None:
    e = Explanation(
        torch.tensor([[0.5, -1.0, 0.2]]),
        "integrated_gradients",
        torch.tensor([2.0]),
        targets=torch.tensor([1]),
        target_names=("positive",),
        extras={"tokens": [["a", "good", "film"]]},
    )
    html = e._repr_html_()
    _self_contained(html)
    assert html.count('class="tok"') == 3 and "good" in html and "positive" in html


def test_repr_html_of_a_tabular_explanation_has_a_table_and_a_figure() -> None:
    g = torch.Generator().manual_seed(0)
    one = Explanation(
        torch.tensor([[0.5, -1.0, 0.25, 0.0]]),
        "tree_shap",
        torch.tensor([1.75]),
        base_value=torch.tensor([2.0]),
        inputs=torch.tensor([[1.0, 2.0, 3.0, 4.0]]),
        targets=torch.tensor([0]),
        target_names=("malignant",),
    ).with_score_unit("margin (log-odds)")
    html = one._repr_html_()
    _self_contained(html)
    assert "waterfall of row 0" in html and len(_images(html)) == 1
    assert "margin (log-odds)" in html and "x1 = 2: -1" in html  # the top feature of row 0 first
    many = Explanation(
        torch.randn(30, 4, generator=g),
        "kernel_shap",
        torch.randn(30, generator=g),
        inputs=torch.randn(30, 4, generator=g),
    )
    html = many._repr_html_()
    assert "beeswarm" in html and "and 20 more rows" in html and len(_images(html)) == 1


def test_repr_html_of_a_comparison(tiny_cnn, tiny_input) -> None:
    comp = perspicio.metrics.compare(
        tiny_cnn, tiny_input, methods=["gradcam", "saliency"], metrics=["sparseness"]
    )
    html = comp._repr_html_()
    _self_contained(html)
    assert (
        "sparseness" in html and "gradcam" in html and "&#9733;" in html and len(_images(html)) == 1
    )
    assert "and 1 more" in html


def test_repr_html_never_raises(monkeypatch, tiny_cnn, tiny_input) -> None:
    from perspicio.core import explanation as core_exp

    e = perspicio.explain(tiny_cnn, tiny_input, method="gradcam")
    comp = perspicio.metrics.compare(
        tiny_cnn, tiny_input, methods=["gradcam"], metrics=["sparseness"]
    )

    class Broken:
        def __getattr__(self, name):
            raise RuntimeError("no display")

    monkeypatch.setattr(core_exp, "_DISPLAY", [Broken()])
    assert e._repr_html_().startswith("<pre>Explanation(method=&#x27;gradcam&#x27;")
    assert "display failed: no display" in comp._repr_html_() and "sparseness" in comp._repr_html_()


def test_a_bundled_models_scores_are_logits_on_every_path() -> None:
    """ZooModel.score_unit reaches the Explanation through Method.__call__: perspicio.explain, a
    method object built on the bundled model, but not a bare module (its outputs are unknown) or an
    ``output=`` selection (the explained tensor is the user's)."""
    import perspicio
    from perspicio import zoo
    from perspicio.methods import GradCAM

    zm = zoo.load("efficientnet_lite0")
    x = zm.preprocess(zoo.sample("chelsea"))
    assert perspicio.explain(zm, x, method="saliency").score_unit == "logit"
    assert GradCAM(zm)(x).score_unit == "logit"
    assert GradCAM(zm.model)(x).score_unit == "output"
    assert GradCAM(zm, output=lambda out: out[:, :10])(x).score_unit == "output"  # a user's head
