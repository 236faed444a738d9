"""The splice's per-flow set-up and tear-down, timed in one process: a micro-benchmark.

Run as ``python -m nodeproxy_dev.bench.splicesetup [--flows N]`` (root; under the bench
lock).  Loads the real programs (the loading child, iptables mode's set, on a bpffs of
its own), opens 2N loopback connections through uvloop, and for each pair of the
transports' sockets does what the splicer does per flow: `send_state` of both sockets,
`SpliceMaps.join`, a counter read of each, `release`.  Prints the median and mean time
per flow.  Run it with another tree on PYTHONPATH (and NODEPROXY_BPF_DIR) to compare.
Everything it made is gone at the end (connections, programs, maps, the bpffs mount).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

CREDIT = 8 * 1024 * 1024


class _Accepted(asyncio.Protocol):
    def __init__(self, accepted: list[asyncio.BaseTransport]):
        self.accepted = accepted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.accepted.append(transport)


async def _time_flows(maps: object, flows: int) -> list[float]:
    from nodeproxy.capture.splice import SpliceMaps
    from nodeproxy.tcp.send_state import send_state

    loop = asyncio.get_running_loop()
    accepted: list[asyncio.BaseTransport] = []
    server = await loop.create_server(lambda: _Accepted(accepted), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    made: list[asyncio.BaseTransport] = []
    try:
        for _ in range(2 * flows):
            transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
            made.append(transport)
        splice = SpliceMaps(maps)  # type: ignore[arg-type]
        times = []
        for k in range(flows):
            a = made[2 * k].get_extra_info("socket")
            b = made[2 * k + 1].get_extra_info("socket")
            started = time.perf_counter()
            send_state(a)
            send_state(b)
            ca, cb = splice.join(a, b, CREDIT)
            splice.counters(ca)
            splice.counters(cb)
            splice.release(ca, cb)
            times.append(time.perf_counter() - started)
        return times
    finally:
        for transport in made + accepted:
            transport.close()
        server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodeproxy_dev.bench.splicesetup",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--flows", type=int, default=500)
    args = parser.parse_args(argv)
    if not 1 <= args.flows <= 5000:
        parser.error("--flows 1..5000")
    import uvloop

    from nodeproxy.capture import kernelfs, load_child
    from nodeproxy.capture.map_access import MapSet

    root = tempfile.mkdtemp(prefix="nodeproxy-splicesetup-")
    kernelfs.mount_bpffs(root)
    try:
        os.mkdir(os.path.join(root, "maps"))
        loaded = load_child.load_in_child(load_child.LoadRequest(
            maps_dir=os.path.join(root, "maps"), mode="iptables", outbound_port=15001,
            inbound_port=15006, hbone_port=15008))
        maps = MapSet(loaded.maps)
        try:
            times = uvloop.run(_time_flows(maps, args.flows))
        finally:
            maps.close()
            for fd in loaded.programs.values():
                os.close(fd)
    finally:
        kernelfs.unmount(root)
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"flows": len(times),
                      "median_us": round(statistics.median(times) * 1e6, 1),
                      "mean_us": round(statistics.mean(times) * 1e6, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
