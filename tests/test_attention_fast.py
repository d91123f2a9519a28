"""The returned-weights path of the attention capture: a Hugging Face eager attention module in
eval mode hands its softmax back as its second output, so no torch-function mode runs inside it;
the weights equal the softmax path's bit for bit, and every other case keeps the mode."""

from __future__ import annotations

import pytest
import torch

import perspicio.methods.attention as attention
from perspicio.methods.attention import AttentionCapture, returns_weights

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bert():
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16,
                                     attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(5, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return model, ids, mask


def _capture(model, ids, mask, monkeypatch, **kw):
    entered = []
    original = attention._AttentionMode.__enter__

    def spy(self):
        entered.append(1)
        return original(self)

    monkeypatch.setattr(attention._AttentionMode, "__enter__", spy)
    with AttentionCapture(model, **kw) as cap, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    monkeypatch.undo()
    return cap, len(entered)


def test_eager_eval_modules_return_their_weights_and_need_no_mode(bert, monkeypatch):
    model, ids, mask = bert
    assert all(returns_weights(m) for _, m in attention.attention_modules(model))
    fast, entered_fast = _capture(model, ids, mask, monkeypatch)
    slow, entered_slow = _capture(model, ids, mask, monkeypatch, fast=False)
    assert entered_fast == 0 and entered_slow == 2 and not fast.missed
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    assert [r.name for r in fast.records] == [r.name for r in slow.records]
    for f, s, a in zip(fast.records, slow.records, ref):
        assert torch.equal(f.weights, s.weights) and torch.equal(f.weights, a)


def test_training_mode_gradients_and_sdpa_keep_the_softmax_path(bert, monkeypatch):
    model, ids, mask = bert
    model.train()
    try:
        assert not any(returns_weights(m) for _, m in attention.attention_modules(model))
        _, entered = _capture(model, ids, mask, monkeypatch)
        assert entered == 2  # in training mode the returned weights are after dropout
    finally:
        model.eval()
    with AttentionCapture(model, grad=True) as cap:
        model(input_ids=ids, attention_mask=mask)
    assert all(r.leaf.requires_grad for r in cap.records)  # gradients need the leaf in the graph
    config = transformers.BertConfig(**{**model.config.to_dict(), "attn_implementation": "sdpa"})
    sdpa = transformers.BertModel(config).eval()
    assert not any(returns_weights(m) for _, m in attention.attention_modules(sdpa))


def test_a_module_that_returns_no_weights_is_read_again_through_its_softmax(bert, monkeypatch):
    """If an eager module returns no weights after all, the method reruns the chunk with the mode."""
    import perspicio

    model, ids, mask = bert

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = model

        def forward(self, x):
            return self.bert(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state[:, 0]

    wrapped = Wrapped().eval()
    want = perspicio.explain(wrapped, ids, method="attention_rollout")
    real = attention.AttentionCapture._returned

    def drop_weights(self, name):
        hook = real(self, name)
        return lambda module, args, out: hook(module, args, (out[0], None))

    monkeypatch.setattr(attention.AttentionCapture, "_returned", drop_weights)
    got = perspicio.explain(wrapped, ids, method="attention_rollout")
    assert torch.equal(got.attributions, want.attributions)
