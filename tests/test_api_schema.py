"""Schemathesis against the OpenAPI spec: generated requests, in-process over the ASGI app
and the real database, answer no server error, whoever sends them.

Per operation, each request sent with each role's key and with none: the admitted roles
reach the handler, the others meet the admission check (`moderation.http.admission`),
which reads no body.
Statefully as well: sequences of calls that follow the links Schemathesis infers between
operations (create a bank, then add to it, change it, remove from it; submit an upload,
then read it and decide its hits), so that handlers see ids that exist, not only random
ones that 404.

The examples are few (the file took 85 s of wall time, 33 s of CPU, on two cores
shared with other work): this guards
against 500s from inputs a handler did not expect (NUL characters, huge ids, odd JSON),
not against everything property-based testing could find with more time.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error

from moderation.auth.models import Role
from moderation.main.app import create_app
from tests.api_fixtures import bearer, keys
from tests.conftest import TEST_RUNTIME
from tests.health_fixtures import live_worker

__all__ = ["keys", "live_worker"]

schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(TEST_RUNTIME))

# Every role, and no key at all.
CALLERS = [*Role, None]


def _headers(keys: dict[Role, str], role: Role | None) -> dict[str, str]:
    return {} if role is None else bearer(keys[role])


@schema.parametrize()
@settings(
    max_examples=4,
    deadline=None,
    # Explicit examples and generated ones; no shrinking: a failure is reported as found.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
@pytest.mark.usefixtures("live_worker")  # else /readyz answers its documented 503
def test_no_request_is_a_server_error(case: schemathesis.Case[Any], keys: dict[Role, str]) -> None:
    """Each generated request, sent by every caller in turn (one test per operation, not
    per caller: the per-test database setup costs more than the requests)."""
    for role in CALLERS:
        case.call_and_validate(headers=_headers(keys, role), checks=[not_a_server_error])


class Workflow(schema.as_state_machine()):  # type: ignore[misc]
    """Sequences of calls by one caller; only a server error fails them."""

    headers: ClassVar[dict[str, str]] = {}

    def get_call_kwargs(self, case: schemathesis.Case[Any]) -> dict[str, Any]:
        return {"headers": self.headers}

    def validate_response(
        self,
        response: Any,
        case: schemathesis.Case[Any],
        additional_checks: Any = None,
        **kwargs: Any,
    ) -> None:
        case.validate_response(response, checks=[not_a_server_error])


@pytest.mark.parametrize("role", CALLERS, ids=lambda role: str(role or "no key"))
@pytest.mark.usefixtures("live_worker")
def test_no_sequence_of_requests_is_a_server_error(
    keys: dict[Role, str], role: Role | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Workflow, "headers", _headers(keys, role))
    Workflow.run(
        settings=settings(
            max_examples=8 if role is Role.ADMIN else 3,
            stateful_step_count=6,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
    )
