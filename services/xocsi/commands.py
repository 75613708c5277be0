"""The xocsi command table: each subcommand's arguments, the CSI RPC(s) it calls and its renderer.

Pure declarations; requests are built in requests.py, calls are made in cli.py.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.message import Message

from services.xocsi import render
from services.xocsi import requests as req
from shared.csi import csi_pb2

Configure = Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True)
class Command:
    """One leaf subcommand.

    ``rpcs`` are "Service.Method" names. With ``build`` the command calls rpcs[0] with the built
    request; without it, every RPC in ``rpcs`` is called with an empty request (``identity``).
    ``paginate`` follows next_token until the end unless --max is given.
    """

    path: tuple[str, ...]
    help: str
    rpcs: tuple[str, ...]
    configure: Configure
    build: Callable[[argparse.Namespace], Message] | None = None
    render: Callable[[render.Result], list[render.View]] = render.generic
    paginate: bool = False


GROUPS = {
    "volume": "volume lifecycle on the Controller service",
    "controller": "Controller service information",
    "snapshot": "snapshots on the Controller service",
    "node": "Node service RPCs (run against the node plugin's endpoint)",
}


# --- argument helpers -------------------------------------------------------------------------


def _nothing(parser: argparse.ArgumentParser) -> None:
    """No arguments beyond the global options."""


def _pairs(parser: argparse.ArgumentParser, flag: str, help_text: str, metavar: str = "K=V") -> None:
    parser.add_argument(flag, action="append", type=req.key_value, default=[], metavar=metavar, help=help_text)


def _volume_id(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("volume_id", metavar="ID", help="volume id as returned by `volume create`")


def _capability(parser: argparse.ArgumentParser, *, optional: bool = False) -> None:
    when = " (sent only with --block or --fs)" if optional else ""
    group = parser.add_argument_group("volume capability" + when)
    kind = group.add_mutually_exclusive_group()
    kind.add_argument("--block", action="store_true", help="raw block access")
    default = "" if optional else " (default: mount access, filesystem chosen by the plugin)"
    kind.add_argument("--fs", metavar="FSTYPE", help=f"mount access with this filesystem, e.g. ext4{default}")
    group.add_argument("--mount-flag", action="append", default=[], metavar="FLAG", help="mount flag (repeatable)")
    group.add_argument(
        "--access-mode", choices=list(req.ACCESS_MODES), default="single-node-writer", metavar="MODE",
        help="one of: %(choices)s (default: %(default)s)",
    )


# --- per-command arguments --------------------------------------------------------------------


def _volume_create(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="suggested volume name (the idempotency key)")
    p.add_argument("--size", type=req.size_bytes, help="required capacity, e.g. 10GiB (capacity_range.required_bytes)")
    p.add_argument("--limit", type=req.size_bytes, help="capacity limit (capacity_range.limit_bytes)")
    _pairs(p, "--param", "creation parameter, as in a StorageClass (repeatable)")
    _pairs(p, "--mutable-param", "mutable parameter (repeatable)")
    p.add_argument("--requisite", action="append", type=req.segments, default=[], metavar="K=V[,K=V]",
                   help="requisite topology, one segment set per flag (repeatable)")
    p.add_argument("--preferred", action="append", type=req.segments, default=[], metavar="K=V[,K=V]",
                   help="preferred topology, in order (repeatable)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--from-snapshot", metavar="SNAPSHOT_ID", help="create from this snapshot")
    source.add_argument("--from-volume", metavar="VOLUME_ID", help="clone this volume")
    _capability(p)


def _list(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max", type=req.non_negative_int, metavar="N",
                   help="ask for at most N entries and print next_token (default: follow tokens, print all)")
    p.add_argument("--starting-token", default="", metavar="T", help="start from this next_token")


def _snapshot_list(p: argparse.ArgumentParser) -> None:
    _list(p)
    p.add_argument("--volume", metavar="VOLUME_ID", help="only snapshots of this source volume")
    p.add_argument("--snapshot", metavar="SNAPSHOT_ID", help="only this snapshot")


def _volume_expand(p: argparse.ArgumentParser) -> None:
    _volume_id(p)
    p.add_argument("--size", type=req.size_bytes, required=True, help="new required capacity, e.g. 20GiB")
    _capability(p, optional=True)


def _volume_validate(p: argparse.ArgumentParser) -> None:
    _volume_id(p)
    _pairs(p, "--context", "volume context from `volume create` (repeatable)")
    _pairs(p, "--param", "creation parameter to validate against (repeatable)")
    _capability(p)


def _volume_modify(p: argparse.ArgumentParser) -> None:
    _volume_id(p)
    _pairs(p, "--mutable-param", "mutable parameter to change (repeatable)")


def _publish(p: argparse.ArgumentParser) -> None:
    _volume_id(p)
    p.add_argument("--node", required=True, help="node id, as reported by `node info`")
    p.add_argument("--readonly", action="store_true", help="publish read-only")
    _pairs(p, "--context", "volume context from `volume create` (repeatable)")
    _capability(p)


def _unpublish(p: argparse.ArgumentParser) -> None:
    _volume_id(p)
    p.add_argument("--node", help="node id to unpublish from (omit to unpublish from every node)")


def _capacity(p: argparse.ArgumentParser) -> None:
    _pairs(p, "--param", "creation parameter (repeatable)")
    _pairs(p, "--segment", "accessible topology segment (repeatable)")
    _capability(p, optional=True)


def _snapshot_create(p: argparse.ArgumentParser) -> None:
    p.add_argument("source_volume_id", metavar="VOLUME_ID", help="volume to snapshot")
    p.add_argument("name", help="suggested snapshot name (the idempotency key)")
    _pairs(p, "--param", "snapshot parameter (repeatable)")


def _snapshot_id(p: argparse.ArgumentParser) -> None:
    p.add_argument("snapshot_id", metavar="SNAPSHOT_ID", help="snapshot id")


def _node_contexts(p: argparse.ArgumentParser) -> None:
    """What NodeStage and NodePublish both take from the controller's answers: both contexts and the capability."""
    _pairs(p, "--publish-context", "publish context from `publish` (repeatable)")
    _pairs(p, "--context", "volume context from `volume create` (repeatable)")
    _capability(p)


