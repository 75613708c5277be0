"""The grpc.aio server: endpoint parsing (unix sockets, stale socket removal), servicers by mode,
the interceptor, and a graceful stop on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
from pathlib import Path

import grpc

from services.csi_frontend.interceptors import ErrorMappingInterceptor, Observer
from shared.logging import get_logger

log = get_logger(__name__)


def grpc_address(endpoint: str) -> tuple[str, Path | None]:
    """``unix:///csi/csi.sock`` -> (``unix:///csi/csi.sock``, socket path); ``tcp://h:p`` -> (``h:p``, None)."""
    if endpoint.startswith("unix://"):
        path = Path(endpoint[len("unix://"):])
    elif endpoint.startswith("unix:"):
        path = Path(endpoint[len("unix:"):])
    elif endpoint.startswith("/"):
        path = Path(endpoint)
    elif endpoint.startswith("tcp://"):
        return endpoint[len("tcp://"):], None
    elif ":" in endpoint:
        return endpoint, None
    else:
        raise ValueError(f"endpoint {endpoint!r} must be unix:///path/to/csi.sock or tcp://host:port")
    if not path.is_absolute():
        raise ValueError(f"endpoint {endpoint!r}: the socket path must be absolute")
    return f"unix://{path}", path


def remove_stale_socket(path: Path) -> None:
    """Remove a socket left by a previous run; refuse to delete anything that is not a socket."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    if not stat.S_ISSOCK(mode):
        raise ValueError(f"{path} exists and is not a socket; refusing to replace it")
    path.unlink()


async def serve(servicers: list[tuple[object, object]], endpoint: str, *, grace_s: float,
                observe: Observer | None = None, stop: asyncio.Event | None = None) -> None:
    """Serve ``(servicer, add_to_server)`` pairs on ``endpoint`` until SIGTERM/SIGINT (or ``stop``)."""
    address, socket_path = grpc_address(endpoint)
    if socket_path is not None:
        remove_stale_socket(socket_path)
    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor(observe)],
                             options=[("grpc.so_reuseport", 0)])
    for servicer, add in servicers:
        add(servicer, server)  # type: ignore[operator]
    port = server.add_insecure_port(address)
    if socket_path is None and port == 0:
        raise OSError(f"cannot listen on {endpoint}")
    await server.start()
    if socket_path is not None:
        os.chmod(socket_path, 0o660)
    log.info("frontend_listening", endpoint=endpoint if socket_path else f"tcp://{address.rsplit(':', 1)[0]}:{port}")
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        log.info("frontend_stopping", grace_s=grace_s)
        await server.stop(grace_s)
        if socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                socket_path.unlink()
