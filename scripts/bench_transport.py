"""Benchmark node/transport.py against bare asyncio TLS 1.3 on loopback (two processes).

Measures, in one run:
  * bulk throughput of 16 MiB float32 tensor messages over the transport (one-way
    notifications, pipelined) and of the same bytes over a bare asyncio TLS stream;
  * round-trip latency (p50, p99) of an 8 KiB bfloat16 activation (shape [1, 4096])
    echoed by a request handler, and of the same 8 KiB echoed over bare TLS.

Both sides use the same TLS 1.3 contexts (node/identity.py) and uvloop when it
is importable, as the daemon does. Targets: throughput >= 0.8x baseline, p50 RTT
<= 2x baseline.

    python scripts/bench_transport.py [--json] [--messages 24] [--rtt-iters 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.identity import ClusterKeys, NodeKey, generate_secret, parse_secret
from node.net.connection import Connection
from node.net.tls import client_ssl_context, server_ssl_context
from node.net.transport import Transport

BULK_BYTES = 16 * 2**20
_LEN = struct.Struct(">I")


def _install_loop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


# ------------------------------------------------------------------ server process


async def _serve(workdir: Path) -> None:
    cluster = ClusterKeys.from_secret(parse_secret((workdir / "secret").read_text()))
    key = NodeKey.load(workdir / "server.key")
    transport = Transport(key, cluster, name="bench-server", software_version="bench",
                          keepalive_interval=0)
    received = 0
    arrived = asyncio.Event()

    async def on_bulk(conn: Connection, body: Any) -> None:
        nonlocal received
        assert body["x"].nbytes == BULK_BYTES
        received += 1
        arrived.set()

    async def on_count(conn: Connection, body: Any) -> int:
        while received < int(body):
            arrived.clear()
            await arrived.wait()
        return received

    async def on_echo(conn: Connection, body: Any) -> Any:
        return body

    async def on_reset(conn: Connection, body: Any) -> None:
        nonlocal received
        received = 0

    transport.on_notify("bulk", on_bulk)
    transport.on_request("count", on_count)
    transport.on_request("echo", on_echo)
    transport.on_request("reset", on_reset)
    await transport.start("127.0.0.1", 0)

    async def bare(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Protocol: "B" + count => read count frames, answer 1 byte; "E" => echo frames.
        try:
            mode = await reader.readexactly(1)
            if mode == b"B":
                (count,) = _LEN.unpack(await reader.readexactly(4))
                for _ in range(count):
                    (size,) = _LEN.unpack(await reader.readexactly(4))
                    await reader.readexactly(size)
                writer.write(b"k")
                await writer.drain()
            else:
                while True:
                    header = await reader.readexactly(4)
                    (size,) = _LEN.unpack(header)
                    data = await reader.readexactly(size)
                    writer.writelines([header, data])
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(bare, "127.0.0.1", 0, ssl=server_ssl_context(cluster, key),
                                        limit=2**24)
    bare_port = server.sockets[0].getsockname()[1]
    print(json.dumps({"port": transport.port, "bare_port": bare_port}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    server.close()
    await transport.close()


# ------------------------------------------------------------------ client measurements


async def _bulk_transport(conn: Connection, count: int) -> float:
    tensor = np.random.default_rng(0).standard_normal(BULK_BYTES // 4, dtype=np.float32).reshape(4096, 1024)
    await conn.request("reset", None)
    start = time.perf_counter()
    for _ in range(count):
        await conn.notify("bulk", {"x": tensor})
    assert await conn.request("count", count, timeout=120) == count
    return count * BULK_BYTES / (time.perf_counter() - start) / 1e6


async def _bulk_bare(port: int, ctx: Any, count: int) -> float:
    payload = np.random.default_rng(0).standard_normal(BULK_BYTES // 4, dtype=np.float32).tobytes()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, limit=2**24)
    start = time.perf_counter()
    writer.write(b"B" + _LEN.pack(count))
    for _ in range(count):
        writer.write(_LEN.pack(len(payload)))
        writer.write(payload)
        await writer.drain()
    assert await reader.readexactly(1) == b"k"
    elapsed = time.perf_counter() - start
    writer.close()
    return count * BULK_BYTES / elapsed / 1e6


def _percentiles(samples: list[float]) -> tuple[float, float]:
    qs = statistics.quantiles(samples, n=100, method="inclusive")
    return statistics.median(samples), qs[98]


async def _rtt_transport(conn: Connection, iters: int) -> tuple[float, float]:
    act = np.random.default_rng(1).standard_normal((1, 4096)).astype(ml_dtypes.bfloat16)
    samples = []
    for i in range(iters + 200):
        start = time.perf_counter()
        out = await conn.request("echo", {"h": act})
        if i >= 200:  # warm-up
            samples.append((time.perf_counter() - start) * 1e6)
    assert out["h"].shape == (1, 4096)
    return _percentiles(samples)


async def _rtt_bare(port: int, ctx: Any, iters: int) -> tuple[float, float]:
    payload = np.random.default_rng(1).standard_normal((1, 4096)).astype(ml_dtypes.bfloat16).tobytes()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    writer.write(b"E")
    samples = []
    for i in range(iters + 200):
        start = time.perf_counter()
        writer.write(_LEN.pack(len(payload)) + payload)
        (size,) = _LEN.unpack(await reader.readexactly(4))
        await reader.readexactly(size)
        if i >= 200:
            samples.append((time.perf_counter() - start) * 1e6)
    writer.close()
    return _percentiles(samples)


async def _client(workdir: Path, ports: dict[str, int], args: argparse.Namespace) -> dict[str, Any]:
    cluster = ClusterKeys.from_secret(parse_secret((workdir / "secret").read_text()))
    key = NodeKey.load(workdir / "client.key")
    transport = Transport(key, cluster, name="bench-client", software_version="bench",
                          keepalive_interval=0, request_timeout=120)
    ctx = client_ssl_context(cluster, key)
    try:
        conn = await transport.connect("127.0.0.1", ports["port"])
        # warm-up both paths once (allocators, TLS session state)
        await _bulk_transport(conn, 2)
        await _bulk_bare(ports["bare_port"], ctx, 2)
        ours, base = [], []
        for _ in range(args.rounds):  # interleaved so background load hits both alike
            base.append(await _bulk_bare(ports["bare_port"], ctx, args.messages))
            ours.append(await _bulk_transport(conn, args.messages))
        rtt = await _rtt_transport(conn, args.rtt_iters)
        base_rtt = await _rtt_bare(ports["bare_port"], ctx, args.rtt_iters)
    finally:
        await transport.close()
    result = {
        "baseline_mb_s": round(max(base), 1),
        "mb_s": round(max(ours), 1),
        "baseline_rtt_us_p50": round(base_rtt[0], 1),
        "baseline_rtt_us_p99": round(base_rtt[1], 1),
        "rtt_us_p50": round(rtt[0], 1),
        "rtt_us_p99": round(rtt[1], 1),
    }
    result["throughput_ratio"] = round(result["mb_s"] / result["baseline_mb_s"], 3)
    result["rtt_p50_ratio"] = round(result["rtt_us_p50"] / result["baseline_rtt_us_p50"], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--messages", type=int, default=24, help="16 MiB messages per throughput round")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds (best is reported)")
    parser.add_argument("--rtt-iters", type=int, default=2000)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    # Logs go to stderr (stdout carries the results), and only warnings.
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    )
    loop_name = _install_loop()
    if args.serve:
        asyncio.run(_serve(args.serve))
        return
    with tempfile.TemporaryDirectory(prefix="bench-transport-") as tmp:
        workdir = Path(tmp)
        (workdir / "secret").write_text(generate_secret())
        NodeKey.generate().save(workdir / "server.key")
        NodeKey.generate().save(workdir / "client.key")
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(workdir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            assert server.stdout is not None
            ports = json.loads(server.stdout.readline())
            result = asyncio.run(_client(workdir, ports, args))
        finally:
            if server.stdin is not None:
                server.stdin.close()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    result["loop"] = loop_name
    if args.json:
        print(json.dumps(result))
        return
    print(f"transport benchmark (loopback, two processes, {loop_name})")
    print(f"{'':24}{'enjambre':>12}{'bare TLS':>12}{'ratio':>8}")
    print(f"{'16 MiB msgs, MB/s':24}{result['mb_s']:>12}{result['baseline_mb_s']:>12}"
          f"{result['throughput_ratio']:>8}   (target >= 0.8)")
    print(f"{'8 KiB RTT p50, us':24}{result['rtt_us_p50']:>12}{result['baseline_rtt_us_p50']:>12}"
          f"{result['rtt_p50_ratio']:>8}   (target <= 2.0)")
    print(f"{'8 KiB RTT p99, us':24}{result['rtt_us_p99']:>12}{result['baseline_rtt_us_p99']:>12}")


if __name__ == "__main__":
    main()
