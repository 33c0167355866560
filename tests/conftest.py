"""Shared test setup: every test gets its own decoded-image cache (never ~/.cache/debias)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("debias-cache")
    monkeypatch.setenv("DEBIAS_CACHE_DIR", str(cache))
    yield cache
