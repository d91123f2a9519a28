"""Fused twin: convolution + activation (+ zero padding) as one oneDNN call, for pure outputs.

On CPU a CNN's no-grad forward spends as much time outside its convolutions as inside:
on the bundled EfficientNet-Lite0 (batch 32, channels-last, 2 threads) the ReLU6s took 31%
of the time and the zero padding before its stride-2 convolutions (TensorFlow "SAME",
asymmetric, so ``F.pad`` makes a padded copy) 32%, the convolutions 35%. oneDNN applies an
activation to a convolution's output while it is still in cache (a post-op) and pads
symmetrically by itself, so both memory passes disappear if

* each convolution whose output feeds nothing but one activation module is called with that
  activation as its post-op (``torch.ops.mkldnn._convolution_pointwise``, the kernel
  ``torch.compile`` uses for the same fusion) and the activation module becomes an identity;
* an asymmetric zero padding ``(l, r)`` before a convolution becomes the symmetric padding
  ``p = max(l, r)`` with ``p - l`` zero taps added at the front of the kernel and ``p - r`` at
  its back: output ``i`` then reads exactly the input positions it read before, and the
  output size is unchanged.

The fused twin is built from the BatchNorm-folded inference twin (:mod:`perspicio.core.fold`)
by tracing one forward of one sample: which module calls which convolution, on which tensor,
and who uses its output. It is specialised to that input size (padding depends on it); a
fused convolution given another size, gradients, or another dtype/device runs the original
convolution and activation instead. It is checked against the folded twin once
(:func:`~perspicio.core.fold.outputs_match`; on the bundled model it is bit-identical) and
used for output-only passes and for LRP/DeepLIFT propagation; gradients and the incremental
interpreter keep the folded twin. ``PERSPICIO_FUSE=0`` turns it off.

Under a torch function mode that declares it sees fused calls (:data:`perspicio.core.kernels.SEES_FUSED_CALLS`,
e.g. LRP/DeepLIFT propagation) the fused call is made with gradients on too, with the dense kernel:
the mode intercepts it (:func:`perspicio.core.kernels.parse_fused_call`) and may treat the pair as
one operation or split it back into the convolution - with the extended kernel and symmetric
padding - and the activation. The real taps of an extended kernel are
:func:`perspicio.core.kernels.tap_mask`; the packed form of a kernel is
:func:`perspicio.core.kernels.packed_kernel`. oneDNN itself is used only through
:mod:`perspicio.core.kernels`.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from . import kernels, ops
from .caches import Cache, nbytes
from .fold import outputs_match

#: fuse convolutions with their activations for output-only passes (PERSPICIO_FUSE=0: off)
FUSE = os.environ.get("PERSPICIO_FUSE", "1") not in ("0", "false", "no")



def _post_op(act: nn.Module) -> tuple[str, list[float], str | None] | None:
    """oneDNN's name, scalars and algorithm for an activation module (None: not fusable)."""
    if type(act) is nn.ReLU:
        return "relu", [], None
    if type(act) in (nn.ReLU6, nn.Hardtanh):
        return "hardtanh", [float(act.min_val), float(act.max_val)], None
    if type(act) is nn.SiLU:
        return "swish", [], None
    if type(act) is nn.Sigmoid:
        return "sigmoid", [], None
    if type(act) is nn.Tanh:
        return "tanh", [], None
    if type(act) is nn.Hardswish:
        return "hardswish", [], None
    if type(act) is nn.LeakyReLU:
        return "leaky_relu", [float(act.negative_slope)], None
    if type(act) is nn.GELU:
        return "gelu", [], act.approximate
    return None


def _compiling() -> bool:
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


class FusedConv2d(nn.Module):
    """``act(conv(x))`` as one oneDNN call for inputs of the traced size; otherwise the originals."""

    def __init__(self, conv: nn.Conv2d, act: nn.Module, weight: Tensor, bias: Tensor | None, padding: list[int],
                 stride: list[int], dilation: list[int], groups: int, post: tuple[str, list[float], str | None],
                 size: tuple[int, int]) -> None:
        super().__init__()
        self.conv, self.act = conv, act
        self.register_buffer("fused_weight", weight.detach().contiguous(memory_format=torch.channels_last))
        self.register_buffer("fused_bias", None if bias is None else bias.detach().clone())
        self.padding, self.stride, self.dilation, self.groups = padding, stride, dilation, groups
        self.attr, self.scalars, self.algorithm = post
        self.size = size
        # not a buffer: an opaque oneDNN tensor, derived from fused_weight (see PACKED)
        self.packed = kernels.pack_kernel(self.fused_weight, padding, stride, dilation, groups, size)
        if self.packed is not None:
            kernels.PACKED.put(self.fused_weight, self.packed)

    def forward(self, x: Tensor) -> Tensor:
        if (tuple(x.shape[-2:]) == self.size and x.ndim == 4 and x.dtype == self.fused_weight.dtype == torch.float32
                and x.device == self.fused_weight.device):
            # the opaque packed kernel only where nothing can see the call: a mode that sees fused
            # calls (or any other torch function mode) gets the dense kernel, its rules need it;
            # torch.compile packs the weights of what it compiles
            watched = torch._C._len_torch_function_stack() > 0
            if not torch.is_grad_enabled() or (watched and kernels.fused_calls_seen()):
                w = self.fused_weight if watched or self.packed is None or _compiling() else self.packed
                return kernels.run_conv(x, w, self.fused_bias, self.padding, self.stride, self.dilation, self.groups,
                                        self.attr, self.scalars, self.algorithm)
        return self.act(self.conv(x))


