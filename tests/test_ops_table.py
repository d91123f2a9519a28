"""One table of torch operations (core/ops.py) that every operation-level interpreter consults.

A function added to the table with :func:`perspicio.core.ops.register_operation` is seen by the
propagation (LRP), the incremental evaluator, the receptive-field tracer and the fuse tracer alike;
and no other module keeps a set of torch functions of its own.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import handle_torch_function, has_torch_function_unary

import perspicio
from perspicio.core import fuse, incremental, kernels, ops
from perspicio.errors import LayerError, ModelError
from perspicio.featurevis.receptive_field import receptive_field
from perspicio.methods.propagation.operations import op_kind

SRC = Path(perspicio.__file__).parent


# ------------------------------------------------------------------ toy operations (torch functions)


def toy_act(x: Tensor) -> Tensor:
    """An activation torch does not have: max(x, 0) + 0.1 min(x, 0)."""
    if has_torch_function_unary(x):
        return handle_torch_function(toy_act, (x,), x)
    return F.leaky_relu(x, 0.1)


def toy_pool(x: Tensor, kernel_size: int, stride: int | None = None) -> Tensor:
    """Average pooling under another name (same arguments as ``F.avg_pool2d``)."""
    if has_torch_function_unary(x):
        return handle_torch_function(toy_pool, (x,), x, kernel_size, stride)
    return F.avg_pool2d(x, kernel_size, stride)


def toy_pad(x: Tensor, pad: tuple, mode: str = "constant", value: float | None = None) -> Tensor:
    """Constant padding under another name (same arguments as ``F.pad``)."""
    if has_torch_function_unary(x):
        return handle_torch_function(toy_pad, (x,), x, pad, mode, value)
    return F.pad(x, pad, mode, value)


class ToyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.pooled = nn.Identity()
        self.head = nn.Linear(4 * 3 * 3, 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pooled(toy_pool(toy_act(self.conv(x)), 2)).flatten(1))


class SamePadConv(nn.Conv2d):
    """A TensorFlow-style 'same' convolution: asymmetric padding in forward, then the convolution."""

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(toy_pad(x, (0, 1, 0, 1)), self.weight, self.bias)


@pytest.fixture
def registered():
    yield lambda func, kind, window=None: ops.register_operation(func, kind, window)
    for f in (toy_act, toy_pool, toy_pad):
        ops.unregister_operation(f)


def test_a_registered_operation_is_seen_by_every_interpreter(registered) -> None:
    g = torch.Generator().manual_seed(0)
    net = ToyNet().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    x = torch.randn(1, 3, 8, 8, generator=g)
    # unknown to the table: no rule, no box evaluation, no geometry
    assert op_kind(toy_act) is None and incremental.handler(toy_act) is None
    with pytest.raises(ModelError, match="toy_act"):
        perspicio.explain(net, x, method="lrp", rule="epsilon", target=0)
    with pytest.raises(LayerError, match="toy_pool"):
        receptive_field(net, "pooled", input_shape=(3, 8, 8))

    registered(toy_act, ops.ACT)
    registered(toy_pool, ops.REDUCE, ("avg_pool", 2))
    # the propagation: an activation passes relevance through, a pooling splits it in proportion
    # (LRP-0 on a bias-free network conserves the explained logit)
    e = perspicio.explain(net, x, method="lrp", rule="lrp0", target=0)
    with torch.no_grad():
        torch.testing.assert_close(e.attributions.sum(), net(x)[0, 0], rtol=1e-5, atol=1e-6)
    # the incremental evaluator runs the activation on the changed boxes only
    assert incremental.handler(toy_act) is not None and incremental.handler(toy_pool) is None
    # the receptive-field tracer reads the pooling's window: as nn.AvgPool2d(2) after a 3x3 conv
    rf = receptive_field(net, "pooled", input_shape=(3, 8, 8))
    assert (rf.grid, rf.start, rf.jump, rf.size) == ((3, 3), (0.0, 0.0), (2.0, 2.0), (4.0, 4.0))


def test_the_fuse_tracer_reads_paddings_from_the_table(registered) -> None:
    if not kernels.available():
        pytest.skip("no oneDNN fused convolutions in this torch build")
    net = nn.Sequential(SamePadConv(3, 4, 2), nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    # an unknown padding in front of the convolution: the convolution is not fused
    assert fuse.build_fused(net, x)[1] == 0
    registered(toy_pad, ops.STRUCT, ("pad", 0))
    fused, n = fuse.build_fused(net, x)
    assert n == 1
    with torch.no_grad():
        torch.testing.assert_close(fused(x), net(x))


def test_the_table_covers_what_the_interpreters_handled_before() -> None:
    # the incremental evaluator's former element-wise list, the fuse tracer's convolutions and
    # paddings, the receptive-field tracer's windows: all answered by the one table now
    for f in (
        F.relu,
        F.relu6,
        F.hardtanh,
        torch.clamp,
        F.silu,
        F.gelu,
        torch.abs,
        torch.exp,
        torch.add,
        torch.Tensor.__mul__,
        torch.Tensor.__rtruediv__,
        torch.sqrt,
        torch.maximum,
        torch.minimum,
        torch.Tensor.contiguous,
    ):
        assert incremental.handler(f) is not None, f
    for f in (torch.Tensor.add_, torch.Tensor.__iadd__, F.relu_):  # in-place spellings: never boxed
        assert incremental.handler(f) is None, f
    assert ops.window(F.conv2d) == ops.window(torch.conv2d) == ("conv", 2)
    assert ops.window(F.pad) == ops.window(torch.constant_pad_nd) == ("pad", 0)
    assert (
        ops.window(F.max_pool2d) == ("max_pool", 2)
        and ops.window(F.adaptive_avg_pool2d)[0] == "adaptive_pool"
    )
    assert ops.kind(torch.constant_pad_nd) == ops.STRUCT and ops.kind(torch.maximum) == ops.BINARY
    assert all(f in ops.DROPOUTS for f in (F.dropout, F.dropout2d, F.alpha_dropout))


# ------------------------------------------------------------------ no module keeps its own set

#: module-level tables of torch functions outside core/ops.py that are not the shared table, with
#: the reason; each must still exist (an entry that no longer violates is removed). Empty: the
#: operation metadata the interpreters need - kinds, windows, flags (non-negative outputs, sign-
#: keeping reductions, value-writing structural ops, BatchNorm-foldable layers), clamp bounds and
#: in-place spellings - all lives in core/ops.py.
ALLOWED: dict[str, str] = {}

_TORCH_NAMES = {n for n in dir(F) if not n.startswith("_")} | {
    n for n in dir(torch.Tensor) if n.startswith("__") or not n.startswith("_")
}


def _names_torch_functions(node: ast.AST) -> bool:
    """Does an expression list torch functions (``F.relu``, ``torch.conv2d``: two or more) or their
    names (``"relu6"``: four or more, most of its strings - fewer are option values like "mean")?"""
    refs, strings, names = 0, 0, 0
    owners = {"F": F, "torch": torch, "Tensor": torch.Tensor}
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in owners:
            refs += callable(getattr(owners[n.value.id], n.attr, None))
        elif (
            isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Attribute)
            and n.value.attr == "Tensor"
        ):
            refs += callable(getattr(torch.Tensor, n.attr, None))
        elif isinstance(n, ast.Constant) and isinstance(n.value, str):
            strings += 1
            names += n.value in _TORCH_NAMES
    return refs >= 2 or (names >= 4 and 2 * names >= strings)


def test_no_module_keeps_its_own_table_of_torch_functions() -> None:
    found = set()
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel == "core/ops.py":
            continue
        for stmt in ast.parse(path.read_text()).body:
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
                # a table filled by module-level calls (``_add([torch.relu, Tensor.relu], ...)``)
                if any(_names_torch_functions(a) for a in stmt.value.args):
                    found.add(f"{rel}:{ast.unparse(stmt.value.func)}()")
                continue
            if not isinstance(stmt, (ast.Assign, ast.AnnAssign)) or stmt.value is None:
                continue
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            names = [t.id for t in targets if isinstance(t, ast.Name)]
            value = stmt.value
            if isinstance(value, ast.Call) and getattr(value.func, "id", "") in (
                "frozenset",
                "set",
                "tuple",
            ):
                value = value.args[0] if value.args else value
            if isinstance(
                value, (ast.Tuple, ast.List, ast.Set, ast.Dict)
            ) and _names_torch_functions(value):
                found.update(f"{rel}:{n}" for n in names)
    assert found - set(ALLOWED) == set(), (
        f"a table of torch functions outside core/ops.py: {found - set(ALLOWED)}"
    )
    assert set(ALLOWED) - found == set(), (
        f"allowed entries that no longer exist: {set(ALLOWED) - found}"
    )


# ------------------------------------------------------------------ flags and clamps reach every reader


def toy_relu(x: Tensor) -> Tensor:
    """A rectifier torch does not have (max(x, 0) under another name)."""
    if has_torch_function_unary(x):
        return handle_torch_function(toy_relu, (x,), x)
    return x.clamp(min=0)


def toy_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` under another name."""
    if has_torch_function_unary(x):
        return handle_torch_function(toy_linear, (x,), x, weight, bias)
    return F.linear(x, weight, bias)


class ToyLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return toy_linear(x, self.weight, self.bias)


@pytest.fixture
def registered_flags():
    yield ops.register_operation
    for f in (toy_relu, toy_linear):
        ops.unregister_operation(f)


def test_a_registered_clamp_is_a_rectifier_for_guided_backprop(registered_flags) -> None:
    from perspicio.core.relu_override import rectifier_override

    x = torch.tensor([[-1.0, 2.0, 3.0]], requires_grad=True)
    w = torch.tensor([[1.0, -1.0, 1.0]])

    def grads() -> tuple[Tensor, int]:
        with rectifier_override("guided") as mode:
            g = torch.autograd.grad((toy_relu(x) * w).sum(), x)[0]
        return g, mode.calls

    g, calls = grads()  # unknown: the plain gradient of clamp(min=0)
    assert calls == 0 and g.tolist() == [[0.0, -1.0, 1.0]]
    registered_flags(toy_relu, ops.ACT, clamp=(0.0, None))
    assert ops.clamp_bounds(toy_relu, (x,), {}) == (0.0, None)
    assert ops.nonnegative_output(toy_relu, (x,), {})
    g, calls = grads()  # guided: only positive gradient through active units
    assert calls == 1 and g.tolist() == [[0.0, 0.0, 1.0]]


