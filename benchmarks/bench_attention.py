"""Benchmark: attention methods and token attributions on the bundled MiniLM-L6 (issue 16).

Targets: raw attention and attention rollout at most 1.1x one forward pass; transformer
attribution at most 1.5x one forward + backward. The references are the model itself:

* forward: ``SentenceEncoder(input_ids, attention_mask)`` under ``torch.no_grad``;
* forward + backward: the same with the word-embedding output as a leaf requiring grad, and
  ``torch.autograd.grad`` of the cosine similarity to a reference embedding (what a gradient
  method costs at least);
* tokenize + forward: the tokenizer on the string, then the forward pass - the reference of the
  end-to-end row ``perspicio.explain(minilm, text, method="attention_rollout")``.

The methods are timed as ``Method.__call__`` on the tokenized, packed inputs (guard, engine, capture,
target, Explanation included; tokenization excluded - it is the same for every method) and, for
one row, end to end through ``perspicio.explain`` with the strings. Layer Integrated Gradients
(50 steps, Gauss-Legendre) runs beside Captum's LayerIntegratedGradients with the same baseline.

Timing: every contender of a row runs once per round, round-robin in one process, the order
rotated every round; each run records the process CPU time (all threads) and the wall time. A
row's ratio is the median over rounds of (method / reference) **within the round** (paired, so a
load change between rounds hits both alike), with its interquartile range; the medians of the
times themselves are shown too. On a machine shared with other jobs the wall clock measures the
neighbours; the CPU time of this process much less - both are reported, with the load average.

Diagnostics (``--parts``, 17 tokens): the pieces of the fixed per-call cost - the forward pass
inside :class:`~perspicio.methods.attention.AttentionCapture` (hooks and the torch-function mode)
and inside a torch-function mode that only passes calls through (the floor of any capture that
reads the softmax from the model's own pass), and the model guard alone.

Run::

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \
        python benchmarks/bench_attention.py --repeats 15 --parts
    python benchmarks/bench_attention.py --quick --repeats 41   # 17 tokens only (A/B runs)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import malloc_note, table, write_section  # noqa: E402

import perspicio  # noqa: E402
from perspicio.core.registry import METHODS  # noqa: E402
from perspicio.methods.base import build  # noqa: E402
from perspicio.text import TokenModel, encode, pack, token_baseline  # noqa: E402


@dataclass
class Runs:
    """CPU and wall seconds of one contender, one entry per round."""

    cpu: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int = 9, warmup: int = 2
) -> dict[str, Runs]:
    """Run every contender once per round, ``repeats`` rounds, the order rotated each round (so no
    contender always follows the same one); record process CPU time and wall time of every run."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    runs = {k: Runs() for k in names}
    for r in range(max(1, repeats)):
        k0 = r % len(names)
        for k in names[k0:] + names[:k0]:
            w0, c0 = time.perf_counter(), time.process_time()
            fns[k]()
            c1, w1 = time.process_time(), time.perf_counter()
            runs[k].cpu.append(c1 - c0)
            runs[k].wall.append(w1 - w0)
    return runs


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile)."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[1], q[2]


