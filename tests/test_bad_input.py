"""Bad input gives a clear perspicio error in Python, and on the CLI a non-zero exit, one
line on stderr and no half-written output. Also the CLI's happy paths."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import perspicio
from perspicio import zoo
from perspicio.cli import main
from perspicio.errors import (
    InputError,
    LayerError,
    ModelError,
    OptionError,
    PerspicioError,
    TargetError,
    UnknownNameError,
)

# ---------------------------------------------------------------------------- files


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("images")
    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    good = d / "good.png"
    Image.fromarray(rgb).save(good)
    corrupt = d / "corrupt.png"
    corrupt.write_bytes(good.read_bytes()[:80])  # valid header, truncated pixel data
    text = d / "notes.png"
    text.write_text("these are not pixels\n")
    # PNG headers claiming 81 MP (above our 64 MP limit) and 900 MP (above Pillow's bomb limit)
    # with almost no pixel data: both must be refused before decoding
    bomb, hugebomb = d / "bomb.png", d / "hugebomb.png"
    for path, side in ((bomb, 9000), (hugebomb, 30000)):
        path.write_bytes(
            b"\x89PNG\r\n\x1a\n"
            + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b"")
        )
    gray = d / "gray.png"
    Image.fromarray(rgb[..., 0]).save(gray)
    gray16 = d / "gray16.png"
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(gray16)
    rgba = d / "rgba.png"
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(rgba)
    palette = d / "palette.png"
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE).save(palette)
    return {p.stem: p for p in (good, corrupt, text, bomb, hugebomb, gray, gray16, rgba, palette)} | {
        "missing": d / "missing.png"
    }


# ---------------------------------------------------------------------------- Python


def test_image_errors_in_python(files) -> None:
    with pytest.raises(InputError, match="not found"):
        zoo.load_image(files["missing"])
    with pytest.raises(InputError, match="corrupt or truncated"):
        zoo.load_image(files["corrupt"])
    with pytest.raises(InputError, match="not an image"):
        zoo.load_image(files["notes"])
    with pytest.raises(InputError, match="9000x9000 = 81,000,000 pixels, above the limit"):
        zoo.load_image(files["bomb"])
    with pytest.raises(InputError, match="too large to decode safely"):
        zoo.load_image(files["hugebomb"])
    with pytest.raises(UnknownNameError, match="chelsea"):
        zoo.sample("chelsee")


@pytest.mark.parametrize("name", ["gray", "gray16", "rgba", "palette"])
def test_unusual_image_modes_are_converted(files, name: str) -> None:
    img = zoo.load_image(files[name])
    assert img.mode == "RGB" and img.size == (50, 40)


def test_unknown_names_in_python(tiny_cnn, tiny_input) -> None:
    with pytest.raises(UnknownNameError, match="unknown method 'gradcm'.*Did you mean: gradcam"):
        perspicio.explain(tiny_cnn, tiny_input, method="gradcm")
    with pytest.raises(UnknownNameError, match="efficientnet_lite0"):
        zoo.load("efficientnet_lite1")


def test_layer_errors_in_python(zoo_model, chelsea_batch, tiny_cnn, tiny_input) -> None:
    with pytest.raises(LayerError, match=r"'_act_haed' not found.*Did you mean: .*_act_head"):
        perspicio.explain(zoo_model, chelsea_batch, method="gradcam", layer="_act_haed")
    with pytest.raises(LayerError, match=r"layer 'fc'.*output \(2, 5\).*spatial output"):
        perspicio.explain(tiny_cnn, tiny_input, method="gradcam", layer="fc")
    with pytest.raises(LayerError, match=r"layer 'pool' has no spatial extent.*\(2, 8, 1, 1\)"):
        perspicio.explain(tiny_cnn, tiny_input, method="scorecam", layer="pool")
    with pytest.raises(LayerError, match="not part of the model"):
        perspicio.explain(tiny_cnn, tiny_input, method="gradcam", layer=torch.nn.ReLU())
    with pytest.raises(LayerError, match="dotted module name or an nn.Module"):
        perspicio.explain(tiny_cnn, tiny_input, method="gradcam", layer=3)


def test_target_errors_in_python(zoo_model, chelsea_batch) -> None:
    with pytest.raises(TargetError, match=r"target index 1000 is out of range.*1000 outputs \(0\.\.999\)"):
        perspicio.explain(zoo_model, chelsea_batch, target=1000)
    with pytest.raises(TargetError, match="out of range"):
        perspicio.explain(zoo_model, chelsea_batch, target=-1)
    with pytest.raises(TargetError, match="unknown class name 'Egyptian kat'.*egyptian cat"):
        perspicio.explain(zoo_model, chelsea_batch, target="Egyptian kat")
    with pytest.raises(TargetError, match="class index, name or callable"):
        perspicio.explain(zoo_model, chelsea_batch, target=True)


def test_input_errors_in_python(tiny_cnn, tiny_input) -> None:
    with pytest.raises(InputError, match=r"4 dimensions.*got shape \(3, 8, 8\).*unsqueeze\(0\)"):
        perspicio.explain(tiny_cnn, tiny_input[0])
    with pytest.raises(InputError, match=r"expects 3 input channels; got 1"):
        perspicio.explain(tiny_cnn, tiny_input[:, :1])
    with pytest.raises(InputError, match="at least one sample"):
        perspicio.explain(tiny_cnn, tiny_input[:0])
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = tiny_input.clone()
        x[0, 1, 2, 3] = bad
        with pytest.raises(InputError, match="1 NaN/Inf value"):
            perspicio.explain(tiny_cnn, x, method="gradcam")
    with pytest.raises(InputError, match="torch.Tensor or numpy array"):
        perspicio.explain(tiny_cnn, [[1.0, 2.0]])
    # numpy arrays are accepted
    e = perspicio.explain(tiny_cnn, tiny_input.numpy(), method="gradcam")
    assert e.attributions.shape == (2, 1, 8, 8)


def test_option_errors_in_python(tiny_cnn, tiny_input) -> None:
    with pytest.raises(OptionError, match="batch_size must be an integer >= 1 or None; got 0"):
        perspicio.explain(tiny_cnn, tiny_input, method="scorecam", batch_size=0)
    with pytest.raises(OptionError, match="memory_budget must be a positive"):
        perspicio.explain(tiny_cnn, tiny_input, method="ablationcam", memory_budget=-5)
    with pytest.raises(OptionError, match="upsample must be one of"):
        perspicio.explain(tiny_cnn, tiny_input, method="gradcam", upsample="cubic")
    with pytest.raises(OptionError, match="no option 'steps'"):
        perspicio.explain(tiny_cnn, tiny_input, method="gradcam", steps=5)


# ---------------------------------------------------------------------------- issue 14: smaller gaps


@pytest.mark.parametrize("method", ["gradcam", "saliency", "integrated_gradients", "occlusion", "lrp", "smoothgrad"])
def test_zero_dim_tensor_and_numpy_targets_are_class_indices(tiny_cnn, tiny_input, method: str) -> None:
    """``target=logits.argmax()`` (a 0-d tensor) and numpy integers mean that one class."""
    with torch.no_grad():
        top = tiny_cnn(tiny_input[:1]).argmax()
    assert top.ndim == 0
    ref = perspicio.explain(tiny_cnn, tiny_input, method, target=int(top))
    for t in (top, np.int64(int(top)), np.array(int(top))):
        e = perspicio.explain(tiny_cnn, tiny_input, method, target=t)
        assert e.targets.tolist() == [int(top)] * 2
        torch.testing.assert_close(e.attributions, ref.attributions)
    with pytest.raises(TargetError, match="integer class indices"):
        perspicio.explain(tiny_cnn, tiny_input, method, target=torch.tensor(1.5))


@pytest.mark.parametrize("method", ["occlusion", "feature_ablation", "kernel_shap", "shapley_sampling", "shapley_exact", "lime"])
def test_model_agnostic_methods_check_the_channel_count(tiny_cnn, tiny_input, method: str) -> None:
    with pytest.raises(InputError, match=r"the model expects 3 input channels; got 1 \(input shape \(2, 1, 8, 8\)\)"):
        perspicio.explain(tiny_cnn, tiny_input[:, :1], method)
    with pytest.raises(InputError, match=r"expects 3 input channels; got 4"):
        perspicio.explain(tiny_cnn, torch.cat([tiny_input, tiny_input[:, :1]], 1).numpy(), method)


def test_black_box_with_a_declared_input_shape_checks_the_channel_count(tiny_cnn) -> None:
    """An ONNX session declares (N, C, H, W): a wrong C is refused at the boundary."""

    class Input:
        name = "x"
        type = "tensor(float)"
        shape = ["batch", 3, 8, 8]

    class Session:
        def get_inputs(self):
            return [Input()]

        def run(self, outputs, feeds):
            with torch.no_grad():
                return [tiny_cnn(torch.from_numpy(feeds["x"])).numpy()]

    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    e = perspicio.explain(Session(), x, "occlusion", window=4, stride=4, target=0)
    assert e.attributions.shape == (1, 3, 8, 8)
    with pytest.raises(InputError, match="the model expects 3 input channels; got 1"):
        perspicio.explain(Session(), x[:, :1], "occlusion", window=4, stride=4, target=0)


@pytest.mark.parametrize("method", ["gradcam", "saliency", "integrated_gradients", "occlusion", "kernel_shap",
                                    "scorecam", "deeplift"])
def test_a_target_callable_returning_nan_is_an_error(tiny_cnn, tiny_input, method: str) -> None:
    def nan_score(out: torch.Tensor) -> torch.Tensor:
        return out[:, 0] * float("nan")

    opts = {"feature_mask": torch.arange(4).view(2, 2).repeat_interleave(4, 0).repeat_interleave(4, 1)} \
        if method == "kernel_shap" else {}
    with pytest.raises(TargetError, match=r"the target callable nan_score returned NaN/Inf for 2 of 2 row\(s\)"):
        perspicio.explain(tiny_cnn, tiny_input, method, target=nan_score, **opts)


def test_a_target_that_turns_nan_on_perturbed_copies_is_an_error(tiny_cnn, tiny_input) -> None:
    def fragile(out: torch.Tensor) -> torch.Tensor:  # finite on the input, NaN on some occluded copies
        return torch.log(out[:, 0] - out[:, 0].max() + 1e-3)

    with torch.no_grad():
        assert torch.isfinite(fragile(tiny_cnn(tiny_input[:1])))
    with pytest.raises(TargetError, match="the target callable fragile returned NaN/Inf"):
        perspicio.explain(tiny_cnn, tiny_input[:1], "occlusion", target=fragile, window=4, stride=2)


@pytest.mark.parametrize("method", ["gradcam", "saliency", "occlusion", "kernel_shap", "lrp"])
def test_a_model_on_the_meta_device_is_refused(tiny_input, method: str) -> None:
    from conftest import TinyCNN

    model = TinyCNN().to("meta")
    with pytest.raises(ModelError, match=r"TinyCNN\) has parameters on the 'meta' device.*to_empty"):
        perspicio.explain(model, tiny_input, method)
    from perspicio import metrics

    with pytest.raises(ModelError, match="'meta' device"):
        metrics.get("deletion")(steps=4)(model, tiny_input, torch.ones(2, 8, 8))


def test_every_error_is_a_perspicio_error() -> None:
    for cls in (InputError, LayerError, OptionError, TargetError, UnknownNameError):
        assert issubclass(cls, PerspicioError)


# ---------------------------------------------------------------------------- CLI


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def assert_cli_error(args: list[str], capsys, out_dir: Path, *fragments: str) -> str:
    code, _, err = run_cli([*args, "--out", str(out_dir), "--no-progress"], capsys)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert not out_dir.exists() or not any(out_dir.iterdir()), "files written despite the error"
    return lines[0]


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("missing", ["not found"]),
        ("corrupt", ["corrupt or truncated"]),
        ("notes", ["not an image"]),
        ("bomb", ["above the limit"]),
    ],
)
def test_cli_image_errors(files, tmp_path, capsys, case: str, fragments: list[str]) -> None:
    # a good image first: nothing is written for it either
    assert_cli_error(["explain", str(files["good"]), str(files[case]), "--method", "gradcam"], capsys, tmp_path / "out", *fragments)


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--model", "nosuchnet"], ["unknown model 'nosuchnet'"]),
        (["--method", "gradcm"], ["unknown method 'gradcm'", "gradcam"]),
        (["--method", "gradcam", "--layer", "_act_haed"], ["'_act_haed' not found", "_act_head"]),
        (["--method", "gradcam", "--layer", "_fc"], ["layer '_fc'", "spatial output"]),
        (["--method", "gradcam", "--target", "1000"], ["out of range"]),
        (["--method", "gradcam", "--target", "Egyptian kat"], ["unknown class name", "egyptian cat"]),
        (["--method", "gradcam", "--steps", "5"], ["--steps"]),
        (["--method", "scorecam", "--batch-size", "0"], ["batch_size must be an integer >= 1"]),
        (["nosuchsample"], ["not found", "chelsea"]),
    ],
)
def test_cli_errors(tmp_path, capsys, args: list[str], fragments: list[str]) -> None:
    assert_cli_error(["explain", *args], capsys, tmp_path / "out", *fragments)


def test_cli_converts_unusual_images(files, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    paths = [str(files[k]) for k in ("gray", "gray16", "rgba", "palette")]
    code, stdout, err = run_cli(["explain", *paths, "--method", "gradcam", "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    for k in ("gray", "gray16", "rgba", "palette"):
        assert (out / f"{k}_gradcam.png").is_file() and (out / f"{k}_comparison.png").is_file()
        assert np.load(out / f"{k}_gradcam.npy").shape == (1, 1, 224, 224)


@pytest.mark.slow
def test_cli_explain_default_run(tmp_path, capsys) -> None:
    """`perspicio explain` with no arguments: the bundled model, chelsea, one method of each of six
    families (the demo set); the top-5 shows probability then logit."""
    from perspicio.cli.explain import DEMO_METHODS

    out = tmp_path / "out"
    code, stdout, err = run_cli(["explain", "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    top5 = stdout.split("top-5")[1].splitlines()[1:6]
    assert "285" in top5[0] and "Egyptian cat" in top5[0]
    assert float(top5[0].split()[-2]) == pytest.approx(0.80, abs=0.02)  # probability
    assert float(top5[0].split()[-1]) == pytest.approx(11.04, abs=0.05)  # logit
    for m in DEMO_METHODS:
        for ext in ("png", "npy", "json"):
            assert (out / f"chelsea_{m}.{ext}").is_file(), (m, ext)
        meta = json.loads((out / f"chelsea_{m}.json").read_text())
        assert meta["method"] == m and meta["targets"] == [285]
    assert np.load(out / "chelsea_gradcam.npy").shape == (1, 1, 224, 224)
    with Image.open(out / "chelsea_gradcam.png") as im:
        assert im.size[0] >= 224
    with Image.open(out / "chelsea_comparison.png") as im:
        assert im.size[0] > 224
    summary = json.loads((out / "summary.json").read_text())
    assert {e["method"] for e in summary["chelsea"]} == set(DEMO_METHODS)
    assert not list(out.glob("*.tmp"))


def test_cli_listing_commands(capsys) -> None:
    from perspicio.methods import names

    code, out, _ = run_cli(["methods"], capsys)
    assert code == 0
    for m in names("cam"):
        assert any(line.split()[:2] == [m, "cam"] for line in out.splitlines()), m
    code, out, _ = run_cli(["methods", "--markdown", "--family", "cam"], capsys)
    assert code == 0 and "| `gradcam` | cam |" in out
    code, out, _ = run_cli(["models"], capsys)
    assert code == 0 and "efficientnet_lite0" in out and "torchvision:NAME" in out
    code, out, _ = run_cli(["layers", "--size", "96"], capsys)
    assert code == 0
    default = [line for line in out.splitlines() if line.startswith(">")]
    assert len(default) == 1 and "_act_head" in default[0] and "(1, 1280, 3, 3)" in default[0]
    assert "default CAM layer: _act_head" in out
    code, _, err = run_cli(["layers", "nosuchnet"], capsys)
    assert code != 0 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
