"""The service's own errors (`moderation.errors`): every one has a stable code and an HTTP
status, and each surface has one handler for them all (the API's JSON, the pages' HTML,
the command line's one line), so no route or command maps them by hand."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

from click.testing import CliRunner
from fastapi.testclient import TestClient

import moderation
from moderation.auth.models import Role
from moderation.errors import ModerationError
from moderation.main.cli import main
from tests.api_fixtures import api, bearer, keys
from tests.conftest import TEST_RUNTIME
from tests.web_fixtures import log_in, site

__all__ = ["api", "keys", "site"]

PACKAGE = Path(moderation.__file__).parent
# Caught where a route or page maps errors by hand, or swallows a bug as a client error.
BUILT_INS = {"Exception", "ValueError", "LookupError", "KeyError", "RuntimeError", "TypeError"}


def _every_error_class() -> list[type[ModerationError]]:
    for module in pkgutil.walk_packages(moderation.__path__, "moderation."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    found: list[type[ModerationError]] = []
    pending: list[type[ModerationError]] = [ModerationError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending += cls.__subclasses__()
    return [cls for cls in found if cls.__module__.startswith("moderation.")]


# The kinds that errors subclass: the domains raise their own errors, not these.
KINDS = {"ModerationError", "NotFound", "Conflict", "Invalid", "Unavailable"}
KINDS_OF_INTAKE = {"IntakeError", "BadInput", "TransientFault"}
# A batch refused for its URIs answers with the code one refused URI has.
SHARED_ON_PURPOSE = {"uri_refused": {"UriRefused", "UrisRefused"}}


def test_every_error_has_its_own_code_and_a_client_or_server_status() -> None:
    classes = _every_error_class()
    assert len(classes) > 30  # the domains' errors, not just the kinds
    by_code: dict[str, set[str]] = {}
    for cls in classes:
        assert cls.status in {404, 409, 422, 500, 503}, cls
        if cls.__module__ == "moderation.errors" and cls.__name__ in KINDS:
            continue
        if cls.__module__ == "moderation.images.errors" and cls.__name__ in KINDS_OF_INTAKE:
            continue
        by_code.setdefault(cls.code, set()).add(cls.__name__)
    shared = {code: names for code, names in by_code.items() if len(names) > 1}
    assert shared == SHARED_ON_PURPOSE


def _outside_classes(tree: ast.Module) -> list[ast.AST]:
    """The module's top-level functions (routes and their helpers), not the request
    models' validators, which hand pydantic the `ValueError` it expects."""
    return [node for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]


def test_no_route_or_page_catches_a_built_in_error() -> None:
    surfaces = [
        *PACKAGE.glob("*/api.py"),
        PACKAGE / "web" / "pages.py",
        PACKAGE / "main" / "audit_log.py",
    ]
    assert len(surfaces) >= 6
    caught = []
    for path in surfaces:
        for function in _outside_classes(ast.parse(path.read_text())):
            for node in ast.walk(function):
                if isinstance(node, ast.ExceptHandler) and node.type is not None:
                    names = [n.id for n in ast.walk(node.type) if isinstance(n, ast.Name)]
                    caught += [f"{path.name}:{node.lineno} {n}" for n in names if n in BUILT_INS]
    assert caught == []


def test_the_api_answers_a_domain_error_with_its_status_and_code(
    api: TestClient, keys: dict[Role, str]
) -> None:
    reader = bearer(keys[Role.REVIEWER])
    missing = api.get("/v1/hits/987654321", headers=reader)
    assert (missing.status_code, missing.json()["code"]) == (404, "hit_not_found")
    assert missing.json()["detail"] == "no hit with id 987654321"
    cursor = api.get("/v1/hits", params={"cursor": "not-ours"}, headers=reader)
    assert (cursor.status_code, cursor.json()["code"]) == (422, "invalid_cursor")
    admin = bearer(keys[Role.ADMIN])
    assert api.post("/v1/banks", json={"name": "twice"}, headers=admin).status_code == 201
    again = api.post("/v1/banks", json={"name": "twice"}, headers=admin)
    assert (again.status_code, again.json()["code"]) == (409, "bank_exists")


def test_a_page_shows_a_domain_error_as_a_page(site: TestClient, keys: dict[Role, str]) -> None:
    log_in(site, keys[Role.REVIEWER])
    page = site.get("/review", params={"cursor": "not-ours"})
    assert page.status_code == 422
    assert page.headers["content-type"].startswith("text/html")
    assert "the cursor is not one this service returned" in page.text


def test_the_command_line_says_a_domain_error_in_one_line(keys: dict[Role, str]) -> None:
    result = CliRunner().invoke(main, ["decide", "987654321", "--confirm"], obj=TEST_RUNTIME)
    assert result.exit_code == 1
    assert result.output.strip() == "Error: no hit with id 987654321"
