"""The backward relevance pass: a rule becomes the backward of a custom autograd function.

A propagator wraps each operation it has a rule for in :class:`Node`: the forward computes the
normal result, the backward runs the rule (LRP relevance, DeepLIFT multipliers) on the saved
inputs and output, so the ordinary ``torch.autograd.grad`` walks the graph with relevances
instead of gradients. Operations that only move values (views, indexing, concatenation,
padding) are left to autograd: their gradient already is the right propagation. The helpers
below are the arithmetic every rule's backward shares.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


class Node(torch.autograd.Function):
    """Custom autograd function: ``rule.forward(*tensors)`` forward, ``rule.backward`` backward.

    ``rule`` is a small per-call object; its backward receives the saved inputs,
    the output and the incoming relevance/multiplier, and returns one tensor (or
    None) per input.
    """

    @staticmethod
    def forward(ctx: Any, rule: Any, *tensors: Tensor) -> Tensor:  # type: ignore[override]
        out = rule.forward(*tensors)
        if any(out is t for t in tensors):
            out = out.clone()
        ctx.rule = rule
        ctx.save_for_backward(*tensors, out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        *ins, out = ctx.saved_tensors
        grads = ctx.rule.backward(ins, out, grad)
        ctx.rule = None
        return (None, *grads)


def apply_node(rule: Any, *tensors: Tensor) -> Tensor:
    return Node.apply(rule, *tensors)


def sum_to(t: Tensor, shape: Sequence[int]) -> Tensor:
    """Sum ``t`` over broadcast dimensions so it has ``shape`` (the adjoint of broadcasting)."""
    shape = tuple(shape)
    if tuple(t.shape) == shape:
        return t
    lead = t.ndim - len(shape)
    if lead > 0:
        t = t.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and t.shape[i] != 1)
    if dims:
        t = t.sum(dim=dims, keepdim=True)
    return t.reshape(shape)


def safe_div(num: Tensor, den: Tensor, eps: float) -> Tensor:
    """``num / (den + eps * sign(den))`` with sign(0) = +1; for ``eps == 0`` zero where ``den == 0``."""
    if eps == 0:
        nz = den != 0
        return torch.where(
            nz, num / torch.where(nz, den, torch.ones_like(den)), torch.zeros_like(num)
        )
    stab = (
        den.abs().add_(eps).copysign_(den)
    )  # den + eps * sign(den), sign(+0) = +1; three passes, one buffer
    return (
        torch.div(num, stab, out=stab)
        if stab.shape == num.shape and not num.requires_grad
        else num / stab
    )
