#!/usr/bin/env bash
# Regenerate shared/csi/csi_pb2.py, csi_pb2.pyi and csi_pb2_grpc.py from shared/csi/csi.proto.
#
# Usage: scripts/gen_proto.sh [OUT_DIR]
#   OUT_DIR defaults to the repository root (the committed files are overwritten); the drift
#   test passes a temporary directory. PYTHON overrides the interpreter (default .venv/bin/python),
#   which must have grpcio-tools installed (the `dev` extra).
#
# protoc runs with `-I .` from the repository root so that the generated grpc module imports
# `from shared.csi import csi_pb2` (package-relative), not a top-level `csi_pb2`.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-${repo_root}/.venv/bin/python}"
out_dir="$(mkdir -p "${1:-${repo_root}}" && cd "${1:-${repo_root}}" && pwd)"

cd "${repo_root}"
"${python}" -m grpc_tools.protoc \
  -I . \
  --python_out="${out_dir}" \
  --pyi_out="${out_dir}" \
  --grpc_python_out="${out_dir}" \
  shared/csi/csi.proto

echo "generated shared/csi/csi_pb2.py, csi_pb2.pyi, csi_pb2_grpc.py under ${out_dir}"
