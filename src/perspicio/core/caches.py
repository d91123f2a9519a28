"""Every process-wide cache of perspicio, in one place.

perspicio keeps work across calls: private model copies (the BatchNorm-folded inference twin, its
fused form per input shape, compiled graphs), DeepLIFT reference passes, LRP's merged and derived
weights, snapshots of model states, and small facts about models and functions (traced layers,
measured activation sizes, call signatures). Each of them is a :class:`Cache` (or a :class:`Memo`
for per-function facts) registered here under a name, so that one function lists them
(:func:`cache_info`) and one empties them (:func:`clear_caches`).

Rules every cache follows:

* **Bounded.** Caches holding tensors or modules count their bytes and evict the least recently
  used entries beyond their budget; all of them together stay within :func:`total_budget`
  (``PERSPICIO_CACHE_BYTES``, default: 2 GiB or a quarter of the RAM, whichever is smaller), the
  globally least recently used entry going first. Caches of small facts are bounded by entry count.
  Side tables whose entries belong to an object another cache holds (the taps of a fused kernel)
  are *tied*: they have no budget of their own and empty when that object is evicted.
* **Weak keys never kept alive.** Entries keyed by a model, module or tensor hold the key weakly
  and vanish with it; a value must never reference its own key (a weak-keyed dict whose values
  reach their keys is never collected - the LRP leak of issue 14).
* **Thread-safe.** Every lookup, insertion and eviction of a cache runs under that cache's lock;
  values are dropped (and their memory freed) after the lock is released, and the callbacks of
  dying keys never block (a key that dies while its cache is busy is removed at the next access).
"""

from __future__ import annotations

import itertools
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

