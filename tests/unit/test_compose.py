"""docker-compose.yml, .env.example and the Dockerfile: the compose file is valid against the Compose
specification schema, starts in a healthy order, keeps the migrator scalable, documents every variable, and
runs only real console scripts with flags and settings the services actually read. No Docker engine needed.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.csi_frontend.settings import FrontendSettings
from services.migrator.settings import MigratorSettings
from shared.config import LogSettings, RabbitSettings, RedisSettings, XoSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# The Compose specification's JSON schema (compose-spec/compose-spec, schema/compose-spec.json) as vendored by
# the PyPI package check-jsonschema in check_jsonschema/builtin_schemas/vendor/compose-spec.json (its
# "compose-spec" catalog entry; check-jsonschema 0.39.0 when this test was written). Loaded from the installed
# package, so upgrading check-jsonschema upgrades the schema.
SCHEMA_PACKAGE = "check_jsonschema.builtin_schemas.vendor"
SCHEMA_FILE = "compose-spec.json"

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, ${NAME:+other}; $$ is a literal $.
_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}")
_BARE_VARIABLE = re.compile(r"(?<!\$)\$(?!\$|\{)[A-Za-z_]")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(us|ms|h|m|s)")
_DURATION_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


# -- helpers ----------------------------------------------------------------------------------------------


def _raw_compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict)
    return document


def _env_example() -> dict[str, str]:
    """NAME=value lines of .env.example (the values Compose would read from a copied .env)."""
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f".env.example: {line!r} is not NAME=value"
            values[name.strip()] = value.strip()
    return values


def _substitute(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation of one string (the subset of the shell syntax the spec defines)."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        value = env.get(name)
        if op in (":-", ":?"):
            unset = not value
        else:
            unset = value is None
        if op in (":-", "-") and unset:
            return arg
        if op in (":?", "?") and unset:
            raise AssertionError(f"${{{name}}} is required: {arg}")
        if op == ":+":
            return arg if value else ""
        if op == "+":
            return arg if value is not None else ""
        return value or ""

    return _VARIABLE.sub(one, text)


def _interpolate(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {key: _interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolate(item, env) for item in node]
    if isinstance(node, str):
        return _substitute(node, env)
    return node


def _compose() -> dict[str, Any]:
    """The compose file as Compose sees it with a .env copied from .env.example."""
    interpolated = _interpolate(_raw_compose(), _env_example())
    assert isinstance(interpolated, dict)
    return interpolated


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)
    elif isinstance(node, str):
        yield node


def _references() -> Iterator[tuple[str, str | None, str | None]]:
    """(name, operator, argument) of every ${...} in the compose file."""
    for text in _strings(_raw_compose()):
        for match in _VARIABLE.finditer(text):
            if match.group("name"):
                yield match.group("name"), match.group("op"), match.group("arg")


def _duration_s(text: str) -> float:
    """A Compose/Go duration such as ``40s`` or ``1m30s``."""
    parts = _DURATION_PART.findall(text)
    assert parts and "".join(number + unit for number, unit in parts) == text, f"not a duration: {text!r}"
    return sum(float(number) * _DURATION_UNITS_S[unit] for number, unit in parts)


def _services() -> dict[str, dict[str, Any]]:
    services = _compose()["services"]
    assert isinstance(services, dict) and services
    return services


def _console_scripts() -> dict[str, str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    scripts = pyproject["project"]["scripts"]
    assert isinstance(scripts, dict)
    return scripts


def _settings_env_names() -> set[str]:
    """Every environment variable the frontend and the migrator read (pydantic-settings classes)."""
    names: set[str] = set()
    for settings in (XoSettings, RabbitSettings, RedisSettings, LogSettings, MigratorSettings, FrontendSettings):
        prefix = str(settings.model_config.get("env_prefix", ""))
        for field_name, field in settings.model_fields.items():
            names.add(f"{prefix}{field_name}".upper())
            aliases = getattr(field.validation_alias, "choices", ())
            names.update(alias.upper() for alias in aliases if isinstance(alias, str))
    return names


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    assert isinstance(command, list), "use the exec (list) form of command:"
    return [str(part) for part in command]


# -- the Compose specification ----------------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is a dev dependency (pyproject [dev])")
    pytest.importorskip("check_jsonschema", reason="check-jsonschema (pyproject [dev]) ships the compose-spec schema")
    schema_text = resources.files(SCHEMA_PACKAGE).joinpath(SCHEMA_FILE).read_text()
    schema = yaml.safe_load(schema_text)  # JSON is YAML
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    errors = sorted(validator_class(schema).iter_errors(_compose()), key=lambda error: list(error.path))
    version = importlib.metadata.version("check-jsonschema")
    assert not errors, f"docker-compose.yml vs compose-spec (check-jsonschema {version}):\n" + "\n".join(
        f"  {'/'.join(map(str, error.path)) or '(root)'}: {error.message}" for error in errors
    )


def test_docker_compose_config_accepts_the_file() -> None:
    """The real parser too, where a Docker CLI with the compose plugin exists (it needs no engine)."""
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker CLI on this machine: the compose-spec schema test covers the file")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["no output"])[0][:80]
        pytest.skip(f"docker CLI without the compose plugin ({reason})")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE_FILE), "--env-file", str(ENV_EXAMPLE), "config", "--quiet"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


# -- start order and health --------------------------------------------------------------------------------


def test_every_service_has_a_healthcheck() -> None:
    for name, service in _services().items():
        check = service.get("healthcheck")
        assert isinstance(check, dict), f"service {name} has no healthcheck"
        assert not check.get("disable"), f"service {name} disables its healthcheck"
        test = check.get("test")
        assert isinstance(test, list) and test and test[0] in ("CMD", "CMD-SHELL"), f"service {name}: {test!r}"


def test_dependencies_wait_for_health() -> None:
    services = _services()
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"service {name}: use the long depends_on form with a condition"
        for target, spec in depends_on.items():
            assert target in services, f"service {name} depends on unknown service {target}"
            assert spec.get("condition") == "service_healthy", f"{name} -> {target}: wait for service_healthy"
            assert "healthcheck" in services[target], f"{name} waits for {target}, which has no healthcheck"


def test_frontend_and_migrator_wait_for_brokers_and_xo() -> None:
    services = _services()
    for name in ("frontend", "migrator"):
        assert set(services[name]["depends_on"]) >= {"rabbitmq", "redis", "xo-simulator"}, name


# -- scaling and shutdown ----------------------------------------------------------------------------------


def test_migrator_can_be_scaled() -> None:
    """`docker compose up --scale migrator=N` fails on a fixed container name or a fixed host port."""
    migrator = _services()["migrator"]
    assert "container_name" not in migrator
    assert "hostname" not in migrator
    assert "ports" not in migrator, "a published host port allows only one replica"
    replicas = int(migrator["deploy"]["replicas"])
    assert replicas >= 1


def test_migrator_grace_is_shorter_than_its_stop_grace_period() -> None:
    """SIGTERM: in-flight migrations get MIGRATOR_GRACE_S, then go back to the queue; Docker's SIGKILL must
    come later (STYLE.md: grace < terminationGracePeriodSeconds)."""
    migrator = _services()["migrator"]
    grace_s = float(migrator["environment"]["MIGRATOR_GRACE_S"])
    assert grace_s < _duration_s(migrator["stop_grace_period"])


def test_frontend_grace_is_shorter_than_its_stop_grace_period() -> None:
    frontend = _services()["frontend"]
    assert FrontendSettings().grace_s < _duration_s(frontend["stop_grace_period"])


def test_published_ports_bind_to_the_loopback_by_default() -> None:
    for name, service in _services().items():
        for mapping in service.get("ports", []):
            host_address = str(mapping).split(":")[0]
            assert host_address == "127.0.0.1", f"service {name} publishes {mapping} beyond the loopback"


# -- variables ---------------------------------------------------------------------------------------------


def test_variables_are_documented_in_env_example() -> None:
    referenced = {name for name, _, _ in _references()}
    documented = set(_env_example())
    assert referenced - documented == set(), "add these to .env.example"
    assert documented - referenced == set(), "unused in docker-compose.yml: remove from .env.example"


def test_env_example_defaults_match_the_compose_defaults() -> None:
    """What .env.example shows is what an empty .env gives: one default per variable, the same in both files."""
    example = _env_example()
    for name, op, arg in _references():
        if op in (":-", "-"):
            assert arg == example[name], f"${{{name}:-{arg}}} but .env.example says {name}={example[name]}"


def test_every_env_example_variable_is_commented() -> None:
    described = False
    for line in ENV_EXAMPLE.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            described = not stripped.startswith("# ---")
        elif stripped:
            assert described, f".env.example: explain {stripped.split('=')[0]} in a comment above it"
        else:
            described = False


def test_no_unbraced_variables() -> None:
    for text in _strings(_raw_compose()):
        assert not _BARE_VARIABLE.search(text), f"use ${{NAME}} (or $$ for a literal $): {text!r}"


def test_service_environment_names_are_settings() -> None:
    """A misspelt variable (MIGRATOR_GRACE for MIGRATOR_GRACE_S) would be silently ignored by the service."""
    known = _settings_env_names()
    for name in ("frontend", "migrator"):
        unknown = set(_services()[name]["environment"]) - known
        assert not unknown, f"service {name} sets variables no settings class reads: {sorted(unknown)}"


# -- commands ----------------------------------------------------------------------------------------------


def test_our_services_run_console_scripts_with_known_flags() -> None:
    scripts = _console_scripts()
    ours = {name: service for name, service in _services().items() if "build" in service}
    assert set(ours) == {"xo-simulator", "frontend", "migrator"}
    for name, service in ours.items():
        program, *args = _command(service)
        assert program in scripts, f"service {name} runs {program}, not a [project.scripts] entry"
        module = importlib.import_module(scripts[program].split(":")[0])
        try:
            _, unknown = module.build_parser().parse_known_args(args)
        except SystemExit:
            pytest.fail(f"service {name}: {program} {' '.join(args)} is refused by its parser")
        assert not unknown, f"service {name}: {program} has no option {unknown}"


def test_frontend_serves_the_controller_on_tcp() -> None:
    command = _command(_services()["frontend"])
    assert command[command.index("--mode") + 1] == "controller"
    assert command[command.index("--endpoint") + 1].startswith("tcp://0.0.0.0:")


# -- the image ---------------------------------------------------------------------------------------------


def _dockerignore_allowed() -> set[str]:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    assert "*" in lines, ".dockerignore is an allow-list: it starts by excluding everything"
    return {line[1:].rstrip("/") for line in lines if line.startswith("!")}


def test_dockerfile_copies_only_what_the_context_lets_in() -> None:
    allowed = _dockerignore_allowed()
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY") and "--from=" not in line:
            sources = line.split()[1:-1]
            assert set(sources) <= allowed, f"{line!r}: add the sources to .dockerignore's allow-list"
    assert {"pyproject.toml", "README.md"} <= allowed  # pyproject's readme: pip install . needs it


def test_dockerfile_installs_the_node_tools_and_runs_as_non_root() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.MULTILINE)
    for package in ("e2fsprogs", "xfsprogs", "util-linux", "mount"):
        assert re.search(rf"\b{package}\b", text), f"the node plugin needs {package}"
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and not users[-1].startswith(("0", "root")), "the image's default user must not be root"
    assert "pip install ." in text
