"""Entry point run by `.milvus-server-venv/bin/python -I` to start the PyPI `milvus` 2.3.5 server.

Not imported by raee: this file executes inside the separate server venv, where `import milvus` means
the PyPI package (the embedded Milvus standalone binary), not this repo's `milvus/` package. `-I`
(isolated mode) keeps this directory and the working directory off sys.path, which is what makes that
import resolve to the right package. Started and stopped by `milvus.server.EmbeddedMilvusServer`.

Every role binds its advertised address to 127.0.0.1; the proxy listens on `--port`. The launcher
prints one JSON line `{"ready": true, "port": ...}` once /healthz answers, then waits for SIGTERM or
for its parent to die (so a killed test session never leaves a server behind).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sys
import time
import urllib.error
import urllib.request

_ROLES = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord", "dataNode")


_PORT_FLOOR = 20000  # Ray's worker ports are 10002-19999 by default
_given: set[int] = set()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A loopback port free now, below the kernel's ephemeral range where one exists.

    The server binds its ports seconds after they are chosen. A port from the ephemeral range can meanwhile
    become the source port of any outgoing connection on the machine (Ray starting beside a test session did
    that: "bind: address already in use"); ports below that range are only taken by explicit binds."""
    low = _ephemeral_low()
    candidates = [p for p in random.sample(range(_PORT_FLOOR, low), min(200, low - _PORT_FLOOR))
                  if p not in _given] if low > _PORT_FLOOR + 1000 else []
    for port in candidates:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    with socket.socket() as sock:  # no room below the ephemeral range: any free port
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _use_private_etcd_ports(server: object, data_dir: str) -> None:
    """Give the embedded etcd free loopback ports: its peer port 2380 is fixed in 2.3.5's template,
    so a second server on the same machine would otherwise fail to start."""
    client_port, peer_port = free_port(), free_port()
    etcd_yaml = os.path.join(data_dir, "embed-etcd.yaml")
    os.makedirs(data_dir, exist_ok=True)
    with open(etcd_yaml, "w", encoding="utf-8") as f:
        f.write(
            "name: default\n"
            f"listen-client-urls: http://127.0.0.1:{client_port}\n"
            f"advertise-client-urls: http://127.0.0.1:{client_port}\n"
            f"listen-peer-urls: http://127.0.0.1:{peer_port}\n"
            f"initial-advertise-peer-urls: http://127.0.0.1:{peer_port}\n"
            f"initial-cluster: default=http://127.0.0.1:{peer_port}\n"
        )
    server.config.configs["etcd_port"] = client_port
    # The other roles' ports default to fixed numbers (53100, 19529, ...); take free ones so that two
    # servers (tests and a benchmark) can run side by side.
    for key in list(server.config_keys):
        if key.endswith("_port") and key not in ("proxy_port", "etcd_port"):
            server.config.configs[key] = free_port()
    server.webservice_port = free_port()
    server.config.template_text = server.config.template_text.replace(
        "  use:\n    embed: true", f"  config:\n    path: {etcd_yaml}\n  use:\n    embed: true", 1
    )


def _pin_proxy_port(server: object, port: int) -> None:
    """Listen on exactly `port`, also right after a restart on it.

    The package treats the proxy port as a *start* for a free-port search and probes ports with a plain
    bind, which fails while the previous server's connections sit in TIME_WAIT (60 s): a restarted
    server would silently move to port + 1 and its clients would never find it. Pin the port and probe
    with SO_REUSEADDR, which is how the Go binary itself binds."""
    config = server.config
    config.configs["proxy_port"] = port

    def try_bind_port(candidate: int) -> object:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", candidate))
            sock.listen()
            return sock
        except OSError:
            sock.close()
            return None

    config.try_bind_port = try_bind_port


def _wait_healthy(server: object, timeout_s: float) -> None:
    """Poll /healthz like MilvusServer.wait_started, but give up as soon as the binary exits."""
    url = f"http://127.0.0.1:{server.webservice_port}/healthz"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.server_proc.poll() is not None:
            raise RuntimeError(f"milvus exited with code {server.server_proc.returncode}; see {_logs_dir(server)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if b"OK" in resp.read():
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"milvus not healthy after {timeout_s:.0f} s; see {_logs_dir(server)}")


def _logs_dir(server: object) -> str:
    return os.path.join(server.config.base_data_dir, "logs")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--authorization", action="store_true")
    parser.add_argument("--start-timeout-s", type=float, default=120.0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a milvus.yaml key of the 2.3.5 template, e.g. proxy.maxTaskNum=2048")
    args = parser.parse_args()

    from milvus import MilvusServer, MilvusServerConfig  # the PyPI package, thanks to -I

    server = MilvusServer(MilvusServerConfig(), wait_for_started=False)
    server.set_base_dir(args.data_dir)
    _use_private_etcd_ports(server, args.data_dir)
    _pin_proxy_port(server, args.port)
    for role in _ROLES:
        server.config.set(f"{role}.ip", "127.0.0.1")
    for item in args.set:
        key, _, value = item.partition("=")
        server.config.set(key, value)
    if args.authorization:
        server.config.set("authorization_enabled", True)

    stopping = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    parent = os.getppid()
    try:
        server.start()
        _wait_healthy(server, args.start_timeout_s)
    except (TimeoutError, RuntimeError) as exc:
        print(json.dumps({"ready": False, "error": str(exc)}), flush=True)
        server.stop()
        return 1
    print(json.dumps({"ready": True, "port": server.listen_port, "pid": server.server_proc.pid}), flush=True)
    while not stopping and os.getppid() == parent and server.server_proc.poll() is None:
        time.sleep(0.2)
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
