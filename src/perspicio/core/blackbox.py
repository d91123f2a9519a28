"""The one adapter that lets any prediction callable stand in for a torch model.

Model-agnostic methods (occlusion, RISE, Shapley values, LIME) only need outputs.
:class:`BlackBox` wraps a scikit-learn ``predict_proba``, an XGBoost model, an
ONNX Runtime session, a plain function on numpy arrays or tensors - or a function
on lists of strings for text - into an ``nn.Module`` the core (guard, batching
engine, targets) can call like any network. Every call is validated: the output
must have one row per input, a stable trailing shape, and finite values.

Methods that need gradients refuse black boxes with a :class:`ModelError`
(see :func:`unwrap_model`, which every method and metric calls on its model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ModelError, OptionError
from .options import check_choice

_INPUT_KINDS = ("numpy", "torch")
_ONNX_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def _describe(fn: Any) -> str:
    owner = getattr(fn, "__self__", None)
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return f"{type(owner).__name__}.{name}" if owner is not None else name


def declared_input(obj: Any) -> tuple[int, int] | None:
    """``(channels, ndim)`` an ONNX session declares for its image input ((N, C, ...) with a fixed
    C, rank 3 to 5), else None."""
    if not (hasattr(obj, "get_inputs") and hasattr(obj, "run")):
        return None
    try:
        shape = list(obj.get_inputs()[0].shape)
    except Exception:  # noqa: BLE001 - a session-like object without shapes declares nothing
        return None
    if 3 <= len(shape) <= 5 and isinstance(shape[1], int) and not isinstance(shape[1], bool) and shape[1] > 0:
        return shape[1], len(shape)
    return None


def onnx_output_name(session: Any, *, zipmap_hint: bool = True) -> str | None:
    """The output of an ONNX session to explain: a floating-point tensor, preferring one whose
    name says probabilities. A converted classifier's first output is usually its integer label,
    which no attribution method can explain; a ZipMap (a sequence of dicts) is not a tensor."""
    if not callable(getattr(session, "get_outputs", None)):  # a session-like object: its first output
        return None
    outputs = [(o.name, getattr(o, "type", "")) for o in session.get_outputs()]
    floats = [n for n, t in outputs if t in ("tensor(float)", "tensor(double)", "tensor(float16)")]
    if not floats:
        kinds = ", ".join(f"{n} ({t})" for n, t in outputs)
        hint = (
            "; convert the model without a ZipMap (skl2onnx: options={'zipmap': False}) or load the "
            "file with perspicio.zoo.tabular.OnnxModel, which reads the probabilities behind a ZipMap"
            if zipmap_hint
            else ""
        )
        raise ModelError(
            f"the ONNX model has no floating-point tensor output to explain (outputs: {kinds}){hint}."
        )
    return next((n for n in floats if "prob" in n.lower()), floats[0])


def _as_callable(obj: Any) -> tuple[Callable[[Any], Any], str, Any]:
    """(function, description, preferred numpy dtype) for a supported black-box object."""
    mod = type(obj).__module__ or ""
    if hasattr(obj, "get_inputs") and hasattr(obj, "run") and not callable(obj):  # onnxruntime session
        inputs = obj.get_inputs()
        if len(inputs) != 1:
            raise ModelError(f"an ONNX session must have exactly one input to be used as a model; it has {len(inputs)}.")
        name = inputs[0].name
        dtype = _ONNX_TYPES.get(getattr(inputs[0], "type", ""), np.float32)
        output = onnx_output_name(obj)
        return (
            (lambda a: obj.run(None if output is None else [output], {name: np.asarray(a, dtype=dtype)})[0]),
            f"ONNX session input {name!r}" + (f", output {output!r}" if output else ""),
            dtype,
        )
    if mod.startswith("xgboost") and type(obj).__name__ == "Booster":
        def xgb_predict(a: np.ndarray) -> Any:
            import xgboost

            return obj.predict(xgboost.DMatrix(a))

        return xgb_predict, "xgboost.Booster.predict", None
    if not callable(obj):
        for attr in ("predict_proba", "predict"):
            if callable(getattr(obj, attr, None)):
                return getattr(obj, attr), _describe(getattr(obj, attr)), None
        raise ModelError(
            f"expected a torch nn.Module or a callable (e.g. clf.predict_proba, an ONNX session); got {type(obj).__name__}."
        )
    if hasattr(obj, "predict_proba") and callable(obj.predict_proba) and mod.startswith(("sklearn", "xgboost", "lightgbm")):
        return obj.predict_proba, _describe(obj.predict_proba), None
    return obj, _describe(obj), None


class BlackBox(nn.Module):
    """An ``nn.Module`` view of a prediction callable.

    Args:
        fn: a callable on a batch (numpy array, tensor, or list of strings), or an
            object with ``predict_proba``/``predict``, an ONNX Runtime session, or an
            XGBoost ``Booster``.
        inputs: ``"numpy"`` (default for callables) passes numpy arrays, ``"torch"`` passes tensors.
            Lists of strings (text) are always passed as lists.
        dtype: floating dtype inputs are converted to before the call (default float64 for numpy
            callables, float32 for torch ones); it is also the dtype explained inputs are cast to.

    The output is returned as a float tensor of shape (N, K); a 1-D output (N,) (regression,
    decision function) becomes (N, 1).
    """

    is_black_box = True

    def __init__(self, fn: Any, *, inputs: str = "numpy", dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if isinstance(fn, BlackBox):
            fn = fn.fn
        if isinstance(fn, nn.Module):
            raise ModelError("BlackBox wraps callables; an nn.Module can be used directly.")
        check_choice("inputs", inputs, _INPUT_KINDS)
        self.fn, self.description, np_dtype = _as_callable(fn)
        #: (channels, ndim) of the inputs, where the callable declares them (ONNX sessions): checked
        #: at the boundary (core/inputs.py) instead of failing inside the runtime
        self.expected_input = declared_input(fn)
        self.input_kind = inputs
        if dtype is None:
            dtype = torch.float32 if (inputs == "torch" or np_dtype == np.float32) else torch.float64
        if not dtype.is_floating_point:
            raise OptionError(f"dtype must be a floating torch dtype; got {dtype}.")
        # an empty buffer tells the core which dtype (and device) inputs should have
        self.register_buffer("_anchor", torch.zeros(0, dtype=dtype), persistent=False)
        self.output_shape: tuple[int, ...] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    def bytes_per_sample(self, sample: Tensor) -> int:
        """Memory estimate per input for the batching engine (no probe call on a black box)."""
        return max(1, int(sample[:1].numel() * 8 * 4))

    def forward(self, x: Tensor | Sequence[str]) -> Tensor:
        if isinstance(x, Tensor):
            n = x.shape[0]
            device = x.device
            arg: Any = x.detach().cpu().numpy() if self.input_kind == "numpy" else x.detach()
        elif isinstance(x, (list, tuple)) and all(isinstance(s, str) for s in x):
            n, device, arg = len(x), self._anchor.device, list(x)
        else:
            raise ModelError(f"a black-box model is called on tensors or lists of strings; got {type(x).__name__}.")
        try:
            raw = self.fn(arg)
        except Exception as exc:  # the user's callable failed: say which and on what
            shape = f"shape {tuple(arg.shape)}" if hasattr(arg, "shape") else f"{len(arg)} strings"
            raise ModelError(f"the black-box model {self.description} failed on a batch of {shape}: "
                             f"{type(exc).__name__}: {exc}") from exc
        return self._check(raw, n, device)

    def _check(self, raw: Any, n: int, device: torch.device) -> Tensor:
        if isinstance(raw, (list, tuple)) and len(raw) == 1 and not np.isscalar(raw[0]) and n != 1:
            raw = raw[0]  # e.g. session.run outputs
        try:
            out = raw.detach() if isinstance(raw, Tensor) else torch.as_tensor(np.asarray(raw))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ModelError(f"the black-box model {self.description} returned {type(raw).__name__}, "
                             f"not an array of shape ({n}, outputs).") from exc
        if out.ndim == 0 or out.shape[0] != n:
            raise ModelError(f"the black-box model {self.description} returned shape {tuple(out.shape)} for {n} "
                             f"inputs; expected ({n},) or ({n}, outputs): one row per input.")
        if out.ndim == 1:
            out = out[:, None]
        if self.output_shape is None:
            self.output_shape = tuple(out.shape[1:])
        elif tuple(out.shape[1:]) != self.output_shape:
            raise ModelError(f"the black-box model {self.description} returned rows of shape {tuple(out.shape[1:])}; "
                             f"earlier calls returned {self.output_shape}.")
        if not out.is_floating_point():
            out = out.to(torch.float64)
        if not torch.isfinite(out).all():
            bad = int((~torch.isfinite(out)).sum())
            raise ModelError(f"the black-box model {self.description} returned {bad} NaN/Inf value(s); "
                             "expected finite scores.")
        return out.to(device=device, dtype=self.dtype)

    def extra_repr(self) -> str:
        return f"{self.description}, inputs={self.input_kind}, dtype={self.dtype}"


def is_black_box(model: Any) -> bool:
    return isinstance(model, BlackBox)


def unwrap_model(model: Any) -> tuple[Any, Sequence[str] | None]:
    """Accept a bundled ``ZooModel`` (``.model`` + ``.labels``), a plain model, or a
    black-box callable (``predict_proba``, an ONNX session, ...), which is wrapped in a
    :class:`BlackBox`. Returns ``(model, labels or None)``."""
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and not isinstance(model, nn.Module):
        return inner, getattr(model, "labels", None)
    if not isinstance(model, nn.Module) and (
        callable(model) or hasattr(model, "predict_proba") or hasattr(model, "predict")
        or (hasattr(model, "run") and hasattr(model, "get_inputs"))
    ):
        return BlackBox(model), None
    return model, None
