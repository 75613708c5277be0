"""xocsi: an operator CLI over a CSI endpoint (like csc) reaching every Identity, Controller and Node RPC.

This module wires argparse to the command table (commands.py) and makes the grpc.aio calls,
each bounded by --timeout. Exit status: 0 success, 1 gRPC error, 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import grpc
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.json_format import MessageToDict, MessageToJson
from google.protobuf.message import Message

from services.xocsi import jobs, render
from services.xocsi.commands import COMMANDS, GROUPS, Command
from services.xocsi.requests import (
    DEFAULT_ENDPOINT,
    UsageError,
    apply_secrets,
    endpoint_target,
    key_value,
    positive_seconds,
)
from shared.csi import csi_pb2

DEFAULT_TIMEOUT_S = 30.0


class PaginationError(RuntimeError):
    """The plugin returned a next_token it had already returned; following it would never end."""


# --- parser -----------------------------------------------------------------------------------


def _global_options(parser: argparse.ArgumentParser, default_endpoint: str, *, suppress: bool) -> None:
    # Leaf parsers repeat the options with SUPPRESS defaults so they work after the subcommand too
    # without overwriting values given before it.
    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("global options")
    group.add_argument("--endpoint", default=default(default_endpoint),
                       help="CSI endpoint: unix:///path, unix:/path, /path, tcp://host:port or host:port "
                       f"(default: $CSI_ENDPOINT, else {DEFAULT_ENDPOINT}; now {default_endpoint})")
    group.add_argument("--json", action="store_true", default=default(False),
                       help="print the response message as JSON (proto field names)")
    group.add_argument("--timeout", type=positive_seconds, default=default(DEFAULT_TIMEOUT_S), metavar="SECONDS",
                       help=f"gRPC deadline of each call (default: {DEFAULT_TIMEOUT_S:g})")
    group.add_argument("--secret", action="append", type=key_value, default=default([]), metavar="K=V",
                       help="secret passed in the RPC's secrets field (repeatable)")


def build_parser(default_endpoint: str = DEFAULT_ENDPOINT) -> argparse.ArgumentParser:
    """The full xocsi parser; each leaf subparser carries its Command as ``command`` default."""
    parser = argparse.ArgumentParser(prog="xocsi", description=__doc__.split("\n", 1)[0])
    _global_options(parser, default_endpoint, suppress=False)
    top = parser.add_subparsers(dest="command_name", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]] = {}
    for command in COMMANDS:
        parent = top
        if len(command.path) == 2:
            group = command.path[0]
            if group not in groups:
                group_parser = top.add_parser(group, help=GROUPS[group], description=GROUPS[group])
                groups[group] = group_parser.add_subparsers(
                    dest=f"{group}_command", metavar="SUBCOMMAND", required=True
                )
            parent = groups[group]
        rpcs = ", ".join(command.rpcs)
        leaf = parent.add_parser(command.path[-1], help=command.help,
                                 description=f"{command.help}. Calls {rpcs}.")
        command.configure(leaf)
        _global_options(leaf, default_endpoint, suppress=True)
        leaf.set_defaults(command=command, leaf_parser=leaf)
    jobs.register(top)  # `jobs` talks to Redis and RabbitMQ, not to the CSI endpoint
    return parser


# --- calls ------------------------------------------------------------------------------------


def _method(rpc: str) -> MethodDescriptor:
    service_name, method_name = rpc.split(".")
    return csi_pb2.DESCRIPTOR.services_by_name[service_name].methods_by_name[method_name]


async def call(channel: grpc.aio.Channel, rpc: str, request: Message, timeout_s: float) -> Message:
    """Call ``Service.Method`` of csi.v1 with a deadline of timeout_s; raises grpc.aio.AioRpcError."""
    method = _method(rpc)
    if request.DESCRIPTOR is not method.input_type:
        raise TypeError(f"{rpc} takes {method.input_type.name}, not {request.DESCRIPTOR.name}")
    response_class = getattr(csi_pb2, method.output_type.name)
    multicallable = channel.unary_unary(
        f"/{method.containing_service.full_name}/{method.name}",
        request_serializer=type(request).SerializeToString,
        response_deserializer=response_class.FromString,
    )
    response: Message = await multicallable(request, timeout=timeout_s)
    return response


async def _all_pages(channel: grpc.aio.Channel, rpc: str, request: Any, timeout_s: float) -> Message:
    """Follow next_token to the end and return one response holding every entry."""
    merged: Any = await call(channel, rpc, request, timeout_s)
    seen: set[str] = set()
    while merged.next_token:
        if merged.next_token in seen:
            raise PaginationError(f"{rpc} returned next_token {merged.next_token!r} twice")
        seen.add(merged.next_token)
        request.starting_token = merged.next_token
        page: Any = await call(channel, rpc, request, timeout_s)
        merged.entries.extend(page.entries)
        merged.next_token = page.next_token
    result: Message = merged
    return result


def _requests(command: Command, args: argparse.Namespace) -> list[Message]:
    if command.build is not None:
        requests = [command.build(args)]
    else:
        requests = [getattr(csi_pb2, _method(rpc).input_type.name)() for rpc in command.rpcs]
    for request in requests:
        apply_secrets(request, args.secret)
    return requests


async def _execute(command: Command, args: argparse.Namespace, requests: list[Message]) -> render.Result:
    async with grpc.aio.insecure_channel(endpoint_target(args.endpoint)) as channel:
        if command.build is None:
            return {rpc.split(".")[1]: await call(channel, rpc, request, args.timeout)
                    for rpc, request in zip(command.rpcs, requests, strict=True)}
        if command.paginate and not args.max:
            return await _all_pages(channel, command.rpcs[0], requests[0], args.timeout)
        return await call(channel, command.rpcs[0], requests[0], args.timeout)


# --- output -----------------------------------------------------------------------------------


def to_json(result: render.Result) -> str:
    """The response as proto3 JSON with proto field names; several responses keyed by RPC name."""
    if isinstance(result, Mapping):
        return json.dumps(
            {name: MessageToDict(message, preserving_proto_field_name=True) for name, message in result.items()},
            indent=2,
        )
    text: str = MessageToJson(result, preserving_proto_field_name=True)
    return text


def _print(command: Command, args: argparse.Namespace, result: render.Result, out: TextIO) -> None:
    if args.json:
        out.write(to_json(result) + "\n")
        return
    views = command.render(result)
    if all(isinstance(view, render.Pairs) and not view.rows for view in views):
        out.write(f"{command.rpcs[0].split('.')[1]}: ok\n")
        return
    render.print_views(views, out)


# --- entry points -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None, *, default_endpoint: str = DEFAULT_ENDPOINT) -> argparse.Namespace:
    """Parse argv and build the request(s) into ``args.requests``.

    Usage errors, including arguments that cannot form a valid request, raise SystemExit(2) after
    printing the subcommand's usage (argparse's convention).
    """
    args = build_parser(default_endpoint).parse_args(argv)
    if getattr(args, "jobs_action", None) is not None:
        return args
    try:
        endpoint_target(args.endpoint)
        args.requests = _requests(args.command, args)
    except UsageError as exc:
        args.leaf_parser.error(str(exc))
    return args


async def execute(args: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Make the parsed command's call(s) and print the result; returns the exit status.

    A gRPC error prints ``error: <CODE>: <details>`` to err and returns 1.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    if getattr(args, "jobs_action", None) is not None:
        return await jobs.execute(args, out=out, err=err)
    command: Command = args.command
    try:
        result = await _execute(command, args, args.requests)
    except grpc.aio.AioRpcError as exc:
        err.write(f"error: {exc.code().name}: {exc.details()}\n")
        return 1
    except PaginationError as exc:
        err.write(f"error: {exc}\n")
        return 1
    _print(command, args, result, out)
    return 0


async def run(
    argv: Sequence[str] | None = None,
    *,
    default_endpoint: str = DEFAULT_ENDPOINT,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """parse_args + execute, for callers already inside an event loop (tests)."""
    return await execute(parse_args(argv, default_endpoint=default_endpoint), out=out, err=err)


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``xocsi``; the default endpoint comes from $CSI_ENDPOINT. Returns the exit status."""
    args = parse_args(argv, default_endpoint=os.environ.get("CSI_ENDPOINT") or DEFAULT_ENDPOINT)
    return asyncio.run(execute(args))


if __name__ == "__main__":
    sys.exit(main())
