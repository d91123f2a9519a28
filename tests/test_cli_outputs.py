"""CLI output safety: an unwritable ``--out`` fails before any work, inputs that share a file
stem get distinct output names (and only files that exist are reported), and ``--output``
selects the tensor of a model that returns a dict."""

from __future__ import annotations

import errno
import json
import os
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perspicio.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def no_work(monkeypatch):
    """Fail loudly if a command gets as far as loading a model or an image."""

    def boom(*args, **kwargs):
        raise AssertionError("the command started working before checking --out")

    from perspicio.cli import evaluate, explain, features

    for mod in (explain, evaluate, features):
        monkeypatch.setattr(mod, "load_model", boom)
    monkeypatch.setattr("perspicio.zoo.load_image", boom)


# ---------------------------------------------------------------------------- --out checked first


@pytest.mark.parametrize("command", [
    ["explain", "--method", "gradcam"],
    ["features", "kernels"],
    ["benchmark", "pointing-game", "--max-grids", "1"],
])
def test_out_dir_with_a_file_in_the_way_fails_before_any_work(tmp_path, capsys, no_work, command) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    code, _, err = run_cli([*command, "--out", str(blocker / "sub")], capsys)
    line = one_line_error(code, err)
    assert "cannot write to --out" in line and "a file is in the way" in line
    assert blocker.read_text() == "a file, not a directory"


def test_compare_report_with_a_file_in_the_way_fails_before_any_work(tmp_path, capsys, no_work) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    code, _, err = run_cli(["compare", "--out", str(blocker / "report.html"), "--no-progress"], capsys)
    assert "a file is in the way" in one_line_error(code, err)


@pytest.mark.parametrize("failure, message", [
    (PermissionError(errno.EACCES, "Permission denied"), "no permission to write there"),
    (OSError(errno.EROFS, "Read-only file system"), "the file system is read-only"),
])
def test_unwritable_out_dir_is_reported_before_any_work(tmp_path, capsys, monkeypatch, no_work, failure, message) -> None:
    import perspicio.cli.common as common

    def refuse(*args, **kwargs):
        raise failure

    monkeypatch.setattr(common.tempfile, "NamedTemporaryFile", refuse)
    code, _, err = run_cli(["explain", "--method", "gradcam", "--out", str(tmp_path / "out")], capsys)
    assert message in one_line_error(code, err)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_out_dir_without_permission(tmp_path, capsys, no_work) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = run_cli(["explain", "--method", "gradcam", "--out", str(locked / "out")], capsys)
        assert "no permission" in one_line_error(code, err)
    finally:
        locked.chmod(0o700)


def test_writable_out_dir_is_left_without_probe_files(tmp_path) -> None:
    from perspicio.cli.common import check_out_dir

    out = check_out_dir(tmp_path / "a" / "b")
    assert out.is_dir() and not list(out.iterdir())


# ---------------------------------------------------------------------------- shared stems


def test_output_names_are_unique() -> None:
    from perspicio.cli.common import output_names

    assert output_names(["a/x.png", "b/x.png", "x.jpg", "y.png", "chelsea", "X.png"]) == \
        ["x", "x-2", "x-3", "y", "chelsea", "X-4"]
    assert output_names(["x-2.png", "x.png", "x.jpg"]) == ["x-2", "x", "x-3"]


def test_inputs_sharing_a_stem_get_distinct_outputs(tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    sources = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "x.jpg"]
    for path in sources:
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path, quality=95)
    out = tmp_path / "out"
    code, stdout, err = run_cli(["explain", *map(str, sources), "--method", "gradcam", "--out", str(out),
                                 "--no-progress"], capsys)
    assert code == 0, err
    import torch

    import perspicio
    from perspicio import zoo

    model = zoo.load("efficientnet_lite0")
    for name, path in zip(("x", "x-2", "x-3"), sources):
        for ext in ("png", "npy", "json"):
            assert (out / f"{name}_gradcam.{ext}").is_file(), (name, ext)
        assert (out / f"{name}_comparison.png").is_file()
        expected = perspicio.explain(model, model.preprocess(zoo.load_image(path)), "gradcam").attributions
        np.testing.assert_allclose(np.load(out / f"{name}_gradcam.npy"), expected.numpy(), rtol=1e-4, atol=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"x", "x-2", "x-3"}
    files = [p for p in out.iterdir() if p.is_file()]
    reported = int(re.search(r"wrote (\d+) files", stdout).group(1))
    assert reported == len(files) == 3 * 4 + 1
    assert "x-2_*" in stdout and torch.is_tensor(expected)


# ---------------------------------------------------------------------------- --output


FACTORY = textwrap.dedent('''
    import torch
    from torch import nn


    class DictHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 4, stride=4)
            self.act = nn.ReLU()
            self.fc = nn.Linear(8, 10)
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)

        def forward(self, x):
            a = self.act(self.conv(x))
            return {"logits": self.fc(a.mean((2, 3))), "features": a}


    def make():
        return DictHead()
''')


@pytest.fixture
def dict_model(tmp_path, monkeypatch) -> str:
    (tmp_path / "pkg_dict_head.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "pkg_dict_head:make"


def test_cli_output_selects_the_tensor(tmp_path, capsys, dict_model) -> None:
    out = tmp_path / "out"
    code, stdout, err = run_cli(["explain", "--model", dict_model, "--method", "gradcam,occlusion", "--output",
                                 "logits", "--out", str(out), "--no-progress", "--layer", "act"], capsys)
    assert code == 0, err
    assert "top-5" in stdout
    meta = json.loads((out / "chelsea_gradcam.json").read_text())
    assert meta["options"]["output"] == "logits"
    assert np.load(out / "chelsea_occlusion.npy").shape == (1, 3, 224, 224)


def test_cli_without_output_names_the_structure(tmp_path, capsys, dict_model) -> None:
    code, _, err = run_cli(["explain", "--model", dict_model, "--method", "gradcam", "--layer", "act",
                            "--out", str(tmp_path / "out"), "--no-progress"], capsys)
    line = one_line_error(code, err)
    assert "the model returned a dict with keys 'logits' (tensor (1, 10)), 'features'" in line
    assert "pass output='logits'" in line


def test_cli_compare_with_output(tmp_path, capsys, dict_model) -> None:
    report = tmp_path / "r" / "report.html"
    code, stdout, err = run_cli(["compare", "--model", dict_model, "--methods", "gradcam,saliency", "--metrics",
                                 "sparseness", "--output", "0", "--out", str(report), "--no-progress"], capsys)
    assert code == 0, err
    assert report.is_file() and Path(str(report)).with_suffix(".json").is_file()
