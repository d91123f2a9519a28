"""The per-call work of the attention methods made cheaper without changing what it computes:
the model guard and the attention-module search walk the module tree through ``_modules`` /
``_parameters`` (``core.guard.module_tree``) and must give exactly what nn.Module's generators give -
shared and tied modules and parameters, None children and parameters, and models that override the
traversal (which keep the generators) - and the guard must restore the same state as before."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from perspicio.core.guard import _modules_and_parameters, model_guard, module_tree
from perspicio.methods.attention import AttentionCapture, attention_modules


class Attention(nn.Module):
    """A self-attention block whose softmax the capture reads (class name contains 'Attention')."""

    def __init__(self, d: int = 4, heads: int = 2) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        return (a @ v).transpose(1, 2).reshape(n, t, d)


class OuterAttention(nn.Module):
    """An 'Attention' module holding an inner one: only the inner one is an attention module."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.out = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.inner(x))


class Tangled(nn.Module):
    """Shared and tied modules and parameters, None children and parameters, a nested container."""

    def __init__(self) -> None:
        super().__init__()
        shared = Attention()
        self.a = OuterAttention(shared)
        self.b = nn.Sequential(
            nn.Linear(4, 4), shared, nn.Sequential(nn.ReLU(), OuterAttention(Attention()))
        )
        self.tied = nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4, 4)
        self.head.weight = self.tied.weight  # the same Parameter in two modules
        self.register_module("nothing", None)
        self.register_parameter("scale", None)
        self.bias = nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tied(self.b(self.a(x)))) + self.bias


class Hiding(nn.Sequential):
    """A module whose ``named_modules`` hides its second child: the walk must follow it."""

    def named_modules(self, memo=None, prefix="", remove_duplicate=True):  # noqa: ANN001, ANN201
        for name, m in super().named_modules(memo, prefix, remove_duplicate):
            if not name.endswith(".1"):
                yield name, m


class HidingParameters(nn.Sequential):
    """A model whose ``parameters`` leaves out its last layer's (a wrapper exposing a subset)."""

    def parameters(self, recurse: bool = True):  # noqa: ANN201
        yield from self[0].parameters()


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _same_named(a: list, b: list) -> bool:
    return len(a) == len(b) and all(n == m and x is y for (n, x), (m, y) in zip(a, b))


def _models() -> list[nn.Module]:
    return [
        Tangled(),
        nn.Sequential(Tangled(), Hiding(nn.Linear(4, 4), nn.Linear(4, 4), Attention())),
        nn.TransformerEncoder(
            nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2, enable_nested_tensor=False
        ),
        nn.Linear(3, 3),
    ]


@pytest.mark.parametrize(
    "model", _models(), ids=["tangled", "hiding-child", "torch-encoder", "leaf"]
)
def test_module_tree_and_guard_walk_equal_the_generators(model: nn.Module) -> None:
    assert _same_named(module_tree(model), list(model.named_modules()))
    mods, params = _modules_and_parameters(model)
    assert _same(mods, list(model.modules()))
    assert _same(params, list(model.parameters()))


def test_tangled_walk_counts() -> None:
    """Exact names and counts on the hand-built model: 15 modules (the shared one once, under its
    first name; the None child skipped) and 13 parameters (the tied weight once, None skipped)."""
    model = Tangled()
    names = [n for n, _ in module_tree(model)]
    assert names == [
        "",
        "a",
        "a.inner",
        "a.inner.qkv",
        "a.out",
        "b",
        "b.0",
        "b.2",
        "b.2.0",
        "b.2.1",
        "b.2.1.inner",
        "b.2.1.inner.qkv",
        "b.2.1.out",
        "tied",
        "head",
    ]
    _, params = _modules_and_parameters(model)
    # bias; a.inner.qkv, a.out, b.0, b.2.1.inner.qkv, b.2.1.out: weight and bias; tied.weight; head.bias
    assert len(params) == 1 + 5 * 2 + 1 + 1
    assert sum(p is model.tied.weight for p in params) == 1


def test_overridden_traversal_keeps_the_generators() -> None:
    hiding = nn.Sequential(Hiding(nn.Linear(2, 2), nn.Linear(2, 2)))
    assert [n for n, _ in module_tree(hiding)] == ["", "0", "0.0"]  # the override's answer
    wrapper = HidingParameters(nn.Linear(2, 2), nn.Linear(2, 2))
    mods, params = _modules_and_parameters(wrapper)
    assert _same(params, list(wrapper[0].parameters()))
    # the guard freezes and restores exactly the parameters the model exposes, as before
    wrapper[1].weight.requires_grad_(True)
    with model_guard(wrapper):
        assert not wrapper[0].weight.requires_grad
        assert wrapper[1].weight.requires_grad


