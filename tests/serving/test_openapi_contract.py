"""The service against its own OpenAPI document, with schemathesis: for every operation,
requests generated from the document's request schemas, both ones that conform
(positive) and ones that break them (negative), each answered without a 5xx, with a
status the document declares for the route, a declared Content-Type and a body of the
declared schema (ErrorBody for every error); a negative request must be refused (a 4xx).

A positive request may still be refused with a 422 for what the document cannot say: an
item id that is not in the catalog, an added item's channel not in it, its upload time in
the future or its title blank, an integer spelled as a float (`1.0`, an integer for
JSON Schema; the service takes JSON integers only, README "Serving"), or a NUL in a reload
path; or for an id past 2^63-1 that schemathesis takes for a valid one (below).

Deterministic: derandomized Hypothesis, a bounded number of examples per operation and
mode, and no example database. (Parametrized here rather than with
`schemathesis.pytest.from_fixture`, whose test renaming fails on pytest 9.2.)
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from funnelrec.pipeline import build_tiny_artifact
from funnelrec.serving.http import MAX_ID, create_app

MAX_EXAMPLES = 100  # per operation and generation mode
POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE

# method, path: the statuses a positive (schema-valid) request may get besides a 422 by
# design (below); none: it takes no input, so there is no negative request to make.
OPERATIONS: dict[tuple[str, str], set[int] | None] = {
    ("POST", "/v1/recommend"): {200},
    ("POST", "/v1/events"): {200},
    ("GET", "/v1/items/{item_id}"): {200, 404},  # 404: not in the catalog
    ("POST", "/v1/items"): {200, 409},  # 409: the external id exists with other data
    # Loopback, no token: reloads the artifact (no path), refuses a path outside the
    # artifacts' root (403) and a directory inside it that is no artifact (409).
    ("POST", "/admin/reload"): {200, 403, 409},
    ("GET", "/healthz"): None,
    ("GET", "/readyz"): None,
    ("GET", "/metrics"): None,
}
CASES = [
    pytest.param(method, path, mode, id=f"{method} {path} {mode.value}")
    for (method, path), accepted in OPERATIONS.items()
    for mode in ([POSITIVE] if accepted is None else [POSITIVE, NEGATIVE])
]
_CONTRACT = settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,  # the same examples every run
    database=None,  # nothing written to .hypothesis/
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    art = build_tiny_artifact(tmp_path_factory.mktemp("contract"), steps=100)
    state = tmp_path_factory.mktemp("contract-state") / "state.db"
    return create_app(art, state_path=state)


@pytest.fixture(scope="module")
def api_schema(app: FastAPI) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_every_operation_is_covered(api_schema: schemathesis.BaseSchema) -> None:
    ops = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert ops == set(OPERATIONS)


_FIELD_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _value_at(case: schemathesis.Case, field: str) -> Any:
    """The request's value at an ErrorBody `field` ("events[0].watch.ts"); the tag of a
    tagged union ("watch") is a step of the path in pydantic's, not in the body."""
    body: Any = {
        **(case.path_parameters or {}),
        **(case.body if isinstance(case.body, dict) else {}),
    }
    for name, index in _FIELD_PART.findall(field):
        if index:
            body = body[int(index)]
        elif isinstance(body, dict) and name in body:
            body = body[name]
        elif not (isinstance(body, dict) and body.get("type") == name):
            raise KeyError(field)
    return body


def _refused_by_design(app: FastAPI, case: schemathesis.Case, error: dict[str, Any]) -> bool:
    """Whether the 422 of a schema-valid request refuses what the document cannot say."""
    field = error["field"]
    if field is None:
        return False
    value = _value_at(case, field)
    if isinstance(value, float) and value.is_integer():
        return "valid integer" in error["error"]  # 1.0: JSON integers only
    if isinstance(value, int) and value > MAX_ID:
        # Past the document's own bound (`exclusiveMaximum` 2^63, a float): the validator
        # schemathesis generates with (jsonschema-rs 0.60) admits 2^63 and the
        # integers just past it (up to 2^63+191).
        return "less than" in error["error"]
    if isinstance(value, int) and "unknown item id" in error["error"]:
        return not app.state.service.recommender.has_item(value)
    if field == "channel_id":
        return "unknown channel" in error["error"]  # not in the catalogue
    if field == "upload_ts":
        return "in the future" in error["error"]
    if field == "title":
        return "is blank" in error["error"] and not value.strip()
    if isinstance(value, str) and "\x00" in value:
        return field == "path"  # a reload path with NUL: no file has one
    return False


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_operation_keeps_its_contract(
    app: FastAPI, api_schema: schemathesis.BaseSchema, method: str, path: str, mode: GenerationMode
) -> None:
    operation = api_schema[path][method]
    acceptance = schemathesis.checks.positive_data_acceptance
    accepted = OPERATIONS[method, path] or {200}

    @_CONTRACT
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: schemathesis.Case) -> None:
        # The default checks: no 5xx, declared status, Content-Type and body schema, a 4xx
        # for a negative request; the acceptance of positive ones is checked below.
        response = case.call()
        case.validate_response(response, excluded_checks=[acceptance])
        if mode is POSITIVE and response.status_code == 422:
            error = response.json()
            assert _refused_by_design(app, case, error), (case.body, error)
        elif mode is POSITIVE:
            assert response.status_code in accepted, (case.body, response.text)

    check()


# Found by the sweep above (pydantic reads all of these as 1), kept as fixed examples.
@pytest.mark.parametrize("raw", ["+1", "01", "1.0", "1_0", "1%20", "%201", "%C2%A01"])
def test_an_item_id_in_the_path_is_decimal_digits_only(app: FastAPI, raw: str) -> None:
    with TestClient(app) as client:
        assert client.get("/v1/items/1").status_code == 200
        r = client.get(f"/v1/items/{raw}")
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "item_id" and "decimal digits" in r.json()["error"]
