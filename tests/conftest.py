"""Shared test setup: every test gets its own decoded-image cache (never ~/.cache/debias) and float32 forward passes."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("debias-cache")
    monkeypatch.setenv("DEBIAS_CACHE_DIR", str(cache))
    yield cache


@pytest.fixture(autouse=True)
def _float32_forward_passes():
    """Tests compare numbers (weights computed by hand, two runs that must agree), so every test starts at fp32 whatever
    the CPU: ``auto`` picks bfloat16 on CPUs with AVX-512-BF16 or AMX, whose roundings move a latent across a histogram
    bin edge. The tests of bf16 itself set it explicitly; CLI calls set the precision they are given."""
    from debias.runtime.device import set_precision

    set_precision("fp32")
    yield
    set_precision("auto")
