"""Benchmark: attention methods and token attributions on the bundled MiniLM-L6 (issue 16).

Targets: raw attention and attention rollout at most 1.1x one forward pass; transformer
attribution at most 1.5x one forward + backward. The references are the model itself:

* forward: ``SentenceEncoder(input_ids, attention_mask)`` under ``torch.no_grad``;
* forward + backward: the same with the word-embedding output as a leaf requiring grad, and
  ``torch.autograd.grad`` of the cosine similarity to a reference embedding (what a gradient
  method costs at least).

The methods are timed as ``Method.__call__`` on the tokenized, packed inputs (guard, engine, capture,
target, Explanation included; tokenization excluded - it is the same for every method) and, for
one row, end to end through ``perspicio.explain`` with the strings. Layer Integrated Gradients
(50 steps, Gauss-Legendre) runs beside Captum's LayerIntegratedGradients with the same baseline.
Every contender runs round-robin in one process (``interleaved``); ratios are what count.

Run::

    python benchmarks/bench_attention.py --repeats 9 --write
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

from common import machine_note, ratio, table, write_section  # noqa: E402

import perspicio  # noqa: E402
from perspicio.core.registry import METHODS  # noqa: E402
from perspicio.methods.base import build  # noqa: E402
from perspicio.text import TokenModel, encode, pack, token_baseline  # noqa: E402


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1
) -> dict[str, float]:
    """Median CPU time (this process, all threads) of each contender, run round-robin: on a machine
    shared with other jobs the wall clock measures the neighbours; the process's CPU time much less."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(1, repeats)):
        for k, fn in fns.items():
            t0 = time.process_time()
            fn()
            times[k].append(time.process_time() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


SENTENCE = (
    "the film is a quiet, beautifully acted story about two brothers who meet again after years"
)


def texts(tokens: int, batch: int) -> list[str]:
    words = (SENTENCE + " ") * (tokens // 10 + 2)
    return [" ".join(words.split()[: tokens - 2 - i % 3]) for i in range(batch)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    zm = perspicio.zoo.load("minilm")
    model, tok = zm.model, zm.preprocess.tokenizer
    ref_emb = perspicio.text.targets.embed(
        TokenModel(model),
        pack(encode(tok, "a great movie").tensors(), ("input_ids", "attention_mask")),
    )[0]
    target = perspicio.EmbeddingSimilarity(ref_emb)
    word = model.get_input_embeddings()
    rows = []
    for tokens, batch in ((16, 1), (64, 1), (64, 8), (128, 1)):
        tb = encode(tok, texts(tokens, batch))
        keys = tuple(tb.tensors())
        x = pack(tb.tensors(), keys)
        tm = TokenModel(model, keys)
        kw = tb.tensors()

        def forward(kw: dict = kw) -> None:
            with torch.no_grad():
                model(kw["input_ids"], kw["attention_mask"])

        def forward_backward(kw: dict = kw) -> None:
            leaf: list[torch.Tensor] = []

            def hook(m: torch.nn.Module, a: object, out: torch.Tensor) -> torch.Tensor:
                leaf.append(out.detach().requires_grad_(True))
                return leaf[-1]

            h = word.register_forward_hook(hook)
            try:
                s = target(model(kw["input_ids"], kw["attention_mask"]))
            finally:
                h.remove()
            torch.autograd.grad(s.sum(), leaf[0])

        methods = {
            m: build(METHODS.get(m).cls, tm, batch_size=len(x))
            for m in ("attention", "attention_rollout", "transformer_attribution")
        }
        fns = {"forward": forward, "forward+backward": forward_backward}
        fns.update(
            {m: (lambda meth=meth, x=x: meth(x, target=target)) for m, meth in methods.items()}
        )
        if batch == 1:
            text = tb.texts[0]
            fns["rollout (explain, strings)"] = lambda text=text: perspicio.explain(
                zm, text, method="attention_rollout"
            )
        t = interleaved(fns, repeats=args.repeats, warmup=2)
        f, fb = t["forward"], t["forward+backward"]
        n_tok = int(tb.attention_mask.sum(1).max())
        for name in ("attention", "attention_rollout", "rollout (explain, strings)"):
            if name in t:
                rows.append(
                    (
                        f"{n_tok} x {batch}",
                        name,
                        t[name] * 1e3,
                        f * 1e3,
                        ratio(t[name], f),
                        "<= 1.1",
                    )
                )
        rows.append(
            (
                f"{n_tok} x {batch}",
                "transformer_attribution",
                t["transformer_attribution"] * 1e3,
                fb * 1e3,
                ratio(t["transformer_attribution"], fb),
                "<= 1.5",
            )
        )
        print(
            table(["tokens x batch", "method", "ms", "reference ms", "ratio", "target"], rows[-4:]),
            flush=True,
        )

    # layer IG beside Captum's LayerIntegratedGradients, 50 steps, [PAD] baseline, one 16-token text
    lig_rows = []
    try:
        from captum.attr import LayerIntegratedGradients as CaptumLIG
    except ImportError:
        CaptumLIG = None
    tb = encode(tok, texts(16, 1))
    keys = tuple(tb.tensors())
    x = pack(tb.tensors(), keys)
    tm = TokenModel(model, keys)
    base = token_baseline(x, tb.special, tok.pad_token_id)
    ours = build(
        METHODS.get("layer_integrated_gradients").cls, tm, layer=word, baseline=base, steps=50
    )
    fns = {"perspicio layer_integrated_gradients": lambda: ours(x, target=target)}
    if CaptumLIG is not None:

        def f(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return target(model(ids, mask))

        lig = CaptumLIG(f, word)
        fns["captum LayerIntegratedGradients"] = lambda: lig.attribute(
            x[:, 0],
            baselines=base[:, 0],
            additional_forward_args=(x[:, 1],),
            n_steps=50,
            method="gausslegendre",
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = interleaved(fns, repeats=max(3, args.repeats // 2), warmup=1)
    for k, v in t.items():
        lig_rows.append((k, v * 1e3))
    body = "\n".join(
        [
            "`python benchmarks/bench_attention.py` - MiniLM-L6 (6 layers, 12 heads, 384-d), texts of the given "
            "length in tokens (longest of the batch); medians of the process CPU time (all threads) of round-robin runs in one process. "
            + machine_note()
            + " The machine was shared with ~25 other jobs on 2 cores (wall-clock forward passes 100x slower than unloaded): CPU time of this process is reported, and still only the ratios mean anything.",
            "",
            table(
                ["tokens x batch", "method", "CPU ms", "reference CPU ms", "ratio", "target"], rows
            ),
            "",
            "Reference: one forward pass for attention/rollout, one forward + backward (to the word embeddings) "
            "for transformer attribution. 'explain, strings' includes tokenization and the wrapper.",
            "",
            "Layer Integrated Gradients on the word embeddings, 50 Gauss-Legendre steps, [PAD] baseline, one text:",
            "",
            table(["implementation", "CPU ms"], lig_rows),
        ]
    )
    print(body)
    if args.write:
        write_section("Attention methods and token attributions (issue 16)", body)


if __name__ == "__main__":
    main()