_MISSING = object()
_NO_SUB = ()


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def _default_total() -> int:
    env = os.environ.get("PERSPICIO_CACHE_BYTES")
    if env:
        try:
            return max(0, int(float(env)))
        except ValueError:
            pass
    ram = _ram_bytes()
    return min(2 * 2**30, ram // 4) if ram else 2 * 2**30


#: all byte-bounded caches together stay within this (``PERSPICIO_CACHE_BYTES``; see set_total_budget)
_TOTAL = [_default_total()]
_TICK = itertools.count(1)  # global recency clock (next() on a count is atomic)


def total_budget() -> int:
    """Bytes all caches holding tensors or modules may use together."""
    return _TOTAL[0]


def set_total_budget(nbytes: int) -> None:
    """Change the total cache budget (bytes; 0 keeps nothing) and evict down to it now."""
    _TOTAL[0] = max(0, int(nbytes))
    _enforce_total()


# ============================================================================ sizes


def nbytes(obj: Any) -> int:
    """Bytes of the tensors reachable from ``obj`` (modules' parameters and buffers, tensors in
    tuples, lists, dicts and dataclass-like objects), each storage counted once."""
    seen: set[int] = set()
    total = 0

    def tensor(t: Tensor) -> None:
        nonlocal total
        try:
            s = t.untyped_storage()
            key, size = s.data_ptr(), s.nbytes()
        except (RuntimeError, NotImplementedError, TypeError):  # opaque (oneDNN packed) tensors
            key, size = id(t), t.numel() * t.element_size()
        if key not in seen:
            seen.add(key)
            total += size

    def walk(o: Any, depth: int) -> None:
        if depth > 6 or o is None:
            return
        if isinstance(o, Tensor):
            tensor(o)
        elif isinstance(o, nn.Module):
            for m in o.modules():
                for t in (*m._parameters.values(), *m._buffers.values()):
                    if t is not None:
                        tensor(t)
                for v in m.__dict__.values():  # plain tensor attributes (packed kernels)
                    if isinstance(v, Tensor):
                        tensor(v)
        elif isinstance(o, (tuple, list)):
            for v in o:
                walk(v, depth + 1)
        elif isinstance(o, dict):
            for v in o.values():
                walk(v, depth + 1)
        elif hasattr(o, "__dataclass_fields__"):
            for name in o.__dataclass_fields__:
                walk(getattr(o, name, None), depth + 1)

    walk(obj, 0)
    return total


# ============================================================================ the cache


@dataclass
class CacheInfo:
    """One cache's figures (see :func:`cache_info`)."""

    name: str
    holds: str
    key: str
    entries: int
    bytes: int
    budget: int | None  # bytes (None: bounded by entries, or tied)
    max_entries: int | None
    eviction: str


class _Ref(weakref.ref):
    __slots__ = ("oid",)


class Cache:
    """A thread-safe least-recently-used cache.

    Keys are ``(owner, sub)``: ``owner`` is held weakly (``weak=True``: a model, module or tensor,
    compared by identity; its entries vanish with it) or strongly (``weak=False``: any hashable),
    ``sub`` is any hashable (default: none). ``budget``: bytes (None: this cache has no byte bound of
    its own; it still counts toward the total budget when ``sized``); ``max_entries``: entries.
    ``tied=True``: never evicted by budget (entries die with their owners, which another cache
    bounds). Values are sized with :func:`nbytes` unless given.
    """

    def __init__(self, name: str, *, holds: str, key: str, weak: bool = True, budget: int | None = None,
                 max_entries: int | None = None, sized: bool = False, tied: bool = False) -> None:
        self.name, self.holds, self.key = name, holds, key
        self.weak, self.budget, self.max_entries, self.sized, self.tied = weak, budget, max_entries, sized, tied
        self._lock = threading.Lock()
        # (owner id or key, sub) -> [value, bytes, tick]; least recently used first
        self._entries: OrderedDict[tuple, list] = OrderedDict()
        self._owners: dict[Any, tuple[_Ref | None, set]] = {}  # owner id -> (weak ref, subs)
        self._pending: list[_Ref] = []  # owners that died while the lock was held
        self.bytes = 0
        register(self)

    # ------------------------------------------------------------------ internals (lock held)

    def _oid(self, owner: Any) -> Any:
        return id(owner) if self.weak else owner

    def _purge(self, trash: list) -> None:
        while self._pending:
            ref = self._pending.pop()
            self._drop_owner(ref.oid, ref, trash)

    def _drop_owner(self, oid: Any, ref: _Ref | None, trash: list) -> None:
        rec = self._owners.get(oid)
        if rec is None or (ref is not None and rec[0] is not ref):
            return
        del self._owners[oid]
        for sub in rec[1]:
            entry = self._entries.pop((oid, sub), None)
            if entry is not None:
                self.bytes -= entry[1]
                trash.append(entry[0])

    def _remove(self, k: tuple, trash: list) -> None:
        entry = self._entries.pop(k, None)
        if entry is None:
            return
        self.bytes -= entry[1]
        trash.append(entry[0])
        rec = self._owners.get(k[0])
        if rec is not None:
            rec[1].discard(k[1])
            if not rec[1]:
                del self._owners[k[0]]

    def _dead(self, ref: _Ref) -> None:  # weakref callback: must never block
        if self._lock.acquire(blocking=False):
            trash: list = []
            try:
                self._drop_owner(ref.oid, ref, trash)
            finally:
                self._lock.release()
            del trash
        else:
            self._pending.append(ref)

    def _valid(self, owner: Any, oid: Any) -> bool:
        rec = self._owners.get(oid)
        return rec is not None and (not self.weak or rec[0]() is owner)

    # ------------------------------------------------------------------ public

    def get(self, owner: Any, sub: Any = _NO_SUB, default: Any = None) -> Any:
        """The value for ``(owner, sub)`` (now the most recently used), or ``default``."""
        trash: list = []
        with self._lock:
            self._purge(trash)
            oid = self._oid(owner)
            entry = self._entries.get((oid, sub))
            if entry is None or not self._valid(owner, oid):
                return default
            self._entries.move_to_end((oid, sub))
            entry[2] = next(_TICK)
            return entry[0]

    def put(self, owner: Any, value: Any, sub: Any = _NO_SUB, *, size: int | None = None) -> Any:
        """Store ``value`` for ``(owner, sub)`` and evict beyond the budget; returns ``value``.
        A value larger than the whole budget is not kept."""
        size = (nbytes(value) if size is None else int(size)) if self.sized else 0
        trash: list = []
        with self._lock:
            self._purge(trash)
            oid = self._oid(owner)
            if oid in self._owners and not self._valid(owner, oid):  # a dead owner's id reused
                self._drop_owner(oid, None, trash)
            self._remove((oid, sub), trash)
            limit = self._limit()
            if limit is not None and size > limit:
                return value
            rec = self._owners.get(oid)
            if rec is None:
                ref = None
                if self.weak:
                    ref = _Ref(owner, self._dead)
                    ref.oid = oid
                rec = self._owners[oid] = (ref, set())
            rec[1].add(sub)
            self._entries[(oid, sub)] = [value, size, next(_TICK)]
            self.bytes += size
            self._evict(trash)
        del trash
        if self.sized and not self.tied:
            _enforce_total()
        return value

    def _limit(self) -> int | None:
        if not self.sized or self.tied:
            return None
        return min(self.budget, total_budget()) if self.budget is not None else total_budget()

    def _evict(self, trash: list) -> None:
        if self.tied:
            return
        limit = self._limit()
        while self._entries and ((limit is not None and self.bytes > limit)
                                 or (self.max_entries is not None and len(self._entries) > self.max_entries)):
            self._remove(next(iter(self._entries)), trash)

    def pop(self, owner: Any, sub: Any = _NO_SUB, default: Any = None) -> Any:
        trash: list = []
        with self._lock:
            self._purge(trash)
            oid = self._oid(owner)
            entry = self._entries.get((oid, sub))
            if entry is None or not self._valid(owner, oid):
                return default
            self._remove((oid, sub), trash)
            return entry[0]

    def discard(self, owner: Any) -> None:
        """Forget every entry of ``owner``."""
        trash: list = []
        with self._lock:
            oid = self._oid(owner)
            if self._valid(owner, oid):
                self._drop_owner(oid, None, trash)
        del trash

    def subs(self, owner: Any) -> list:
        """The sub-keys stored for ``owner``."""
        with self._lock:
            oid = self._oid(owner)
            return list(self._owners[oid][1]) if self._valid(owner, oid) else []

    def owners(self) -> list:
        """The live owners (weak caches: the objects; others: the keys)."""
        with self._lock:
            recs = list(self._owners.items())
        out = []
        for oid, (ref, _) in recs:
            o = ref() if ref is not None else oid
            if o is not None:
                out.append(o)
        return out

    def oldest_tick(self) -> int | None:
        with self._lock:
            for entry in self._entries.values():
                return entry[2]
            return None

    def evict_oldest(self) -> bool:
        trash: list = []
        with self._lock:
            if not self._entries:
                return False
            self._remove(next(iter(self._entries)), trash)
        del trash
        return True

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            trash = [e[0] for e in self._entries.values()]
            self._entries.clear()
            self._owners.clear()
            self._pending.clear()
            self.bytes = 0
        del trash

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, owner: Any) -> bool:
        return self.get(owner, default=_MISSING) is not _MISSING

    def __getitem__(self, owner: Any) -> Any:
        value = self.get(owner, default=_MISSING)
        if value is _MISSING:
            raise KeyError(owner)
        return value

    def info(self) -> CacheInfo:
        with self._lock:
            self._purge([])
            n, b = len(self._entries), self.bytes
        eviction = ("with its owner" if self.tied else
                    "LRU by bytes" + (" and entries" if self.max_entries else "") if self.sized else "LRU by entries")
        return CacheInfo(self.name, self.holds, self.key, n, b, self._limit() if self.sized else None,
                         self.max_entries, eviction)