def _attention_modules_reference(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The original search: every MultiheadAttention, and every '*Attention*' module holding no
    other such module (``m.modules()`` walks)."""
    named = list(model.named_modules())
    cands = [
        (n, m)
        for n, m in named
        if isinstance(m, nn.MultiheadAttention) or "attention" in type(m).__name__.lower()
    ]
    ids = {id(m) for _, m in cands}
    return [
        (n, m)
        for n, m in cands
        if isinstance(m, nn.MultiheadAttention)
        or not any(id(c) in ids for c in m.modules() if c is not m)
    ]


@pytest.mark.parametrize("model", _models()[:3], ids=["tangled", "hiding-child", "torch-encoder"])
def test_attention_search_equals_the_original(model: nn.Module) -> None:
    got = attention_modules(model)
    assert _same_named(got, _attention_modules_reference(model))
    assert got  # every model here has attention


def test_shared_attention_module_is_captured_at_each_call() -> None:
    """The shared inner attention runs twice per forward (under a and under b): two records, the
    outer 'Attention' wrappers none; the hooks are gone afterwards."""
    model = Tangled().eval()
    x = torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), AttentionCapture(model) as cap:
        model(x)
    assert [r.name for r in cap.records] == ["a.inner", "a.inner", "b.2.1.inner"]
    assert all(r.weights.shape == (1, 2, 3, 3) for r in cap.records)
    assert all(torch.allclose(r.weights.sum(-1), torch.ones(1, 2, 3)) for r in cap.records)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_guard_restores_training_flags_grads_and_requires_grad() -> None:
    model = Tangled().train()
    model.a.eval()  # mixed flags
    model.tied.weight.grad = g = torch.ones(4, 4)
    model.bias.requires_grad_(False)
    before = ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()])
    with model_guard(model):
        assert not any(m.training for m in model.modules())
        assert not any(p.requires_grad for p in model.parameters())
        model.tied.weight.grad = None
        model.a.train()
    after = ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()])
    assert after == before
    assert model.tied.weight.grad is g


def _rollout_layer_by_layer(attn: list[torch.Tensor], residual: float, fusion: str) -> torch.Tensor:
    """Abnar & Zuidema's rollout one layer at a time (the formula as written before the stack)."""
    out = None
    for a in attn:
        f = {"mean": a.mean(-3), "max": a.amax(-3), "min": a.amin(-3)}[fusion] if a.ndim == 4 else a
        m = (1 - residual) * f + residual * torch.eye(f.shape[-1], dtype=f.dtype)
        m = m / m.sum(-1, keepdim=True).clamp_min(torch.finfo(m.dtype).tiny)
        out = m if out is None else m @ out
    return out


@pytest.mark.parametrize(
    ("t", "n", "layers", "dtype", "residual", "fusion"),
    [
        (17, 1, 6, torch.float32, 0.5, "mean"),
        (33, 2, 3, torch.float64, 0.3, "max"),
        (5, 3, 1, torch.float32, 0.0, "min"),
        (68, 1, 12, torch.float32, 1.0, "mean"),
    ],
)
def test_stacked_rollout_is_bit_identical_to_layer_by_layer(
    t, n, layers, dtype, residual, fusion
) -> None:
    from perspicio.methods.attention import rollout

    g = torch.Generator().manual_seed(t + layers)
    attn = [torch.randn(n, 4, t, t, generator=g, dtype=dtype).softmax(-1) for _ in range(layers)]
    want = _rollout_layer_by_layer(attn, residual, fusion)
    assert torch.equal(rollout(attn, residual=residual, head_fusion=fusion), want)
    # layers given already fused (N, T, T) beside per-head ones: the same values
    mixed = [a.mean(-3) if i % 2 else a for i, a in enumerate(attn)] if fusion == "mean" else attn
    assert torch.equal(rollout(mixed, residual=residual, head_fusion=fusion), want)


class CountingEncoder(nn.Module):
    """A tiny token model (ids -> embedding -> attention -> mean) that counts its train() calls."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.attn = Attention()
        self.train_calls = 0

    def train(self, mode: bool = True) -> CountingEncoder:
        self.train_calls += 1
        return super().train(mode)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.attn(self.emb(input_ids)).mean(1)


def test_token_wrapper_follows_the_model_flag_and_spares_the_eval_walk() -> None:
    import perspicio
    from perspicio.text import TokenModel

    enc = CountingEncoder().eval()
    enc.train_calls = 0
    tm = TokenModel(enc)
    assert tm.training is False
    assert TokenModel(CountingEncoder().train()).training is True
    x = torch.stack([torch.tensor([[1, 2, 3, 4]]), torch.ones(1, 4, dtype=torch.long)], dim=1)
    e = perspicio.explain(tm, x, method="attention_rollout", target=lambda out: out.sum(1))
    assert e.attributions.shape == (1, 4)
    assert enc.train_calls == 0  # an eval-mode model is not walked by model.eval() on every call
    # a training-mode model is still put in eval mode for the call and restored afterwards
    enc.train()
    enc.train_calls = 0
    seen = []
    h = enc.attn.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    try:
        perspicio.explain(
            TokenModel(enc), x, method="attention_rollout", target=lambda out: out.sum(1)
        )
    finally:
        h.remove()
    assert seen and not any(seen) and enc.train_calls >= 1
    assert all(m.training for m in enc.modules())


@pytest.mark.parametrize(
    "model", _models(), ids=["tangled", "hiding-child", "torch-encoder", "leaf"]
)
def test_model_tensors_are_the_parameters_and_buffers(model: nn.Module) -> None:
    from perspicio.core.guard import model_tensors

    model.register_buffer("extra_buffer", torch.zeros(2))
    want = {id(t) for t in [*model.parameters(), *model.buffers()]}
    assert {id(t) for t in model_tensors(model)} == want


def test_meta_tensors_anywhere_are_refused() -> None:
    from perspicio.core.inputs import check_model_usable
    from perspicio.errors import ModelError

    model = Tangled()
    check_model_usable(model)
    model.b[2][1].out.register_buffer("stats", torch.empty(3, device="meta"))  # deep, a buffer only
    with pytest.raises(ModelError, match="meta"):
        check_model_usable(model)
    with torch.device("meta"):
        empty = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ModelError, match="meta"):
        check_model_usable(empty)


def test_a_guarded_call_walks_its_model_once_and_the_walk_ends_with_it() -> None:
    """Inside model_guard the module tree is the guard's walk (a nested guard on the same model
    reuses it; another model is walked anew); after the call a changed model is walked again."""
    from perspicio.core import guard

    model, other = Tangled(), Tangled()
    calls = []
    walk = guard._walk

    def counting(m: nn.Module) -> guard._Walk:
        calls.append(m)
        return walk(m)

    guard._walk = counting
    try:
        with model_guard(model):
            first = module_tree(model)
            with model_guard(model):  # a metric calling a method on the same model
                assert _same_named(module_tree(model), first)
            module_tree(model)
            module_tree(other)
        assert calls == [model, other]
        model.extra = nn.Linear(4, 4)
        with model_guard(model):
            assert module_tree(model)[-1][0] == "extra"
        assert calls[-1] is model and len(calls) == 3
    finally:
        guard._walk = walk
    assert not getattr(guard._WALKS, "stack", [])


def test_walk_stack_is_unwound_when_the_body_raises() -> None:
    from perspicio.core import guard

    model = Tangled()
    with pytest.raises(RuntimeError, match="boom"), model_guard(model):
        raise RuntimeError("boom")
    assert not guard._WALKS.stack


def test_attention_methods_see_modules_added_between_calls_and_leave_requires_grad() -> None:
    """The method keeps its attention-module search while the module tree is the same, and searches
    again when it changes. Gradient-free attention methods do not freeze parameters (nothing is
    differentiated); transformer attribution does, and every flag is as before after the call."""
    import perspicio

    model = nn.Sequential(Attention(), nn.Flatten()).eval()
    x = torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(1))
    seen: list[bool] = []
    probe = model[0].qkv.register_forward_pre_hook(lambda m, a: seen.append(m.weight.requires_grad))
    try:
        method = perspicio.methods.get("attention_rollout")(model, query=0)
        method(x, target=lambda out: out.sum(1))
        assert seen and all(seen)  # the parameter was not frozen for a gradient-free pass
        assert len(method(x, target=lambda out: out.sum(1)).extras["attention_layers"]) == 1
        model.insert(1, nn.Sequential(nn.Identity(), Attention()))
        got = method(x, target=lambda out: out.sum(1))
        assert got.extras["attention_layers"] == ("0", "1.1")
        seen.clear()
        perspicio.explain(model, x, method="transformer_attribution", target=lambda out: out.sum(1), query=0)
        assert seen and not any(seen)  # frozen while gradients flow
    finally:
        probe.remove()
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_a_callable_target_runs_once_per_gradient_free_chunk() -> None:
    import perspicio

    model = nn.Sequential(Attention(), nn.Flatten()).eval()
    x = torch.randn(3, 3, 4, generator=torch.Generator().manual_seed(2))
    calls: list[int] = []

    def target(out: torch.Tensor) -> torch.Tensor:
        calls.append(len(out))
        return out.sum(1)

    e = perspicio.explain(model, x, method="attention", target=target, query=0, batch_size=2)
    assert calls == [2, 1]
    assert torch.allclose(e.scores, model(x).sum(1))


def test_a_model_moved_to_meta_after_the_method_was_built_is_refused_clearly() -> None:
    """A method checks every tensor of its model when built; each call re-checks only whether
    the model moved to the meta device since (its first tensor), and refuses it with the same
    clear error; other entry points (a fresh walk) still scan every tensor."""
    import perspicio
    from perspicio.core.inputs import check_model_usable
    from perspicio.errors import ModelError

    model = nn.Sequential(nn.Linear(4, 3)).eval()
    method = perspicio.methods.get("saliency")(model)
    x = torch.randn(2, 4)
    method(x, target=0)
    model.to("meta")
    with pytest.raises(ModelError, match="meta"):
        method(x, target=0)
    partly = nn.Sequential(nn.Linear(4, 3))
    partly.register_buffer("stats", torch.empty(3, device="meta"))
    with pytest.raises(ModelError, match="meta"):
        perspicio.methods.get("saliency")(partly)  # caught when built
    with pytest.raises(ModelError, match="meta"), model_guard(partly):
        check_model_usable(partly)  # no method checked it: the guard's walk scans every tensor
