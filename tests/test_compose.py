"""docker-compose.yml and the Dockerfile, checked as `docker compose config` would read them.

No Docker engine runs here, so nothing is built or started: these tests hold the files to
what compose requires (every service has an image or a build, every dependency names a
service with a valid condition) and to what this project promises (healthchecks on every
long-running service, the README's credentials, the model cache mounted, only CLI commands
that exist).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import redis
import yaml
from sqlalchemy.engine import make_url

from moderation.config import Settings
from moderation.demo.samples import SAMPLES
from moderation.main.cli import main
from moderation.worker.child import WorkerProcess
from tests.conftest import TEST_ENV

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
# Variables the compose file may take from the environment, each with a default.
DOCUMENTED_VARIABLES = {
    "TORCH_INDEX_URL",
    "MODERATION_MODEL",
    "MODERATION_DEVICE",
    "MODERATION_WEBHOOK_URL",
    "MODERATION_WEBHOOK_SECRET",
    "MODERATION_SEARCH_BACKEND",
    "MODERATION_MILVUS_URI",
    "MODERATION_MILVUS_TOKEN",
}


def load_compose() -> dict[str, Any]:
    # SafeLoader resolves anchors and `<<` merge keys as compose does.
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict)
    return document


COMPOSE = load_compose()
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
BUILT = sorted(name for name, service in SERVICES.items() if "build" in service)
ONE_SHOT = sorted(name for name, service in SERVICES.items() if service.get("restart") == "no")
LONG_RUNNING = sorted(SERVICES.keys() - set(ONE_SHOT))


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def dockerfile_stages(path: Path) -> list[str]:
    return re.findall(r"^FROM\s+\S+(?:\s+AS\s+(\S+))?", path.read_text(), re.M | re.I)


def test_the_top_level_has_only_what_compose_knows() -> None:
    known = {"name", "services", "volumes", "networks", "configs", "secrets", "include"}
    assert {key for key in COMPOSE if not key.startswith("x-")} <= known
    assert SERVICES


def test_every_service_has_an_image_or_a_build() -> None:
    for name, service in SERVICES.items():
        assert "image" in service or "build" in service, name


def test_the_expected_services_are_there() -> None:
    assert {"postgres", "redis", "migrate", "worker", "api", "demo"} <= SERVICES.keys()
    assert set(ONE_SHOT) == {"migrate", "demo"}
    assert set(BUILT) == {"migrate", "worker", "api", "demo", "webhooks", "index-sync"}


@pytest.mark.parametrize("name", BUILT)
def test_builds_use_a_dockerfile_and_stage_that_exist(name: str) -> None:
    build = SERVICES[name]["build"]
    context = ROOT / build["context"]
    dockerfile = context / build.get("dockerfile", "Dockerfile")
    assert dockerfile.is_file()
    stages = dockerfile_stages(dockerfile)
    assert build["target"] in stages
    # The built image is named, so the services built alike share one image.
    assert SERVICES[name]["image"] == SERVICES[BUILT[0]]["image"]


def test_dockerfile_copies_only_from_earlier_stages_and_installs_only_wheels() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages: list[str] = []
    for line in text.splitlines():
        if match := re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.I):
            stages.append(match[1])
        for source in re.findall(r"COPY\s+--from=(\S+)", line):
            assert source in stages[:-1], f"COPY --from={source} before that stage"
    # Continuation lines joined: each pip install is one command.
    commands = re.split(r"&&|\n(?!\s)", text.replace("\\\n", " "))
    installs = [c for c in commands if "pip install" in c]
    assert installs
    for command in installs:
        # Wheels only (no compiler anywhere), or the project itself, without dependencies.
        assert "--only-binary=:all:" in command or "--no-deps --editable ." in command, command
        if "--only-binary" in command:
            assert "--constraint constraints.txt" in command, command
    runtime = text.split(" AS runtime", 1)[1]
    assert not re.search(r"apt-get|apk add|gcc|build-essential", runtime)
    for path in ("constraints.txt", "pyproject.toml", "README.md", "moderation", "migrations"):
        assert (ROOT / path).exists(), path


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_services_have_a_healthcheck(name: str) -> None:
    test = SERVICES[name]["healthcheck"]["test"]
    assert isinstance(test, list)
    assert test[0] in {"CMD", "CMD-SHELL"}
    assert len(test) > 1
    assert SERVICES[name].get("restart") == "unless-stopped"


def test_dependencies_name_services_with_valid_conditions() -> None:
    for name, service in SERVICES.items():
        for dependency, spec in service.get("depends_on", {}).items():
            assert dependency in SERVICES, f"{name} depends on unknown {dependency}"
            condition = spec["condition"]
            assert condition in CONDITIONS, f"{name}: {condition}"
            if condition == "service_healthy":
                assert "healthcheck" in SERVICES[dependency], dependency
            if condition == "service_completed_successfully":
                assert dependency in ONE_SHOT, dependency


def test_dependencies_have_no_cycle() -> None:
    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"cycle: {' -> '.join((*path, name))}"
        for dependency in SERVICES[name].get("depends_on", {}):
            visit(dependency, (*path, name))

    for name in SERVICES:
        visit(name, ())


def test_services_start_in_order() -> None:
    depends = {name: set(service.get("depends_on", {})) for name, service in SERVICES.items()}
    assert {"postgres", "redis", "migrate"} <= depends["worker"]
    assert SERVICES["worker"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully"
    )
    # The demo screens with the worker, so it waits until the worker consumes.
    assert SERVICES["demo"]["depends_on"]["worker"]["condition"] == "service_healthy"


def test_built_services_use_the_readme_credentials_and_the_compose_servers() -> None:
    postgres = environment(SERVICES["postgres"])
    readme_default = make_url(Settings.model_fields["database_url"].default)
    for name in BUILT:
        env = environment(SERVICES[name])
        database = make_url(env["MODERATION_DATABASE_URL"])
        assert database.host == "postgres"
        assert database.username == postgres["POSTGRES_USER"] == readme_default.username
        assert database.database == postgres["POSTGRES_DB"] == readme_default.database
        assert database.password is None
        assert readme_default.password is None
        assert env["MODERATION_REDIS_URL"].startswith("redis://redis:6379/")
    # No password in the URLs: the server must not ask for one.
    assert postgres["POSTGRES_HOST_AUTH_METHOD"] == "trust"


def test_published_ports_are_local_only() -> None:
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"


@pytest.mark.parametrize("name", BUILT)
def test_built_services_mount_the_model_cache_where_hugging_face_looks(name: str) -> None:
    env = environment(SERVICES[name])
    mounts = dict(volume.split(":")[:2][::-1] for volume in SERVICES[name]["volumes"])
    assert mounts[env["HF_HOME"]] in COMPOSE["volumes"]
    samples = "file:///app/moderation/demo/samples/"
    assert samples in env["MODERATION_ALLOWED_URI_PREFIXES"].split(",")


def test_named_volumes_are_declared() -> None:
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in COMPOSE["volumes"], f"{name}: {source}"


def _strings(node: object) -> Iterator[str]:
    """Every key and value of the file, as compose interpolates them (comments are not)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)
    elif node is not None:
        yield str(node)