def _node_unstage(p: argparse.ArgumentParser) -> None:
    _volume_id(p)
    p.add_argument("--staging-path", required=True, metavar="P", help="staging_target_path")


def _node_stage(p: argparse.ArgumentParser) -> None:
    _node_unstage(p)
    _node_contexts(p)


def _node_publish(p: argparse.ArgumentParser) -> None:
    _volume_id(p)
    p.add_argument("--staging-path", metavar="P", help="staging_target_path (when the plugin stages)")
    p.add_argument("--target-path", required=True, metavar="T", help="target_path to publish at")
    p.add_argument("--readonly", action="store_true", help="publish read-only")
    _node_contexts(p)


def _node_unpublish(p: argparse.ArgumentParser) -> None:
    _volume_id(p)
    p.add_argument("--target-path", required=True, metavar="T", help="target_path to unpublish")


def _node_stats(p: argparse.ArgumentParser) -> None:
    _volume_id(p)
    p.add_argument("--path", required=True, metavar="P", help="volume_path (a target path of the volume)")
    p.add_argument("--staging-path", metavar="P", help="staging_target_path, if staged")


def _node_expand(p: argparse.ArgumentParser) -> None:
    _node_stats(p)
    p.add_argument("--size", type=req.size_bytes, required=True, help="new required capacity, e.g. 20GiB")
    _capability(p, optional=True)


# --- the table --------------------------------------------------------------------------------