class _Tracer(TorchFunctionMode):
    """Records every call's tensor arguments and outputs, keeping them alive (ids stay unique)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, tuple, dict, Any]] = []
        self.uses: dict[int, list[int]] = {}  # tensor id -> indices of the calls that read it
        self.keep: list[Any] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, Tensor)]
        for t in tensors:
            self.uses.setdefault(id(t), []).append(len(self.calls))
        self.calls.append((func, args, kwargs, out))
        self.keep.append((args, kwargs, out))
        return out


def _ints(v: Any, n: int = 2) -> list[int] | None:
    if isinstance(v, int):
        return [v] * n
    if isinstance(v, (list, tuple)) and len(v) == n and all(isinstance(i, int) for i in v):
        return list(v)
    return None


def _conv_args(args: tuple, kwargs: dict) -> tuple | None:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    a = dict(zip(names, args))
    a.update({k: v for k, v in kwargs.items() if k in names})
    stride, padding, dilation = _ints(a.get("stride", 1)), _ints(a.get("padding", 0)), _ints(a.get("dilation", 1))
    if stride is None or padding is None or dilation is None:  # padding="same"/"valid": leave alone
        return None
    return a["input"], a["weight"], a.get("bias"), stride, padding, dilation, int(a.get("groups", 1))


def _plan(twin: nn.Module, sample: Tensor) -> list[tuple[str, str | None, dict[str, Any]]]:
    """``(conv name, activation name or None, fused call)`` for every convolution worth fusing."""
    mods = dict(twin.named_modules())
    tracer = _Tracer()
    # per module call: (input, output, index of its first call, index after its last call)
    seen: dict[int, list[tuple[Any, Any, int, int]]] = {}
    started: dict[int, int] = {}
    handles = []
    for m in mods.values():
        if isinstance(m, nn.Conv2d) or _post_op(m) is not None:
            handles.append(m.register_forward_pre_hook(lambda mod, inp: started.__setitem__(id(mod), len(tracer.calls))))
            handles.append(m.register_forward_hook(lambda mod, inp, out: seen.setdefault(id(mod), []).append(
                (inp[0] if inp else None, out, started.get(id(mod), -1), len(tracer.calls)))))
    try:
        with torch.no_grad(), tracer:
            twin(sample[:1])
    finally:
        for h in handles:
            h.remove()
    made_by: dict[int, tuple] = {}  # the first call that returned a tensor (in-place ones return it again)
    for func, args, kwargs, out in tracer.calls:
        if isinstance(out, Tensor):
            made_by.setdefault(id(out), (func, args, kwargs))
    act_of_input: dict[int, tuple[str, int, int, bool]] = {}  # input id -> (name, first, end, in place)
    for name, m in mods.items():
        if _post_op(m) is not None and len(seen.get(id(m), [])) == 1:
            inp, out, first, end = seen[id(m)][0]
            if isinstance(inp, Tensor):
                act_of_input[id(inp)] = (name, first, end, out is inp)
    plan = []
    for name, m in mods.items():
        if not isinstance(m, nn.Conv2d) or len(seen.get(id(m), [])) != 1:
            continue
        inp, out = seen[id(m)][0][:2]
        call = made_by.get(id(out))
        if call is None or ops.window(call[0]) != ("conv", 2):
            continue
        parsed = _conv_args(call[1], call[2])
        if parsed is None or parsed[1] is not m.weight:
            continue
        x, weight, bias, stride, padding, dilation, groups = parsed
        pads = [padding[1], padding[1], padding[0], padding[0]]  # left, right, top, bottom
        if x is not inp:  # a zero padding of the module's input in between, used by nothing else
            pad = made_by.get(id(x))
            if pad is None or ops.window(pad[0]) != ("pad", 0) or len(tracer.uses.get(id(x), ())) != 1:
                continue
            names = ("input", "pad", "value") if pad[0] is torch.constant_pad_nd else ("input", "pad", "mode", "value")
            pargs = dict(zip(names, pad[1]), **pad[2])
            p = pargs.get("pad")
            if (pargs.get("input") is not inp or pargs.get("mode", "constant") != "constant"
                    or pargs.get("value") not in (None, 0, 0.0) or not isinstance(p, (list, tuple)) or len(p) != 4):
                continue
            pads = [pads[i] + int(p[i]) for i in range(4)]
        act = _sole_activation(act_of_input.get(id(out)), tracer.uses.get(id(out), []))
        asymmetric = pads[0] != pads[1] or pads[2] != pads[3]
        if act is None and not asymmetric and not kernels.PACKING:
            continue  # nothing to save (with packing: the per-call reorder of the plain kernel)
        if asymmetric and dilation != [1, 1]:
            continue
        ph, pw = max(pads[2], pads[3]), max(pads[0], pads[1])
        extend = (pw - pads[0], pw - pads[1], ph - pads[2], ph - pads[3])
        w = F.pad(weight.detach(), extend)
        taps = F.pad(torch.ones_like(weight, dtype=weight.dtype), extend) if any(extend) else None
        plan.append((name, act, {"weight": w, "bias": bias, "padding": [ph, pw], "stride": stride,
                                 "dilation": dilation, "groups": groups, "size": tuple(inp.shape[-2:]), "taps": taps}))
    return plan


def _sole_activation(act: tuple[str, int, int, bool] | None, uses: list[int]) -> str | None:
    """The activation module's name if it is the only reader of a convolution's output: its
    one read happens inside the activation, and any later reads are of the activation's
    result (an in-place activation returns the same tensor)."""
    if act is None:
        return None
    name, first, end, in_place = act
    inside = [u for u in uses if first <= u < end]
    outside = [u for u in uses if not first <= u < end]
    if len(inside) != 1 or any(u < first for u in outside) or (outside and not in_place):
        return None
    return name


def build_fused(twin: nn.Module, sample: Tensor) -> tuple[nn.Module, int]:
    """``(module, fused)``: a copy of ``twin`` with its fusable convolutions fused, verified on
    ``sample`` - or ``(twin, 0)`` when nothing was fused or anything did not work."""
    if (not kernels.available() or sample.dtype != torch.float32
            or sample.device.type != "cpu" or sample.ndim != 4):
        return twin, 0
    try:
        plan = _plan(twin, sample)
        if not plan:
            return twin, 0
        fused = copy.deepcopy(twin)
        mods = dict(fused.named_modules())
        for conv_name, act_name, call in plan:
            act = mods[act_name] if act_name is not None else nn.Identity()
            post = _post_op(act) if act_name is not None else ("none", [], None)
            size, taps = call.pop("size"), call.pop("taps")
            module = FusedConv2d(mods[conv_name], act, post=post, size=size, **call)
            if taps is not None:
                kernels.TAP_MASKS.put(module.fused_weight, taps.contiguous(memory_format=torch.channels_last))
            fused.set_submodule(conv_name, module)
            if act_name is not None:
                fused.set_submodule(act_name, nn.Identity())
        with torch.no_grad():
            x = sample[:1].contiguous(memory_format=torch.channels_last)
            ok = outputs_match(fused(x), twin(x)) and outputs_match(fused(sample[:1]), twin(sample[:1]))
    except Exception:  # noqa: BLE001 - an untraceable or uncopyable model simply runs unfused
        return twin, 0
    return (fused, len(plan)) if ok else (twin, 0)


#: per folded twin and input shape (C, H, W), dtype, device: (fused module or None, number fused)
_FUSED = Cache("fused twins", holds="fused private copies of inference twins, per input shape",
               key="inference twin (weak), input shape", sized=True)


def fused_twin(twin: nn.Module, sample: Tensor) -> tuple[nn.Module, int]:
    """The cached fused twin of the folded ``twin`` for inputs shaped like ``sample``, or ``(twin, 0)``."""
    if not FUSE:
        return twin, 0
    key = (tuple(sample.shape[1:]), sample.dtype, str(sample.device))
    entry = _FUSED.get(twin, key)
    if entry is None:
        module, n = build_fused(twin, sample)
        entry = (None if module is twin else module, n)  # no strong reference to the key
        # the entry's bytes: the fused module with its packed kernels (tap masks: kernels.TAP_MASKS)
        _FUSED.put(twin, entry, key, size=nbytes(module) if module is not twin else 0)
    module, n = entry
    return (twin if module is None else module), n
