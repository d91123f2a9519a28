"""Tree ensembles stored in ONNX files -> :class:`~perspicio.trees.ensemble.TreeEnsemble`.

The graph is parsed with the ``onnx`` package (a protobuf: data, no code runs; nothing is
unpickled) and its one tree-ensemble operator - ``ai.onnx.ml`` ``TreeEnsembleRegressor``,
``TreeEnsembleClassifier`` (opsets 1-3, as written by skl2onnx and onnxmltools) or ``TreeEnsemble``
(opset 5) - is turned into perspicio's array form, following the node semantics of onnxruntime:

- ``BRANCH_LEQ``/``LT``/``GTE``/``GT`` become one ``<``/``<=`` node each (``GTE``/``GT`` with the
  children swapped); ``BRANCH_EQ``, ``BRANCH_NEQ`` and ``BRANCH_MEMBER`` (a set of values) become a
  chain of ``<`` / ``<=`` nodes that copies the subtrees below them (the same function, so the
  exact Shapley values are unchanged).
- NaN follows the true branch where ``nodes_missing_value_tracks_true`` is 1, else the branch the
  comparison sends it to (false; true for ``BRANCH_NEQ``, since NaN != t).
- ``aggregate_function`` SUM or AVERAGE (leaf weights divided by the number of trees); base values
  added to the margin; ``post_transform`` NONE, LOGISTIC or SOFTMAX is the link from margin to
  probability (``model_output="probability"``).
- Binary classifiers that score one class (``class_ids`` all 0, the converters' layout) follow
  onnxruntime: LOGISTIC gives one output, the log-odds s of the second label (onnxruntime's
  probabilities are [sigmoid(-s), sigmoid(s)]); NONE with non-negative leaf weights (a forest of
  probabilities) gives two outputs [1 - s, s], as onnxruntime does; NONE with signed weights one
  output s (onnxruntime writes [-s, s]).

ONNX trees store no training covers: the converters write ``nodes_hitrates`` = 1 for every node.
Hit rates are used as covers only when they are consistent (every node's equals the sum of its
children's, all positive); otherwise the covers are NaN, and the path-dependent algorithm refuses
the model - use ``feature_perturbation="interventional"`` with background rows, or
:func:`read_onnx`'s ``cover_rows=`` to count covers from data (e.g. the training rows).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError, PerspicioError
from .ensemble import LE, TreeEnsemble, build_ensemble

ML = "ai.onnx.ml"
TREE_OPS = ("TreeEnsembleRegressor", "TreeEnsembleClassifier", "TreeEnsemble")
INSTALL = "pip install 'perspicio[onnx]'"

#: ops allowed between the graph input and the ensemble (they do not change the values)
_BEFORE = ("Cast", "Identity")
#: ops allowed between the ensemble's scores and the graph outputs (shape / container only, or
#: arithmetic with a neutral constant as onnxmltools writes for LightGBM)
_AFTER = ("Identity", "Cast", "ZipMap", "Reshape", "Flatten", "Squeeze", "Unsqueeze")
NEUTRAL_OPERANDS = {"Mul": 1.0, "Div": 1.0, "Add": 0.0, "Sub": 0.0}
#: the opset-5 ``TreeEnsemble`` enumerations
_MODES_V5 = (
    "BRANCH_LEQ",
    "BRANCH_LT",
    "BRANCH_GTE",
    "BRANCH_GT",
    "BRANCH_EQ",
    "BRANCH_NEQ",
    "BRANCH_MEMBER",
)
_POST_V5 = ("NONE", "SOFTMAX", "LOGISTIC", "SOFTMAX_ZERO", "PROBIT")
_AGG_V5 = ("AVERAGE", "SUM", "MIN", "MAX")
_FLOAT, _DOUBLE = 1, 11  # onnx TensorProto element types
#: largest ensemble (nodes after rewriting EQ/NEQ/MEMBER splits) that is read
MAX_NODES = 5_000_000


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ModelError(f"reading ONNX models needs the onnx package: {INSTALL}.") from None
    return onnx


def load_proto(src: Any) -> tuple[Any, str]:
    """``(ModelProto, name)`` from a path, bytes or a ``ModelProto``; a file that is not an ONNX
    model (or is truncated) raises :class:`ModelError` in one line. External tensor data is not
    loaded (tree ensembles keep their attributes inline)."""
    onnx = _onnx()
    if isinstance(src, onnx.ModelProto):
        return src, "ONNX model"
    if isinstance(src, (bytes, bytearray)):
        data, name = bytes(src), "ONNX bytes"
    else:
        path = Path(src)
        if not path.is_file():
            raise ModelError(f"model file {str(path)!r} does not exist.")
        data, name = path.read_bytes(), path.name
    from google.protobuf.message import DecodeError

    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelError(
            f"{name} is not an ONNX model (truncated or not a protobuf: {exc})."
        ) from None
    if not data or model.ir_version <= 0 or not model.HasField("graph") or not model.graph.node:
        raise ModelError(f"{name} is not an ONNX model (no IR version or no graph nodes).")
    return model, name


def find_tree_node(model: Any) -> Any:
    """The graph's tree-ensemble node, None if it has none; several raise :class:`ModelError`."""
    found = [n for n in model.graph.node if n.domain == ML and n.op_type in TREE_OPS]
    if len(found) > 1:
        raise ModelError(
            f"the ONNX graph has {len(found)} tree-ensemble operators; tree_shap reads a graph with one."
        )
    return found[0] if found else None