class Memo:
    """Per-function facts (signatures, operation kinds): a dict bounded by entry count, emptied when
    full. Reads are single dict lookups (atomic); insertions take the lock."""

    def __init__(self, name: str, *, holds: str, max_entries: int = 4096) -> None:
        self.name, self.holds, self.max_entries = name, holds, max_entries
        self.table: dict[Any, Any] = {}
        self._lock = threading.Lock()
        register(self)

    def __call__(self, func: Any, compute: Callable[[Any], Any]) -> Any:
        try:
            return self.table[func]
        except KeyError:
            pass
        except TypeError:  # unhashable callable
            return compute(func)
        value = compute(func)
        with self._lock:
            if len(self.table) >= self.max_entries:
                self.table.clear()
            self.table[func] = value
        return value

    def clear(self) -> None:
        with self._lock:
            self.table.clear()

    def info(self) -> CacheInfo:
        return CacheInfo(self.name, self.holds, "function", len(self.table), 0, None, self.max_entries,
                         "emptied when full")


# ============================================================================ the registry


_REGISTRY: dict[str, Any] = {}
_REGISTRY_LOCK = threading.Lock()


def register(cache: Any) -> Any:
    """Add a cache (anything with ``name``, ``info()`` and ``clear()``) to the registry."""
    with _REGISTRY_LOCK:
        if cache.name in _REGISTRY and _REGISTRY[cache.name] is not cache:
            raise ValueError(f"a cache named {cache.name!r} is already registered")
        _REGISTRY[cache.name] = cache
    return cache


