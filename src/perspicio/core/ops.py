"""The one table of torch operations shared by perspicio's operation-level interpreters.

The propagation (``methods/propagation``: LRP, DeepLIFT), the incremental evaluator
(:mod:`perspicio.core.incremental`) and the tracers (:mod:`perspicio.core.fuse`,
``featurevis/receptive_field.py``) each see every torch function a forward pass calls; what a
function *is* - a metadata query, a structural move of values, an element-wise function, a
convolution, a pooling, ... - is stated here once (:data:`KINDS`, :func:`kind`), so the
interpreters cannot drift apart. :func:`register_operation` adds a function to the table for all
of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

#: tensor properties read as attributes (``x.shape``): their getters reach a torch function mode
METADATA_PROPERTIES = (
    "shape",
    "ndim",
    "dtype",
    "device",
    "layout",
    "requires_grad",
    "is_leaf",
    "grad_fn",
    "is_cuda",
    "is_sparse",
    "is_quantized",
    "is_meta",
    "is_mkldnn",
    "itemsize",
    "nbytes",
)
#: tensor methods that only query metadata (``x.size()``)
METADATA_METHODS = (
    "size",
    "dim",
    "ndimension",
    "stride",
    "numel",
    "nelement",
    "__len__",
    "is_contiguous",
    "is_floating_point",
    "is_complex",
    "element_size",
    "data_ptr",
    "storage_offset",
    "get_device",
    "has_names",
)


def functions(names: Sequence[str], owners: Sequence[Any]) -> list[Any]:
    """The functions ``owner.name`` that exist, for every owner and name (owners first)."""
    found = []
    for owner in owners:
        for n in names:
            f = getattr(owner, n, None)
            if f is not None:
                found.append(f)
    return found


def _metadata() -> frozenset:
    getters = [getattr(Tensor, n).__get__ for n in METADATA_PROPERTIES if hasattr(Tensor, n)]
    return frozenset([*getters, *functions(METADATA_METHODS, (Tensor,))])


#: tensor metadata queries (``x.shape``, ``x.dtype``, ``x.size()``, ...): they never return a tensor
#: and need no rule - interpreters run them straight through (about 4 in 5 calls of a CNN's forward)
METADATA: frozenset = _metadata()


# ============================================================================ operation kinds

#: moves values only (views, indexing, concatenation, padding, dtype casts, dropout in eval mode)
STRUCT = "structural"
#: ``+ - * /`` in all their spellings (parsed further by the interpreters that need to)
ARITH = "arith"
#: parameter-free linear maps with non-negative weights: sum, mean, average pooling, interpolation
REDUCE = "reduce"
#: convolutions, linear layers, matmul/einsum (affine in one operand when the other is constant)
AFFINE = "affine"
#: element-wise activations
ACT = "activation"
#: other element-wise nonlinearities of one tensor (exp, log, sqrt, pow, ...)
ELEMWISE = "elementwise"
#: element-wise functions of two tensors that are neither arithmetic nor activations
BINARY = "binary"
#: batch_norm (eval), layer_norm, group_norm, rms_norm; ``F.normalize`` (division by an Lp norm)
NORM = "norm"
SOFTMAX = "softmax"
MAXPOOL = "maxpool"
#: scaled_dot_product_attention
SDPA = "sdpa"
#: convolution + activation of perspicio's fused twin (:data:`perspicio.core.kernels.FUSED_OP`)
FUSED = "fused"

KIND_NAMES = (
    STRUCT,
    ARITH,
    REDUCE,
    AFFINE,
    ACT,
    ELEMWISE,
    BINARY,
    NORM,
    SOFTMAX,
    MAXPOOL,
    SDPA,
    FUSED,
)
#: kinds whose output element depends only on the input elements at the same position
ELEMENTWISE_KINDS = frozenset({ACT, ELEMWISE, ARITH, BINARY})

#: names of the functions of each kind, looked up on ``torch.Tensor`` and ``torch`` (``T``: only
#: Tensor; ``F``: only ``torch.nn.functional``)
STRUCT_NAMES = (
    "reshape view view_as reshape_as flatten unflatten squeeze unsqueeze permute transpose swapaxes swapdims "
    "movedim moveaxis t contiguous clone expand expand_as broadcast_to repeat repeat_interleave tile narrow "
    "select split chunk unbind tensor_split index_select gather take_along_dim flip roll masked_fill where "
    "float double half bfloat16 to type type_as diagonal tril triu unfold"
).split()
STRUCT_T_NAMES = ("__getitem__", "__setitem__")
STRUCT_TORCH_NAMES = (
    "cat",
    "concat",
    "concatenate",
    "stack",
    "hstack",
    "vstack",
    "broadcast_tensors",
    "atleast_1d",
    "atleast_2d",
    "constant_pad_nd",
)
#: dropouts (identities in eval mode)
DROPOUT_F_NAMES = (
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "alpha_dropout",
    "feature_alpha_dropout",
)
STRUCT_F_NAMES = (
    "pad",
    *DROPOUT_F_NAMES,
    "unfold",
    "fold",
    "pixel_shuffle",
    "pixel_unshuffle",
    "embedding",
)
#: tensor properties that return a tensor (``x.T``): their getters reach a torch function mode
STRUCT_PROPERTIES = ("T", "mT", "H", "mH")
ARITH_NAMES = (
    "add add_ __add__ __radd__ __iadd__ sub sub_ __sub__ __rsub__ __isub__ subtract mul mul_ __mul__ __rmul__ "
    "__imul__ multiply div div_ divide true_divide __truediv__ __rtruediv__ __rdiv__ __div__ __itruediv__ neg "
    "neg_ negative __neg__ rsub"
).split()
REDUCE_NAMES = ("sum", "mean", "cumsum", "nansum")
REDUCE_F_NAMES = (
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "interpolate",
    "upsample",
    "upsample_bilinear",
    "upsample_nearest",
)
AFFINE_F_NAMES = (
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "linear",
)
AFFINE_NAMES = (
    "matmul",
    "mm",
    "bmm",
    "__matmul__",
    "__rmatmul__",
    "einsum",
    "inner",
    "outer",
    "dot",
    "mv",
)
ACT_F_NAMES = (
    "relu relu6 hardtanh elu selu celu leaky_relu gelu silu mish hardswish hardsigmoid softplus logsigmoid "
    "softsign tanhshrink threshold prelu rrelu sigmoid tanh relu_ hardtanh_ elu_ leaky_relu_ threshold_ rrelu_ "
    "celu_ selu_"
).split()
ACT_NAMES = (
    "relu",
    "relu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "clamp",
    "clamp_",
    "clip",
    "clip_",
    "clamp_min",
    "clamp_min_",
    "clamp_max",
    "clamp_max_",
    "hardtanh",
    "selu",
    "celu",
    "prelu",
    "rrelu",
)
ELEMWISE_NAMES = (
    "exp exp_ log log_ log2 log10 sqrt sqrt_ rsqrt rsqrt_ abs abs_ square square_ sin cos erf erfc reciprocal "
    "reciprocal_ log1p expm1 pow pow_ __pow__ __rpow__ __ipow__ exp2 sinh cosh atan asin acos"
).split()
BINARY_NAMES = ("maximum", "minimum")
NORM_F_NAMES = ("batch_norm", "layer_norm", "group_norm", "rms_norm", "normalize")
NORM_TORCH_NAMES = ("batch_norm", "layer_norm", "group_norm")
SOFTMAX_NAMES = ("softmax",)
MAXPOOL_F_NAMES = (
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "adaptive_max_pool1d",
    "adaptive_max_pool2d",
    "adaptive_max_pool3d",
)


def _build_kinds() -> dict[Any, str]:
    import torch
    import torch.nn.functional as F

    from . import kernels

    table: dict[Any, str] = {}

    def add(kind: str, names: Sequence[str], owners: Sequence[Any]) -> None:
        # owner by owner, name by name: a later entry wins where a function appears twice
        for n in names:
            for owner in owners:
                f = getattr(owner, n, None)
                if f is not None:
                    table[f] = kind

    add(STRUCT, STRUCT_NAMES, (Tensor, torch))
    add(STRUCT, STRUCT_T_NAMES, (Tensor,))
    add(STRUCT, STRUCT_TORCH_NAMES, (torch,))
    add(STRUCT, STRUCT_F_NAMES, (F,))
    for n in STRUCT_PROPERTIES:
        if hasattr(Tensor, n):
            table[getattr(Tensor, n).__get__] = STRUCT
    add(ARITH, ARITH_NAMES, (Tensor, torch))
    add(REDUCE, REDUCE_NAMES, (Tensor, torch))
    add(REDUCE, REDUCE_F_NAMES, (F,))
    add(AFFINE, AFFINE_F_NAMES, (F,))
    add(AFFINE, AFFINE_NAMES, (Tensor, torch))
    add(ACT, ACT_F_NAMES, (F,))
    add(ACT, ACT_NAMES, (Tensor, torch))
    add(ELEMWISE, ELEMWISE_NAMES, (Tensor, torch))
    add(BINARY, BINARY_NAMES, (Tensor, torch))
    add(NORM, NORM_F_NAMES, (F,))
    add(NORM, NORM_TORCH_NAMES, (torch,))
    add(SOFTMAX, SOFTMAX_NAMES, (F, torch, Tensor))
    add(MAXPOOL, MAXPOOL_F_NAMES, (F,))
    table[F.scaled_dot_product_attention] = SDPA
    if kernels.FUSED_OP is not None:
        table[kernels.FUSED_OP] = FUSED
    return table


#: torch function -> operation kind: the one table every operation-level interpreter consults
#: (extended only through :func:`register_operation`)
KINDS: dict[Any, str] = _build_kinds()


def kind(func: Any) -> str | None:
    """The operation kind of a torch function (None: not in the table)."""
    try:
        return KINDS.get(func)
    except TypeError:  # an unhashable callable
        return None


#: functions that return their input's values as a copy in another memory layout
COPY_NAMES = ("contiguous",)

#: sliding-window and padding operations by geometry: ``(window, spatial dims)`` with window one of
#: ``conv``, ``max_pool``, ``avg_pool``, ``adaptive_pool`` (any pooling to a given output size) and
#: ``pad`` (constant padding; dims 0: as many as the padding tuple names)
WINDOW_NAMES: dict[str, tuple[str, ...]] = {
    "conv": ("conv{n}d",),
    "max_pool": ("max_pool{n}d", "max_pool{n}d_with_indices"),
    "avg_pool": ("avg_pool{n}d",),
    "adaptive_pool": (
        "adaptive_avg_pool{n}d",
        "adaptive_max_pool{n}d",
        "adaptive_max_pool{n}d_with_indices",
    ),
}


def _build_windows() -> dict[Any, tuple[str, int]]:
    import torch
    import torch.nn.functional as F

    table: dict[Any, tuple[str, int]] = {}
    for window, patterns in WINDOW_NAMES.items():
        for n in (1, 2, 3):
            for pattern in patterns:
                for owner in (torch, F):
                    f = getattr(owner, pattern.format(n=n), None)
                    if f is not None:
                        table[f] = (window, n)
    for f in (F.pad, torch.constant_pad_nd):
        table[f] = ("pad", 0)
    return table


#: torch function -> ``(window, spatial dims)`` for convolutions, poolings and paddings (the
#: receptive-field tracer, the fuse tracer and the incremental evaluator read their geometry)
WINDOWS: dict[Any, tuple[str, int]] = _build_windows()


def _functions_of(names: Sequence[str], owners: Sequence[Any]) -> frozenset:
    return frozenset(functions(names, owners))


def _dropouts() -> frozenset:
    import torch.nn.functional as F

    return _functions_of(DROPOUT_F_NAMES, (F,))


#: the dropout functions (identities in eval mode)
DROPOUTS: frozenset = _dropouts()
#: layout copies (``x.contiguous()``): same values, so element-wise for every interpreter
COPIES: frozenset = _functions_of(COPY_NAMES, (Tensor,))


def window(func: Any) -> tuple[str, int] | None:
    """``(window, spatial dims)`` of a convolution, pooling or padding (None: none of those)."""
    try:
        return WINDOWS.get(func)
    except TypeError:  # an unhashable callable
        return None


def elementwise(func: Any) -> bool:
    """Does each output element of ``func`` depend only on the input elements at its position?"""
    return kind(func) in ELEMENTWISE_KINDS or func in COPIES


# ============================================================================ flags

#: the output is >= 0 whatever the input (LRP reads inputs proven non-negative)
NONNEGATIVE = "nonnegative"
#: a linear map with non-negative weights: non-negative inputs give a non-negative output
KEEPS_SIGN = "keeps_sign"
#: a structural operation that may write values not taken from its input (fill, assignment)
WRITES = "writes"
#: an affine operation that a following eval-mode BatchNorm can be folded into
FOLDS_BATCHNORM = "folds_batchnorm"
FLAG_NAMES = (NONNEGATIVE, KEEPS_SIGN, WRITES, FOLDS_BATCHNORM)

#: names of the functions with each flag (looked up on ``torch.Tensor``, ``torch`` and
#: ``torch.nn.functional``; clamps with a lower bound >= 0 are non-negative too, see
#: :func:`clamp_bounds`)
FLAG_FUNCTION_NAMES: dict[str, tuple[str, ...]] = {
    NONNEGATIVE: ("relu", "relu_", "relu6", "sigmoid", "sigmoid_", "hardsigmoid"),
    # sums and averages (the average poolings of REDUCE_F_NAMES) keep the sign of their inputs
    KEEPS_SIGN: ("sum", "mean", *(n for n in REDUCE_F_NAMES if "avg_pool" in n)),
    WRITES: ("masked_fill", "where", "__setitem__", "index_put", "scatter"),
    FOLDS_BATCHNORM: ("conv1d", "conv2d", "conv3d", "linear"),
}
#: owners each flag's names are looked up on (BatchNorm folding knows the functional layers only)
FLAG_OWNERS = {FOLDS_BATCHNORM: ("F",)}


def _build_flags() -> dict[str, set]:
    import torch
    import torch.nn.functional as F

    owners = {"Tensor": Tensor, "torch": torch, "F": F}
    return {
        flag: set(
            functions(names, [owners[o] for o in FLAG_OWNERS.get(flag, ("Tensor", "torch", "F"))])
        )
        for flag, names in FLAG_FUNCTION_NAMES.items()
    }


#: flag -> the functions that have it (extended only through :func:`register_operation`)
FLAGS: dict[str, set] = _build_flags()


def has_flag(func: Any, flag: str) -> bool:
    """Does the torch function ``func`` have ``flag`` (one of :data:`FLAG_NAMES`)?"""
    try:
        return func in FLAGS[flag]
    except TypeError:  # an unhashable callable
        return False


#: clamps (the output is the input clamped to bounds read from the call), by name (in-place
#: spellings too): ``(lower, upper)``, each a fixed value (None: unbounded) or the
#: ``(position, keyword, default)`` of the argument giving it
CLAMP_SPECS: dict[str, tuple[Any, Any]] = {
    "relu": (0.0, None),
    "relu6": (0.0, 6.0),
    "hardtanh": ((1, "min_val", -1.0), (2, "max_val", 1.0)),
    "clamp": ((1, "min", None), (2, "max", None)),
    "clip": ((1, "min", None), (2, "max", None)),
    "clamp_min": ((1, "min", None), None),
    "clamp_max": (None, (1, "max", None)),
}


def _build_clamps() -> dict[Any, tuple[Any, Any]]:
    import torch
    import torch.nn.functional as F

    table: dict[Any, tuple[Any, Any]] = {}
    for name, spec in CLAMP_SPECS.items():
        for f in functions((name, name + "_"), (Tensor, torch, F)):
            table[f] = spec
    return table


#: torch function -> its clamp spec (as in :data:`CLAMP_SPECS`)
CLAMPS: dict[Any, tuple[Any, Any]] = _build_clamps()


def _bound(spec: Any, args: tuple, kwargs: dict) -> Any:
    if not isinstance(spec, tuple):
        return spec
    pos, key, default = spec
    return args[pos] if len(args) > pos else kwargs.get(key, default)


def clamp_bounds(func: Any, args: tuple, kwargs: dict) -> tuple[Any, Any] | None:
    """``(lower, upper)`` bound arguments of a clamp call (ReLU, ReLU6, hardtanh, clamp, clip,
    clamp_min, clamp_max: None where unbounded, the value as passed otherwise - a number or a
    tensor); None for any other function."""
    try:
        spec = CLAMPS.get(func)
    except TypeError:  # an unhashable callable
        return None
    if spec is None:
        return None
    return _bound(spec[0], args, kwargs), _bound(spec[1], args, kwargs)


def nonnegative_output(func: Any, args: tuple, kwargs: dict) -> bool:
    """Is the output of this call >= 0 whatever its input (ReLU, sigmoid, a clamp with a lower
    bound >= 0, ...)?"""
    if has_flag(func, NONNEGATIVE):
        return True
    bounds = clamp_bounds(func, args, kwargs)
    if bounds is None:
        return False
    low = bounds[0]
    return isinstance(low, (int, float)) and not isinstance(low, bool) and low >= 0


#: matrix products ``left @ right`` (batched, broadcast) by name: the argument positions of
#: ``(left, right)`` (LRP transposes them in closed form: ``s @ right^T``, ``left^T @ s``)
MATMUL_NAMES: dict[str, tuple[int, int]] = {
    "matmul": (0, 1),
    "__matmul__": (0, 1),
    "__rmatmul__": (1, 0),
    "bmm": (0, 1),
    "mm": (0, 1),
}


def _build_matmuls() -> dict[Any, tuple[int, int]]:
    import torch

    return {
        f: order
        for name, order in MATMUL_NAMES.items()
        for f in functions((name,), (Tensor, torch))
    }


#: torch function -> ``(left, right)`` argument positions of a matrix product
MATMULS: dict[Any, tuple[int, int]] = _build_matmuls()


def matmul_operands(func: Any) -> tuple[int, int] | None:
    """``(left, right)`` argument positions of a matrix product ``left @ right`` (None: not one)."""
    try:
        return MATMULS.get(func)
    except TypeError:  # an unhashable callable
        return None


# ============================================================================ in-place spellings


def _build_inplace() -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    pairs = {
        torch.add: "add_ __iadd__",
        torch.sub: "sub_ __isub__",
        torch.mul: "mul_ __imul__",
        torch.div: "div_ __itruediv__",
        torch.neg: "neg_",
        torch.relu: "relu_",
        torch.sigmoid: "sigmoid_",
        torch.tanh: "tanh_",
        torch.clamp: "clamp_ clip_",
        torch.clamp_min: "clamp_min_",
        torch.clamp_max: "clamp_max_",
        torch.exp: "exp_",
        torch.log: "log_",
        torch.sqrt: "sqrt_",
        torch.rsqrt: "rsqrt_",
        torch.abs: "abs_",
        torch.square: "square_",
        torch.reciprocal: "reciprocal_",
        torch.pow: "pow_ __ipow__",
        F.hardtanh: "hardtanh_",
        F.elu: "elu_",
        F.leaky_relu: "leaky_relu_",
        F.threshold: "threshold_",
        F.rrelu: "rrelu_",
        F.celu: "celu_",
        F.selu: "selu_",
    }
    return {name: f for f, names in pairs.items() for name in names.split()}


#: in-place spellings (by ``__name__``, whatever the owner) -> the out-of-place function computing
#: the same result (interpreters run in-place calls out of place: :func:`perspicio.core.calls.out_of_place`)
INPLACE: dict[str, Any] = _build_inplace()


# ============================================================================ registration


def register_operation(
    func: Any,
    kind_name: str,
    window_spec: tuple[str, int] | None = None,
    *,
    flags: Sequence[str] = (),
    clamp: tuple[Any, Any] | None = None,
    matmul: tuple[int, int] | None = None,
) -> None:
    """Declare the kind of a torch function that is not in the table (e.g. a new activation), so
    that every interpreter treats it as that kind: the propagation rules, the incremental evaluator
    and the tracers. ``kind_name`` is one of :data:`KIND_NAMES`; ``window_spec`` the geometry of a
    convolution, pooling or padding (as in :data:`WINDOWS`); ``flags`` any of :data:`FLAG_NAMES`;
    ``clamp`` the bounds of a clamp (as in :data:`CLAMP_SPECS`: guided backpropagation and
    deconvnet treat a clamp with lower bound 0 as a rectifier, DeepLIFT uses its fast Rescale);
    ``matmul`` the ``(left, right)`` argument positions of a matrix product (as in :data:`MATMULS`)."""
    if kind_name not in KIND_NAMES:
        raise ValueError(
            f"unknown operation kind {kind_name!r}; expected one of: {', '.join(KIND_NAMES)}"
        )
    if window_spec is not None and (
        window_spec[0] not in (*WINDOW_NAMES, "pad") or len(window_spec) != 2
    ):
        raise ValueError(
            f"unknown window {window_spec!r}; expected ({'|'.join((*WINDOW_NAMES, 'pad'))}, dims)"
        )
    unknown = [f for f in flags if f not in FLAG_NAMES]
    if unknown:
        raise ValueError(f"unknown flags {unknown}; expected any of: {', '.join(FLAG_NAMES)}")
    if clamp is not None and (
        len(clamp) != 2
        or not all(b is None or isinstance(b, (int, float)) or len(b) == 3 for b in clamp)
    ):
        raise ValueError(
            f"clamp must be (lower, upper), each None, a number or (position, keyword, default); got {clamp!r}"
        )
    KINDS[func] = kind_name
    if window_spec is not None:
        WINDOWS[func] = (str(window_spec[0]), int(window_spec[1]))
    for flag in flags:
        FLAGS[flag].add(func)
    if clamp is not None:
        CLAMPS[func] = (clamp[0], clamp[1])
    if matmul is not None:
        MATMULS[func] = (int(matmul[0]), int(matmul[1]))


def unregister_operation(func: Any) -> None:
    """Remove a function added by :func:`register_operation` (a no-op for functions never added)."""
    KINDS.pop(func, None)
    WINDOWS.pop(func, None)
    for members in FLAGS.values():
        members.discard(func)
    CLAMPS.pop(func, None)
    MATMULS.pop(func, None)