def is_tree_model(src: Any) -> bool:
    """Whether the ONNX model's graph contains a tree-ensemble operator."""
    model, _ = load_proto(src)
    return find_tree_node(model) is not None


# ----------------------------------------------------------------------------- graph checks


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper, numpy_helper

    out: dict[str, Any] = {}
    for a in node.attribute:
        if a.type == a.TENSOR:
            out[a.name] = numpy_helper.to_array(a.t)
        else:
            out[a.name] = helper.get_attribute_value(a)
    return out


def _constants(graph: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            a = _attrs(n)
            if "value" in a:
                consts[n.output[0]] = np.asarray(a["value"])
    return consts


def _trace_input(graph: Any, node: Any, name: str) -> tuple[str, int]:
    """(input name, float dtype code seen) for the ensemble's input: back through Cast/Identity to
    the graph's one input. The dtype is float32 if any tensor on the way is float32."""
    producers = {o: n for n in graph.node for o in n.output}
    inits = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelError(
            f"{name}: the ONNX graph has {len(inputs)} inputs; explaining it needs one (N, features) input."
        )
    types: list[int] = []
    cur = node.input[0]
    while cur in producers:
        p = producers[cur]
        if p.op_type not in _BEFORE or p.domain not in ("", "ai.onnx"):
            raise ModelError(
                f"{name}: the {p.op_type} operator before the tree ensemble is not supported "
                f"(supported before it: {', '.join(_BEFORE)}); export the trees without preprocessing."
            )
        if p.op_type == "Cast":
            types.append(int(_attrs(p).get("to", 0)))
        cur = p.input[0]
    if cur != inputs[0].name:
        raise ModelError(
            f"{name}: the tree ensemble does not read the graph's input {inputs[0].name!r}."
        )
    types.append(int(inputs[0].type.tensor_type.elem_type))
    bad = [t for t in types if t not in (_FLOAT, _DOUBLE)]
    if bad:
        from onnx import TensorProto

        raise ModelError(
            f"{name}: the tree ensemble's input has type {TensorProto.DataType.Name(bad[-1]).lower()}; "
            "supported: float and double."
        )
    return cur, (_FLOAT if _FLOAT in types else _DOUBLE)


def _check_outputs(graph: Any, tensor: str, name: str) -> None:
    """The ensemble's scores must reach a graph output through shape-only ops (or neutral
    arithmetic): otherwise the file's output is not the ensemble's and the values would not add up."""
    consts = _constants(graph)
    outputs = {o.name for o in graph.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    reached = False
    todo, seen = [tensor], set()
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        reached |= t in outputs
        for c in consumers.get(t, []):
            op = c.op_type
            ok = op in _AFTER
            if op in NEUTRAL_OPERANDS and c.domain in ("", "ai.onnx"):
                other = [i for i in c.input if i != t]
                ok = (
                    len(other) == 1
                    and other[0] in consts
                    and c.input[0] == t
                    and np.all(
                        np.asarray(consts[other[0]], dtype=np.float64) == NEUTRAL_OPERANDS[op]
                    )
                )
            if not ok:
                raise ModelError(
                    f"{name}: the graph applies {op} to the tree ensemble's scores, so its output is not "
                    "the ensemble's; tree_shap reads graphs whose scores are the model's output."
                )
            todo.extend(c.output[:1])
    if not reached:
        raise ModelError(f"{name}: the tree ensemble's scores are not an output of the graph.")


# ----------------------------------------------------------------------------- trees


@dataclass
class _Split:
    mode: str
    feature: int
    value: float
    true: Any
    false: Any
    nan_true: bool
    hit: float = float("nan")
    members: tuple[float, ...] = ()


@dataclass
class _Trees:
    """The ensemble before lowering: per tree a root key; splits and leaves keyed by any hashable."""

    roots: list[Any] = field(default_factory=list)
    splits: dict[Any, _Split] = field(default_factory=dict)
    leaves: dict[Any, dict[int, float]] = field(default_factory=dict)
    leaf_hit: dict[Any, float] = field(default_factory=dict)


def _strs(v: Any) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else str(s) for s in (v or [])]


def _check_node_lengths(name: str, n: int, *named: tuple[str, Any]) -> None:
    """Every per-node attribute (``nodes_<key>``) must have one entry per node."""
    for k, arr in named:
        if len(arr) != n:
            raise ModelError(f"{name}: nodes_{k} has {len(arr)} entries for {n} nodes.")


def _pick(a: dict[str, Any], name: str) -> Any:
    """An attribute or its ``_as_tensor`` (double) twin, as a float64 array (or None)."""
    v = a.get(name + "_as_tensor")
    if v is None:
        v = a.get(name)
    return None if v is None else np.asarray(v, dtype=np.float64).reshape(-1)


def _parse_v1(a: dict[str, Any], classifier: bool, name: str) -> _Trees:
    tids = np.asarray(a.get("nodes_treeids", []), dtype=np.int64)
    nids = np.asarray(a.get("nodes_nodeids", []), dtype=np.int64)
    n = len(tids)
    if n == 0:
        raise ModelError(f"{name}: the tree ensemble has no nodes.")
    feats = np.asarray(a.get("nodes_featureids", []), dtype=np.int64)
    modes = _strs(a.get("nodes_modes"))
    vals = _pick(a, "nodes_values")
    tru = np.asarray(a.get("nodes_truenodeids", []), dtype=np.int64)
    fal = np.asarray(a.get("nodes_falsenodeids", []), dtype=np.int64)
    mtt = np.asarray(a.get("nodes_missing_value_tracks_true") or [0] * n, dtype=np.int64)
    hits = _pick(a, "nodes_hitrates")
    if hits is None or len(hits) != n:
        hits = np.full(n, np.nan)
    if vals is None:
        vals = np.zeros(n)
    _check_node_lengths(
        name,
        n,
        ("featureids", feats),
        ("modes", modes),
        ("values", vals),
        ("truenodeids", tru),
        ("falsenodeids", fal),
        ("nodeids", nids),
        ("missing_value_tracks_true", mtt),
    )
    t = _Trees()
    children: dict[int, set[int]] = {}
    keys: dict[int, list[int]] = {}
    for i in range(n):
        tid, nid = int(tids[i]), int(nids[i])
        key = (tid, nid)
        if key in t.splits or key in t.leaves:
            raise ModelError(f"{name}: node {nid} of tree {tid} is defined twice.")
        keys.setdefault(tid, []).append(nid)
        if modes[i] == "LEAF":
            t.leaves[key] = {}
            t.leaf_hit[key] = float(hits[i])
            continue
        if not modes[i].startswith("BRANCH_") or modes[i] == "BRANCH_MEMBER":
            raise ModelError(f"{name}: unknown node mode {modes[i]!r} (node {nid} of tree {tid}).")
        t.splits[key] = _Split(
            modes[i],
            int(feats[i]),
            float(vals[i]),
            (tid, int(tru[i])),
            (tid, int(fal[i])),
            bool(mtt[i]),
            float(hits[i]),
        )
        children.setdefault(tid, set()).update((int(tru[i]), int(fal[i])))
    for tid in keys:  # the root: the tree's one node that is nobody's child
        missing = children.get(tid, set()) - set(keys[tid])
        if missing:
            raise ModelError(
                f"{name}: a split of tree {tid} points to node {min(missing)}, which does not exist."
            )
        roots = [nid for nid in keys[tid] if nid not in children.get(tid, set())]
        if len(roots) != 1:
            raise ModelError(f"{name}: tree {tid} has {len(roots)} root nodes; expected one.")
        t.roots.append((tid, roots[0]))
    prefix = "class" if classifier else "target"
    wt = np.asarray(a.get(f"{prefix}_treeids", []), dtype=np.int64)
    wn = np.asarray(a.get(f"{prefix}_nodeids", []), dtype=np.int64)
    wi = np.asarray(a.get(f"{prefix}_ids", []), dtype=np.int64)
    ww = _pick(a, f"{prefix}_weights")
    ww = np.zeros(0) if ww is None else ww
    if not (len(wt) == len(wn) == len(wi) == len(ww)):
        raise ModelError(f"{name}: the {prefix}_* attributes have different lengths.")
    for tid, nid, k, w in zip(wt.tolist(), wn.tolist(), wi.tolist(), ww.tolist()):
        leaf = t.leaves.get((tid, nid))
        if leaf is None:
            raise ModelError(
                f"{name}: a weight is attached to node {nid} of tree {tid}, which is not a leaf."
            )
        leaf[k] = leaf.get(k, 0.0) + w
    return t


def _parse_v5(a: dict[str, Any], name: str) -> _Trees:
    modes_raw = np.asarray(a.get("nodes_modes", []), dtype=np.int64).reshape(-1)
    n = len(modes_raw)
    feats = np.asarray(a.get("nodes_featureids", []), dtype=np.int64)
    splits = np.asarray(a.get("nodes_splits", np.zeros(n)), dtype=np.float64).reshape(-1)
    tru = np.asarray(a.get("nodes_truenodeids", []), dtype=np.int64)
    fal = np.asarray(a.get("nodes_falsenodeids", []), dtype=np.int64)
    tleaf = np.asarray(a.get("nodes_trueleafs", []), dtype=np.int64)
    fleaf = np.asarray(a.get("nodes_falseleafs", []), dtype=np.int64)
    mtt = np.asarray(a.get("nodes_missing_value_tracks_true") or [0] * n, dtype=np.int64)
    weights = np.asarray(a.get("leaf_weights", []), dtype=np.float64).reshape(-1)
    targets = np.asarray(a.get("leaf_targetids", []), dtype=np.int64)
    members = np.asarray(a.get("membership_values", np.zeros(0)), dtype=np.float64).reshape(-1)
    if n == 0:
        raise ModelError(f"{name}: the tree ensemble has no nodes.")
    _check_node_lengths(
        name,
        n,
        ("featureids", feats),
        ("splits", splits),
        ("truenodeids", tru),
        ("falsenodeids", fal),
        ("trueleafs", tleaf),
        ("falseleafs", fleaf),
        ("missing_value_tracks_true", mtt),
    )
    if len(weights) != len(targets):
        raise ModelError(f"{name}: leaf_weights and leaf_targetids have different lengths.")
    if (modes_raw < 0).any() or (modes_raw >= len(_MODES_V5)).any():
        raise ModelError(f"{name}: node modes must be 0..6; got {sorted(set(modes_raw.tolist()))}.")
    sets: list[tuple[float, ...]] = []
    cur: list[float] = []
    for v in members.tolist():
        if np.isnan(v):
            sets.append(tuple(cur))
            cur = []
        else:
            cur.append(v)
    if cur:
        sets.append(tuple(cur))
    t = _Trees()
    n_member = 0
    for i in range(n):
        mode = _MODES_V5[modes_raw[i]]
        mem: tuple[float, ...] = ()
        if mode == "BRANCH_MEMBER":
            if n_member >= len(sets):
                raise ModelError(
                    f"{name}: membership_values has fewer sets than BRANCH_MEMBER nodes."
                )
            mem = sets[n_member]
            n_member += 1

        child = _v5_child(name, i, n, len(weights))
        t.splits[("node", i)] = _Split(
            mode,
            int(feats[i]),
            float(splits[i]),
            child(int(tru[i]), int(tleaf[i])),
            child(int(fal[i]), int(fleaf[i])),
            bool(mtt[i]),
            members=mem,
        )
    for j, (k, w) in enumerate(zip(targets.tolist(), weights.tolist())):
        t.leaves[("leaf", j)] = {k: w}
    roots = np.asarray(a.get("tree_roots", []), dtype=np.int64)
    if len(roots) == 0 or (roots < 0).any() or (roots >= n).any():
        raise ModelError(f"{name}: tree_roots is empty or out of range.")
    t.roots = [("node", int(r)) for r in roots]
    return t


def _v5_child(name: str, i: int, n_nodes: int, n_leaves: int) -> Any:
    """The key of node ``i``'s child ``j`` (a leaf or a node), range-checked."""

    def child(j: int, is_leaf: int) -> Any:
        bound = n_leaves if is_leaf else n_nodes
        if not 0 <= j < bound:
            raise ModelError(
                f"{name}: node {i} points to {'leaf' if is_leaf else 'node'} {j}, out of range."
            )
        return ("leaf", j) if is_leaf else ("node", j)

    return child


class _Lowered:
    """Per-tree node arrays for :func:`~perspicio.trees.ensemble.build_ensemble`."""

    def __init__(self) -> None:
        self.left: list[int] = []
        self.right: list[int] = []
        self.default: list[int] = []
        self.feature: list[int] = []
        self.threshold: list[float] = []
        self.flags: list[int] = []
        self.leaf: list[dict[int, float] | None] = []
        self.cover: list[float] = []

    def new(
        self, feature: int = -1, threshold: float = 0.0, flags: int = 0, cover: float = np.nan
    ) -> int:
        self.left.append(-1)
        self.right.append(-1)
        self.default.append(-1)
        self.feature.append(feature)
        self.threshold.append(threshold)
        self.flags.append(flags)
        self.leaf.append(None)
        self.cover.append(cover)
        return len(self.left) - 1


def _lower(
    trees: _Trees, root: Any, f32: bool, budget: list[int], name: str
) -> tuple[_Lowered, bool]:
    """One tree as ``<``/``<=`` nodes (children after parents); EQ/NEQ/MEMBER splits become chains
    that copy their subtrees. Returns the arrays and whether any split was rewritten."""
    out = _Lowered()
    rewritten = False
    # tasks: (source key, parent, side) where side is "L" or "R"; defaults are resolved after the
    # children exist: pending[(node)] = "L" | "R"
    pending: dict[int, str] = {}
    todo: list[tuple[Any, int, str]] = [(root, -1, "")]

    def thr(v: float) -> float:
        return float(np.float32(v)) if f32 else float(v)

    def attach(parent: int, side: str, child: int) -> None:
        if parent < 0:
            return
        if side == "L":
            out.left[parent] = child
        else:
            out.right[parent] = child

    while todo:
        key, parent, side = todo.pop()
        if len(out.left) + budget[0] > MAX_NODES:
            raise ModelError(
                f"{name}: rewriting the EQ/NEQ/MEMBER splits would need more than {MAX_NODES} nodes."
            )
        if key in trees.leaves:
            i = out.new(cover=trees.leaf_hit.get(key, np.nan))
            out.leaf[i] = trees.leaves[key]
            attach(parent, side, i)
            continue
        s = trees.splits.get(key)
        if s is None:
            raise ModelError(f"{name}: a split points to node {key[-1]}, which does not exist.")
        if s.feature < 0:
            raise ModelError(f"{name}: a split reads feature {s.feature}.")
        t = thr(s.value)
        if s.mode in ("BRANCH_LEQ", "BRANCH_LT", "BRANCH_GTE", "BRANCH_GT"):
            le = s.mode in ("BRANCH_LEQ", "BRANCH_GT")
            i = out.new(s.feature, t, LE if le else 0, s.hit)
            attach(parent, side, i)
            # x <= t (LEQ, GT) or x < t (LT, GTE) goes left: the true branch for LEQ/LT
            true_left = s.mode in ("BRANCH_LEQ", "BRANCH_LT")
            left, right = (s.true, s.false) if true_left else (s.false, s.true)
            pending[i] = "L" if s.nan_true == true_left else "R"
            todo.append((right, i, "R"))
            todo.append((left, i, "L"))
            continue
        rewritten = True
        if s.mode == "BRANCH_EQ":
            points = (t,)
            inside, outside, nan_inside = s.true, s.false, s.nan_true
        elif s.mode == "BRANCH_NEQ":  # NaN != t is true: NaN goes to the true branch
            points = (t,)
            inside, outside, nan_inside = s.false, s.true, False
        else:  # BRANCH_MEMBER
            points = tuple(sorted({thr(v) for v in s.members}))
            inside, outside, nan_inside = s.true, s.false, s.nan_true
            if not points:  # an empty set: every value is outside
                todo.append((outside, parent, side))
                continue
        # chain: x < p1 -> outside; x <= p1 -> inside; x < p2 -> outside; ... ; else outside
        prev, prev_side = parent, side
        for q, p in enumerate(points):
            a = out.new(s.feature, p, 0)
            attach(prev, prev_side, a)
            b = out.new(s.feature, p, LE)
            out.right[a] = b
            todo.append((outside, a, "L"))
            todo.append((inside, b, "L"))
            if q == 0:
                pending[a] = "R" if nan_inside else "L"
                pending[b] = "L"
            else:
                pending[a] = "L"
                pending[b] = "L"
            prev, prev_side = b, "R"
        todo.append((outside, prev, "R"))
    budget[0] += len(out.left)
    for i, sd in pending.items():
        out.default[i] = out.left[i] if sd == "L" else out.right[i]
    return out, rewritten


def _covers_ok(low: _Lowered) -> bool:
    c = np.asarray(low.cover)
    if not np.isfinite(c).all() or (c <= 0).any():
        return False
    left, right = np.asarray(low.left), np.asarray(low.right)
    internal = left >= 0
    s = c[left[internal]] + c[right[internal]]
    return bool(np.allclose(c[internal], s, rtol=1e-4, atol=0.0))


def _check_regressor_base(trees: _Trees, base: np.ndarray, name: str) -> None:
    """onnxruntime's TreeEnsembleRegressor writes 0, not the base value, for an output that no leaf
    the row reaches carries a weight for. That is a sum of trees only if each output with a non-zero
    base is carried by every leaf of some tree (then every row gets a weight for it)."""
    targets = np.flatnonzero(base)
    if len(targets) == 0:
        return
    per_tree: dict[Any, list[dict[int, float]]] = {}
    for key, leaf in trees.leaves.items():  # opset-1 keys are (tree id, node id)
        per_tree.setdefault(key[0], []).append(leaf)
    for k in targets:
        covered = any(all(k in leaf for leaf in leaves) for leaves in per_tree.values())
        if not covered:
            raise ModelError(
                f"{name}: output {k} has base value {base[k]:g} but some rows reach no leaf weighted "
                "for it, where onnxruntime writes 0 instead of the base: not a sum of trees."
            )


def read_onnx(src: Any, *, cover_rows: Any = None) -> TreeEnsemble:
    """The :class:`TreeEnsemble` of an ONNX model (path, bytes or ``onnx.ModelProto``) whose graph is
    one tree-ensemble operator (with Cast/Identity before it and shape-only ops after it).

    Args:
        src: the model.
        cover_rows: optional (N, F) rows (e.g. the training data) whose counts at each node become
            the covers the path-dependent algorithm needs; ONNX files carry none (see the module
            documentation). Without them the covers are NaN and only the interventional game works.

    Unsupported content (MIN/MAX aggregation, PROBIT/SOFTMAX_ZERO transforms, other operators
    around the ensemble, non-float inputs) raises :class:`ModelError` in one line.
    """
    model, name = load_proto(src)
    try:
        return _read_proto(model, name, cover_rows)
    except PerspicioError:
        raise
    except (UnicodeDecodeError, TypeError, ValueError, KeyError, IndexError, OverflowError) as exc:
        # a corrupted file can parse as a protobuf with nonsense attributes
        msg = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise ModelError(
            f"{name}: malformed ONNX tree ensemble ({type(exc).__name__}: {msg})."
        ) from None


def _read_proto(model: Any, name: str, cover_rows: Any) -> TreeEnsemble:
    node = find_tree_node(model)
    if node is None:
        ops = sorted({n.op_type for n in model.graph.node})
        raise ModelError(
            f"{name} has no ONNX tree-ensemble operator (its operators: {', '.join(ops[:8])}); explain it "
            "as a black box (onnxruntime) with kernel_shap."
        )
    graph = model.graph
    input_name, dtype = _trace_input(graph, node, name)
    f32 = dtype == _FLOAT
    a = _attrs(node)
    op = node.op_type
    classifier = op == "TreeEnsembleClassifier"
    if op == "TreeEnsemble":
        trees = _parse_v5(a, name)
        post_i, agg_i = int(a.get("post_transform", 0)), int(a.get("aggregate_function", 1))
        post = _POST_V5[post_i] if 0 <= post_i < len(_POST_V5) else str(post_i)
        agg = _AGG_V5[agg_i] if 0 <= agg_i < len(_AGG_V5) else str(agg_i)
        n_targets = int(a.get("n_targets", 0))
        base = np.zeros(0)
        labels: list[str] = []
    else:
        trees = _parse_v1(a, classifier, name)
        post = a.get("post_transform") or b"NONE"
        post = post.decode() if isinstance(post, bytes) else str(post)
        agg = a.get("aggregate_function") or b"SUM"
        agg = agg.decode() if isinstance(agg, bytes) else str(agg)
        b = _pick(a, "base_values")
        base = np.zeros(0) if b is None else b
        if classifier:
            ints, strs = a.get("classlabels_int64s"), a.get("classlabels_strings")
            labels = [str(v) for v in ints] if ints else _strs(strs)
            n_targets = len(labels)
        else:
            labels = []
            n_targets = int(a.get("n_targets", 1))
    _check_outputs(graph, node.output[1 if classifier else 0], name)
    if agg not in ("SUM", "AVERAGE"):
        raise ModelError(
            f"{name}: aggregate_function {agg} is not a sum of trees; tree_shap reads SUM and AVERAGE."
        )
    if post not in ("NONE", "LOGISTIC", "SOFTMAX"):
        raise ModelError(
            f"{name}: post_transform {post} is not supported (supported: NONE, LOGISTIC, SOFTMAX)."
        )
    if n_targets < 1:
        raise ModelError(f"{name}: the tree ensemble declares {n_targets} outputs.")
    # leaf weights -> per-leaf vectors over the outputs, and the outputs' meaning
    weights = [w for leaf in trees.leaves.values() for w in leaf.values()]
    ids = {k for leaf in trees.leaves.values() for k in leaf}
    if ids and (min(ids) < 0 or max(ids) >= n_targets):
        raise ModelError(
            f"{name}: leaf weights go to output {max(ids)}, but the ensemble has {n_targets} outputs."
        )
    n_out, sign, offset, transform = n_targets, None, None, None
    out_names: tuple[str, ...] | None = tuple(labels) if labels else None
    if classifier and n_targets == 1:
        raise ModelError(f"{name}: a classifier with one class label is not supported.")
    if classifier and n_targets == 2:
        if ids - {0}:
            raise ModelError(
                f"{name}: a two-class TreeEnsembleClassifier whose leaves score class 1 is not supported "
                "(onnxruntime's binary rules make it no sum of trees); the converters score class 0 only."
            )
        if len(base) > 1:
            raise ModelError(
                f"{name}: a binary TreeEnsembleClassifier with {len(base)} base values is not supported."
            )
        positive = all(w >= 0 for w in weights)
        if post == "LOGISTIC":
            n_out, transform, out_names = 1, "logistic", (labels[1],)
        elif positive:  # onnxruntime writes [1 - s, s]
            n_out, sign, offset, transform = (
                2,
                np.array([-1.0, 1.0]),
                np.array([1.0, 0.0]),
                "identity",
            )
        else:  # onnxruntime writes [-s, s]
            n_out, out_names = 1, (labels[1],)
        base = np.broadcast_to(base if len(base) else np.zeros(1), (1,))
    else:
        if len(base) not in (0, n_targets):
            raise ModelError(f"{name}: {len(base)} base values for {n_targets} outputs.")
        if post == "SOFTMAX" and n_targets < 2:
            raise ModelError(f"{name}: post_transform SOFTMAX over one output is not supported.")
        transform = {
            "NONE": "identity" if classifier else None,
            "LOGISTIC": "logistic",
            "SOFTMAX": "softmax",
        }[post]
    base_vec = np.zeros(n_targets) if len(base) == 0 else np.asarray(base, dtype=np.float64)
    if op == "TreeEnsembleRegressor":
        _check_regressor_base(trees, base_vec, name)
    scale = 1.0 / len(trees.roots) if agg == "AVERAGE" else 1.0
    budget = [0]
    tree_dicts = []
    covers = cover_rows is None
    for root in trees.roots:
        low, rewritten = _lower(trees, root, f32, budget, name)
        covers = covers and not rewritten and _covers_ok(low)
        n = len(low.left)
        val = np.zeros((n, n_targets))
        for i, leaf in enumerate(low.leaf):
            if leaf:
                for k, w in leaf.items():
                    val[i, k] += w * scale
        if sign is not None:  # binary [1 - s, s] from the one scored column
            val = val[:, :1] * sign[None, :]
        elif n_out != n_targets:
            val = val[:, :1]
        tree_dicts.append(
            {
                "left": low.left,
                "right": low.right,
                "default": low.default,
                "feature": low.feature,
                "threshold": low.threshold,
                "flags": low.flags,
                "value": val,
                "cover": low.cover,
                "output": -1,
            }
        )
    if sign is not None:
        base_off = offset + sign * base_vec[0]
    else:
        base_off = base_vec[:n_out]
    if not covers:
        for t in tree_dicts:
            t["cover"] = np.full(len(t["left"]), np.nan)
    dims = next(i for i in graph.input if i.name == input_name).type.tensor_type.shape.dim
    max_feat = max((s.feature for s in trees.splits.values()), default=-1)
    declared = dims[1].dim_value if len(dims) == 2 and dims[1].HasField("dim_value") else 0
    if declared and max_feat >= declared:
        raise ModelError(
            f"{name}: a split reads feature {max_feat}, but the input has {declared} columns."
        )
    n_features = int(declared or max_feat + 1 or 1)
    ens = build_ensemble(
        tree_dicts,
        n_features=n_features,
        n_outputs=n_out,
        base_offset=base_off,
        input_dtype="float32" if f32 else "float64",
        transform=transform,
        nan_routing=True,
        source=f"ONNX {op} in {name}",
        output_names=out_names,
    )
    if cover_rows is not None:
        ens = with_covers(ens, cover_rows)
    return ens


def has_covers(ens: TreeEnsemble) -> bool:
    """Whether the ensemble carries node covers (the path-dependent algorithm needs them)."""
    return bool(np.isfinite(ens.cover).all())


def with_covers(ens: TreeEnsemble, rows: Any) -> TreeEnsemble:
    """A copy of ``ens`` whose covers are the number of ``rows`` reaching each node (routed as the
    model routes them), for the path-dependent algorithm. Nodes no row reaches get cover 0."""
    import dataclasses

    x = ens.prepare(rows, "cover rows")
    cover = np.zeros(ens.n_nodes)
    left, right, default = ens.left, ens.right, ens.default
    for t in range(ens.n_trees):
        start, stop = int(ens.tree_start[t]), int(ens.tree_start[t + 1])
        at = {start: np.arange(len(x))}
        for node in range(start, stop):  # children come after their parents
            idx = at.pop(node, None)
            if idx is None:
                continue
            cover[node] = len(idx)
            if left[node] < 0 or len(idx) == 0:
                continue
            v = x[idx, ens.feature[node]]
            nan = np.isnan(v)
            go_left = v <= ens.threshold[node] if ens.flags[node] & LE else v < ens.threshold[node]
            go_left = np.where(nan, default[node] == left[node], go_left)
            for child, sel in ((int(left[node]), go_left), (int(right[node]), ~go_left)):
                at[child] = np.concatenate([at.get(child, np.zeros(0, np.int64)), idx[sel]])
    fields = {f.name: getattr(ens, f.name) for f in dataclasses.fields(ens) if f.name != "_cache"}
    fields["cover"] = cover
    fields["source"] = f"{ens.source} (covers from {len(x)} rows)"
    return TreeEnsemble(**fields).validate()


def source_name(src: Any) -> str:
    return Path(src).name if isinstance(src, (str, os.PathLike)) else type(src).__name__
