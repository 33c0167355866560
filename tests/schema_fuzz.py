"""A bounded schemathesis run over a service's OpenAPI operations, shared by the service and web-page tests."""

from __future__ import annotations

from typing import Any


def fuzz_operations(schema: Any, path_prefix: str = "/") -> tuple[list[tuple[str, int, str]], list[tuple[str, int]]]:
    """25 derandomised cases per operation under ``path_prefix``; returns (5xx problems, every (label, status) seen)."""
    from hypothesis import HealthCheck, given, settings

    problems: list[tuple[str, int, str]] = []
    seen: list[tuple[str, int]] = []
    for op in schema.get_all_operations():
        operation = op.ok()
        if not operation.path.startswith(path_prefix):
            continue

        @settings(max_examples=25, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case):
            response = case.call()
            seen.append((case.operation.label, response.status_code))
            if response.status_code >= 500:
                problems.append((case.operation.label, response.status_code, response.text[:200]))

        check()
    return problems, seen