def paired(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Quartiles of the per-round ratios a[r] / b[r]."""
    return quartiles([x / y for x, y in zip(a, b)])


SENTENCE = (
    "the film is a quiet, beautifully acted story about two brothers who meet again after years"
)


def texts(tokens: int, batch: int) -> list[str]:
    words = (SENTENCE + " ") * (tokens // 10 + 2)
    return [" ".join(words.split()[: tokens - 2 - i % 3]) for i in range(batch)]


def row(label: str, name: str, runs: dict[str, Runs], ref: str, target: str) -> dict:
    m, r = runs[name], runs[ref]
    return {
        "tokens x batch": label,
        "method": name,
        "reference": ref,
        "cpu ms": statistics.median(m.cpu) * 1e3,
        "ref cpu ms": statistics.median(r.cpu) * 1e3,
        "cpu ratio": paired(m.cpu, r.cpu),
        "wall ms": statistics.median(m.wall) * 1e3,
        "ref wall ms": statistics.median(r.wall) * 1e3,
        "wall ratio": paired(m.wall, r.wall),
        "target": target,
    }


def fmt_rows(rows: list[dict]) -> str:
    def q(t: tuple[float, float, float]) -> str:
        return f"{t[1]:.3f} ({t[0]:.2f}-{t[2]:.2f})"

    return table(
        [
            "tokens x batch",
            "method",
            "CPU ms",
            "ref CPU ms",
            "CPU ratio (IQR)",
            "wall ms",
            "ref wall ms",
            "wall ratio (IQR)",
            "target",
        ],
        [
            (
                r["tokens x batch"],
                r["method"],
                f"{r['cpu ms']:.2f}",
                f"{r['ref cpu ms']:.2f}",
                q(r["cpu ratio"]),
                f"{r['wall ms']:.2f}",
                f"{r['ref wall ms']:.2f}",
                q(r["wall ratio"]),
                r["target"],
            )
            for r in rows
        ],
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=9, help="rounds per row")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="17 tokens x 1 only, no backward, no IG")
    ap.add_argument("--parts", action="store_true", help="also time the pieces of the fixed cost")
    ap.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    ap.add_argument("--write", action="store_true", help="write the tables to docs/benchmarks.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    zm = perspicio.zoo.load("minilm")
    model, tok = zm.model, zm.preprocess.tokenizer
    ref_emb = perspicio.text.targets.embed(
        TokenModel(model),
        pack(encode(tok, "a great movie").tensors(), ("input_ids", "attention_mask")),
    )[0]
    target = perspicio.EmbeddingSimilarity(ref_emb)
    word = model.get_input_embeddings()
    rows: list[dict] = []
    shapes = ((16, 1),) if args.quick else ((16, 1), (64, 1), (64, 8), (128, 1))
    for tokens, batch in shapes:
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

        names = ("attention", "attention_rollout") + (
            () if args.quick else ("transformer_attribution",)
        )
        methods = {m: build(METHODS.get(m).cls, tm, batch_size=len(x)) for m in names}
        fns: dict[str, Callable[[], object]] = {"forward": forward}
        if not args.quick:
            fns["forward+backward"] = forward_backward
        fns.update(
            {m: (lambda meth=meth, x=x: meth(x, target=target)) for m, meth in methods.items()}
        )
        if batch == 1:
            text = tb.texts[0]

            def tokenize_forward(text: str = text) -> None:
                enc = zm.preprocess([text])
                with torch.no_grad():
                    model(enc["input_ids"], enc["attention_mask"])

            fns["tokenize+forward"] = tokenize_forward
            fns["rollout (explain, strings)"] = lambda text=text: perspicio.explain(
                zm, text, method="attention_rollout"
            )
        if args.parts and tokens == 16 and batch == 1:
            fns.update(_parts(tm, x))
        runs = interleaved(fns, repeats=args.repeats, warmup=2)
        n_tok = int(tb.attention_mask.sum(1).max())
        label = f"{n_tok} x {batch}"
        new = [row(label, m, runs, "forward", "<= 1.1") for m in ("attention", "attention_rollout")]
        if "rollout (explain, strings)" in runs:
            new.append(row(label, "rollout (explain, strings)", runs, "tokenize+forward", "<= 1.1"))
        if "transformer_attribution" in runs:
            new.append(row(label, "transformer_attribution", runs, "forward+backward", "<= 1.5"))
        for part in (
            "forward in AttentionCapture",
            "forward in a pass-through mode",
            "model guard alone",
        ):
            if part in runs:
                new.append(row(label, part, runs, "forward", "(diagnostic)"))
        rows.extend(new)
        print(fmt_rows(new), flush=True)

    lig_rows = [] if args.quick else _layer_ig(tok, model, word, target, args.repeats)
    load1 = os.getloadavg()
    note = (
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{malloc_note()}, load average {load0[0]:.1f} at start and {load1[0]:.1f} at the end"
    )
    body = "\n".join(
        [
            "`python benchmarks/bench_attention.py` - MiniLM-L6 (6 layers, 12 heads, 384-d), texts of "
            f"the given length in tokens (longest of the batch); {args.repeats} rounds, contenders "
            f"round-robin in one process (order rotated each round). {note}. Ratios are medians of the "
            "per-round ratios (interquartile range in brackets); ms are medians.",
            "",
            fmt_rows(rows),
            "",
            "Reference: one forward pass for attention/rollout, tokenization + one forward pass for "
            "'explain, strings', one forward + backward (to the word embeddings) for transformer attribution.",
        ]
        + (
            [
                "",
                "Layer Integrated Gradients on the word embeddings, 50 Gauss-Legendre steps, [PAD] "
                "baseline, one text:",
                "",
                table(["implementation", "CPU ms", "wall ms"], lig_rows),
            ]
            if lig_rows
            else []
        )
    )
    print(body)
    if args.json:
        args.json.write_text(
            json.dumps({"note": note, "rows": rows, "layer_ig": lig_rows}, indent=1)
        )
    if args.write:
        write_section("Attention methods and token attributions (issue 16)", body)


def _parts(tm: TokenModel, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Pieces of the fixed cost (see the module docstring)."""
    from torch.overrides import TorchFunctionMode

    from perspicio.core.guard import model_guard
    from perspicio.methods.attention import AttentionCapture, attention_modules

    class PassThrough(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            return func(*args, **(kwargs or {}))

    mods = [m for _, m in attention_modules(tm)]

    def captured() -> None:
        with torch.no_grad(), AttentionCapture(tm):
            tm(x)

    def pass_through() -> None:
        mode = PassThrough()
        handles = []
        for m in mods:
            handles.append(m.register_forward_pre_hook(lambda m, a: mode.__enter__() and None))
            handles.append(m.register_forward_hook(lambda m, a, o: mode.__exit__(None, None, None)))
        try:
            with torch.no_grad():
                tm(x)
        finally:
            for h in handles:
                h.remove()

    def guard() -> None:
        with model_guard(tm):
            pass

    return {
        "forward in AttentionCapture": captured,
        "forward in a pass-through mode": pass_through,
        "model guard alone": guard,
    }


def _layer_ig(
    tok: object, model: torch.nn.Module, word: torch.nn.Module, target: object, repeats: int
) -> list[tuple[str, float, float]]:
    """Layer IG beside Captum's LayerIntegratedGradients, 50 steps, [PAD] baseline, one 16-token text."""
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
    fns: dict[str, Callable[[], object]] = {
        "perspicio layer_integrated_gradients": lambda: ours(x, target=target)
    }
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
        runs = interleaved(fns, repeats=max(3, repeats // 2), warmup=1)
    return [
        (k, statistics.median(v.cpu) * 1e3, statistics.median(v.wall) * 1e3)
        for k, v in runs.items()
    ]


if __name__ == "__main__":
    main()
