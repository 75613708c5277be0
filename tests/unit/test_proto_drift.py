"""The committed shared/csi/csi_pb2*.py must be what scripts/gen_proto.sh makes from csi.proto."""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("csi_pb2.py", "csi_pb2.pyi", "csi_pb2_grpc.py")

# Only the toolchain version stamps differ between grpcio-tools releases that generate otherwise
# identical code; a protoc run with one toolchain is byte-for-byte reproducible.
_VERSION_STAMPS = [
    (re.compile(r"^# Protobuf Python Version: .*$", re.M), "# Protobuf Python Version: X"),
    (re.compile(r"(_runtime_version\.Domain\.PUBLIC,\n)(\s+\d+,\n){3}"), r"\1    X,\n"),
    (re.compile(r"^GRPC_GENERATED_VERSION = '.*'$", re.M), "GRPC_GENERATED_VERSION = 'X'"),
]


def _normalise(text: str) -> str:
    for pattern, replacement in _VERSION_STAMPS:
        text = pattern.sub(replacement, text)
    return text


def test_generated_code_matches_csi_proto(tmp_path: Path) -> None:
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpc_tools is not importable (install the dev extra); cannot check generated code drift")
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not available to run scripts/gen_proto.sh")
    subprocess.run(
        [bash, str(REPO_ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    stale = []
    for name in GENERATED:
        committed = _normalise((REPO_ROOT / "shared" / "csi" / name).read_text())
        fresh = _normalise((tmp_path / "shared" / "csi" / name).read_text())
        if committed != fresh:
            diff = difflib.unified_diff(
                committed.splitlines(), fresh.splitlines(), f"committed/{name}", f"regenerated/{name}", lineterm="", n=1
            )
            stale.append("\n".join(list(diff)[:40]))
    assert not stale, "shared/csi generated code is stale; run scripts/gen_proto.sh\n" + "\n".join(stale)
