"""Schemathesis fuzzes every HTTP operation of the OpenAPI schema: no input gives a 500.

The app runs in-process over ASGI (schemathesis runs its lifespan, so the app has its real
Redis client and store). Rate limits are off here so the fuzzer reaches the handlers; they are
tested in test_limits.py. Inputs that fit the schema and inputs that do not are both tried, a
few dozen per operation, so the whole run stays well under a minute.

(schemathesis's own `from_fixture` parametrization does not run under pytest 9 yet, so the
operations are walked here with Hypothesis directly.)
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import BaseSchema, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Err
from schemathesis.python.asgi import shutdown_lifespans

from server.main import create_app
from tests.conftest import make_settings

EXAMPLES = 60


def fuzz(api: BaseSchema) -> list[str]:
    """Run every operation with generated inputs; returns what was tried ("POST /token
    negative"). Operations without parameters have no invalid inputs to try."""
    tried = []
    for result in api.get_all_operations():
        if isinstance(result, Err):
            raise result.err()
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            def run(case: schemathesis.Case[Any]) -> None:
                case.call_and_validate(checks=[not_a_server_error])

            try:
                run()
            except Unsatisfiable:
                if mode is GenerationMode.POSITIVE:
                    raise
                continue
            tried.append(f"{operation.label} {mode.value}")
    return tried


def test_no_input_makes_a_server_error(redis_url: str) -> None:
    settings_ = make_settings(redis_url, rate_limit_token_requests=0, rate_limit_refresh_requests=0)
    api = schemathesis.openapi.from_asgi("/openapi.json", create_app(settings_))
    try:
        tried = fuzz(api)
    finally:
        shutdown_lifespans()
    assert {
        "POST /token positive",
        "POST /token negative",
        "GET /refresh_token positive",
        "GET /refresh_token negative",
        "GET /readyz positive",
    } <= set(tried)


def test_the_fuzzing_does_fail_on_a_server_error() -> None:
    app = FastAPI()

    @app.get("/broken")
    async def broken(n: int) -> JSONResponse:
        status = 500 if n > 3 else 200
        return JSONResponse({"n": n}, status_code=status)

    api = schemathesis.openapi.from_asgi("/openapi.json", app)
    try:
        with pytest.raises(FailureGroup) as found:
            fuzz(api)
        assert [type(e).__name__ for e in found.value.exceptions] == ["ServerError"]
    finally:
        shutdown_lifespans()