def test_variables_are_escaped_or_documented_with_defaults() -> None:
    # Compose replaces $NAME and ${NAME} everywhere, commands included: shell variables
    # must be written $$NAME, and compose's own must have a default.
    text = "\n".join(_strings(COMPOSE)).replace("$$", "")
    for match in re.finditer(r"\$(\{[^}]*\}|\w+)", text):
        reference = match[1]
        assert reference.startswith("{"), f"unescaped ${reference}"
        name = reference[1:-1].split(":-")[0]
        assert name in DOCUMENTED_VARIABLES, name
        assert ":-" in reference, f"{name} has no default"


def _moderation_commands(service: dict[str, Any]) -> list[list[str]]:
    command = service.get("command", [])
    shell = command[:2] == ["sh", "-ec"]
    lines = command[2].splitlines() if shell else [shlex.join(command)]
    found = []
    for line in lines:
        words = shlex.split(line.replace("$$", "$"))
        if "moderation" in words:
            found.append(words[words.index("moderation") + 1 :])
    return found


@pytest.mark.parametrize("name", BUILT)
def test_services_run_only_commands_the_cli_has(name: str) -> None:
    commands = _moderation_commands(SERVICES[name])
    assert commands
    for words in commands:
        group: click.Command = main
        path: list[str] = []
        for word in words:
            if not isinstance(group, click.Group) or word.startswith(("-", "$")):
                break
            sub = group.get_command(click.Context(group), word)
            assert sub is not None, f"{name}: no command `moderation {' '.join([*path, word])}`"
            group, path = sub, [*path, word]
        assert path, words


