"""Shared test fixtures: the bundled model and photo, a tiny CNN, and a hook checker.

Session fixtures (``zoo_model``, ``chelsea_batch``) are shared by every test file:
never change them in place (methods restore the model themselves; tests that want to
mutate weights, flags or grads should ``copy.deepcopy`` first or restore in ``finally``).
Everything is CPU-only, seeded with local generators and works offline.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn


@pytest.fixture(scope="session")
def zoo_model():
    """The bundled EfficientNet-Lite0 as a ``ZooModel`` (eval mode, CPU)."""
    from perspicio import zoo

    return zoo.load("efficientnet_lite0")


@pytest.fixture(scope="session")
def chelsea_batch(zoo_model) -> torch.Tensor:
    """scikit-image's ``chelsea`` preprocessed for the bundled model: (1, 3, 224, 224)."""
    from perspicio import zoo

    x = zoo_model.preprocess(zoo.sample("chelsea"))
    return x.detach().clone()


class TinyCNN(nn.Module):
    """conv3x3 -> ReLU -> conv3x3 -> ReLU -> GAP -> linear: 3 input channels, 5 classes.

    Weights come from a seeded local generator, so every instance is identical.
    The last ReLU (``act2``) is the natural CAM layer (8 channels at the input size).
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(self.pool(a).flatten(1))


@pytest.fixture
def tiny_cnn() -> TinyCNN:
    """A fresh :class:`TinyCNN` (eval mode) per test."""
    return TinyCNN().eval()


@pytest.fixture
def tiny_input() -> torch.Tensor:
    """A seeded (2, 3, 8, 8) batch for :class:`TinyCNN`."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 8, 8, generator=g)


def hook_report(model: nn.Module) -> list[str]:
    """Every hook still attached to ``model``'s modules or registered globally in torch."""
    from torch.nn.modules import module as module_mod

    found = []
    for name, m in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"):
            hooks = getattr(m, attr, None)
            if hooks:
                found.append(f"{name or '<root>'}.{attr}: {len(hooks)}")
    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks", "_global_module_registration_hooks",
                 "_global_parameter_registration_hooks", "_global_buffer_registration_hooks"):
        hooks = getattr(module_mod, attr, None)
        if hooks:
            found.append(f"torch global {attr}: {len(hooks)}")
    return found


@pytest.fixture
def assert_no_hooks() -> Callable[[nn.Module], None]:
    """``assert_no_hooks(model)`` fails listing any hook left on the model or globally."""

    def check(model: nn.Module) -> None:
        left = hook_report(model)
        assert not left, f"hooks left behind: {left}"

    return check


@pytest.fixture()
def hub_dir(tmp_path, monkeypatch):
    """An empty torch hub directory for the duration of one test. torch keeps a directory given to
    ``torch.hub.set_dir`` for good (``TORCH_HOME`` is then ignored), so the fixture swaps torch's own
    setting and puts back exactly what was there - usually "not set"."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    yield tmp_path / "hub"


# ---------------------------------------------------------------- browser tests (Playwright + Chromium)

#: the Debian chromium .ci/run installs (Playwright drives it through executable_path; no download)
CHROMIUM = os.environ.get("PERSPICIO_CHROMIUM", "/usr/bin/chromium")
#: the two widths every page is checked at
BROWSER_SIZES = {"desktop": {"width": 1280, "height": 900}, "phone": {"width": 390, "height": 844}}


def browser_module_setup(artifacts: str):
    """For a browser test module: Playwright's sync API (skipping the module without Playwright or
    Chromium, saying how to get them) and the folder its screenshots go to
    (``$PERSPICIO_ARTIFACTS/<artifacts>``, default ``test-artifacts/<artifacts>``)."""
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install '.[test]')"
    )
    if not Path(CHROMIUM).exists():
        pytest.skip(
            f"no chromium at {CHROMIUM}: install it with 'apt-get install -y chromium' (or set "
            "PERSPICIO_CHROMIUM) to run the browser tests",
            allow_module_level=True,
        )
    root = Path(__file__).resolve().parents[1]
    return sync_api, Path(os.environ.get("PERSPICIO_ARTIFACTS", root / "test-artifacts")) / artifacts


def pgc_recorded_maps(ref_cls: type, model: nn.Module, layers: list, x: torch.Tensor, targets: list, **call):
    """Run a pytorch-grad-cam method (the oracle of the CAM tests): every map its ``get_cam_image``
    returned (un-normalised, at layer resolution, before its ReLU/scaling), and its final output.
    Its hooks are released and the model's ``.grad`` cleared afterwards."""
    import numpy as np

    ref = ref_cls(model, list(layers))
    recorded: list = []
    inner = ref.get_cam_image

    def record(*args, **kwargs):
        out = inner(*args, **kwargs)
        recorded.append(np.asarray(out, dtype=np.float64))
        return out

    ref.get_cam_image = record
    try:
        full = ref(input_tensor=x, targets=targets, **call)
    finally:
        ref.activations_and_grads.release()
        for p in model.parameters():
            p.grad = None
    return recorded, np.asarray(full, dtype=np.float64)

