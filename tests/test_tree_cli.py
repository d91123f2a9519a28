"""`perspicio explain-tabular` with tree models: the seed's XGBoost example end to end (cached as
verified UBJSON, never pickled), the user's own model files (XGBoost JSON, LightGBM text, pickles
only with --trust-pickle, a broken ONNX file refused), one-line errors, and the message naming the
extra when scikit-learn or xgboost is missing."""

from __future__ import annotations

import builtins
import json
import pickle

import numpy as np
import pytest

from perspicio.cli import main

xgb = pytest.importorskip("xgboost")
lgb = pytest.importorskip("lightgbm")
pytest.importorskip("numba")
from sklearn.datasets import load_breast_cancer  # noqa: E402
from sklearn.ensemble import RandomForestClassifier  # noqa: E402


@pytest.mark.slow
def test_breast_cancer_xgb_demo_end_to_end_and_its_verified_cache(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("PERSPICIO_CACHE", str(cache))
    out = tmp_path / "out"
    assert main(["explain-tabular", "--model", "breast_cancer_xgb", "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    want = {
        "beeswarm.png",
        "bar.png",
        "row0_waterfall.png",
        "row0_force.png",
        "force.html",
        "heatmap.png",
        "decision.png",
        "interaction_summary.png",
        "summary.json",
    }
    assert want <= names and sum(n.startswith("dependence_") for n in names) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "tree_shap" and len(summary["rows"]) == 114  # the whole test split
    assert "benign" in capsys.readouterr().out
    # the values are XGBoost's own pred_contribs on the same rows (the seed's TreeExplainer values)
    from perspicio.zoo.tabular import load_tabular

    demo = load_tabular("breast_cancer", "xgb")
    contribs = demo.estimator.get_booster().predict(xgb.DMatrix(demo.X_test), pred_contribs=True)
    ours = np.array([list(r["values"].values()) for r in summary["rows"]])
    np.testing.assert_allclose(ours, contribs[:, :-1], rtol=1e-4, atol=1e-5)
    for r in summary["rows"]:
        assert abs(sum(r["values"].values()) + r["base_value"] - r["prediction"]) < 1e-9
    # the cache holds XGBoost's UBJSON and its check sums, nothing pickled
    files = sorted(p.suffix for p in (cache / "tabular").iterdir())
    assert files == [".json", ".ubj"]
    ubj = next((cache / "tabular").glob("*.ubj"))
    first = ubj.stat().st_mtime_ns
    load_tabular("breast_cancer", "xgb")
    assert ubj.stat().st_mtime_ns == first  # read back, not retrained
    raw = bytearray(ubj.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    ubj.write_bytes(bytes(raw))  # a corrupted (or planted) file fails its hash and is retrained
    again = load_tabular("breast_cancer", "xgb")
    np.testing.assert_array_equal(again.predict(again.X_test), demo.predict(demo.X_test))
    assert ubj.read_bytes() != bytes(raw)


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("user")
    data = load_breast_cancer()
    x, y = data.data[:200], data.target[:200]
    cols = [n.replace(" ", "_") for n in data.feature_names]
    header = ",".join(["label", *cols])
    rows = "\n".join(",".join([str(int(t)), *(f"{v:.6g}" for v in r)]) for r, t in zip(x, y))
    (d / "rows.csv").write_text(header + "\n" + rows + "\n")
    (d / "bare.csv").write_text(
        ",".join(cols) + "\n" + "\n".join(",".join(f"{v:.6g}" for v in r) for r in x[:20])
    )
    xgb.XGBClassifier(n_estimators=10, max_depth=3, n_jobs=1).fit(x, y).save_model(d / "model.json")
    lgb.LGBMClassifier(n_estimators=10, num_leaves=8, verbose=-1, n_jobs=1).fit(
        x, y
    ).booster_.save_model(d / "model.txt")
    with (d / "forest.pkl").open("wb") as fh:
        pickle.dump(
            RandomForestClassifier(n_estimators=5, max_depth=3, random_state=0).fit(x, y), fh
        )
    (d / "model.onnx").write_bytes(b"\x08\x07")
    return d


@pytest.mark.slow
@pytest.mark.parametrize("model", ["model.json", "model.txt"])
def test_user_model_file_and_csv(user_files, tmp_path, model):
    out = tmp_path / "out"
    args = [
        "explain-tabular",
        "--model",
        str(user_files / model),
        "--data",
        str(user_files / "rows.csv"),
        "--drop",
        "label",
        "--rows",
        "0:30",
        "--no-interactions",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["rows"]) == 30 and "label" not in summary["rows"][0]["values"]
    assert {"beeswarm.png", "bar.png", "row0_force.png", "force.html"} <= {
        p.name for p in out.iterdir()
    }
    # interventional with a background drawn from the data
    assert main([*args[:-2], "--background", "25", "--out", str(tmp_path / "bg")]) == 0
    s2 = json.loads((tmp_path / "bg" / "summary.json").read_text())
    assert s2["summary"]["options"]["feature_perturbation"] == "interventional"


def test_pickles_need_trust_and_onnx_is_refused(user_files, tmp_path, capsys):
    base = [
        "explain-tabular",
        "--data",
        str(user_files / "rows.csv"),
        "--drop",
        "label",
        "--out",
        str(tmp_path),
    ]
    assert main([*base, "--model", str(user_files / "forest.pkl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--trust-pickle" in err and "runs" in err
    assert main([*base, "--model", str(user_files / "model.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not an ONNX model" in err  # ONNX: tests/test_tree_onnx.py


@pytest.mark.slow
def test_trusted_pickle_warns_and_runs(user_files, tmp_path, capsys):
    args = [
        "explain-tabular",
        "--model",
        str(user_files / "forest.pkl"),
        "--trust-pickle",
        "--data",
        str(user_files / "rows.csv"),
        "--drop",
        "label",
        "--rows",
        "0:10",
        "--no-interactions",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    assert "warning: unpickling forest.pkl" in capsys.readouterr().err


def test_one_line_errors(user_files, tmp_path, capsys):
    model = str(user_files / "model.json")
    cases = [
        (
            ["--model", model, "--data", str(user_files / "rows.csv")],
            "use --drop",
        ),  # the label is not a feature
        (
            ["--model", model, "--data", str(user_files / "rows.csv"), "--drop", "nope"],
            "no column 'nope'",
        ),
        (["--model", model, "--data", "breast_cancer"], "needs --data FILE.csv"),
        (
            ["--model", str(tmp_path / "missing.json"), "--data", str(user_files / "bare.csv")],
            "neither a bundled demo",
        ),
        (
            ["--model", model, "--data", str(user_files / "bare.csv"), "--method", "linear_shap"],
            "needs a linear model",
        ),
        (
            ["--model", model, "--data", str(user_files / "bare.csv"), "--rows", "5:x"],
            "--rows expects",
        ),
        (["--model", "breast_cancer_xgb", "--drop", "label"], "--drop applies to a --data file"),
    ]
    for args, msg in cases:
        assert main(["explain-tabular", *args, "--out", str(tmp_path / "o")]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and msg in err and "\n" not in err, (args, err)


@pytest.mark.parametrize("missing", ["sklearn", "xgboost"])
def test_missing_library_names_the_extra(monkeypatch, tmp_path, capsys, missing):
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == missing or name.startswith(missing + "."):
            raise ModuleNotFoundError(f"No module named '{missing}'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
    monkeypatch.setenv("PERSPICIO_CACHE", str(tmp_path / "cache"))
    assert (
        main(["explain-tabular", "--model", "breast_cancer_xgb", "--out", str(tmp_path / "o")]) == 2
    )
    err = capsys.readouterr().err.strip()
    pkg = "scikit-learn" if missing == "sklearn" else "xgboost"
    assert (
        err == f"error: the breast_cancer_xgb demo needs {pkg}: pip install 'perspicio[tabular]'."
    )
    if missing == "sklearn":  # the torch demo needs scikit-learn's data too
        assert main(["explain-tabular", "--model", "mlp", "--out", str(tmp_path / "o")]) == 2
        assert "pip install 'perspicio[tabular]'" in capsys.readouterr().err


def test_readme_first_install_covers_explain_tabular():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    first = re.search(r"```bash\n(.*?)\n```", (root / "README.md").read_text(), re.S).group(1)
    extras = set(re.search(r"\.\[([a-z,]+)\]", first).group(1).split(","))
    table = {  # one-line extras of pyproject.toml (tomllib is 3.11+)
        m.group(1): re.findall(r'"([^"]+)"', m.group(2))
        for m in re.finditer(r"^([a-z]+) = \[(.*)\]$", (root / "pyproject.toml").read_text(), re.M)
    }
    needed = {"scikit-learn", "xgboost", "numba"}  # the demo, the model and the tree_shap kernels
    got = {re.split(r"[<>=\[ ]", dep)[0] for extra in extras for dep in table.get(extra, [])}
    assert needed <= got, (extras, got)
