"""The project's CSI v1 protocol: csi.proto and the Python modules grpc_tools generates from it.

Edit csi.proto, then run scripts/gen_proto.sh; never edit csi_pb2*.py by hand
(tests/unit/test_proto_drift.py fails when they are stale).
"""

from shared.csi import csi_pb2, csi_pb2_grpc

__all__ = ["csi_pb2", "csi_pb2_grpc"]
