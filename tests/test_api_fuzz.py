"""Property-based fuzzing of the real gateway from its own OpenAPI schema (Schemathesis + Hypothesis).

Every operation gets requests generated from the schema, valid and invalid (wrong types, missing
bodies, odd media types, out-of-range `top_k`, strings where images go); every answer must be no 5xx,
a status code the schema documents, the declared content type, and a body that matches the documented
schema (errors included). Derandomized, so CI sees the same requests every run; `make fuzz` runs more.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Per operation and generation mode; the classify endpoints carry nearly all of the input space.
EXAMPLES = int(os.environ.get("KDSERVE_FUZZ_EXAMPLES", "500"))
MIN_REQUESTS = 1000


@pytest.mark.slow
def test_generated_requests_get_no_5xx_and_answers_that_match_the_schema(gateway):
    schema = schemathesis.openapi.from_url(f"{gateway.url}/openapi.json")
    sent: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        heavy = operation.path in ("/v1/classify", "/v2/models/{name}/infer")
        examples = EXAMPLES if operation.path == "/v1/classify" else EXAMPLES // 4 if heavy else 25
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def exercise(case: schemathesis.Case) -> None:
                response = case.call(base_url=gateway.url, timeout=30)
                sent[case.operation.label] += 1
                statuses[response.status_code] += 1
                case.validate_response(response, checks=CHECKS)

            try:
                exercise()
            except Unsatisfiable:
                # An operation without parameters or body (GET /healthz) has no invalid form to generate.
                assert mode == GenerationMode.NEGATIVE and not heavy, operation.label
    total = sum(sent.values())
    print(f"schemathesis: {total} requests, {dict(sent)}, statuses {dict(sorted(statuses.items()))}")
    assert total >= MIN_REQUESTS, dict(sent)
    assert not [s for s in statuses if s >= 500]
    assert statuses[200] > 0 and sum(n for s, n in statuses.items() if 400 <= s < 500) > 0
    assert sent["POST /v2/models/{name}/infer"] >= EXAMPLES // 4, dict(sent)
