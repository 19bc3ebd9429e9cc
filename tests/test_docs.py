"""The documentation says what the code does: every setting documented with its default,
every route with its roles, every error code; the README short; every relative link
pointing at a file (and heading) in this repository. Each check is also run on a doctored
copy of the text, to show that it fails when the documentation drifts."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from fastapi import FastAPI
from pydantic.fields import FieldInfo

from moderation.config import Settings
from moderation.http.access import PUBLIC_KEY, ROLES_KEY
from moderation.http.routes import app_routes
from moderation.main.app import create_app
from tests.conftest import TEST_RUNTIME

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
OPERATIONS = ROOT / "docs" / "operations.md"
API = ROOT / "docs" / "api.md"
README_MAX_LINES = 250

# Markdown links, not images' alt text nor code: [text](target) with no space in the target.
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
ROW = re.compile(r"^\|(.+)\|\s*$", re.M)


def documents() -> list[Path]:
    """The Markdown this repository publishes: the README, docs/ and bench/README.md."""
    return [README, ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def section(markdown: str, heading: str) -> str:
    """The text under `## heading`, up to the next heading of that level."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", markdown, re.S | re.M)
    assert match is not None, f"no section '## {heading}'"
    return match[1]


def table_rows(markdown: str) -> list[list[str]]:
    """The cells of every table row in the text, header and separator rows left out."""
    rows = []
    for match in ROW.finditer(markdown):
        cells = [cell.strip() for cell in match[1].split(" | ")]
        if set(cells[0]) <= {"-", " "} or cells[0] in {"variable", "route", "status"}:
            continue
        rows.append(cells)
    return rows


# --- settings ----------------------------------------------------------------------------


def documented_default(value: object) -> str:
    """A default as the tables write it: `true`, `25` for 25.0, lists comma-separated."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return str(value)


def default_problem(name: str, field: FieldInfo, cell: str) -> str | None:
    """Whether the table's default cell says the field's default: "unset..." for None,
    "empty..." for an empty list, else the value in backticks first."""
    default = field.default
    if default is None:
        expected = "unset"
        found = cell.startswith("unset")
    elif default == []:
        expected = "empty"
        found = cell.startswith("empty")
    else:
        expected = f"`{documented_default(default)}`"
        found = cell.startswith(expected)
    return None if found else f"{name}: the default is {expected}, documented as {cell!r}"


def setting_problems(markdown: str) -> list[str]:
    """What the configuration section of docs/operations.md gets wrong about `Settings`."""
    documented: dict[str, str] = {}
    for cells in table_rows(section(markdown, "Configuration")):
        variable = re.fullmatch(r"`(MODERATION_[A-Z0-9_]+)`", cells[0])
        if variable is not None:
            documented[variable[1]] = cells[1]
    fields = {f"MODERATION_{name.upper()}": field for name, field in Settings.model_fields.items()}
    problems = [f"{name} is not documented" for name in fields.keys() - documented.keys()]
    problems += [f"{name} is no setting" for name in documented.keys() - fields.keys()]
    for name in fields.keys() & documented.keys():
        problem = default_problem(name, fields[name], documented[name])
        if problem is not None:
            problems.append(problem)
    return sorted(problems)


def test_every_setting_is_documented_with_its_default() -> None:
    assert setting_problems(OPERATIONS.read_text()) == []


def test_the_settings_check_finds_a_missing_a_stale_and_a_wrong_row() -> None:
    text = OPERATIONS.read_text()
    missing = re.sub(r"^\| `MODERATION_MAX_FRAMES` \|.*\n", "", text, flags=re.M)
    assert setting_problems(missing) == ["MODERATION_MAX_FRAMES is not documented"]
    stale = text.replace(
        "| `MODERATION_MAX_FRAMES` |",
        "| `MODERATION_GONE` | `1` | removed |\n| `MODERATION_MAX_FRAMES` |",
    )
    assert setting_problems(stale) == ["MODERATION_GONE is no setting"]
    wrong = re.sub(r"(\| `MODERATION_MAX_FRAMES` \| )`4`", r"\1`5`", text)
    assert setting_problems(wrong) == [
        "MODERATION_MAX_FRAMES: the default is `4`, documented as '`5`'"
    ]
    unset = re.sub(r"(\| `MODERATION_WEBHOOK_URL` \| )unset", r"\1`x`", text)
    assert len(setting_problems(unset)) == 1


# --- routes and errors -------------------------------------------------------------------


def route_access(app: FastAPI) -> dict[str, str]:
    """`METHOD path` of every route in the OpenAPI spec, with who may call it as the table
    writes it: "anyone, no key", "admin only", or the other roles admitted."""
    access = {}
    for path, route in app_routes(app):
        if not route.include_in_schema:
            continue
        extra = route.openapi_extra or {}
        roles = [role for role in extra.get(ROLES_KEY, []) if role != "admin"]
        if extra.get(PUBLIC_KEY):
            who = "anyone, no key"
        else:
            who = ", ".join(sorted(roles)) if roles else "admin only"
        for method in sorted(route.methods or ()):
            access[f"{method} {path}"] = who
    return access


def route_problems(markdown: str, app: FastAPI) -> list[str]:
    documented = {}
    for cells in table_rows(section(markdown, "Routes")):
        route = re.fullmatch(r"`([A-Z]+ /\S*)`", cells[0])
        if route is not None:
            who = cells[1]
            if who not in {"anyone, no key", "admin only"}:
                who = ", ".join(sorted(role.strip() for role in who.split(",")))
            documented[route[1]] = who
    actual = route_access(app)
    problems = [f"{route} is not documented" for route in actual.keys() - documented.keys()]
    problems += [f"{route} is no route" for route in documented.keys() - actual.keys()]
    problems += [
        f"{route}: {actual[route]}, documented as {documented[route]}"
        for route in actual.keys() & documented.keys()
        if actual[route] != documented[route]
    ]
    return sorted(problems)


def test_every_route_is_documented_with_its_roles() -> None:
    assert route_problems(API.read_text(), create_app(TEST_RUNTIME)) == []


def test_the_route_check_finds_a_missing_route_and_wrong_roles() -> None:
    text = API.read_text()
    app = create_app(TEST_RUNTIME)
    missing = re.sub(r"^\| `GET /v1/audit` \|.*\n", "", text, flags=re.M)
    assert route_problems(missing, app) == ["GET /v1/audit is not documented"]
    wrong = text.replace("| `POST /v1/uploads` | submitter |", "| `POST /v1/uploads` | analyst |")
    assert route_problems(wrong, app) == ["POST /v1/uploads: submitter, documented as analyst"]


def error_codes() -> set[str]:
    """Every `code = "..."` of a class in the package: the codes of the service's errors."""
    codes = set()
    for path in (ROOT / "moderation").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            for statement in node.body:
                if (
                    isinstance(statement, ast.Assign)
                    and [ast.unparse(target) for target in statement.targets] == ["code"]
                    and isinstance(statement.value, ast.Constant)
                ):
                    codes.add(str(statement.value.value))
    return codes


