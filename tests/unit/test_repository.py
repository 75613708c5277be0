"""Repository hygiene a reviewer would otherwise catch by eye: no merge left half done."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", "node_modules"}
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".proto", ".json", ".cfg", ".txt", ".ini"}
MARKER = re.compile(r"^(<{7}|>{7}) ?|^={7}$", re.MULTILINE)


def _text_files() -> list[Path]:
    found = []
    for path in ROOT.rglob("*"):
        if any(part in SKIP_DIRS for part in path.relative_to(ROOT).parts):
            continue
        if path.is_file() and (path.suffix in TEXT_SUFFIXES or path.name in {"Makefile", "Dockerfile"}):
            found.append(path)
    return found


def test_no_file_holds_merge_conflict_markers() -> None:
    offenders = [str(path.relative_to(ROOT)) for path in _text_files()
                 if MARKER.search(path.read_text(encoding="utf-8", errors="replace"))]
    assert offenders == []
