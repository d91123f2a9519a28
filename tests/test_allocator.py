"""Allocator tuning is opt-in for library users and sizes the engine's output-only chunks."""

from __future__ import annotations

import subprocess
import sys

import torch
from torch import nn

from perspicio.core import allocator
from perspicio.core.batching import MAX_AUTO_BATCH, UNTUNED_CHUNK_BYTES, Engine, activation_profile


def test_detects_environment_settings(monkeypatch):
    monkeypatch.setattr(allocator, "_tuned", False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert allocator.allocator_tuned() is (not sys.platform.startswith("linux"))
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=4294967296")
    assert allocator.allocator_tuned()
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4294967296")
    assert allocator.allocator_tuned()


def test_import_does_not_tune_but_the_call_does():
    code = ("import perspicio, perspicio.core.allocator as a; before = a._tuned; "
            "ok = perspicio.tune_allocator(); print(before, ok, a.allocator_tuned())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PATH": ""}).stdout.split()
    assert out[0] == "False"
    if sys.platform.startswith("linux"):
        assert out[1:] == ["True", "True"]


def test_untuned_output_only_chunks_stay_small(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x = torch.zeros(1, 3, 64, 64)
    _, largest = activation_profile(model, x)
    monkeypatch.setattr(allocator, "_tuned", False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    eng = Engine(model)
    if sys.platform.startswith("linux"):
        assert eng.chunk_size(x) == UNTUNED_CHUNK_BYTES // largest == 30 < MAX_AUTO_BATCH
    monkeypatch.setattr(allocator, "_tuned", True)
    assert eng.chunk_size(x) == MAX_AUTO_BATCH
    assert Engine(model, batch_size=3).chunk_size(x) == 3  # an explicit batch size always wins


def test_registries_populate_themselves_in_a_fresh_process():
    """The CLI looks names up before anything imported perspicio.methods (regression: `perspicio
    explain` once failed with "unknown method 'family:cam'" on a fresh interpreter)."""
    code = ("from perspicio.core.registry import METHODS, METRICS; "
            "print(len(METHODS.select(None, default=['family:cam'])), 'deletion' in METRICS)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["10", "True"]
