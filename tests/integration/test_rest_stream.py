"""Disk content through XO's REST endpoints with real bytes (simulator in real data mode): the VHD export holds
only the allocated blocks with exact bitmaps and qemu reads it back byte for byte; VHD and raw round trips keep
the target sparse; imports refuse what does not fit and keep what was written before a fault; cancelled or
stalled transfers free the VDIs and fail cleanly."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from dev.wait import eventually
from services.xo_simulator.content import data_extents
from services.xo_simulator.server import SimulatorHandle
from shared import vhd
from shared.config import XoSettings
from shared.units import MiB
from shared.vhd_stream import ByteReader, iter_blocks, read_head, with_exact_length
from shared.xo.errors import XoError, XoUnavailable
from shared.xo.rest import XoRest
from shared.xo.streaming import Progress, stream_copy
from tests.support.sim import SR_LOCAL_A1, SR_LOCAL_A2, TOKEN, running

pytestmark = [pytest.mark.integration, pytest.mark.root]
requires_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("losetup") is None,
                                   reason="real data mode needs root and losetup for loop devices")
requires_qemu = pytest.mark.skipif(shutil.which("qemu-img") is None,
                                   reason="qemu-img is absent (Debian package qemu-utils; make bootstrap installs it)")
SEGMENT = 64 * 1024


@asynccontextmanager
async def _stack(tmp_path: Path) -> AsyncIterator[tuple[SimulatorHandle, XoRest]]:
    async with running(backing_dir=tmp_path / "backing", device_root=tmp_path / "dev") as sim:
        async with XoRest.from_settings(XoSettings(url=sim.url, token=TOKEN)) as rest:
            yield sim, rest


def _backing(tmp_path: Path, sr: str, vdi: str) -> Path:
    return tmp_path / "backing" / sr / f"{vdi}.img"


def _write(path: Path, pieces: dict[int, bytes]) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset, data in pieces.items():
            os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _extents(path: Path) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return list(data_extents(fd, 0, path.stat().st_size))
    finally:
        os.close(fd)


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def _pattern() -> dict[int, bytes]:
    """~25 % of a 64 MiB disk: whole blocks, a block's tail, a 4 KiB island and the disk's last bytes."""
    return {0: os.urandom(8 * MiB), 10 * MiB + 12 * 1024: os.urandom(4096), 21 * MiB: os.urandom(7 * MiB),
            40 * MiB: os.urandom(MiB + 512 * 1024), 64 * MiB - 4096: os.urandom(4096)}


async def _file_chunks(path: Path, chunk: int = MiB) -> AsyncIterator[bytes]:
    with path.open("rb") as source:
        while data := await asyncio.to_thread(source.read, chunk):
            yield data


def _blocks_of(extents: list[tuple[int, int]]) -> Iterator[tuple[int, list[tuple[int, int]]]]:
    """Block index -> sector ranges of the data extents inside it."""
    per_block: dict[int, list[tuple[int, int]]] = {}
    for first, end in extents:
        for index in range(first // vhd.BLOCK_BYTES, (end - 1) // vhd.BLOCK_BYTES + 1):
            start = index * vhd.BLOCK_BYTES
            low, high = max(first, start) - start, min(end, start + vhd.BLOCK_BYTES) - start
            per_block.setdefault(index, []).append((low // 512, -(-high // 512)))
    yield from sorted(per_block.items())


@requires_root
async def test_the_vhd_export_holds_only_allocated_blocks_with_their_bitmaps(tmp_path: Path) -> None:
    async with _stack(tmp_path) as (sim, rest):
        vdi = await rest.create_vdi(SR_LOCAL_A1, 64 * MiB, "source")
        path = _backing(tmp_path, SR_LOCAL_A1, vdi)
        _write(path, _pattern())
        expected = list(_blocks_of(_extents(path)))
        async with httpx.AsyncClient(cookies={"authenticationToken": TOKEN}) as http, \
                http.stream("GET", f"{sim.http_url}/rest/v0/vdis/{vdi}.vhd") as answer:
            assert answer.status_code == 200 and "content-length" not in answer.headers
            reader = ByteReader(answer.aiter_bytes())
            head, _ = await read_head(reader)
            blocks = [block async for block in iter_blocks(head, reader)]
        content = path.read_bytes()
    assert [index for index, _ in expected] == [0, 1, 2, 3, 5, 10, 11, 12, 13, 20, 31]
    assert [block.index for block in blocks] == [index for index, _ in expected]
    for block, (index, sectors) in zip(blocks, expected, strict=True):
        assert block.bitmap == vhd.bitmap_of(sectors), f"bitmap of block {index}"
        assert block.data == content[index * vhd.BLOCK_BYTES:(index + 1) * vhd.BLOCK_BYTES]
    assert reader.position == head.length == vhd.stream_length(64 * MiB, len(expected))
    assert head.footer.current_size == 64 * MiB and head.header.max_table_entries == 32


@requires_root
@requires_qemu
async def test_qemu_reads_the_exported_vhd_back_byte_for_byte(tmp_path: Path) -> None:
    exported, raw = tmp_path / "export.vhd", tmp_path / "qemu.raw"
    async with _stack(tmp_path) as (_, rest):
        vdi = await rest.create_vdi(SR_LOCAL_A1, 64 * MiB, "source")
        path = _backing(tmp_path, SR_LOCAL_A1, vdi)
        _write(path, _pattern())
        with exported.open("wb") as out:
            async with rest.export(vdi, "vhd") as chunks:
                async for chunk in chunks:
                    out.write(chunk)
        content = path.read_bytes()
    info = json.loads(subprocess.run(["qemu-img", "info", "-f", "vpc", "--output=json", str(exported)],
                                     check=True, capture_output=True, text=True).stdout)
    assert (info["format"], info["virtual-size"], info["cluster-size"]) == ("vpc", 64 * MiB, vhd.BLOCK_BYTES)
    check = subprocess.run(["qemu-img", "check", "-f", "vpc", str(exported)], capture_output=True, text=True)
    # qemu's vpc driver has no consistency check (exit 63, "does not support checks"); when it has one, it
    # must be clean (exit 0).
    assert check.returncode == 0 or (check.returncode == 63 and "does not support checks" in check.stderr), \
        check.stderr
    subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(exported), str(raw)], check=True)
    assert raw.read_bytes() == content


@requires_root
@pytest.mark.parametrize("fmt", ["vhd", "raw"])
async def test_a_round_trip_copies_every_byte_and_stays_sparse(tmp_path: Path, fmt: str) -> None:
    async with _stack(tmp_path) as (_, rest):
        src = await rest.create_vdi(SR_LOCAL_A1, 64 * MiB, "source")
        dst = await rest.create_vdi(SR_LOCAL_A2, 64 * MiB, "target")
        source, target = _backing(tmp_path, SR_LOCAL_A1, src), _backing(tmp_path, SR_LOCAL_A2, dst)
        _write(source, _pattern())
        seen: list[Progress] = []

        async def progress(report: Progress) -> None:
            seen.append(report)

        result = await stream_copy(rest, src, dst, fmt, progress=progress)  # type: ignore[arg-type]
        extents = _extents(source)
    assert target.read_bytes() == source.read_bytes()
    sent = vhd.stream_length(64 * MiB, 11) if fmt == "vhd" else 64 * MiB
    assert result.bytes_sent == sent and (seen[0].done_bytes, seen[-1].done_bytes) == (0, sent)
    # sparse: what the source holds, rounded out to the import's 64 KiB segments, plus the file system's own
    # extent blocks
    bound = sum(-(-end // SEGMENT) * SEGMENT - first // SEGMENT * SEGMENT for first, end in extents) + SEGMENT
    assert _allocated(target) <= bound < 2 * _allocated(source)


@requires_root
@requires_qemu
async def test_a_vhd_written_by_qemu_imports_exactly(tmp_path: Path) -> None:
    raw, made = tmp_path / "disk.raw", tmp_path / "qemu.vhd"
    with raw.open("wb") as out:
        out.truncate(32 * MiB)
    _write(raw, {MiB: os.urandom(3 * MiB), 30 * MiB: os.urandom(4096)})
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic,force_size=on",
                    str(raw), str(made)], check=True)
    async with _stack(tmp_path) as (_, rest):
        vdi = await rest.create_vdi(SR_LOCAL_A1, 32 * MiB, "target")
        await rest.import_(vdi, "vhd", made.stat().st_size, _file_chunks(made))
        target = _backing(tmp_path, SR_LOCAL_A1, vdi)
        assert target.read_bytes() == raw.read_bytes()
        assert _allocated(target) <= 4 * MiB + 2 * SEGMENT


@requires_root
async def test_imports_refuse_content_that_does_not_fit_and_write_nothing(tmp_path: Path) -> None:
    async with _stack(tmp_path) as (_, rest):
        src = await rest.create_vdi(SR_LOCAL_A1, 64 * MiB, "source")
        small = await rest.create_vdi(SR_LOCAL_A2, 32 * MiB, "small")
        _write(_backing(tmp_path, SR_LOCAL_A1, src), _pattern())
        for fmt, why in (("vhd", "VHD's disk (67108864 bytes) is larger than the VDI (33554432 bytes)"),
                         ("raw", "raw content (67108864 bytes) is larger than the VDI (33554432 bytes)")):
            with pytest.raises(XoError) as caught:
                await stream_copy(rest, src, small, fmt)  # type: ignore[arg-type]
            assert caught.value.xapi_code == "VDI_IO_ERROR" and why in str(caught.value)
            assert _allocated(_backing(tmp_path, SR_LOCAL_A2, small)) == 0


async def _exported(rest: XoRest, vdi: str) -> bytes:
    async with rest.export(vdi, "vhd") as chunks:
        return b"".join([chunk async for chunk in chunks])


@requires_root
async def test_a_corrupt_vhd_fails_keeping_the_blocks_written_before_the_fault(tmp_path: Path) -> None:
    async with _stack(tmp_path) as (_, rest):
        src = await rest.create_vdi(SR_LOCAL_A1, 64 * MiB, "source")
        bad_head = await rest.create_vdi(SR_LOCAL_A2, 64 * MiB, "head")
        bad_tail = await rest.create_vdi(SR_LOCAL_A2, 64 * MiB, "tail")
        _write(_backing(tmp_path, SR_LOCAL_A1, src), _pattern())
        body = await _exported(rest, src)
        corrupt_header = body[:600] + bytes([body[600] ^ 0xFF]) + body[601:]
        with pytest.raises(XoError, match=r"VDI_IO_ERROR\(VHD header checksum is 0x[0-9A-F]{8}, expected"):
            await rest.import_(bad_head, "vhd", len(body), _single(corrupt_header))
        assert _allocated(_backing(tmp_path, SR_LOCAL_A2, bad_head)) == 0

        wrong_footer = body[:-512] + vhd.Footer.for_disk(64 * MiB, bytes(16)).pack()
        with pytest.raises(XoError, match="differs from the footer copy at the start"):
            await rest.import_(bad_tail, "vhd", len(body), _single(wrong_footer))
        written = _backing(tmp_path, SR_LOCAL_A2, bad_tail).read_bytes()
        assert written == _backing(tmp_path, SR_LOCAL_A1, src).read_bytes()  # every block went in: no rollback


@requires_root
async def test_a_cut_upload_keeps_what_was_written_and_frees_the_vdi(tmp_path: Path) -> None:
    async with _stack(tmp_path) as (sim, rest):
        src = await rest.create_vdi(SR_LOCAL_A1, 64 * MiB, "source")
        dst = await rest.create_vdi(SR_LOCAL_A2, 64 * MiB, "target")
        source, target = _backing(tmp_path, SR_LOCAL_A1, src), _backing(tmp_path, SR_LOCAL_A2, dst)
        _write(source, _pattern())
        body = await _exported(rest, src)
        first_block_end = 2048 + vhd.BITMAP_BYTES + vhd.BLOCK_BYTES
        _, writer = await asyncio.open_connection(sim.host, sim.port)
        writer.write(f"PUT /rest/v0/vdis/{dst}.vhd HTTP/1.1\r\nHost: x\r\nCookie: authenticationToken={TOKEN}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:first_block_end + 4096])
        await writer.drain()
        await eventually(lambda: _allocated(target) >= vhd.BLOCK_BYTES, timeout_s=10)
        writer.close()  # the connection drops mid-body
        await writer.wait_closed()

        async def freed() -> bool:
            try:
                await rest.import_(dst, "vhd", len(body), _single(body))
            except XoError:
                return False
            return True

        assert target.read_bytes()[:vhd.BLOCK_BYTES] == source.read_bytes()[:vhd.BLOCK_BYTES]
        await eventually(freed, timeout_s=10)
        assert target.read_bytes() == source.read_bytes()


@requires_root
async def test_a_cancelled_copy_frees_both_vdis(tmp_path: Path) -> None:
    async with _stack(tmp_path) as (_, rest):
        src = await rest.create_vdi(SR_LOCAL_A1, 512 * MiB, "source")
        dst = await rest.create_vdi(SR_LOCAL_A2, 512 * MiB, "target")
        started = asyncio.Event()

        async def progress(report: Progress) -> None:
            if report.done_bytes > 0:
                started.set()

        copy = asyncio.create_task(stream_copy(rest, src, dst, "raw", progress=progress, progress_interval_s=0))
        await asyncio.wait_for(started.wait(), 10)
        copy.cancel()
        with pytest.raises(asyncio.CancelledError):
            await copy

        async def deleted(vdi: str) -> bool:
            try:
                await rest.delete_vdi(vdi)
            except XoError:
                return False
            return True

        await eventually(lambda: deleted(dst), timeout_s=10)
        await eventually(lambda: deleted(src), timeout_s=10)


async def test_a_stalled_export_fails_after_the_idle_timeout() -> None:
    release = asyncio.Event()
    handlers: list[asyncio.Task[object]] = []

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.current_task())  # type: ignore[arg-type]
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nconn\r\n")
        await writer.drain()
        await release.wait()  # a peer that stops sending until the test is over
        writer.close()

    server = await asyncio.start_server(stall, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = XoSettings(url=f"http://127.0.0.1:{port}", token=TOKEN)
    try:
        async with XoRest.from_settings(settings, idle_timeout_s=0.3) as rest, rest.export("x", "vhd") as chunks:
            loop = asyncio.get_running_loop()
            started = loop.time()
            got = await anext(aiter(chunks))
            with pytest.raises(XoUnavailable, match="XO export of VDI x as vhd failed: ReadTimeout"):
                await anext(aiter(chunks))
            assert (got, loop.time() - started < 5) == (b"conn", True)
    finally:
        release.set()
        server.close()
        await asyncio.gather(*handlers, return_exceptions=True)


async def test_with_exact_length_over_a_real_http_stream(tmp_path: Path) -> None:
    async with running() as sim, XoRest.from_settings(XoSettings(url=sim.url, token=TOKEN)) as rest:
        vdi = await rest.create_vdi(SR_LOCAL_A1, 10 * MiB, "plain")
        async with rest.export(vdi, "vhd") as chunks:
            length, body = await with_exact_length(chunks)
            assert len(b"".join([chunk async for chunk in body])) == length == vhd.stream_length(10 * MiB, 0)


async def _single(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), MiB):
        yield data[start:start + MiB]
