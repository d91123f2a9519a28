"""Models whose output is not one tensor: ``output=`` selects the tensor to explain (a key, an
index, a path or a callable) in every method, in ``perspicio.explain``, in the metrics and in
``compare``; without it every method raises a ModelError that names the output's structure."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from conftest import TinyCNN
from torch import nn

import perspicio
from perspicio import metrics
from perspicio.core.outputs import OutputSelector, describe_output
from perspicio.core.registry import METHODS
from perspicio.errors import ModelError, OptionError
from perspicio.methods import names

ALL = [n for n in names() if not METHODS.get(n).extra.get("needs")]  # every method for any torch network


class DictNet(TinyCNN):
    """TinyCNN returning a dict: the logits and a tuple of feature maps."""

    def forward(self, x: torch.Tensor) -> dict:  # type: ignore[override]
        a = self.act2(self.conv2(self.act1(self.conv1(x))))
        return {"hidden": (a, a.mean(1)), "logits": self.fc(self.pool(a).flatten(1))}


class TupleNet(TinyCNN):
    def forward(self, x: torch.Tensor) -> tuple:  # type: ignore[override]
        a = self.act2(self.conv2(self.act1(self.conv1(x))))
        return a.mean(1), self.fc(self.pool(a).flatten(1))


class FakeModelOutput(OrderedDict):
    """The behaviour of a Hugging Face ``ModelOutput`` that matters here: a Mapping whose fields
    are also attributes, indexed by position over its non-None fields (``to_tuple``)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_tuple(self) -> tuple:
        return tuple(v for v in self.values() if v is not None)


class HFNet(TinyCNN):
    def forward(self, x: torch.Tensor) -> FakeModelOutput:  # type: ignore[override]
        a = self.act2(self.conv2(self.act1(self.conv1(x))))
        return FakeModelOutput(loss=None, logits=self.fc(self.pool(a).flatten(1)), hidden_states=(a,))


#: 4 features (2x2 blocks of 4x4 pixels) keep the coalition methods fast on 8x8 inputs
BLOCKS = torch.arange(4).view(2, 2).repeat_interleave(4, 0).repeat_interleave(4, 1)
FAST = {m: {"feature_mask": BLOCKS} for m in ("shapley_exact", "shapley_sampling", "kernel_shap", "lime",
                                              "feature_ablation")} | {"rise": {"budget": 64}}
FAST["shapley_sampling"]["budget"] = FAST["lime"]["budget"] = 64


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", ALL)
def test_every_method_explains_the_selected_output(method: str, x: torch.Tensor) -> None:
    """output="logits" on a dict-returning model gives exactly the plain model's explanation."""
    opts = FAST.get(method, {})
    ref = perspicio.explain(TinyCNN().eval(), x, method=method, batch_size=5, **opts)
    e = perspicio.explain(DictNet().eval(), x, method=method, batch_size=5, output="logits", **opts)
    torch.testing.assert_close(e.attributions, ref.attributions)
    assert e.options["output"] == "logits"


@pytest.mark.parametrize("method", ALL)
def test_every_method_names_a_non_tensor_output(method: str, x: torch.Tensor) -> None:
    if method.startswith("neuron_"):  # explains a layer's neuron: the output is never read
        e = perspicio.explain(DictNet().eval(), x, method=method, batch_size=5)
        torch.testing.assert_close(e.attributions, perspicio.explain(TinyCNN().eval(), x, method=method,
                                                                     batch_size=5).attributions)
        return
    with pytest.raises(ModelError, match=r"the model returned a dict with keys 'hidden' \(tuple of 2 tensors\), "
                                         r"'logits' \(tensor \(\d+, 5\)\); pass output='logits' "
                                         r"\(a key, an index or a callable\)"):
        perspicio.explain(DictNet().eval(), x, method=method, batch_size=5)


@pytest.mark.parametrize("spec", [1, -1, "logits", ("logits",), lambda out: out[1]])
def test_tuple_outputs_by_index_or_callable(spec, x: torch.Tensor) -> None:
    model = HFNet().eval() if isinstance(spec, (str, tuple)) else TupleNet().eval()
    ref = perspicio.explain(TinyCNN().eval(), x, "gradcam")
    e = perspicio.explain(model, x, "gradcam", output=spec)
    torch.testing.assert_close(e.attributions, ref.attributions)
    ref_occ = perspicio.explain(TinyCNN().eval(), x, "occlusion", window=4, stride=4)
    torch.testing.assert_close(perspicio.explain(model, x, "occlusion", window=4, stride=4, output=spec).attributions,
                               ref_occ.attributions)


def test_model_output_positions_skip_none_and_paths_reach_nested_tensors(x: torch.Tensor) -> None:
    model = HFNet().eval()
    ref = perspicio.explain(TinyCNN().eval(), x, "saliency")
    torch.testing.assert_close(perspicio.explain(model, x, "saliency", output=0).attributions, ref.attributions)
    # a nested tensor: the channel-mean map of the CAM layer, summed, as a callable target
    e = perspicio.explain(model, x, "saliency", output=("hidden_states", 0), target=lambda a: a.sum((1, 2, 3)))
    assert e.attributions.shape == (2, 3, 8, 8) and e.attributions.abs().sum() > 0


