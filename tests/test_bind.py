"""`raee serve` binds 127.0.0.1 unless told otherwise: the defaults, and the live proxy's socket."""

from __future__ import annotations

import inspect
import socket
from urllib.parse import urlparse

import psutil
import pytest

from inference_workers import deployment
from tests.figures import report

pytestmark = [pytest.mark.serve, pytest.mark.reliability]


def test_every_entry_point_defaults_to_loopback():
    from orchestration import cli, distributed

    assert deployment.DEFAULT_HOST == "127.0.0.1"
    assert inspect.signature(deployment.start_http).parameters["host"].default == "127.0.0.1"
    assert distributed.ServeOptions().host == "127.0.0.1"
    assert inspect.signature(cli.serve).parameters["host"].default == "127.0.0.1"  # `raee serve` without --host


def test_the_live_proxy_listens_on_loopback_only(serve_url_reused: str):
    """The session's Serve was started by start_http with the default host (tests/fixtures_ray.py)."""
    from ray.serve.context import _get_global_client

    port = urlparse(serve_url_reused).port
    assert urlparse(serve_url_reused).hostname == "127.0.0.1"
    assert _get_global_client().http_config.host == "127.0.0.1"  # what the Serve controller was told
    listening = {c.laddr.ip for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert listening == {"127.0.0.1"}, listening  # not 0.0.0.0 / :: (every interface)
    with socket.create_connection(("127.0.0.1", port), timeout=10):
        pass  # loopback reaches it

    others = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs
              if a.family == socket.AF_INET and not a.address.startswith("127.")}
    for address in others:  # the same port on this machine's other addresses refuses the connection
        with socket.socket() as sock:
            sock.settimeout(2)
            assert sock.connect_ex((address, port)) != 0, f"reachable on {address}:{port}"
    report(f"bind: Serve proxy listens on {sorted(listening)} port {port}; refused on {sorted(others) or 'no'} "
          "other addresses")
