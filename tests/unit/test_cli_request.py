"""xocsi argument parsing: endpoints, K=V arguments and argv -> CSI request, with no server."""

from __future__ import annotations

import pytest

from services.xocsi import cli
from services.xocsi.commands import COMMANDS
from services.xocsi.requests import UsageError, endpoint_target
from shared.csi import csi_pb2

Mode = csi_pb2.VolumeCapability.AccessMode.Mode


@pytest.mark.parametrize(
    ("endpoint", "target"),
    [
        ("unix:///csi/csi.sock", "unix:///csi/csi.sock"),
        ("unix:/csi/csi.sock", "unix:///csi/csi.sock"),
        ("/csi/csi.sock", "unix:///csi/csi.sock"),
        ("tcp://controller.example:10000", "controller.example:10000"),
        ("tcp://127.0.0.1:10000/", "127.0.0.1:10000"),
        ("localhost:10000", "localhost:10000"),
        ("[::1]:10000", "[::1]:10000"),
    ],
)
def test_endpoint_forms(endpoint: str, target: str) -> None:
    assert endpoint_target(endpoint) == target


@pytest.mark.parametrize("endpoint", ["localhost", "tcp://host", "host:http", "host:0", "unix://", ":10000"])
def test_bad_endpoints_are_usage_errors(endpoint: str) -> None:
    with pytest.raises(UsageError):
        endpoint_target(endpoint)


def _request(*argv: str) -> object:
    return cli.parse_args(["--endpoint", "/csi/csi.sock", *argv]).requests[0]


def test_volume_create_builds_the_full_request() -> None:
    request = _request(
        "volume", "create", "pvc-1", "--size", "1GiB", "--param", "sr=fast", "--param", "k=a=b",
        "--fs", "ext4", "--mount-flag", "noatime", "--access-mode", "single-node-single-writer",
        "--requisite", "zone=a,rack=r1", "--preferred", "zone=a", "--secret", "token=s3cr3t",
    )  # fmt: skip

    expected = csi_pb2.CreateVolumeRequest(
        name="pvc-1",
        capacity_range=csi_pb2.CapacityRange(required_bytes=1024**3),
        parameters={"sr": "fast", "k": "a=b"},
        secrets={"token": "s3cr3t"},
        accessibility_requirements=csi_pb2.TopologyRequirement(
            requisite=[csi_pb2.Topology(segments={"zone": "a", "rack": "r1"})],
            preferred=[csi_pb2.Topology(segments={"zone": "a"})],
        ),
    )
    cap = expected.volume_capabilities.add()
    cap.mount.fs_type = "ext4"
    cap.mount.mount_flags.append("noatime")
    cap.access_mode.mode = Mode.SINGLE_NODE_SINGLE_WRITER
    assert request == expected


def test_default_capability_is_single_node_writer_mount() -> None:
    request = _request("volume", "create", "pvc-1")

    assert isinstance(request, csi_pb2.CreateVolumeRequest)
    assert not request.HasField("capacity_range")
    (cap,) = request.volume_capabilities
    assert cap.WhichOneof("access_type") == "mount"
    assert cap.mount.fs_type == ""
    assert cap.access_mode.mode == Mode.SINGLE_NODE_WRITER


def test_block_capability_and_global_options_after_the_subcommand() -> None:
    args = cli.parse_args(
        ["publish", "vol-1", "--node", "n1", "--block", "--readonly", "--endpoint", "h:1", "--json", "--timeout", "5"]
    )

    assert (args.endpoint, args.json, args.timeout) == ("h:1", True, 5.0)
    request = args.requests[0]
    assert request.volume_id == "vol-1"
    assert request.node_id == "n1"
    assert request.readonly
    assert request.volume_capability.WhichOneof("access_type") == "block"


def test_expand_sends_a_capability_only_when_asked() -> None:
    plain = _request("volume", "expand", "vol-1", "--size", "2G")
    with_fs = _request("volume", "expand", "vol-1", "--size", "2G", "--fs", "xfs")

    assert plain.capacity_range.required_bytes == 2 * 1000**3
    assert not plain.HasField("volume_capability")
    assert with_fs.volume_capability.mount.fs_type == "xfs"


def test_capacity_segments_become_accessible_topology() -> None:
    request = _request("capacity", "--param", "sr=fast", "--segment", "zone=a", "--segment", "rack=1")

    assert request == csi_pb2.GetCapacityRequest(
        parameters={"sr": "fast"}, accessible_topology=csi_pb2.Topology(segments={"zone": "a", "rack": "1"})
    )


def test_node_requests() -> None:
    stage = _request("node", "stage", "vol-1", "--staging-path", "/s", "--publish-context", "device=/dev/xvdb")
    stats = _request("node", "stats", "vol-1", "--path", "/t")
    expand = _request("node", "expand", "vol-1", "--path", "/t", "--size", "3GiB")

    assert stage.staging_target_path == "/s"
    assert dict(stage.publish_context) == {"device": "/dev/xvdb"}
    assert stats == csi_pb2.NodeGetVolumeStatsRequest(volume_id="vol-1", volume_path="/t")
    assert expand.capacity_range.required_bytes == 3 * 1024**3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["volume", "create", "v", "--size", "1Q"], "argument --size"),
        (["volume", "create", "v", "--param", "novalue"], "expected K=V"),
        (["volume", "create", "v", "--block", "--fs", "ext4"], "not allowed with argument"),
        (["volume", "create", "v", "--block", "--mount-flag", "ro"], "--mount-flag needs mount access"),
        (["node", "unstage", "v", "--staging-path", "/s", "--secret", "a=b"], "--secret is not accepted"),
        (["--timeout", "0", "probe"], "timeout must be positive"),
        (["--endpoint", "nohost", "probe"], "endpoint 'nohost'"),
        (["volume"], "required"),
    ],
)
def test_usage_errors_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(argv)

    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_every_rpc_of_the_three_services_is_reachable() -> None:
    reachable = {rpc for command in COMMANDS for rpc in command.rpcs}
    services = csi_pb2.DESCRIPTOR.services_by_name

    assert reachable == {f"{name}.{method.name}" for name, svc in services.items() for method in svc.methods}


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c.path) for c in COMMANDS])
def test_help_names_the_rpcs(command: object, capsys: pytest.CaptureFixture[str]) -> None:
    path = command.path  # type: ignore[attr-defined]
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args([*path, "--help"])

    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"usage: xocsi {' '.join(path)}" in help_text
    for rpc in command.rpcs:  # type: ignore[attr-defined]
        assert rpc in help_text


def test_main_takes_the_default_endpoint_from_csi_endpoint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CSI_ENDPOINT", "unix:///var/lib/kubelet/plugins/xo/csi.sock")

    with pytest.raises(SystemExit):
        cli.main(["probe", "--help"])

    assert "now unix:///var/lib/kubelet/plugins/xo/csi.sock" in " ".join(capsys.readouterr().out.split())
