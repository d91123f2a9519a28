"""Bad input on every command line: one clear line on stderr, a non-zero exit, no traceback,
nothing left behind (a bad-input sweep of the CLI; see also test_bad_input.py)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from perspicio.cli import main


@pytest.fixture(scope="module")
def f(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz")
    (d / "latin1.csv").write_bytes("caf\xe9,b\n1,2\n".encode("latin-1"))
    (d / "header.csv").write_text("a,b,c\n")
    (d / "nocol.csv").write_text("foo,bar\n1,2\n")
    (d / "model.pkl").write_bytes(pickle.dumps({"a": 1}))
    torch.save(torch.nn.Linear(3, 2), d / "full.pt")
    (d / "trunc.json").write_bytes(b'{"learner": {"gradient_booster": ')
    (d / "xgb.ubj").write_bytes(b"{\x00garbage")
    (d / "imgs").mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    from PIL import Image

    Image.fromarray(rgb).save(d / "imgs" / "a.png")
    (d / "afile").write_text("x")
    return d


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, err


def assert_one_line_error(rc: int, err: str, *fragments: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "(run with --debug" not in err, err
    for frag in fragments:
        assert frag in lines[0], lines[0]


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


# (argv with {F} for the fixture folder and {OUT} for a fresh output dir, expected fragments)
CASES = [
    (["methods", "--family", "nope"], ["unknown method family 'nope'"]),
    (["methods", "--family", "cma"], ["Did you mean: cam"]),
    (["metrics", "--family", "faithfulnes"], ["Did you mean: faithfulness"]),
    (["layers", "--size", "0"], ["--size"]),
    (
        ["concepts", "discover", "chelsea", "--layer", "_blocks.5", "--top", "0", "-o", "{OUT}"],
        ["--top"],
    ),
    (["explain", "", "--method", "saliency", "-o", "{OUT}"], ["the image path is empty"]),
    (
        ["explain", "a cat", "--model", "minilm", "--method", "gradcam", "-o", "{OUT}"],
        ["does not take text"],
    ),
    (
        ["run", "{F}/nocol.csv", "--store", "{OUT}/st", "--methods", "saliency"],
        ["no image-path column"],
    ),
    (
        [
            "compare",
            "chelsea",
            "--methods",
            "saliency",
            "--method-option",
            "saliency.bogus=5",
            "-o",
            "{OUT}/r.html",
        ],
        ["no option 'bogus'"],
    ),
    (["benchmark", "pointing-game", "--threshold", "2", "-o", "{OUT}"], ["--threshold"]),
    (["benchmark", "pointing-game", "--threshold", "nan", "-o", "{OUT}"], ["--threshold"]),
    (["layers", "--size", "100000"], ["--size"]),
    (
        ["explain-tabular", "--model", "{F}/trunc.json", "--data", "{F}/header.csv", "-o", "{OUT}"],
        ["trunc.json is not a readable XGBoost model", "EOF"],
    ),
    (
        ["explain-tabular", "--model", "{F}/xgb.ubj", "--data", "{F}/header.csv", "-o", "{OUT}"],
        ["xgb.ubj is not a readable XGBoost model"],
    ),
    (["explain-tabular", "--model", "mlp", "--max-display", "0", "-o", "{OUT}"], ["--max-display"]),
    (
        ["explain-tabular", "--model", "breast_cancer_xgb", "--data", "nope", "-o", "{OUT}"],
        ["conflicts"],
    ),
    (["surrogate", "tree", "--holdout", "1.5", "-o", "{OUT}"], ["--holdout"]),
    (["surrogate", "tree", "--holdout", "nan", "-o", "{OUT}"], ["--holdout"]),
    (["surrogate", "linear", "--max-features", "3", "--l1", "0.1", "-o", "{OUT}"], ["not both"]),
    (["surrogate", "tree", "--model", "breast_cancer/xg", "-o", "{OUT}"], ["Did you mean: xgb"]),
    (["surrogate", "tree", "--data", "{F}/latin1.csv", "-o", "{OUT}"], ["not UTF-8"]),
    (["surrogate", "tree", "--data", "{F}/header.csv", "-o", "{OUT}"], ["no data rows"]),
    (["features", "maps", "chelsea", "--channels", "abc", "-o", "{OUT}"], ["--channels"]),
    (["features", "maximize", "--size", "0", "-o", "{OUT}"], ["--size"]),
    (["features", "maximize", "--size", "100000", "-o", "{OUT}"], ["--size"]),
    (
        ["run", "{F}/imgs", "--store", "{OUT}/st", "--methods", "saliency", "--address", "auto"],
        ["--engine ray"],
    ),
    (
        ["run", "{F}/imgs", "--store", "{OUT}/st", "--methods", "saliency", "--target", "99999"],
        ["out of range"],
    ),
    (
        ["run", "{F}/imgs", "--store", "{OUT}/st", "--methods", "saliency", "--batch-size", "0"],
        ["batch_size"],
    ),
    (
        [
            "run",
            "{F}/imgs",
            "--store",
            "{OUT}/st",
            "--method-option",
            "saliency.bogus=1",
            "--methods",
            "saliency",
        ],
        ["no option 'bogus'"],
    ),
]


@pytest.mark.parametrize("argv,fragments", CASES, ids=[" ".join(a[:4]) for a, _ in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(argv, fragments, f, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    args = [a.replace("{F}", str(f)).replace("{OUT}", str(out)) for a in argv]
    rc, err = run_cli(args, capsys)
    assert_one_line_error(rc, err, *fragments)
    assert not files_under(out), files_under(out)


def test_tabular_csv_that_is_not_utf8(f, tmp_path, capsys) -> None:
    xgb = pytest.importorskip("xgboost")
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    model = tmp_path / "m.json"
    xgb.XGBClassifier(n_estimators=2, max_depth=2).fit(x, y).save_model(model)
    out = tmp_path / "out"
    rc, err = run_cli(
        ["explain-tabular", "--model", str(model), "--data", str(f / "latin1.csv"), "-o", str(out)],
        capsys,
    )
    assert_one_line_error(rc, err, "not UTF-8", "0xe9")
    assert not files_under(out)


def test_debug_shows_the_traceback(f, tmp_path) -> None:
    from perspicio.errors import ModelError

    with pytest.raises(ModelError):
        main(
            [
                "--debug",
                "explain-tabular",
                "--model",
                str(f / "trunc.json"),
                "--data",
                str(f / "header.csv"),
                "-o",
                str(tmp_path / "out"),
            ]
        )


def test_a_failed_run_removes_the_store_it_created_but_keeps_an_existing_one(
    f, tmp_path, capsys
) -> None:
    existing = tmp_path / "old"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    rc, err = run_cli(
        [
            "run",
            str(f / "imgs"),
            "--store",
            str(existing),
            "--methods",
            "saliency",
            "--method-option",
            "saliency.bogus=1",
        ],
        capsys,
    )
    assert rc == 2 and (existing / "keep.txt").read_text() == "mine"


SERVE_CASES = [
    (["--port", "-1"], "--port"),
    (["--port", "99999"], "--port"),
    (["--time-limit", "nan"], "finite"),
    (["--max-upload-mb", "nan"], "finite"),
    (["--max-megapixels", "inf"], "finite"),
    (["--cache-mb", "-1"], "--cache-mb"),
    (["--model", "{F}/model.pkl"], "not a zip archive"),
    (["--model", "{F}/full.pt"], "torch.save() checkpoint"),
    (["--model", "{F}/imgs"], "is a directory"),
    (["--model", "{F}/nonexistent.pt"], "model file not found"),
    (["--model", "nope_model"], "unknown model 'nope_model'"),
]


@pytest.mark.parametrize("argv,fragment", SERVE_CASES, ids=[" ".join(a) for a, _ in SERVE_CASES])
def test_serve_options_are_checked_before_starting(argv, fragment, f, capsys, monkeypatch) -> None:
    pytest.importorskip("uvicorn")
    import uvicorn

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the server was started despite a bad option")

    monkeypatch.setattr(uvicorn, "run", never)
    args = ["serve", *[a.replace("{F}", str(f)) for a in argv]]
    rc, err = run_cli(args, capsys)
    assert_one_line_error(rc, err, fragment)