def test_the_api_listens_on_every_address_after_the_migration() -> None:
    api = SERVICES["api"]
    assert api["command"] == ["moderation", "api", "--host", "0.0.0.0"]
    assert api["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "/healthz" in " ".join(api["healthcheck"]["test"])
    assert api["ports"] == ["127.0.0.1:8000:8000"]


def test_the_api_healthcheck_passes_against_a_running_api(tmp_path: Path) -> None:
    """The healthcheck as compose runs it, against `moderation api` started as the service
    starts it (on a free port here, where 8000 may be taken)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [*SERVICES["api"]["command"], "--port", str(port)]
    env = {**os.environ, **TEST_ENV}
    log = (tmp_path / "api.log").open("wb")
    api = subprocess.Popen(
        [sys.executable, "-m", *command], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    check = [part.replace("8000", str(port)) for part in SERVICES["api"]["healthcheck"]["test"][1:]]
    check[0] = sys.executable if check[0] == "python" else check[0]
    try:
        deadline = time.monotonic() + 60
        while True:
            checked = subprocess.run(check, capture_output=True, text=True)
            if checked.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert checked.returncode == 0, (tmp_path / "api.log").read_text()
    finally:
        api.terminate()
        api.wait(timeout=30)
        log.close()
    # Nothing answers any more: the check fails.
    assert subprocess.run(check, capture_output=True).returncode != 0


def test_the_worker_is_unhealthy_while_no_worker_answers(redis_client: redis.Redis) -> None:
    """The healthcheck's command, run where no worker of this host consumes: it fails."""
    assert SERVICES["worker"]["healthcheck"]["test"][:3] == ["CMD", "moderation", "ping"]
    env = {**os.environ, **TEST_ENV}
    command = [*SERVICES["worker"]["healthcheck"]["test"][1:], "--host", "no-such-host"]
    checked = subprocess.run(
        [str(Path(sys.executable).parent / command[0]), *command[1:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "no worker answered" in checked.stderr


@pytest.mark.e2e
@pytest.mark.usefixtures("clean_db")
def test_the_compose_commands_run_against_a_real_worker(
    worker: WorkerProcess, tmp_path: Path
) -> None:
    """The worker's healthcheck and the demo job's script, run on this host as compose would
    run them in the containers ($$ read as $), against the tests' worker and database."""
    samples = tmp_path / "samples"
    shutil.copytree(SAMPLES, samples)  # where the tests' worker may read
    env = {
        **os.environ,
        **TEST_ENV,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    _, *health = SERVICES["worker"]["healthcheck"]["test"]
    checked = subprocess.run(health, env=env, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"screening@{socket.gethostname()}: answers" in checked.stdout

    shell, flags, script = SERVICES["demo"]["command"]
    script = script.replace("$$", "$").replace("/app/moderation/demo/samples", str(samples))
    demo = subprocess.run(
        [shell, flags, script], env=env, capture_output=True, text=True, timeout=240
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "added 2 entries to known-bad" in demo.stdout
    # The two broken samples fail, as expected, and the job goes on to the hits.
    assert "Error: 2 of 9 upload(s) failed" in demo.stderr
    assert "sha256" in demo.stdout.split("BANK_ENTRY_ID")[-1]
