"""Attention methods for transformers: raw attention, attention rollout and attention flow
(Abnar & Zuidema, ACL 2020), and gradient-weighted attention relevance (Chefer, Gur & Wolf,
ICCV 2021, "Generic Attention-model Explainability").

Interface (for the text package, the vision-transformer code and the figures):

* :class:`AttentionCapture` ``(model, modules=None, *, grad=False)`` - a context manager. While
  it is entered, every call of an attention module appends an :class:`AttentionRecord`
  ``(name, weights, leaf)`` to ``capture.records`` in call order; ``weights`` is the attention
  probability tensor (N, heads, queries, keys) the module multiplies with its values. It is read
  from the module's own computation: a ``softmax`` inside the module's forward (Hugging Face
  eager attention, ``nn.MultiheadAttention`` with ``need_weights=True``), or a
  ``F.scaled_dot_product_attention`` call, which is decomposed into
  ``softmax(q k^T * scale + mask) v`` so the weights exist (timm ``Attention`` with
  ``fused_attn``, torchvision's ViT through ``nn.MultiheadAttention``, Hugging Face sdpa). With
  ``grad=True`` a zero leaf requiring grad is added to each weight tensor in the model's graph
  (``record.leaf``), so ``torch.autograd.grad(score, [r.leaf for r in records])`` gives the total
  derivative d score / d A per layer (through every later layer, their softmaxes included). Hooks and the
  torch-function mode exist only while the context is entered (removed in ``finally``). Without
  ``grad``, a Hugging Face attention module in eager mode and in eval mode returns its weights as
  the second element of its output (the softmax itself: dropout is the identity in eval mode):
  they are read from there by a forward hook and no torch-function mode runs inside that module
  (:func:`returns_weights`); a module that then returns none sets ``capture.missed`` and the
  caller runs the forward again with ``fast=False``.
* :func:`attention_modules` ``(model, spec=None) -> list[(name, module)]`` - the attention modules
  (``spec``: None/"auto", a list of names or modules, or a module class); auto = every
  ``nn.MultiheadAttention`` and every module whose class name contains "Attention" and that has
  no such module inside it (Hugging Face ``BertSelfAttention``, timm ``Attention``).
* Functions on stacks of attention maps (no model involved): :func:`fuse_heads`,
  :func:`rollout` (``(L, N, T, T) -> (N, T, T)``), :func:`attention_flow_values`,
  :func:`gradient_weighted_relevance` (Chefer: ``R = I; R += mean_h(relu(dA * A)) @ R``).
* Registered methods ``attention``, ``attention_rollout``, ``attention_flow``,
  ``transformer_attribution``. Inputs: token ids (N, T) or any packed integer tensor, or images
  (N, C, H, W). A model may state which tokens are real with a method ``token_mask(x) -> (N, T)
  bool`` and its pooling with an attribute ``pooling`` ("mean" or "cls") - the text adapter
  (:mod:`perspicio.text`) does. Options: ``query`` ("auto", "cls", "mean" or a token index: the
  output token(s) whose relevance row is reported; auto = "mean" for mean-pooling models and for
  images without extra tokens, else token 0), ``extra_tokens`` (images: "auto" or the number of
  leading class/distillation/register tokens dropped before the tokens are reshaped to the patch
  grid), ``attention_modules`` (see above). Results: ``attributions`` (N, T) per token for token
  inputs; for images (N, 1, H, W) upsampled like CAMs, with ``raw`` the (N, 1, h, w) patch grid.
  ``extras``: ``relevance_matrix`` (N, T, T) (rollout, transformer attribution, attention),
  ``query_weights`` (N, T), ``token_mask`` (N, T), ``attention_layers`` (module names), and for
  ``attention`` the full stack ``attentions`` (N, L, heads, T, T).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..core import ops
from ..core.batching import Engine
from ..core.capture import token_grid
from ..core.explanation import Explanation
from ..core.guard import module_tree
from ..core.inputs import as_batch
from ..core.registry import register_method
from ..core.targets import (
    check_target_count,
    resolve_target,
    row_scores,
    slice_target,
)
from ..core.tokens import Layout, check_extra_tokens, token_map
from ..errors import InputError, LayerError, ModelError, OptionError
from .base import Method

__all__ = [
    "AttentionCapture",
    "AttentionFlow",
    "AttentionRecord",
    "AttentionRollout",
    "RawAttention",
    "TransformerAttribution",
    "attention_flow_values",
    "attention_modules",
    "fuse_heads",
    "gradient_weighted_relevance",
    "rollout",
]

#: attention_flow refuses inputs with more tokens than this unless ``max_tokens`` is raised
FLOW_MAX_TOKENS = 64


# ============================================================================ capture


@dataclass
class AttentionRecord:
    """One call of an attention module: its name and attention probabilities (N, heads, T, S).
    ``weights`` are detached. ``leaf``: with ``grad=True`` the zero leaf requiring grad that was added
    to the weights in the model's graph (in the form the module computed them, e.g. (N*heads, T, S)
    for ``nn.MultiheadAttention``); otherwise the weights as the module computed them."""

    name: str
    weights: Tensor
    leaf: Tensor


def attention_modules(model: nn.Module, spec: Any = None) -> list[tuple[str, nn.Module]]:
    """The attention modules of ``model`` (see the module docstring for ``spec``)."""
    named = module_tree(model)  # the guard's walk inside a method call
    if spec is None or spec == "auto":
        kinds: dict[type, bool] = {}  # one name test per class, not per module
        for _, m in named:
            t = type(m)
            if t not in kinds:
                kinds[t] = issubclass(t, nn.MultiheadAttention) or "attention" in t.__name__.lower()
        cands = [(n, m) for n, m in named if kinds[type(m)]]
        ids = {id(m) for _, m in cands}
        found = [
            (n, m)
            for n, m in cands
            if isinstance(m, nn.MultiheadAttention) or not _holds_any(m, ids)
        ]
        if not found:
            raise LayerError(
                f"found no attention module in {type(model).__name__} (looked for nn.MultiheadAttention and modules "
                "whose class name contains 'Attention'); pass attention_modules=[names] or a module class."
            )
        return found
    if isinstance(spec, type) and issubclass(spec, nn.Module):
        found = [(n, m) for n, m in named if isinstance(m, spec)]
        if not found:
            raise LayerError(f"{type(model).__name__} has no {spec.__name__} module.")
        return found
    items = (
        [spec]
        if isinstance(spec, (str, nn.Module))
        else list(spec)
        if isinstance(spec, (list, tuple))
        else None
    )
    if not items:
        raise OptionError(
            "attention_modules must be None/'auto', a module class, or a list of module names or "
            f"modules; got {spec!r}."
        )
    from ..core.capture import resolve_layer

    return [resolve_layer(model, s) for s in items]


def _holds_any(module: nn.Module, ids: set[int]) -> bool:
    """Whether a module below ``module`` (not itself) has its id in ``ids`` (stops at the first)."""
    if type(module).modules is not nn.Module.modules:  # a module that walks its own way
        return any(id(c) in ids for c in module.modules() if c is not module)
    seen = {id(module)}
    stack = [c for c in module._modules.values() if c is not None]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        if type(m).named_modules is not nn.Module.named_modules:
            return any(id(c) in ids for c in module.modules() if c is not module)
        if id(m) in ids:
            return True
        seen.add(id(m))
        stack.extend(c for c in m._modules.values() if c is not None)
    return False


_find_modules = attention_modules  # the methods' option of the same name shadows it


class _AttentionMode(TorchFunctionMode):
    """Sees the torch calls made inside attention modules (entered by the modules' pre-hooks)."""

    def __init__(self, capture: AttentionCapture) -> None:
        super().__init__()
        self.capture = capture

    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        # every torch call inside an attention module passes here (20 per BERT layer): the common
        # case - neither softmax nor sdpa - is one table look-up and the call
        what = ops.kind(func)
        if what is None or (what != ops.SOFTMAX and what != ops.SDPA):
            return func(*args, **kwargs) if kwargs else func(*args)
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self.capture._sdpa(*args, **kwargs)
        out = func(*args, **kwargs)
        if what == ops.SOFTMAX and isinstance(out, Tensor):
            return self.capture._record(out)
        return out


def returns_weights(module: nn.Module) -> bool:
    """Whether ``module`` is a Hugging Face attention module that returns its attention weights as
    the second element of its output: eager attention (``config._attn_implementation``) in eval
    mode, where the returned weights are the softmax itself (dropout is the identity)."""
    config = getattr(module, "config", None)
    return getattr(config, "_attn_implementation", None) == "eager" and not module.training


class AttentionCapture:
    """Records the attention probabilities of every attention module call (module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        modules: Any = None,
        *,
        grad: bool = False,
        fast: bool = True,
        found: list[tuple[str, nn.Module]] | None = None,
    ) -> None:
        #: (name, module) of the attention modules: ``found`` (a search already done), else the search
        self.modules = found if found is not None else _find_modules(model, modules)
        self.grad = grad
        self.fast = fast and not grad
        self.records: list[AttentionRecord] = []
        #: names of modules read by the returned-weights path that returned none (rerun with fast=False)
        self.missed: list[str] = []
        self._stack: list[tuple[str, nn.Module]] = []
        self._mode = _AttentionMode(self)
        self._handles: list[Any] = []

    # hooks -----------------------------------------------------------------------------------
    def _pre(self, name: str) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            if not self._stack:
                self._mode.__enter__()
            self._stack.append((name, module))

        return hook

    def _post(self, name: str) -> Callable:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if self._stack and self._stack[-1][1] is module:
                self._stack.pop()
                if not self._stack:
                    self._mode.__exit__(None, None, None)

        return hook

    def _returned(self, name: str) -> Callable:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if self._stack:  # inside another attention module: that one's mode sees the softmax
                return
            weights = out[1] if isinstance(out, tuple) and len(out) > 1 else None
            if isinstance(weights, Tensor) and weights.ndim == 4 and weights.is_floating_point():
                self.records.append(AttentionRecord(name, weights.detach(), weights))
            else:
                self.missed.append(name)

        return hook

    def _mha(self, name: str) -> Callable:
        def hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict, out: Any) -> Any:
            return self._multihead(name, module, args, kwargs, out)

        return hook

    def __enter__(self) -> AttentionCapture:
        try:
            for name, module in self.modules:
                if isinstance(module, nn.MultiheadAttention):
                    self._handles.append(
                        module.register_forward_hook(self._mha(name), with_kwargs=True)
                    )
                    continue
                if self.fast and returns_weights(module):
                    self._handles.append(module.register_forward_hook(self._returned(name)))
                    continue
                self._handles.append(module.register_forward_pre_hook(self._pre(name)))
                self._handles.append(module.register_forward_hook(self._post(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Remove the hooks and leave the torch-function mode if a forward raised inside a module."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._stack:
            self._stack.clear()
            self._mode.__exit__(None, None, None)

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # what the mode calls ----------------------------------------------------------------------
    def _record(self, probs: Tensor) -> Tensor:
        name, module = self._stack[-1]
        weights = probs.detach()
        if (
            probs.ndim == 3
        ):  # (N*heads, T, S), as nn.MultiheadAttention computes them with need_weights
            heads = getattr(module, "num_heads", None)
            if not heads or probs.shape[0] % heads:
                raise ModelError(
                    f"attention module {name!r} computed weights of shape {tuple(probs.shape)}; "
                    "cannot split them into heads."
                )
            weights = weights.view(probs.shape[0] // heads, heads, *probs.shape[1:])
        elif probs.ndim != 4:
            raise ModelError(
                f"attention module {name!r} computed a softmax of shape {tuple(probs.shape)}; expected "
                "attention weights (N, heads, queries, keys)."
            )
        leaf = probs
        if self.grad:
            # A + 0 with the zero a leaf: d score / d leaf is the total derivative d score / d A,
            # through every later layer (also their softmaxes, which a detached A would cut off)
            leaf = torch.zeros_like(probs, requires_grad=True)
            probs = probs + leaf
        self.records.append(AttentionRecord(name, weights, leaf))
        return probs

    def _multihead(
        self, name: str, module: nn.MultiheadAttention, args: tuple, kwargs: dict, out: Any
    ) -> Any:
        """``nn.MultiheadAttention`` runs its attention inside ``F.multi_head_attention_forward`` (or a
        fused kernel), out of reach of the torch-function mode: its output is recomputed here from
        the module's parameters with the weights explicit, checked against the module's own output,
        and returned in its place (so with ``grad=True`` the weights are in the graph)."""
        names = (
            "query",
            "key",
            "value",
            "key_padding_mask",
            "need_weights",
            "attn_mask",
            "average_attn_weights",
            "is_causal",
        )
        call = dict(zip(names, args))
        call.update(kwargs)
        if module.bias_k is not None or module.add_zero_attn:
            raise ModelError(
                f"attention module {name!r}: nn.MultiheadAttention with bias_k/bias_v or add_zero_attn "
                "is not supported by the attention methods."
            )
        q, k, v = call["query"], call["key"], call["value"]
        if not module.batch_first:
            q, k, v = (t.transpose(0, 1) if t.ndim == 3 else t for t in (q, k, v))
        if q.ndim != 3:
            raise ModelError(
                f"attention module {name!r}: unbatched inputs are not supported; got {tuple(q.shape)}."
            )
        e, h = module.embed_dim, module.num_heads
        if module.in_proj_weight is not None:
            wq, wk, wv = module.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
        bq, bk, bv = (
            module.in_proj_bias.chunk(3) if module.in_proj_bias is not None else (None, None, None)
        )
        n, t, s_len = q.shape[0], q.shape[1], k.shape[1]
        qh = F.linear(q, wq, bq).view(n, t, h, e // h).transpose(1, 2)
        kh = F.linear(k, wk, bk).view(n, s_len, h, e // h).transpose(1, 2)
        vh = F.linear(v, wv, bv).view(n, s_len, h, e // h).transpose(1, 2)
        scores = (qh @ kh.transpose(-2, -1)) / math.sqrt(e // h)
        for mask in (call.get("attn_mask"), call.get("key_padding_mask")):
            if mask is None:
                continue
            if mask is call.get("key_padding_mask"):
                mask = mask.view(n, 1, 1, s_len)
            elif mask.ndim == 3:
                mask = mask.view(n, h, t, s_len)
            scores = (
                scores.masked_fill(mask, float("-inf"))
                if mask.dtype == torch.bool
                else scores + mask
            )
        if call.get("is_causal") and call.get("attn_mask") is None:
            scores = scores.masked_fill(
                ~torch.ones(t, s_len, dtype=torch.bool, device=q.device).tril(), float("-inf")
            )
        self._stack.append((name, module))
        try:
            a = self._record(torch.softmax(scores, dim=-1))
        finally:
            self._stack.pop()
        y = F.linear(
            (a @ vh).transpose(1, 2).reshape(n, t, e), module.out_proj.weight, module.out_proj.bias
        )
        if not module.batch_first:
            y = y.transpose(0, 1)
        own = out[0] if isinstance(out, tuple) else out
        tol = 1e-4 * float(own.detach().abs().max().clamp_min(1))
        if own.shape != y.shape or not torch.allclose(y.detach(), own.detach(), rtol=0, atol=tol):
            raise ModelError(
                f"attention module {name!r}: recomputing this nn.MultiheadAttention from its parameters "
                "did not reproduce its output; its attention cannot be read."
            )
        weights = None
        if call.get("need_weights", True):
            weights = a.mean(dim=1) if call.get("average_attn_weights", True) else a
        return (y, weights) if isinstance(out, tuple) else y

    def _sdpa(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> Tensor:
        """``F.scaled_dot_product_attention`` written out, so the weights exist and are recorded."""
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            rep = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
        s = (query @ key.transpose(-2, -1)) * (
            1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
        )
        if is_causal:
            t, k = s.shape[-2:]
            s = s.masked_fill(
                ~torch.ones(t, k, dtype=torch.bool, device=s.device).tril(), float("-inf")
            )
        if attn_mask is not None:
            s = (
                s.masked_fill(~attn_mask, float("-inf"))
                if attn_mask.dtype == torch.bool
                else s + attn_mask
            )
        a = self._record(torch.softmax(s, dim=-1))
        if dropout_p > 0:
            a = F.dropout(a, dropout_p)
        return a @ value


# ============================================================================ the formulas


def fuse_heads(attn: Tensor, how: str = "mean") -> Tensor:
    """(..., heads, T, S) -> (..., T, S): mean, max or min over heads."""
    if how == "mean":
        return attn.mean(dim=-3)
    if how == "max":
        return attn.amax(dim=-3)
    if how == "min":
        return attn.amin(dim=-3)
    raise OptionError(f"head_fusion must be 'mean', 'max' or 'min'; got {how!r}.")


def _with_residual(a: Tensor, residual: float) -> Tensor:
    """Abnar & Zuidema: A~ = (1 - r) A + r I, rows re-normalised to sum to 1."""
    m = (1 - residual) * a
    m.diagonal(dim1=-2, dim2=-1).add_(residual)  # + residual * I: the same sums, element by element
    return m / m.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(m.dtype).tiny)


def rollout(
    attn: Tensor | Sequence[Tensor], *, residual: float = 0.5, head_fusion: str = "mean"
) -> Tensor:
    """Attention rollout: ``A~_L @ ... @ A~_1`` with ``A~ = norm(0.5 A + 0.5 I)`` (Abnar & Zuidema).

    ``attn``: per layer (in forward order) attention weights (N, heads, T, T) or already fused
    (N, T, T). Returns (N, T, T): row ``i`` is how much output token ``i`` draws on each input token.
    """
    if not attn:
        raise ModelError("no attention layer ran.")
    first = attn[0]
    if all(
        a.shape == first.shape and a.dtype == first.dtype and a.device == first.device for a in attn
    ):
        # one head fusion, residual and normalisation for the whole (L, N, [heads,] T, T) stack:
        # the same element-wise values as layer by layer, in a few torch calls instead of a few
        # per layer
        stacked = torch.stack(list(attn))
        fused = fuse_heads(stacked, head_fusion) if first.ndim == 4 else stacked
        mats = list(_with_residual(fused, residual).unbind(0))
    else:
        fused_layers = [fuse_heads(a, head_fusion) if a.ndim == 4 else a for a in attn]
        mats = [_with_residual(f, residual) for f in fused_layers]
    out = mats[0]
    for m in mats[1:]:
        out = m @ out
    return out


def gradient_weighted_relevance(attn: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    """Chefer, Gur & Wolf (2021), self-attention rule: ``R = I``; for each layer in forward order
    ``R <- R + mean_h(relu(dA * A)) @ R``. ``attn``, ``grads``: (N, heads, T, T) per layer."""
    r = None
    for a, g in zip(attn, grads):
        abar = (g * a).clamp_min(0).mean(dim=1)
        if r is None:
            r = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(abar).clone()
        r = r + abar @ r
    if r is None:
        raise ModelError("no attention layer ran.")
    return r


def attention_flow_values(layers: Tensor, queries: Sequence[int], *, scale: int = 2**30) -> Tensor:
    """Maximum flow from each input token to each query token (Abnar & Zuidema's attention flow).

    ``layers``: (L, T, T) residual-augmented, head-fused attention of ONE sample in forward order
    (``layers[l][i, j]`` is the capacity of the edge from token ``j`` below layer ``l`` to token
    ``i`` above it). The graph has (L + 1) T nodes and L T^2 edges; each (input, query) pair is one
    max-flow problem, solved with scipy's Dinic algorithm on integer capacities ``round(c * scale)``
    (the flows are exact to about T * L / scale). Returns (len(queries), T).
    """
    try:
        import numpy as np
        from scipy.sparse import csr_array
        from scipy.sparse.csgraph import maximum_flow
    except ImportError as exc:
        raise ModelError(
            "attention_flow needs scipy: pip install scipy (or 'perspicio[text]')."
        ) from exc
    n_layers, t, _ = layers.shape
    cap = np.rint(layers.detach().double().cpu().numpy() * scale).astype(np.int64)
    rows, cols, vals = [], [], []
    for layer in range(n_layers):
        i, j = np.nonzero(cap[layer])
        rows.append(layer * t + j)  # from token j below the layer
        cols.append((layer + 1) * t + i)  # to token i above it
        vals.append(cap[layer][i, j])
    size = (n_layers + 1) * t
    graph = csr_array(
        (np.concatenate(vals).astype(np.int32), (np.concatenate(rows), np.concatenate(cols))),
        shape=(size, size),
    )
    out = torch.zeros(len(queries), t, dtype=torch.float64)
    for qi, q in enumerate(queries):
        sink = n_layers * t + int(q)
        for j in range(t):
            out[qi, j] = maximum_flow(graph, j, sink, method="dinic").flow_value / scale
    return out


# ============================================================================ methods


def _check_query(query: Any) -> None:
    if query in ("auto", "cls", "mean", "last") or (
        isinstance(query, int) and not isinstance(query, bool)
    ):
        return
    raise OptionError(
        f"query must be 'auto', 'cls', 'mean', 'last' or a token index; got {query!r}."
    )


def is_causal(attn: Sequence[Tensor], mask: Tensor) -> bool:
    """Whether every layer's attention is causal (a decoder: no real query attends to a later real
    key): the upper triangle over the real tokens is exactly 0 in every layer and head, and some
    text has at least two real tokens. A bidirectional softmax is never exactly 0 there."""
    if int(mask.sum(1).max()) < 2:
        return False
    real = mask[:, None, :, None] & mask[:, None, None, :]  # (N, 1, T, T) real query and key
    upper = torch.ones(mask.shape[1], mask.shape[1], dtype=torch.bool, device=mask.device).triu(1)
    return all(not bool((a.ne(0) & real & upper).any()) for a in attn)


def _pools_by_mean(model: nn.Module) -> bool | None:
    """What the model states about its pooling: True for the mean of the tokens (``pooling="mean"``,
    timm ``global_pool`` "avg"/"avgmax"/"max"/"map"), False for a class token (``"cls"``, timm
    ``"token"``), None when it states nothing."""
    pooling = getattr(model, "pooling", None)
    if isinstance(pooling, str):
        return pooling == "mean"
    pool = getattr(model, "global_pool", None)
    if isinstance(pool, str) and pool:
        return pool != "token"
    return None


class _AttentionMethod(Method):
    """Shared capture, query selection and output shaping; subclasses override :meth:`relevance`."""

    input_ndim = None
    #: True when the method needs dA (d target / d attention) per layer
    uses_gradients = False

    @property
    def freezes_parameters(self) -> bool:  # type: ignore[override]
        """Only the gradient-weighted methods differentiate (the guard then freezes parameters)."""
        return self.uses_gradients

    def __init__(
        self,
        model: nn.Module,
        *,
        query: Any = "auto",
        extra_tokens: Any = "auto",
        attention_modules: Any = None,
        **common: Any,
    ) -> None:
        super().__init__(model, **common)
        _check_query(query)
        check_extra_tokens(extra_tokens)
        self.query = query
        self.extra_tokens = extra_tokens
        self.attention_modules = attention_modules
        #: names of the attention calls of the last call (call order) and the ones left out
        self._names: tuple[str, ...] = ()
        self._skipped: list[str] = []
        #: (module tree, its attention modules) of the last call: searched again when the tree differs
        self._found = (module_tree(self.model), _find_modules(self.model, attention_modules))  # validates now

    def _attention_modules(self) -> list[tuple[str, nn.Module]]:
        """The attention modules to capture (the last search while the model's modules are the same)."""
        tree = module_tree(self.model)
        if tree != self._found[0]:
            self._found = (tree, _find_modules(self.model, self.attention_modules))
        return self._found[1]

    def _prepare_inputs(self, inputs: Any) -> Any:
        return as_batch(inputs, self.model, ndim=None, keep_integer=True)

    # the override point ------------------------------------------------------------------------
    def relevance(
        self, attn: list[Tensor], grads: list[Tensor] | None, mask: Tensor, weights: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """Per-token relevance (N, T) from per-layer attention (N, heads, T, T) (and gradients),
        the real-token ``mask`` (N, T) and the query ``weights`` (N, T); also the (N, T, T) matrix
        whose query rows were taken, when there is one."""
        raise NotImplementedError  # abstract: every registered subclass overrides it

    # shared -----------------------------------------------------------------------------------
    def _token_mask(self, x: Tensor, t: int) -> Tensor:
        fn = getattr(self.model, "token_mask", None)
        if callable(fn):
            mask = fn(x).to(torch.bool)
            if mask.shape != (len(x), t):
                raise ModelError(
                    f"token_mask gave shape {tuple(mask.shape)}; the attention has {t} tokens."
                )
            return mask
        return torch.ones(len(x), t, dtype=torch.bool, device=x.device)

    def _layout(self, x: Tensor, t: int) -> Layout | None:
        """Images: how the T tokens lie on the patch grid (core's token_grid); tokens: None."""
        if x.ndim != 4 or not x.is_floating_point():
            return None
        return token_grid(self.model, x, t, extra_tokens=check_extra_tokens(self.extra_tokens))

    def _query_weights(self, mask: Tensor, extra: int, image: bool, causal: bool = False) -> Tensor:
        n, t = mask.shape
        q = self.query
        if q == "auto":
            by_mean = _pools_by_mean(self.model)
            if causal:  # a decoder: only the last real token has seen the whole text
                q = "last"
            elif by_mean is not None:
                q = "mean" if by_mean else "cls"
            else:
                q = "mean" if image and extra == 0 else "cls"
        if q == "mean":
            w = mask.double()  # a new tensor
            if extra:
                w[:, :extra] = 0.0
            return w / w.sum(dim=1, keepdim=True).clamp_min(1)
        w = torch.zeros(n, t, dtype=torch.float64, device=mask.device)
        if q == "last":  # each row's last real token (right or left padding)
            pos = torch.arange(t, device=mask.device).expand(n, t)
            last = torch.where(mask, pos, torch.full_like(pos, -1)).amax(dim=1).clamp_min(0)
            w[torch.arange(n, device=mask.device), last] = 1.0
            return w
        idx = 0 if q == "cls" else int(q)
        if not -t <= idx < t:
            raise OptionError(f"query={q} is out of range for {t} tokens.")
        w[:, idx % t] = 1.0
        return w

    def _check_records(self, records: list[AttentionRecord], rows: int) -> list[AttentionRecord]:
        """The records the methods use, checked: one (heads, T, T) self-attention map per input over
        one token sequence. With automatic module search, attention calls whose queries are not
        their keys (an attention-pooling head such as timm's MAP pool, cross-attention) are left
        out and named in ``extras["skipped_attention_layers"]``; everything else that is not one
        global self-attention over the same tokens is refused with what was seen."""
        auto = self.attention_modules is None or self.attention_modules == "auto"
        square = [r for r in records if r.weights.shape[-2] == r.weights.shape[-1]]
        self._skipped = [r.name for r in records if r.weights.shape[-2] != r.weights.shape[-1]]
        if auto and square and self._skipped:
            records = square
        else:
            self._skipped = []
        if len(square) != len(records):
            raise ModelError(
                "attention methods need self-attention (queries = keys); got shapes "
                + ", ".join(f"{r.name}: {tuple(r.weights.shape)}" for r in records[:4])
                + (", ..." if len(records) > 4 else "")
                + "."
            )
        for r in records:
            if r.weights.shape[0] != rows:
                raise ModelError(
                    f"attention module {r.name!r} computed {r.weights.shape[0]} attention maps "
                    f"{tuple(r.weights.shape[1:])} for {rows} input(s): windowed or grouped attention "
                    "(Swin's shifted windows, local attention) has no map over the whole token sequence, "
                    "so raw attention, rollout, flow and transformer attribution are not defined for it. "
                    "Use a gradient or propagation method (lrp, integrated_gradients) or a CAM on the "
                    "stage outputs (gradcam reads channels-last maps)."
                )
        sizes = sorted({r.weights.shape[-1] for r in records})
        if len(sizes) > 1:
            raise ModelError(
                "the attention layers run over different numbers of tokens ("
                + ", ".join(f"{r.name}: {r.weights.shape[-1]}" for r in records[:6])
                + (", ..." if len(records) > 6 else "")
                + "): token merging or pooling between layers (hierarchical transformers, "
                "encoder-decoders) has no rollout over one sequence. Pass attention_modules=[...] "
                "naming the layers of one token sequence."
            )
        return records

    def _explain(self, x: Tensor, target: Any, engine: Engine) -> Explanation:
        n = len(x)
        check_target_count(target, n)
        chunks: list[tuple[list[Tensor], list[Tensor] | None]] = []
        scores: list[Tensor] = []
        indices: list[Tensor] = []
        names: list[str] = []
        resolved: list[Any] = []

        def step(start: int, stop: int) -> None:
            xs = x[start:stop]
            found = self._attention_modules()
            with AttentionCapture(self.model, found=found, grad=self.uses_gradients) as cap:
                out = engine.forward(xs)
            if cap.missed:  # a module returned no weights after all: read its softmax instead
                with AttentionCapture(
                    self.model, found=found, grad=self.uses_gradients, fast=False
                ) as cap:
                    out = engine.forward(xs)
            if not cap.records:
                raise ModelError(
                    "no attention module ran during the forward pass (attention modules: "
                    + ", ".join(name for name, _ in cap.modules)
                    + ")."
                )
            records = self._check_records(cap.records, len(xs))
            names[:] = [r.name for r in records]
            tgt = None
            if target is not None or (isinstance(out, Tensor) and out.ndim == 2):
                tgt = resolve_target(slice_target(target, start, stop, n), out, self.labels)
                s = row_scores(tgt, out)
                scores.append(s.detach())
                if tgt.indices is not None:
                    indices.append(tgt.indices)
                resolved.append(tgt)
            grads = None
            if self.uses_gradients:
                if tgt is None:
                    raise ModelError(
                        f"{self.name} needs a target: the model output {tuple(out.shape)} is not "
                        "(N, classes); pass a callable target (e.g. EmbeddingSimilarity)."
                    )
                leaves = [r.leaf for r in records]
                if not s.requires_grad:
                    raise ModelError(
                        "the target score does not depend on the attention weights (no gradient path)."
                    )
                got = engine.grad(s.sum(), leaves, len(xs))
                grads = [g.reshape(r.weights.shape).detach() for g, r in zip(got, records)]
            chunks.append(([r.weights.detach() for r in records], grads))

        engine.run(step, n, sample=x[:1], grad=self.uses_gradients, description=self.name)
        layers = len(chunks[0][0])

        def joined(part: int) -> list[Tensor]:  # per layer, the chunks' rows in order
            if len(chunks) == 1:
                return chunks[0][part]  # type: ignore[return-value]
            return [torch.cat([c[part][i] for c in chunks]) for i in range(layers)]

        attn = joined(0)
        grads = joined(1) if self.uses_gradients else None
        t = attn[-1].shape[-1]
        if any(a.shape[-2] != a.shape[-1] for a in attn):
            raise ModelError(
                "attention methods need self-attention (queries = keys); got shapes "
                + ", ".join(str(tuple(a.shape)) for a in attn[:3])
                + "."
            )
        image = x.ndim == 4 and x.is_floating_point()
        layout = self._layout(x, t)
        extra = layout.extra if layout is not None else 0
        mask = self._token_mask(x, t)
        causal = is_causal(attn, mask)
        weights = self._query_weights(mask, extra, image, causal)
        self._names = tuple(names)
        rel, matrix = self.relevance(attn, grads, mask, weights)
        rel = rel.to(attn[-1].dtype) * mask
        extras: dict[str, Any] = {
            "query_weights": weights,
            "token_mask": mask,
            "attention_layers": tuple(names),
            "causal": causal,
        }
        if self._skipped:
            extras["skipped_attention_layers"] = tuple(dict.fromkeys(self._skipped))
        if matrix is not None:
            extras["relevance_matrix"] = matrix
        extras.update(self._extras(attn))
        raw = None
        if layout is not None:
            raw = token_map(rel, layout)  # (N, 1, h, w) patch grid, upsampled like CAMs below
            rel = token_map(rel, layout, tuple(x.shape[-2:]))
        idx = torch.cat(indices) if len(indices) == len(chunks) and indices else None
        sc = torch.cat(scores) if len(scores) == len(chunks) else torch.full((n,), float("nan"))
        if resolved and idx is None and resolved[0].indices is None:
            extras["target_fn"] = resolved[0].fn
        return Explanation(
            attributions=rel.detach(),
            method=self.name,
            scores=sc,
            targets=idx,
            raw=raw,
            extras=extras,
            provenance={"attention_layers": len(attn), "tokens": t, "extra_tokens": extra},
        )

    def _extras(self, attn: list[Tensor]) -> dict[str, Any]:
        return {}


def _rows(matrix: Tensor, weights: Tensor) -> Tensor:
    """The query rows of (N, T, T) ``matrix`` weighted by ``weights`` (N, T) -> (N, T)."""
    return (weights.to(matrix.dtype)[:, None, :] @ matrix)[:, 0]


@register_method(
    "attention",
    family="attention",
    needs="attention layers (a transformer)",
    needs_gradients=False,
    summary="Raw attention weights of one layer and head (or their mean), from the model's own pass",
    paper="Vaswani et al., NeurIPS 2017 (the weights); Clark et al., BlackboxNLP 2019 (reading them)",
)
class RawAttention(_AttentionMethod):
    """The attention probabilities of layer ``layer`` (an index in call order, negative from the
    end, or a module name) and head ``head`` (None: mean over heads), row(s) of the query."""

    def __init__(
        self, model: nn.Module, *, layer: Any = -1, head: int | None = None, **options: Any
    ) -> None:
        super().__init__(model, **options)
        if not isinstance(layer, (int, str)) or isinstance(layer, bool):
            raise OptionError(
                f"layer must be an index of the attention layers or a module name; got {layer!r}."
            )
        if head is not None and (not isinstance(head, int) or isinstance(head, bool)):
            raise OptionError(f"head must be None (mean of heads) or an integer; got {head!r}.")
        self.layer = layer
        self.head = head

    def relevance(
        self, attn: list[Tensor], grads: list[Tensor] | None, mask: Tensor, weights: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        a = self._pick(attn)
        return _rows(a, weights), a

    def _pick(self, attn: list[Tensor]) -> Tensor:
        layer = self.layer
        if isinstance(layer, str):
            # the modules as they ran (call order; a shared module once per call)
            names = list(self._names) or [name for name, _ in self._attention_modules()]
            if layer not in names:
                from ..errors import suggest

                known = list(dict.fromkeys(names))
                raise LayerError(
                    f"{layer!r} is not an attention module; they are: {', '.join(known)}."
                    + suggest(layer, known)
                )
            calls = [i for i, name in enumerate(names) if name == layer]
            if len(calls) > 1:
                raise OptionError(
                    f"attention module {layer!r} runs {len(calls)} times per forward pass (shared "
                    f"layers); pick one call by its index in call order: layer={calls}."
                )
            layer = calls[0]
        if not -len(attn) <= layer < len(attn):
            raise OptionError(
                f"layer={self.layer} is out of range: {len(attn)} attention layers ran."
            )
        a = attn[layer]
        if self.head is None:
            return a.mean(dim=1)
        if not -a.shape[1] <= self.head < a.shape[1]:
            raise OptionError(
                f"head={self.head} is out of range: the layer has {a.shape[1]} heads."
            )
        return a[:, self.head]

    def _extras(self, attn: list[Tensor]) -> dict[str, Any]:
        return {"attentions": torch.stack(attn, dim=1)}


@register_method(
    "attention_rollout",
    family="attention",
    needs="attention layers (a transformer)",
    needs_gradients=False,
    summary="Attention rollout: the product of residual-augmented, head-averaged attention over layers",
    paper="Abnar & Zuidema, ACL 2020",
)
class AttentionRollout(_AttentionMethod):
    """Rollout ``A~_L ... A~_1`` with ``A~ = norm((1 - residual) A + residual I)`` (paper: 0.5);
    heads fused by ``head_fusion`` (paper: mean)."""

    def __init__(
        self, model: nn.Module, *, residual: float = 0.5, head_fusion: str = "mean", **options: Any
    ) -> None:
        super().__init__(model, **options)
        if (
            isinstance(residual, bool)
            or not isinstance(residual, (int, float))
            or not 0 <= residual <= 1
        ):
            raise OptionError(f"residual must be a number in [0, 1]; got {residual!r}.")
        fuse_heads(torch.zeros(1, 1, 1), head_fusion)  # validates
        self.residual = float(residual)
        self.head_fusion = head_fusion

    def relevance(
        self, attn: list[Tensor], grads: list[Tensor] | None, mask: Tensor, weights: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        r = rollout(attn, residual=self.residual, head_fusion=self.head_fusion)
        return _rows(r, weights), r


@register_method(
    "attention_flow",
    family="attention",
    needs="attention layers (a transformer)",
    needs_gradients=False,
    summary="Attention flow: max-flow from each input token to the query through the attention graph",
    paper="Abnar & Zuidema, ACL 2020",
)
class AttentionFlow(_AttentionMethod):
    """Max-flow through the graph of residual-augmented, head-fused attention (the rollout's
    matrices as edge capacities). Cost: one max-flow problem per (input token, query token) on
    (L + 1) T nodes and L T^2 edges - refused above ``max_tokens`` real tokens per sample."""

    def __init__(
        self,
        model: nn.Module,
        *,
        residual: float = 0.5,
        head_fusion: str = "mean",
        max_tokens: int = FLOW_MAX_TOKENS,
        **options: Any,
    ) -> None:
        super().__init__(model, **options)
        if (
            isinstance(residual, bool)
            or not isinstance(residual, (int, float))
            or not 0 <= residual <= 1
        ):
            raise OptionError(f"residual must be a number in [0, 1]; got {residual!r}.")
        fuse_heads(torch.zeros(1, 1, 1), head_fusion)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise OptionError(f"max_tokens must be a positive integer; got {max_tokens!r}.")
        self.residual = float(residual)
        self.head_fusion = head_fusion
        self.max_tokens = max_tokens

    def relevance(
        self, attn: list[Tensor], grads: list[Tensor] | None, mask: Tensor, weights: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        fused = torch.stack(
            [_with_residual(fuse_heads(a, self.head_fusion), self.residual) for a in attn]
        )
        n, t = mask.shape
        if int(mask.sum(1).max()) > self.max_tokens:
            raise InputError(
                f"attention_flow on {int(mask.sum(1).max())} tokens: one max-flow problem per (input, query) token "
                f"pair on a graph of {(len(attn) + 1) * t} nodes and {len(attn) * t * t} edges; above max_tokens="
                f"{self.max_tokens} this is refused (pass a larger max_tokens to accept the cost, or use "
                "attention_rollout)."
            )
        out = torch.zeros(n, t, dtype=torch.float64)
        for i in range(n):
            real = torch.nonzero(mask[i]).flatten()
            sub = fused[:, i][:, real][:, :, real]
            sub = sub / sub.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(sub.dtype).tiny)
            w = weights[i, real]
            qs = torch.nonzero(w).flatten()
            flows = attention_flow_values(sub, qs.tolist())
            out[i, real] = (w[qs].cpu()[:, None] * flows).sum(0)
        return out.to(mask.device), None


@register_method(
    "transformer_attribution",
    family="attention",
    needs="attention layers (a transformer)",
    needs_gradients=True,
    summary="Gradient-weighted attention relevance: R += mean_h(relu(dA * A)) R over layers",
    paper="Chefer, Gur & Wolf, ICCV 2021",
)
class TransformerAttribution(_AttentionMethod):
    """Chefer et al.'s generic attention-model explainability for self-attention encoders: each
    layer's attention weighted by the gradient of the target score, positive part, mean over
    heads, accumulated as ``R <- R + A_bar R`` from ``R = I``."""

    uses_gradients = True

    def relevance(
        self, attn: list[Tensor], grads: list[Tensor] | None, mask: Tensor, weights: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        assert grads is not None
        r = gradient_weighted_relevance(attn, grads)
        return _rows(r, weights), r