def undocumented_codes(markdown: str) -> list[str]:
    errors = section(markdown, "Errors")
    return sorted(code for code in error_codes() if f"`{code}`" not in errors)


def test_every_error_code_is_documented() -> None:
    assert {"uri_refused", "external_id_conflict", "truncated_image"} <= error_codes()
    assert undocumented_codes(API.read_text()) == []


def test_the_error_check_finds_an_undocumented_code() -> None:
    text = API.read_text().replace("`already_decided`, ", "")
    assert undocumented_codes(text) == ["already_decided"]


# --- the README, links, and nothing outside --------------------------------------------


def test_the_readme_is_read_in_five_minutes() -> None:
    assert len(README.read_text().splitlines()) <= README_MAX_LINES


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    found: set[str] = set()
    for heading in re.findall(r"^#+ (.+)$", FENCE.sub("", markdown), re.M):
        anchor = base = slug(heading)
        count = 0
        while anchor in found:
            count += 1
            anchor = f"{base}-{count}"
        found.add(anchor)
    return found


def link_problems(document: Path, markdown: str) -> list[str]:
    """Relative links of the document that name no file in this repository, or no heading
    of it."""
    problems = []
    for target in LINK.findall(FENCE.sub("", markdown)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        linked = (document.parent / path_part).resolve() if path_part else document
        if not linked.is_relative_to(ROOT):
            problems.append(f"{target}: outside the repository")
        elif not linked.is_file():
            problems.append(f"{target}: no such file")
        elif anchor and anchor not in anchors(linked.read_text()):
            problems.append(f"{target}: no such heading in {linked.relative_to(ROOT)}")
    return problems


def test_every_relative_link_resolves_in_the_repository() -> None:
    problems = {
        str(document.relative_to(ROOT)): link_problems(document, document.read_text())
        for document in documents()
    }
    assert {name: found for name, found in problems.items() if found} == {}


# The directory beside the repository that development sessions had and a clone has not;
# spelt in two pieces so that this file, which must name it, does not refer to it.
BESIDE = "../" + "shared"


def test_the_link_check_finds_a_missing_file_a_missing_heading_and_a_way_out() -> None:
    text = (
        f"[a](docs/nowhere.md) [b](docs/api.md#nowhere) [c]({BESIDE}/x.md) [d](docs/api.md#errors)"
    )
    assert link_problems(README, text) == [
        "docs/nowhere.md: no such file",
        "docs/api.md#nowhere: no such heading in docs/api.md",
        f"{BESIDE}/x.md: outside the repository",
    ]


def test_no_file_refers_to_the_directory_beside_the_repository() -> None:
    """A clone has no `BESIDE` directory: nothing in the repository may send a reader
    there (vendored assets left out)."""
    places = [ROOT / name for name in ("moderation", "tests", "bench", "docs", "migrations", ".ci")]
    files = [path for place in places for path in place.rglob("*") if path.is_file()]
    files += [path for path in ROOT.iterdir() if path.is_file()]
    referring = [
        str(path.relative_to(ROOT))
        for path in files
        if "vendor" not in path.parts
        and "__pycache__" not in path.parts
        and BESIDE in path.read_text(errors="ignore")
    ]
    assert referring == []