def test_a_registered_foldable_layer_pairs_with_its_batchnorm(registered_flags) -> None:
    from perspicio.core.bnpairs import find_batchnorm_pairs

    net = nn.Sequential(ToyLinear(3, 4), nn.BatchNorm1d(4), nn.ReLU()).eval()
    x = torch.randn(2, 3)
    assert find_batchnorm_pairs(net, x) == []
    registered_flags(toy_linear, ops.AFFINE, flags=(ops.FOLDS_BATCHNORM,))
    net = nn.Sequential(ToyLinear(3, 4), nn.BatchNorm1d(4), nn.ReLU()).eval()  # a fresh cache key
    assert find_batchnorm_pairs(net, x) == [("0", "1")]


def test_register_operation_refuses_unknown_flags_and_clamps() -> None:
    with pytest.raises(ValueError, match="unknown flags"):
        ops.register_operation(toy_relu, ops.ACT, flags=("positive",))
    with pytest.raises(ValueError, match="clamp must be"):
        ops.register_operation(toy_relu, ops.ACT, clamp=(0.0,))
    assert ops.kind(toy_relu) is None


def test_the_flags_cover_what_the_modules_listed_before() -> None:
    # lrp.py's non-negative activations, moving structural ops and zero pads, bnpairs.py's layers,
    # calls.py's in-place spellings, relu_override.py's rectifiers: answered by core/ops.py now
    for f in (F.relu, torch.relu, torch.Tensor.relu, F.relu6, torch.sigmoid, F.hardsigmoid):
        assert ops.has_flag(f, ops.NONNEGATIVE), f
    assert ops.nonnegative_output(F.hardtanh, (None, 0.0, 1.0), {})
    assert not ops.nonnegative_output(F.hardtanh, (None,), {})  # min_val -1 by default
    assert not ops.nonnegative_output(torch.clamp, (None,), {"min": -0.5})
    for f in (torch.Tensor.masked_fill, torch.where, torch.Tensor.__setitem__):
        assert ops.has_flag(f, ops.WRITES), f
    assert ops.has_flag(torch.sum, ops.KEEPS_SIGN) and not ops.has_flag(
        F.interpolate, ops.KEEPS_SIGN
    )
    assert {f for f in (F.conv1d, F.conv2d, F.conv3d, F.linear)} == ops.FLAGS[ops.FOLDS_BATCHNORM]
    assert ops.INPLACE["add_"] is torch.add and ops.INPLACE["hardtanh_"] is F.hardtanh
    assert ops.clamp_bounds(F.relu6, (None,), {}) == (0.0, 6.0)
    assert ops.clamp_bounds(torch.Tensor.clamp_, (None,), {"max": 2.0}) == (None, 2.0)
    assert ops.clamp_bounds(F.gelu, (None,), {}) is None
    # lrp_nodes.py's matrix products (closed-form transposes)
    assert ops.matmul_operands(torch.Tensor.__rmatmul__) == (1, 0)
    assert ops.matmul_operands(torch.bmm) == ops.matmul_operands(torch.matmul) == (0, 1)
    assert ops.matmul_operands(torch.einsum) is None
