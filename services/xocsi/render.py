"""Readable output of the xocsi CLI: CSI responses -> key/value lines and small tables.

Rich tables on a terminal, plain text otherwise (pipes, logs, tests). JSON output lives in cli.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO, TypeAlias

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table as RichTable

from shared.csi import csi_pb2
from shared.units import format_size

# A command's result: one response, or several keyed by RPC name (`identity`).
Result: TypeAlias = Message | Mapping[str, Message]

_WRAPPERS = {f"google.protobuf.{name}Value" for name in ("Bool", "Int64", "Int32", "UInt64", "String")}
_SIZE_FIELDS = {"available_capacity", "maximum_volume_size", "minimum_volume_size"}


@dataclass(frozen=True)
class Pairs:
    rows: Sequence[tuple[str, str]]


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: Sequence[tuple[str, ...]]


View = Pairs | Table


# --- generic flattening -----------------------------------------------------------------------


def flatten(message: Message, prefix: str = "") -> list[tuple[str, str]]:
    """Every set field as ``(dotted.path, text)``; maps as ``path.key``, lists as ``path[i]``."""
    rows: list[tuple[str, str]] = []
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            rows += [row for key in sorted(value) for row in _value(value_field, value[key], f"{path}.{key}")]
        elif field.is_repeated:
            rows += [row for i, item in enumerate(value) for row in _value(field, item, f"{path}[{i}]")]
        else:
            rows += _value(field, value, path)
    return rows


def _value(field: FieldDescriptor, value: Any, path: str) -> list[tuple[str, str]]:
    if field.message_type is not None:
        full_name = field.message_type.full_name
        if full_name in _WRAPPERS:
            return [(path, _scalar(field.name, value.value))]
        if full_name == "google.protobuf.Timestamp":
            return [(path, value.ToJsonString())]
        return flatten(value, f"{path}.") or [(path, "{}")]
    if field.enum_type is not None:
        return [(path, field.enum_type.values_by_number[value].name)]
    return [(path, _scalar(field.name, value))]


def _scalar(name: str, value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and (name.endswith("_bytes") or name in _SIZE_FIELDS):
        return f"{value} ({format_size(value)})"
    return str(value)


# --- per-command views ------------------------------------------------------------------------


def generic(result: Result) -> list[View]:
    """Key/value lines for one response (or each response of several)."""
    messages = result.values() if isinstance(result, Mapping) else [result]
    return [Pairs([row for message in messages for row in flatten(message)])]


def capability_names(response: Message) -> list[str]:
    """Names of the capabilities in a Get*Capabilities response, e.g. ``CREATE_DELETE_VOLUME``."""
    names = []
    holder: Any = response
    for cap in holder.capabilities:
        kind = cap.WhichOneof("type")
        if kind is None:
            names.append("UNKNOWN")
            continue
        inner = getattr(cap, kind)
        names.append(inner.DESCRIPTOR.fields_by_name["type"].enum_type.values_by_number[inner.type].name)
    return names


def capabilities(result: Result) -> list[View]:
    assert isinstance(result, Message)
    return [Pairs([("capability", name) for name in capability_names(result)])]


def probe(result: Result) -> list[View]:
    assert isinstance(result, csi_pb2.ProbeResponse)
    return [Pairs([("ready", _ready(result))])]


def _ready(response: csi_pb2.ProbeResponse) -> str:
    # CSI spec, Probe: an unset `ready` means the plugin is ready.
    if not response.HasField("ready"):
        return "true (not reported)"
    return "true" if response.ready.value else "false"


def identity(result: Result) -> list[View]:
    assert isinstance(result, Mapping)
    info = result["GetPluginInfo"]
    rows = flatten(info)
    rows += [("capability", name) for name in capability_names(result["GetPluginCapabilities"])]
    probe_response = result["Probe"]
    assert isinstance(probe_response, csi_pb2.ProbeResponse)
    rows.append(("ready", _ready(probe_response)))
    return [Pairs(rows)]


def _page(table: Table, next_token: str) -> list[View]:
    """A listing's table, then the token of the next page when there is one."""
    return [table, Pairs([("next_token", next_token)])] if next_token else [table]


