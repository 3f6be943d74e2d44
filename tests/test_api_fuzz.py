"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis, in-process ASGI).

Every operation gets a bounded number of generated requests, valid and invalid ones (wrong types,
out-of-range numbers, odd strings, missing fields); none may get a 5xx: bad input is always a 4xx with
an error body, and well-formed input reaches the fake engine and comes back.
"""

from __future__ import annotations

import schemathesis
from api_fakes import make_app
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

app, engine = make_app()
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_causes_a_server_error(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=[not_a_server_error])