COMMANDS: tuple[Command, ...] = (
    Command(
        ("identity",), "plugin name, version, capabilities and readiness",
        ("Identity.GetPluginInfo", "Identity.GetPluginCapabilities", "Identity.Probe"), _nothing,
        render=render.identity,
    ),
    Command(
        ("probe",), "ask whether the plugin is ready", ("Identity.Probe",), _nothing,
        build=lambda args: csi_pb2.ProbeRequest(), render=render.probe,
    ),
    # Controller
    Command(
        ("volume", "create"), "create a volume", ("Controller.CreateVolume",), _volume_create,
        build=req.create_volume,
    ),
    Command(
        ("volume", "delete"), "delete a volume (success if already absent)", ("Controller.DeleteVolume",),
        _volume_id, build=req.delete_volume,
    ),
    Command(
        ("volume", "list"), "list volumes, following next_token unless --max is given",
        ("Controller.ListVolumes",), _list, build=req.list_volumes, render=render.volumes, paginate=True,
    ),
    Command(
        ("volume", "get"), "show one volume and its status", ("Controller.ControllerGetVolume",), _volume_id,
        build=req.get_volume,
    ),
    Command(
        ("volume", "expand"), "grow a volume on the controller", ("Controller.ControllerExpandVolume",),
        _volume_expand, build=req.expand_volume,
    ),
    Command(
        ("volume", "validate"), "check that a volume supports a capability",
        ("Controller.ValidateVolumeCapabilities",), _volume_validate, build=req.validate_volume,
    ),
    Command(
        ("volume", "modify"), "change a volume's mutable parameters", ("Controller.ControllerModifyVolume",),
        _volume_modify, build=req.modify_volume,
    ),
    Command(
        ("publish",), "attach a volume to a node", ("Controller.ControllerPublishVolume",), _publish,
        build=req.controller_publish,
    ),
    Command(
        ("unpublish",), "detach a volume from a node", ("Controller.ControllerUnpublishVolume",), _unpublish,
        build=req.controller_unpublish,
    ),
    Command(
        ("capacity",), "show the capacity available for new volumes", ("Controller.GetCapacity",), _capacity,
        build=req.get_capacity,
    ),
    Command(
        ("controller", "caps"), "list the controller capabilities", ("Controller.ControllerGetCapabilities",),
        _nothing, build=lambda args: csi_pb2.ControllerGetCapabilitiesRequest(), render=render.capabilities,
    ),
    Command(
        ("snapshot", "create"), "snapshot a volume", ("Controller.CreateSnapshot",), _snapshot_create,
        build=req.create_snapshot,
    ),
    Command(
        ("snapshot", "delete"), "delete a snapshot (success if already absent)", ("Controller.DeleteSnapshot",),
        _snapshot_id, build=req.delete_snapshot,
    ),
    Command(
        ("snapshot", "list"), "list snapshots, following next_token unless --max is given",
        ("Controller.ListSnapshots",), _snapshot_list, build=req.list_snapshots, render=render.snapshots,
        paginate=True,
    ),
    Command(
        ("snapshot", "get"), "show one snapshot", ("Controller.GetSnapshot",), _snapshot_id,
        build=req.get_snapshot,
    ),
    # Node
    Command(
        ("node", "info"), "show the node id, volume limit and topology", ("Node.NodeGetInfo",), _nothing,
        build=lambda args: csi_pb2.NodeGetInfoRequest(),
    ),
    Command(
        ("node", "caps"), "list the node capabilities", ("Node.NodeGetCapabilities",), _nothing,
        build=lambda args: csi_pb2.NodeGetCapabilitiesRequest(), render=render.capabilities,
    ),
    Command(
        ("node", "stage"), "stage a volume at a staging path", ("Node.NodeStageVolume",), _node_stage,
        build=req.node_stage,
    ),
    Command(
        ("node", "unstage"), "unstage a volume", ("Node.NodeUnstageVolume",), _node_unstage,
        build=req.node_unstage,
    ),
    Command(
        ("node", "publish"), "publish a volume at a target path", ("Node.NodePublishVolume",), _node_publish,
        build=req.node_publish,
    ),
    Command(
        ("node", "unpublish"), "unpublish a volume from a target path", ("Node.NodeUnpublishVolume",),
        _node_unpublish, build=req.node_unpublish,
    ),
    Command(
        ("node", "stats"), "show usage and condition of a published volume", ("Node.NodeGetVolumeStats",),
        _node_stats, build=req.node_stats, render=render.volume_stats,
    ),
    Command(
        ("node", "expand"), "grow a volume's filesystem on the node", ("Node.NodeExpandVolume",), _node_expand,
        build=req.node_expand,
    ),
)
