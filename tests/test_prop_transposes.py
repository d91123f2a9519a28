"""The closed-form transposes LRP uses instead of a recomputed forward + autograd (AttnLRP's
attention products and frozen-statistics norms): equal to autograd's vector-Jacobian products
on every spelling and shape they accept, and refused (None) where they do not apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from perspicio.methods.propagation.lrp_nodes import linear_vjp, norm_linear_maps, product_vjp
from perspicio.methods.propagation.operations import Call, op_name


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _autograd(func, args, a, b, s):
    with torch.enable_grad():
        ai, bi = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
        swap = {id(a): ai, id(b): bi}
        z = func(*[swap.get(id(t), t) for t in args])
        return torch.autograd.grad(z, (ai, bi), s)


@pytest.mark.parametrize(
    "func, shapes",
    [
        (torch.matmul, ((2, 3, 4, 5), (2, 3, 5, 4))),  # q @ k^T per head
        (torch.matmul, ((2, 1, 4, 5), (3, 5, 6))),  # broadcast batch dimensions
        (torch.Tensor.__matmul__, ((4, 5), (5, 2))),
        (torch.Tensor.matmul, ((3, 4, 5), (5, 2))),
        (torch.bmm, ((3, 4, 5), (3, 5, 2))),
        (torch.Tensor.bmm, ((3, 4, 5), (3, 5, 2))),
        (torch.mm, ((4, 5), (5, 2))),
    ],
)
def test_matmul_transposes_equal_autograd(func, shapes) -> None:
    a, b = _randn(*shapes[0], seed=1), _randn(*shapes[1], seed=2)
    s = _randn(*func(a, b).shape, seed=3)
    call = Call(func, (a, b), {}, op_name(func), "product")
    ga, gb = product_vjp(call, (id(a), id(b)), a, b, s)
    ea, eb = _autograd(func, (a, b), a, b, s)
    torch.testing.assert_close(ga, ea, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb, eb, rtol=1e-12, atol=1e-12)
    # the operands given in the other order (the propagator lists them as it meets them)
    gb2, ga2 = product_vjp(call, (id(a), id(b))[::-1], b, a, s)
    torch.testing.assert_close((ga2, gb2), (ea, eb), rtol=1e-12, atol=1e-12)


def test_rmatmul_and_hand_set_values() -> None:
    # z = L @ R with L = [[1, 2]], R = [[3], [4]]: dz/dL = R^T, dz/dR = L^T
    left = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    right = torch.tensor([[3.0], [4.0]], dtype=torch.float64)
    s = torch.tensor([[2.0]], dtype=torch.float64)
    # Tensor.__rmatmul__(right, left) = left @ right: its first argument is the right operand
    call = Call(torch.Tensor.__rmatmul__, (right, left), {}, "Tensor.__rmatmul__", "product")
    g_right, g_left = product_vjp(call, (id(right), id(left)), right, left, s)
    assert g_left.tolist() == [[6.0, 8.0]] and g_right.tolist() == [[2.0], [4.0]]


def test_no_closed_form_where_it_does_not_apply() -> None:
    a, b = _randn(4, 5), _randn(5, 4, seed=1)
    v = _randn(5, seed=2)
    s = _randn(4, 4, seed=3)
    eq = Call(torch.einsum, ("ij,jk->ik", a, b), {}, "torch.einsum", "product")
    assert product_vjp(eq, (id(a), id(b)), a, b, s) is None  # einsum: autograd
    vec = Call(torch.matmul, (a, v), {}, "torch.matmul", "product")
    assert product_vjp(vec, (id(a), id(v)), a, v, _randn(4)) is None  # a 1-d operand
    out = Call(torch.matmul, (a, b), {"out": None}, "torch.matmul", "product")
    assert product_vjp(out, (id(a), id(b)), a, b, s) is None


@pytest.mark.parametrize(
    "func, args",
    [
        (F.layer_norm, lambda x: (x, (6,), _randn(6, seed=5), None, 1e-5)),
        (F.layer_norm, lambda x: (x, (4, 6), None, None, 1e-5)),
        (F.group_norm, lambda x: (x.reshape(2, 6, 4), 3, _randn(6, seed=5), None, 1e-5)),
        (F.rms_norm, lambda x: (x, (6,), _randn(6, seed=5), 1e-6)),
        (
            F.batch_norm,
            lambda x: (
                x.reshape(2, 6, 4),
                _randn(6, seed=6),
                _randn(6, seed=7).abs() + 0.5,
                _randn(6, seed=8),
                None,
                False,
                0.1,
                1e-5,
            ),
        ),
    ],
)
def test_frozen_norm_transposes_equal_autograd(func, args) -> None:
    x = _randn(2, 4, 6, seed=4)
    call_args = args(x)
    xi = call_args[0]
    call = Call(func, call_args, {}, op_name(func), "norm")
    fn, transpose = norm_linear_maps(call, xi)
    s = _randn(*xi.shape, seed=9)
    torch.testing.assert_close(transpose(s), linear_vjp(fn, xi, s), rtol=1e-12, atol=1e-12)
    # and it is the transpose: <J t, s> = <t, J^T s>
    t = _randn(*xi.shape, seed=10)
    torch.testing.assert_close((fn(t) * s).sum(), (t * transpose(s)).sum(), rtol=1e-12, atol=1e-12)