def volumes(result: Result) -> list[View]:
    assert isinstance(result, csi_pb2.ListVolumesResponse)
    rows = []
    for entry in result.entries:
        volume, status = entry.volume, entry.status
        rows.append(
            (
                volume.volume_id,
                format_size(volume.capacity_bytes) if volume.capacity_bytes else "-",
                ",".join(status.published_node_ids) or "-",
                _condition(status.volume_condition) if status.HasField("volume_condition") else "-",
                _topologies(volume.accessible_topology),
            )
        )
    return _page(Table(("VOLUME ID", "CAPACITY", "PUBLISHED ON", "CONDITION", "TOPOLOGY"), rows), result.next_token)


def snapshots(result: Result) -> list[View]:
    assert isinstance(result, csi_pb2.ListSnapshotsResponse)
    rows = [
        (
            snap.snapshot_id,
            snap.source_volume_id,
            format_size(snap.size_bytes) if snap.size_bytes else "-",
            "true" if snap.ready_to_use else "false",
            snap.creation_time.ToJsonString() if snap.HasField("creation_time") else "-",
        )
        for snap in (entry.snapshot for entry in result.entries)
    ]
    return _page(Table(("SNAPSHOT ID", "SOURCE VOLUME", "SIZE", "READY", "CREATED"), rows), result.next_token)


def volume_stats(result: Result) -> list[View]:
    assert isinstance(result, csi_pb2.NodeGetVolumeStatsResponse)
    unit_names = csi_pb2.VolumeUsage.Unit
    rows = [
        (unit_names.Name(usage.unit), _amount(usage, usage.total), _amount(usage, usage.used),
         _amount(usage, usage.available))
        for usage in result.usage
    ]
    views: list[View] = [Table(("UNIT", "TOTAL", "USED", "AVAILABLE"), rows)]
    if result.HasField("volume_condition"):
        views.append(Pairs([("condition", _condition(result.volume_condition))]))
    return views


def _amount(usage: csi_pb2.VolumeUsage, value: int) -> str:
    return format_size(value) if usage.unit == csi_pb2.VolumeUsage.BYTES else str(value)


def _condition(condition: csi_pb2.VolumeCondition) -> str:
    state = "abnormal" if condition.abnormal else "normal"
    return f"{state}: {condition.message}" if condition.message else state


def _topologies(topologies: Sequence[csi_pb2.Topology]) -> str:
    parts = [",".join(f"{k}={v}" for k, v in sorted(t.segments.items())) for t in topologies]
    return " ".join(parts) or "-"


# --- printing ---------------------------------------------------------------------------------


def print_views(views: Sequence[View], out: TextIO) -> None:
    """Print views: rich tables on a terminal, plain ``key: value`` lines and aligned columns otherwise."""
    # Decide on isatty() ourselves: rich also honours FORCE_COLOR and friends, and piped output
    # must stay plain whatever the environment says.
    if not out.isatty():
        out.write("".join(_plain(view) for view in views))
        return
    console = Console(file=out, highlight=False)
    for view in views:
        console.print(_rich(view))


def _rich(view: View) -> RichTable:
    if isinstance(view, Pairs):
        table = RichTable(show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold")
        table.add_column()
        for key, value in view.rows:
            table.add_row(key, value)
        return table
    table = RichTable(*view.headers)
    for row in view.rows:
        table.add_row(*row)
    return table


def _plain(view: View) -> str:
    if isinstance(view, Pairs):
        return "".join(f"{key}: {value}\n" for key, value in view.rows)
    lines = [view.headers, *view.rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(view.headers))]
    return "".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() + "\n"
                   for line in lines)
