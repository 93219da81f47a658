"""schemathesis against /openapi.json: generated requests to every route; no 500, and every answer
fits the documented status codes and schemas."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis import checks

from service import create_app
from tests.helpers import settings_for, train, wait_serving


@pytest.fixture(scope="module")
def api_app(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, photos_zip: Path) -> Iterator[Flask]:
    app = create_app(settings_for(tmp_path_factory.mktemp("fuzzed"), models_dir))
    client = app.test_client()
    job = train(client, "food", photos_zip)  # one trained endpoint, one untrained
    wait_serving(client, "food", job["version"])
    yield app
    app.extensions["simsvc"].close()


# No 500, and every answer documented: its status code, content type, headers and body schema.
# (Not "a schema-valid request must succeed": a zip's or an image's bytes can be schema-valid and
# still not be a zip or an image, and then the right answer is a documented 4xx.)
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]


def operations(app: Flask) -> list:
    loaded = schemathesis.openapi.from_wsgi("/openapi.json", app)
    return [result.ok() for result in loaded.get_all_operations()]


def test_the_api_conforms_to_its_openapi_description(api_app: Flask) -> None:
    # Driven by hand (schemathesis's pytest plugin does not load under pytest 9 here).
    failures = []
    calls: dict[str, int] = {}
    found = operations(api_app)
    assert len(found) >= 14, [f"{o.method} {o.path}" for o in found]
    for operation in found:

        @given(case=operation.as_strategy())
        @hypothesis_settings(
            max_examples=25,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: schemathesis.Case) -> None:
            label = f"{case.operation.method.upper()} {case.operation.path}"  # one path, several methods
            calls[label] = calls.get(label, 0) + 1
            case.call_and_validate(checks=CHECKS)

        try:
            check()
        except Exception as exc:  # collect every route's failure, then report them together
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert not failures, "\n\n".join(failures)
    # Every route really was exercised (routes without parameters need a single call).
    assert len(calls) == len(found) and sum(calls.values()) >= 250, calls
