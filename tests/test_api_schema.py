"""Schemathesis against the OpenAPI spec: generated requests to every operation, in-process
over the ASGI app and the real database, with an admin key (so requests reach the
handlers), answer no server error.

The examples per operation are few (about 20 s for the whole API on two loaded cores):
this guards against 500s from inputs a handler did not expect (NUL characters, huge ids,
odd JSON), not against everything property-based testing could find with more time.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error

from moderation.auth.models import Role
from moderation.main.app import create_app
from tests.api_fixtures import bearer, keys
from tests.health_fixtures import live_worker

__all__ = ["keys", "live_worker"]

schema = schemathesis.openapi.from_asgi("/openapi.json", create_app())


@schema.parametrize()
@settings(
    max_examples=6,
    deadline=None,
    # Explicit examples and generated ones; no shrinking: a failure is reported as found.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
@pytest.mark.usefixtures("live_worker")  # else /readyz answers its documented 503
def test_no_request_is_a_server_error(case: schemathesis.Case[Any], keys: dict[Role, str]) -> None:
    case.call_and_validate(headers=bearer(keys[Role.ADMIN]), checks=[not_a_server_error])
