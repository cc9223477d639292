"""Property-based API test: requests generated from `/openapi.json` (valid and invalid) never get a 5xx,
and every response conforms to the document (status codes, content types, headers, body schemas).

Dispatch is paused (max_active_jobs=0) so generated specs that happen to be valid are stored, not run.
The operations are driven with Hypothesis directly (schemathesis' pytest plugin does not support this
pytest version).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.service.conftest import ADMIN

pytestmark = pytest.mark.integration
AUTH = {"Authorization": f"Bearer {ADMIN}"}
# no 5xx, and every answer is one the OpenAPI document declares: status, content type, headers and body
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]  # fmt: skip


@pytest.fixture
def api_schema(live, make_settings):
    server = live(make_settings(max_active_jobs=0))
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def _fuzz(operation, mode: GenerationMode, headers: dict | None, examples: int) -> list[int]:
    seen: list[int] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case):
        response = case.call_and_validate(headers=headers, checks=CHECKS)
        seen.append(response.status_code)

    try:
        run()
    except Unsatisfiable:
        assert mode == GenerationMode.NEGATIVE  # nothing to make invalid (no parameters, no body)
    return seen


def test_no_server_errors(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) == 7
    statuses: dict[str, set[int]] = {}
    for op in operations:
        for mode, examples in ((GenerationMode.POSITIVE, 30), (GenerationMode.NEGATIVE, 15)):
            statuses.setdefault(op.label, set()).update(_fuzz(op, mode, AUTH, examples))
        # without a token every protected route answers 401 (and never 5xx)
        anonymous = set(_fuzz(op, GenerationMode.POSITIVE, None, 5))
        if op.path != "/healthz":
            assert anonymous <= {401, 404, 405, 422}, (op.label, anonymous)
    assert all(code < 500 for codes in statuses.values() for code in codes)
    assert 422 in statuses["POST /v1/jobs"] and 404 in statuses["GET /v1/jobs/{job_id}"]
