"""An S3 protocol server on loopback with a fixed added latency per request, for tests and measurements.

moto's S3 server and a TCP proxy in front of it run in a child process, so that their Python work does
not share the client's interpreter lock (a real object store runs elsewhere too). The proxy delays
every byte from the client by `latency_s` before passing it on, as a long network path would: a GET
waits that long before the server sees it, and the response streams back undelayed. An upload's bytes
are delayed alike but not spaced out, so uploads are not slowed beyond the one delay.

    with s3_server(latency_s=0.03) as endpoint, s3_environment(endpoint):
        ...  # s3:// URLs now reach the server; create a bucket first (s3fs.S3FileSystem().mkdir)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

READY = "s3-latency ready on port "


@contextlib.contextmanager
def s3_server(latency_s: float = 0.03, startup_timeout_s: float = 60.0) -> Iterator[str]:
    """The endpoint URL of a fresh moto S3 server behind the latency proxy; both stop on exit."""
    child = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.s3_latency", "--latency", str(latency_s)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = _read_line(child, startup_timeout_s)
        if not line.startswith(READY):
            raise RuntimeError(f"the S3 test server did not start (it said {line!r})")
        yield f"http://127.0.0.1:{int(line[len(READY) :])}"
    finally:
        child.stdin.close()  # the child stops when its stdin closes
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


@contextlib.contextmanager
def s3_environment(endpoint: str) -> Iterator[None]:
    """s3fs (and so s3:// stores) pointed at `endpoint` with test credentials; the environment and s3fs's
    cached filesystems as they were afterwards."""
    import s3fs

    values = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    s3fs.S3FileSystem.clear_instance_cache()  # a cached filesystem would keep the old endpoint
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        s3fs.S3FileSystem.clear_instance_cache()


def _read_line(child: subprocess.Popen, timeout_s: float) -> str:
    """The child's first line of output, or '' when it says nothing in time (or exits)."""
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(child.stdout, selectors.EVENT_READ)
        if not selector.select(timeout_s):
            return ""
    return child.stdout.readline().strip()


# -- the child process --------------------------------------------------------------------------------
async def _delayed_pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, latency_s: float) -> None:
    """Forward everything from `reader` to `writer`, each piece `latency_s` after it arrived."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()

    async def receive() -> None:
        try:
            while data := await reader.read(_PIECE):
                pieces.put_nowait((loop.time() + latency_s, data))
        finally:
            pieces.put_nowait((loop.time() + latency_s, b""))

    receiving = asyncio.ensure_future(receive())
    try:
        while True:
            due, data = await pieces.get()
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            if not data:
                break
            writer.write(data)
            await writer.drain()
    finally:
        receiving.cancel()
        writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_PIECE):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


_PIECE = 1 << 20  # bytes relayed per read: large, so relaying a response costs little CPU


async def _serve(upstream_port: int, latency_s: float, stop: asyncio.Future) -> None:
    async def connection(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", upstream_port, limit=_PIECE)
        except OSError:
            client_writer.close()
            return
        for writer in (client_writer, server_writer):
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # either side may hang up at any time (a client killed mid-request): that ends the connection
        with contextlib.suppress(OSError):
            await asyncio.gather(
                _delayed_pipe(client_reader, server_writer, latency_s), _pipe(server_reader, client_writer)
            )

    server = await asyncio.start_server(connection, "127.0.0.1", 0, limit=_PIECE)
    async with server:
        print(f"{READY}{server.sockets[0].getsockname()[1]}", flush=True)
        await stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.03, help="seconds added to every request")
    args = parser.parse_args()
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # nor one per connection cut short at exit

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        # the parent closes our stdin to stop us (and it closes when the parent dies)
        loop.add_reader(sys.stdin.fileno(), lambda: stop.done() or sys.stdin.readline() or stop.set_result(None))
        await _serve(port, args.latency, stop)

    try:
        asyncio.run(run())
    finally:
        moto.stop()


if __name__ == "__main__":
    main()
