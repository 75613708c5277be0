"""The house's rooms and the arrows between them (docs: README "Development", STYLE §1): shared/ at the bottom,
the services above it and each on its own, the CLI beside them, the dev harness and the benchmarks on top, the
tests outside. Read from the source with ``ast``, so a wrong import fails here before it is ever run."""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[2]
ROOMS = ("shared", "services", "dev", "bench", "tests")


def _modules() -> Iterator[tuple[str, Path]]:
    for room in ROOMS:
        for path in sorted((ROOT / room).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def _imports(module: str, path: Path) -> Iterator[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import statement, relative ones resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            yield base, [alias.name for alias in node.names]


GRAPH = {module: list(_imports(module, path)) for module, path in _modules()}


def _within(name: str, room: str) -> bool:
    return name == room or name.startswith(room + ".")


def _offending(importer: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{module} imports {target}" for module, imports in GRAPH.items() if _within(module, importer)
                  for target, _ in imports if any(_within(target, room) for room in forbidden))


@pytest.mark.parametrize(("importer", "forbidden"), [
    ("shared", ("services", "dev", "bench", "tests")),
    ("services", ("dev", "bench", "tests")),
    ("services.csi_frontend", ("services.migrator", "services.xocsi", "services.xo_simulator")),
    ("services.migrator", ("services.csi_frontend", "services.xocsi", "services.xo_simulator")),
    ("services.xocsi", ("services.csi_frontend", "services.migrator", "services.xo_simulator")),
    ("services.xo_simulator", ("services.csi_frontend", "services.migrator", "services.xocsi")),
    ("dev", ("bench", "tests")),
    ("bench", ("tests",)),
])
def test_arrows_only_point_down(importer: str, forbidden: tuple[str, ...]) -> None:
    assert _offending(importer, forbidden) == []


def test_the_graph_was_read() -> None:
    # A glob that found nothing would make every test above pass: the rooms are there, with their arrows.
    expected = {"shared.jobs", "services.csi_frontend.node", "services.xocsi.cli", "dev.stack", "bench.attach"}
    assert expected <= set(GRAPH)
    assert any(target == "shared.errors" for target, _ in GRAPH["services.migrator.consumer"])


def test_tests_import_no_test_module_and_no_private_name_of_the_harness() -> None:
    wrong = []
    for module, imports in GRAPH.items():
        if not _within(module, "tests"):
            continue
        for target, names in imports:
            if _within(target, "tests") and target.rpartition(".")[2].startswith("test_"):
                wrong.append(f"{module} imports the test module {target}")
            if _within(target, "dev") or _within(target, "tests.support"):
                wrong += [f"{module} imports {target}.{name}" for name in names if name.startswith("_")]
    assert wrong == []


def test_the_wheel_ships_only_shared_and_services() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    shipped = find_packages(str(ROOT), include=include)
    assert "shared" in shipped and "services.xocsi" in shipped and "services.csi_frontend" in shipped
    assert [p for p in shipped if p.split(".")[0] not in ("shared", "services")] == []
