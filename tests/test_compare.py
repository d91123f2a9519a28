"""perspicio.evaluate / compare, the HTML+JSON report, the CLI commands and the grid pointing game."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from torch import nn

import perspicio
from perspicio import metrics
from perspicio.cli import main
from perspicio.errors import OptionError, UnknownNameError
from perspicio.metrics.base import MetricResult
from perspicio.metrics.evaluate import Comparison, Table

H = W = 16


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.act2(self.conv2(self.act1(self.conv1(x))))).flatten(1))


FAST = {"deletion": {"steps": 8}, "insertion": {"steps": 8}, "randomization": {"steps": 2},
        "max_sensitivity": {"samples": 2}, "faithfulness_correlation": {"runs": 5, "unit": "pixel"}}


@pytest.fixture
def setup():
    model = SmallCNN().eval()
    x = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(0))
    return model, x


def test_evaluate_table_matches_individual_metric_calls(setup):
    model, x = setup
    chosen = ["deletion", "insertion", "sparseness", "entropy", "randomization", "completeness"]
    table = perspicio.evaluate(model, x, methods=["gradcam", "eigencam"], metrics=chosen,
                               metric_options={k: v for k, v in FAST.items() if k in chosen}, target=1)
    assert isinstance(table, Table)  # one return type, pandas installed or not
    assert [r["rank"] for r in table] == list(range(1, len(table) + 1))  # best first
    assert set(table.methods) == {"gradcam", "eigencam"}
    assert table.columns == chosen + ["mean_rank", "rank"]
    for method in ("gradcam", "eigencam"):
        exp = perspicio.explain(model, x, method, target=1)
        for name in ("deletion", "sparseness", "randomization"):
            expected = metrics.get(name)(**FAST.get(name, {}))(model, x, exp).value
            assert table[method][name] == pytest.approx(expected, abs=1e-9), (method, name)
        assert math.isnan(table[method]["completeness"])  # not defined for CAMs: n/a
    assert "gradcam" in repr(table) and "<table>" in table._repr_html_()
    pd = pytest.importorskip("pandas")
    df = table.to_pandas()
    assert isinstance(df, pd.DataFrame) and list(df.index) == table.methods
    assert list(df.columns) == table.columns
    assert df.loc["gradcam", "deletion"] == table["gradcam"]["deletion"]


def test_ranking_respects_direction_and_ties():
    def res(name, values, hib):
        return MetricResult(name, torch.tensor(values, dtype=torch.float64), hib)

    results = {
        "a": {"deletion": res("deletion", [0.1], False), "insertion": res("insertion", [0.5], True)},
        "b": {"deletion": res("deletion", [0.3], False), "insertion": res("insertion", [0.9], True)},
        "c": {"deletion": res("deletion", [0.1], False), "insertion": res("insertion", [math.nan], True)},
    }
    comp = Comparison(["a", "b", "c"], ["deletion", "insertion"], {}, results)
    ranks = comp.ranks()
    assert ranks["a"] == {"deletion": 1.5, "insertion": 2.0}
    assert ranks["b"] == {"deletion": 3.0, "insertion": 1.0}
    assert ranks["c"] == {"deletion": 1.5}
    assert comp.best() == {"deletion": ["a", "c"], "insertion": ["b"]}
    assert [m for m, _ in comp.ranking()] == ["c", "a", "b"]  # mean ranks 1.5, 1.75, 2.0


def test_report_is_self_contained_and_json_has_every_number(setup, tmp_path):
    model, x = setup
    chosen = ["deletion", "insertion", "randomization", "sparseness", "max_sensitivity"]
    comp = metrics.compare(model, x, methods="gradcam,layercam,eigencam", metrics=chosen,
                           metric_options={k: v for k, v in FAST.items() if k in chosen}, seed=3)
    from perspicio.viz.report import write_report

    html_path, json_path = write_report(comp, tmp_path / "r.html")
    text = html_path.read_text()
    assert not re.search(r'(src|href)="(https?:|//|file:)', text)  # nothing external
    assert text.count("data:image/png;base64,") >= 2 * 4 + 3 * 3  # inputs + overlays + sanity maps
    assert text.count("<svg") >= 3  # deletion, insertion, randomization curves
    best = comp.best()
    for metric, winners in best.items():  # the starred cell of each column belongs to the best method
        for w in winners:
            assert f"&#9733; {comp.value(w, metric):.4g}" in text
    data = json.loads(json_path.read_text())
    for m in comp.ok_methods:
        r = data["results"][m]["deletion"]
        assert r["scores"] == pytest.approx(comp.results[m]["deletion"].scores.tolist())
        assert len(r["details"]["curve"]) == 2 and len(r["details"]["curve"][0]) == 9
        assert len(data["results"][m]["randomization"]["details"]["cascading"]["spearman"]) == 2
    assert [row["method"] for row in data["table"]] == [m for m, _ in comp.ranking()]
    assert not list(tmp_path.glob("*.tmp"))


def test_compare_errors(setup):
    model, x = setup
    with pytest.raises(UnknownNameError, match="unknown method"):
        metrics.compare(model, x, methods=["gradkam"], metrics=["sparseness"])
    with pytest.raises(UnknownNameError, match="metric_options"):
        metrics.compare(model, x, methods=["gradcam"], metrics=["sparseness"], metric_options={"deletion": {"steps": 2}})
    with pytest.raises(OptionError, match="has no option 'step'"):
        metrics.compare(model, x, methods=["gradcam"], metrics=["deletion"], metric_options={"deletion": {"step": 2}})
    assert metrics.evaluate.__doc__  # the function, not the module
    assert "relevance_mass" not in metrics.evaluate.__globals__["resolve_metrics"]("all")
    assert "relevance_mass" in metrics.evaluate.__globals__["resolve_metrics"]("all", have_masks=True)


def test_cli_compare_writes_report(tmp_path, capsys):
    out = tmp_path / "rep.html"
    code = main(["compare", "chelsea", "--methods", "gradcam", "--metrics", "deletion,sparseness,entropy",
                 "--metric-option", "deletion.steps=4", "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "gradcam" in captured.out and out.exists() and out.with_suffix(".json").exists()
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["targets"] == [285] and data["inputs"] == ["chelsea"]
    assert main(["compare", "--metric-option", "steps=4", "--out", str(out)]) == 2
    assert "name.key=value" in capsys.readouterr().err
    assert main(["compare", "--metrics", "delition", "--out", str(out)]) == 2
    assert "Did you mean: deletion" in capsys.readouterr().err


def test_grid_pointing_game_cli(tmp_path, capsys):
    code = main(["benchmark", "pointing-game", "--methods", "gradcam", "--size", "224", "--max-grids", "2",
                 "--out", str(tmp_path), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads((tmp_path / "pointing_game.json").read_text())
    assert [p["name"] for p in data["photos"]] == ["chelsea", "coffee", "camera", "motorcycle_left"]
    assert [p["class"] for p in data["photos"]] == [285, 967, 872, 665]
    row = data["table"][0]
    assert row["method"] == "gradcam" and 0.25 < row["energy"] <= 1.0  # better than chance
    energy = torch.tensor(data["per_grid"]["gradcam"]["energy"])
    assert energy.shape == (2, 4) and data["orders"] == [[0, 1, 2, 3], [0, 1, 3, 2]]
    assert row["energy_min"] == pytest.approx(float(energy.mean(1).min()))
    assert row["chelsea_min"] == pytest.approx(float(energy[:, 0].min()))
    assert "gradcam" in captured.out
    # every candidate photo is reported with its confidence, qualifying or not
    cands = {c["name"]: c for c in data["candidates"]}
    assert cands["rocket"]["qualifies"] is False and cands["rocket"]["probability"] < 0.4
    assert all(cands[p]["qualifies"] for p in ("chelsea", "coffee", "camera", "motorcycle_left"))
    assert re.search(r"rocket .* p=0\.\d+ +does not qualify", captured.out)
    assert re.search(r"chelsea .* p=0\.\d+ +used", captured.out)


def test_grid_pointing_game_cli_defaults_to_all_orders_and_cam_family(monkeypatch, capsys):
    import perspicio.metrics.pointing_benchmark as pb

    seen = {}

    def fake(zm, methods, **kw):
        seen.update(kw, methods=methods)
        raise OptionError("stop here")

    monkeypatch.setattr(pb, "pointing_game_benchmark", fake)
    assert main(["benchmark", "pointing-game", "--no-progress"]) != 0
    assert seen["orders"] == "all" and seen["max_grids"] is None
    from perspicio.metrics.evaluate import resolve_methods

    assert len(resolve_methods(seen["methods"])) == len(resolve_methods("family:cam")) > 1
    main(["benchmark", "pointing-game", "--orders", "latin", "--no-progress"])
    assert seen["orders"] == "latin"
    main(["benchmark", "pointing-game", "--orders", "0,23", "--no-progress"])
    assert seen["orders"] == [0, 23]
    assert main(["benchmark", "pointing-game", "--orders", "first", "--no-progress"]) != 0
    assert "--orders" in capsys.readouterr().err


def test_pointing_game_orders_option():
    from perspicio.metrics.pointing_benchmark import (
        LATIN_ORDERS,
        ORDERS,
        make_grids,
        pointing_game_benchmark,
    )

    # the Latin subset puts every photo once in every cell
    latin = torch.tensor([ORDERS[i] for i in LATIN_ORDERS])
    assert all(sorted(col) == [0, 1, 2, 3] for col in latin.T.tolist())
    cells = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 8, 8).contiguous()
    _, perms = make_grids(cells, 16, orders=LATIN_ORDERS)
    assert torch.equal(perms, latin)
    for bad in ([], [24], [1, 1], [True], "some"):
        with pytest.raises(OptionError, match="orders"):
            pointing_game_benchmark(None, "gradcam", orders=bad)


def test_grids_cover_every_order_and_cells():
    from perspicio.metrics.pointing_benchmark import cell_masks, make_grids

    cells = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 8, 8).contiguous()
    grids, perms = make_grids(cells, 16)
    assert grids.shape == (24, 1, 16, 16) and len({tuple(p) for p in perms.tolist()}) == 24
    masks = cell_masks(16)
    for g in range(24):
        for k in range(4):
            assert grids[g, 0][masks[k]].unique().tolist() == [float(perms[g, k])]
