"""Start a real Milvus server (PyPI `milvus` 2.3.5, "embedded Milvus") as a child process, for tests
and benchmarks on machines without Docker.

Why a separate venv and a subprocess: this repository's top-level `milvus/` package shadows the PyPI
package's import name `milvus`, so `from milvus import default_server` cannot work in the project venv.
Renaming our package would break the project layout, and vendoring the binary is worse. Instead
`scripts/setup_milvus_server.sh` installs `milvus==2.3.5` into `.milvus-server-venv/`, and this module
runs `milvus/_embedded_server_main.py` with that venv's python in isolated mode (`-I`), where `import
milvus` means the PyPI package. The server stays a separate process anyway (it is a Go binary), so
nothing is lost. Every Milvus role advertises 127.0.0.1 and clients connect to 127.0.0.1 only; the
Go roles still *listen* on all interfaces (2.3.5 has no setting for that), so run it inside `unshare -n`
where that matters. With Docker, use docker-compose.milvus.yml instead.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from milvus._embedded_server_main import free_port  # stdlib only; also picks the server's internal ports

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VENV = REPO_ROOT / ".milvus-server-venv"
_MAIN = Path(__file__).resolve().parent / "_embedded_server_main.py"


class MilvusServerUnavailable(RuntimeError):
    """The embedded server cannot start here (not installed, or it failed to come up)."""


def server_python(venv: Path | None = None) -> Path:
    """The python of the server venv (env RAEE_MILVUS_SERVER_VENV overrides the default location)."""
    venv = venv or Path(os.environ.get("RAEE_MILVUS_SERVER_VENV", DEFAULT_VENV))
    return venv / "bin" / "python"


class EmbeddedMilvusServer:
    """A Milvus 2.3.5 standalone server in a child process; `uri` is "http://127.0.0.1:<port>".

    with EmbeddedMilvusServer(data_dir) as server:
        db = ExitDB(server.uri, collection=..., meta=...)
    """

    def __init__(self, data_dir: str | Path, *, port: int | None = None, start_timeout_s: float = 120.0,
                 authorization: bool = False, settings: dict[str, str] | None = None,
                 venv: Path | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.start_timeout_s = start_timeout_s
        self.authorization = authorization  # on: clients need token "root:Milvus" (2.3.5's default root)
        self.settings = dict(settings or {})  # milvus.yaml overrides, "section.key" -> value
        self.python = server_python(venv)
        self._proc: subprocess.Popen[str] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    def start(self) -> EmbeddedMilvusServer:
        """Start the server and block until it answers its health check (about 8-20 s)."""
        if not self.python.exists():
            raise MilvusServerUnavailable(
                f"{self.python} not found; run scripts/setup_milvus_server.sh to install milvus==2.3.5"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [str(self.python), "-I", str(_MAIN), "--data-dir", str(self.data_dir), "--port", str(self.port),
               "--start-timeout-s", str(self.start_timeout_s),
               *(arg for key, value in self.settings.items() for arg in ("--set", f"{key}={value}")),
               *(["--authorization"] if self.authorization else [])]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      cwd=self.data_dir, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s + 10
        assert self._proc.stdout is not None
        tail: list[str] = []
        for line in self._proc.stdout:  # the launcher prints one JSON status line
            line = line.strip()
            tail = [*tail[-4:], line]
            if line.startswith("{"):
                status = json.loads(line)
                if status.get("ready") and status.get("port") not in (None, self.port):
                    self.stop()  # clients would look for it on self.port and never find it
                    raise MilvusServerUnavailable(f"milvus came up on port {status['port']}, not {self.port}")
                if status.get("ready"):
                    return self
                self.stop()
                raise MilvusServerUnavailable(f"milvus server did not start: {status.get('error')}")
            if time.monotonic() > deadline:
                break
        self.stop()
        raise MilvusServerUnavailable(f"milvus server did not start ({' | '.join(tail)}); see {self.logs_dir}")

    def stop(self) -> None:
        """Stop the server (SIGTERM to the launcher, which stops milvus; SIGKILL the group if it hangs)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()

    def cleanup(self) -> None:
        """Stop and delete the data directory."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedMilvusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> int:
    """`python -m milvus.server DATA_DIR [PORT]`: run a server in the foreground until Ctrl-C."""
    data_dir = sys.argv[1] if len(sys.argv) > 1 else "./milvus-server-data"
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 19530
    with EmbeddedMilvusServer(data_dir, port=port) as server:
        print(f"milvus server ready at {server.uri} (data in {server.data_dir}); Ctrl-C stops it", flush=True)
        try:
            while server._proc is not None and server._proc.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