def registered() -> dict[str, Any]:
    """Name -> cache object, for every registered cache (importing the modules that define them)."""
    _import_all()
    with _REGISTRY_LOCK:
        return dict(_REGISTRY)


#: the modules that define caches (imported by cache_info/clear_caches so that the list is complete)
CACHE_MODULES = (
    "perspicio.core.fold", "perspicio.core.fuse", "perspicio.core.bnpairs", "perspicio.core.batching",
    "perspicio.core.incremental", "perspicio.core.calls", "perspicio.core.capture",
    "perspicio.methods.propagation.operations", "perspicio.methods.propagation.tracing",
    "perspicio.methods.propagation.rules",
    "perspicio.methods.propagation.canonizers", "perspicio.methods.propagation.deeplift_reference",
    "perspicio.featurevis.receptive_field",
)


def _import_all() -> None:
    import importlib

    for name in CACHE_MODULES:
        importlib.import_module(name)


def _enforce_total() -> None:
    """Evict the globally least recently used entries until all sized caches fit the total budget."""
    with _REGISTRY_LOCK:
        sized = [c for c in _REGISTRY.values() if isinstance(c, Cache) and c.sized and not c.tied]
    while sum(c.bytes for c in sized) > total_budget():
        oldest = [(t, i) for i, c in enumerate(sized) if (t := c.oldest_tick()) is not None]
        if not oldest or not sized[min(oldest)[1]].evict_oldest():
            break


def unregister(name: str) -> None:
    """Remove the cache ``name`` from the registry (a cache made for a test; a no-op if absent)."""
    with _REGISTRY_LOCK:
        _REGISTRY.pop(name, None)


# ---------------------------------------------------------------------------- testing hooks
# Tests check *that* a cache was used or bypassed (a twin built, a fallback remembered) through
# these two functions and the public cache names of cache_info(), never through module globals.


def entry(name: str, owner: Any, sub: Any = _NO_SUB, default: Any = None) -> Any:
    """Testing hook: what the registered cache ``name`` (a :func:`cache_info` key) holds for
    ``owner`` (and ``sub``), or ``default``. Counts as a use (the entry becomes the most recent)."""
    caches = registered()
    if name not in caches:
        raise KeyError(f"no cache named {name!r}; caches: {', '.join(sorted(caches))}")
    return caches[name].get(owner, sub, default)


def owners(name: str) -> list:
    """Testing hook: the live keys of the registered cache ``name``."""
    return registered()[name].owners()


def cache_info() -> dict[str, CacheInfo]:
    """Per cache: what it holds, its key, entries, bytes, budget and eviction rule."""
    return {name: c.info() for name, c in sorted(registered().items())}


def budgeted_bytes() -> int:
    """Bytes held by the caches the total budget bounds (all sized caches but tied side tables)."""
    return sum(c.bytes for c in registered().values() if isinstance(c, Cache) and c.sized and not c.tied)


def cache_bytes() -> int:
    """Bytes held by all caches together (tied side tables included)."""
    return sum(i.bytes for i in cache_info().values())


def clear_caches() -> None:
    """Empty every process-wide cache of perspicio (private model copies, reference passes, derived
    weights, state snapshots, traced facts). Nothing is lost but time: the next call rebuilds what
    it needs."""
    for c in registered().values():
        c.clear()
    import gc

    gc.collect()


# ============================================================================ model state


class _Snapshot:
    __slots__ = ("ptr", "meta", "copy", "nbytes", "token")

    def __init__(self, ptr: int, meta: tuple, copy: Tensor, nbytes: int, token: int) -> None:
        self.ptr, self.meta, self.copy, self.nbytes, self.token = ptr, meta, copy, nbytes, token


