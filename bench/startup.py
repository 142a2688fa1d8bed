"""Start of ``connhex-edge-ota run`` to its first HEAD, and its idle CPU per minute.

A real nats-server and a small HTTP endpoint (answering 204: nothing new) in this
process; the agent runs with ``startup_delay = 0`` so the figure is the process's own
cost (the delay a fleet uses is added on purpose). The baseline is a bare
``python -c pass`` and ``python -c "import requests, nats, pydantic_settings"``:
the interpreter and the libraries a check needs. Idle: CPU-seconds the agent
spends in a window after its first check (heartbeat every 10 s), per minute.
Usage: ``python bench/startup.py [--idle 30]``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from common import (
    RUNS,
    agent_command,
    agent_config,
    bare_agent_env,
    cpu_seconds,
    measure,
    median_usage,
)

from connhex_edge_ota.natsserver import NatsServer


class _Endpoint(BaseHTTPRequestHandler):
    server: _Server

    def do_HEAD(self) -> None:
        self.server.heads.append(time.perf_counter())
        self.server.arrived.set()
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    heads: list[float]
    arrived: threading.Event


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--idle", type=float, default=30.0, help="idle window in seconds")
    args = parser.parse_args()
    http = _Server(("127.0.0.1", 0), _Endpoint)
    http.heads, http.arrived = [], threading.Event()
    threading.Thread(target=http.serve_forever, args=(0.05,), daemon=True).start()
    url = f"http://127.0.0.1:{http.server_address[1]}"
    firsts: list[float] = []
    with NatsServer() as nats, tempfile.TemporaryDirectory(prefix="ota-bench-start-") as tmp:
        config = agent_config(
            Path(tmp) / "agent.toml",
            server_url=url,
            init_id="bench-device",
            install_dir=Path(tmp) / "opt",
            nats_url=nats.url,
            startup_delay="0s",
            heartbeat_interval="10s",
        )
        idle_cpu = 0.0
        for run in range(RUNS):
            http.heads.clear()
            http.arrived.clear()
            started = time.perf_counter()
            agent = subprocess.Popen(
                agent_command(config), stderr=subprocess.DEVNULL, env=bare_agent_env()
            )
            try:
                if not http.arrived.wait(30):
                    raise SystemExit("bench: the agent sent no HEAD within 30 s")
                firsts.append(http.heads[0] - started)
                if run == RUNS - 1:
                    time.sleep(1.0)  # let the first round and its status settle
                    before = cpu_seconds(agent.pid)
                    time.sleep(args.idle)
                    idle_cpu = (cpu_seconds(agent.pid) - before) * 60 / args.idle
            finally:
                agent.terminate()
                agent.wait(10)
    http.shutdown()
    bare = median_usage(lambda: measure([sys.executable, "-c", "pass"]))
    libs = median_usage(
        lambda: measure([sys.executable, "-c", "import requests, nats, pydantic_settings"])
    )
    first = statistics.median(firsts)
    print(f"start of `run` to its first HEAD (median of {RUNS}): {first:.3f} s")
    print(
        f"  baselines: python -c pass {bare.wall:.3f} s ({first / bare.wall:.1f}x); "
        f"importing requests+nats+pydantic_settings {libs.wall:.3f} s "
        f"({first / libs.wall:.1f}x)"
    )
    print(
        f"idle CPU, heartbeat 10 s, over {args.idle:.0f} s: {idle_cpu:.4f} CPU-s per minute "
        f"(goal 0.05)"
    )


if __name__ == "__main__":
    main()