def test_layer_names_still_refer_to_the_users_model(x: torch.Tensor) -> None:
    e = perspicio.explain(DictNet().eval(), x, "gradcam", layer="act1", output="logits")
    assert e.layer == "act1"
    torch.testing.assert_close(e.attributions, perspicio.explain(TinyCNN().eval(), x, "gradcam", layer="act1").attributions)


def test_output_errors(x: torch.Tensor) -> None:
    model = DictNet().eval()
    with pytest.raises(ModelError, match=r"output key 'logit' not found; the model returned a dict with keys 'hidden'"):
        perspicio.explain(model, x, "gradcam", output="logit")
    with pytest.raises(ModelError, match=r"output index 5 is out of range"):
        perspicio.explain(TupleNet().eval(), x, "gradcam", output=5)
    with pytest.raises(ModelError, match=r"output='hidden' selected a tuple of 2 tensors"):
        perspicio.explain(model, x, "gradcam", output="hidden")
    with pytest.raises(ModelError, match=r"shape \(5,\) for a batch of 2 input\(s\); it must have one row per input"):
        perspicio.explain(model, x, "gradcam", output=lambda o: o["logits"][0])
    with pytest.raises(OptionError, match="output must be a key"):
        perspicio.explain(model, x, "gradcam", output=1.5)
    with pytest.raises(OptionError, match="output must be a key"):
        perspicio.explain(model, x, "gradcam", output=True)


def test_describe_output() -> None:
    t = torch.zeros(2, 3)
    assert describe_output(t) == "tensor (2, 3)"
    assert describe_output((t, t)) == "tuple of 2 tensors (2, 3)"
    assert describe_output([{"a": t}]) == "list of 1 item: [0] dict with keys 'a' (tensor (2, 3))"
    assert describe_output({"x": None, "y": [t, 3]}) == "dict with keys 'x' (None), 'y' (list of 2 items: [0] tensor (2, 3), [1] int)"
    sel = OutputSelector(None)
    assert sel(t) is t
    with pytest.raises(ModelError, match=r"the model returned a tuple of 2 items: \[0\] tensor \(2, 3\), \[1\] None; "
                                         r"pass output=0"):
        sel((t, None), 2)


def test_metrics_use_the_explained_output(x: torch.Tensor) -> None:
    model, plain = DictNet().eval(), TinyCNN().eval()
    e = perspicio.explain(model, x, "gradcam", output="logits")
    ref_e = perspicio.explain(plain, x, "gradcam")
    deletion = metrics.get("deletion")
    ref = deletion(steps=4)(plain, x, ref_e)
    # the explanation's recorded output= is the default; an explicit one works too
    torch.testing.assert_close(deletion(steps=4)(model, x, e).scores, ref.scores)
    torch.testing.assert_close(deletion(steps=4, output="logits")(model, x, e.attributions, target=e.targets).scores,
                               ref.scores)
    with pytest.raises(ModelError, match="pass output='logits'"):
        deletion(steps=4)(model, x, e.attributions)
    # a metric that re-runs the method on the model
    stab = metrics.get("max_sensitivity")
    torch.testing.assert_close(stab(samples=2)(model, x, e).scores, stab(samples=2)(plain, x, ref_e).scores)


def test_compare_with_output(x: torch.Tensor) -> None:
    opts = {"metric_options": {"deletion": {"steps": 8}}}
    comp = perspicio.metrics.compare(DictNet().eval(), x, methods=["gradcam", "saliency"], metrics=["deletion"],
                                     output="logits", **opts)
    ref = perspicio.metrics.compare(TinyCNN().eval(), x, methods=["gradcam", "saliency"], metrics=["deletion"], **opts)
    assert not comp.errors
    for m in ("gradcam", "saliency"):
        torch.testing.assert_close(comp.results[m]["deletion"].scores, ref.results[m]["deletion"].scores)


def test_output_selection_keeps_the_inference_twin_cache(x: torch.Tensor) -> None:
    """The model is not wrapped per call: output-only passes of a tuple model with BatchNorm reuse
    one cached twin across calls (keyed by the model), and layer hooks see the user's modules."""
    from perspicio.core import caches

    class BNTuple(TupleNet):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6))

    model = BNTuple().eval()
    a = perspicio.explain(model, x, "occlusion", window=4, stride=4, output=1)
    b = perspicio.explain(model, x, "occlusion", window=4, stride=4, output=1)
    torch.testing.assert_close(a.attributions, b.attributions)
    assert caches.entry("inference twins", model) is not None  # keyed by the user's model, not a per-call wrapper


def test_completeness_recomputed_on_the_explained_output(x: torch.Tensor) -> None:
    """completeness_error(model=...) re-runs the model: it must select the same output as the call."""
    from perspicio.methods.path import completeness_error

    net = DictNet()
    e = perspicio.explain(net, x, method="integrated_gradients", output="logits", target=[0, 3], steps=64)
    recorded = completeness_error(e)
    recomputed = completeness_error(e, model=net)
    torch.testing.assert_close(recomputed, recorded, rtol=1e-5, atol=1e-6)