_TOKENS = itertools.count(1)


def _load_memcmp() -> Any:
    """libc's ``memcmp`` (one pass, no allocation; ctypes releases the GIL), or None."""
    import ctypes
    import ctypes.util

    for name in (None, ctypes.util.find_library("c"), "msvcrt"):
        try:
            fn = ctypes.CDLL(name).memcmp
        except (OSError, AttributeError, TypeError):
            continue
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        return fn
    return None  # pragma: no cover


_MEMCMP = _load_memcmp()


def _flat_bytes(t: Tensor) -> Tensor:
    t = t.detach().reshape(-1)
    return t.view(torch.uint8) if t.element_size() > 1 or t.dtype != torch.uint8 else t


def _same(t: Tensor, snap: _Snapshot) -> bool:
    """Are ``t``'s bytes those of the snapshot (bitwise: NaN equals NaN, -0.0 differs from 0.0)?"""
    if snap.nbytes == 0:
        return True
    if _MEMCMP is not None and snap.meta[3].type == "cpu" and t.is_contiguous():
        return _MEMCMP(snap.ptr, snap.copy.data_ptr(), snap.nbytes) == 0
    return torch.equal(_flat_bytes(t.contiguous()), _flat_bytes(snap.copy))


class StateSnapshots(Cache):
    """Exact copies of model tensors, to tell whether a tensor's values changed since perspicio last
    saw it (writes through ``.data`` change values without touching the version counter, and a row
    swap or a sign flip keeps every norm and sum)."""

    def tokens(self, tensors: list[Tensor | None]) -> tuple:
        """One token per tensor (None for None): equal tokens mean the same storage, shape, strides,
        dtype, device and exactly the same bytes as when the token was handed out; any change gives a
        token never used before. Compared against kept copies with ``memcmp`` (one pass over the
        tensor and its copy, no allocation)."""
        out: list[int | None] = []
        trash: list = []
        grown = 0
        with self._lock:
            self._purge(trash)
            entries, owners = self._entries, self._owners
            for t in tensors:
                if t is None:
                    out.append(None)
                    continue
                oid = id(t)
                entry = entries.get((oid, _NO_SUB))
                ptr = t.data_ptr()
                meta = (t.shape, t.stride(), t.dtype, t.device)
                if entry is not None:
                    snap = entry[0]
                    if snap.ptr == ptr and snap.meta == meta and owners[oid][0]() is t and _same(t, snap):
                        entries.move_to_end((oid, _NO_SUB))
                        entry[2] = next(_TICK)
                        out.append(snap.token)
                        continue
                    self._remove((oid, _NO_SUB), trash)
                if oid in owners:  # a dead tensor's id reused
                    self._drop_owner(oid, None, trash)
                if meta[3].type == "meta":
                    out.append(None)
                    continue
                token = next(_TOKENS)
                copy = t.detach().clone(memory_format=torch.contiguous_format)
                size = copy.numel() * copy.element_size()
                ref = _Ref(t, self._dead)
                ref.oid = oid
                owners[oid] = (ref, {_NO_SUB})
                entries[(oid, _NO_SUB)] = [_Snapshot(ptr, meta, copy, size, token), size, next(_TICK)]
                self.bytes += size
                grown += size
                out.append(token)
            # never evict what this call just compared (the caller relies on its tokens being kept)
            limit = self._limit()
            keep = len(tensors)
            while limit is not None and self.bytes > limit and len(entries) > keep:
                self._remove(next(iter(entries)), trash)
        del trash
        if grown:
            _enforce_total()
        return tuple(out)


#: the kept copies behind :func:`state_tokens`
SNAPSHOTS = StateSnapshots("state snapshots", holds="exact copies of model parameters and buffers",
                           key="tensor (weak)", sized=True)


def state_tokens(tensors: list[Tensor | None]) -> tuple:
    """Tokens identifying the current content of ``tensors`` (see :meth:`StateSnapshots.tokens`):
    the one state check every cache of model-derived values uses."""
    return SNAPSHOTS.tokens(tensors)


def iter_caches() -> Iterator[Any]:
    yield from registered().values()
