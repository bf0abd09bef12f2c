"""A spinserve HTTP server in a subprocess, for benchmarks and for the server tests.

`ServerProcess` runs `python -c SCRIPT PORT ARGS...` (the script starts uvicorn through
control.server.run_server on 127.0.0.1:PORT, a free loopback port), logs its stdout and stderr
to log_dir/server-PORT.log, is ready once GET /v2/health/ready answers 200, and stops with
SIGTERM (SIGKILL after a timeout). One OpenMP thread in the child: on a few shared cores OpenMP
teams spin against each other. perf/ cannot import tests/, so the test harness
(tests/control/server_harness.py) builds on this module.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 20.0
LOG_TAIL_CHARS = 4000  # of the server log, quoted in start errors


def free_port() -> int:
    """A loopback port free right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`script` reads its port from sys.argv[1] and `args` from sys.argv[2:]."""

    def __init__(
        self,
        script: str,
        args: list[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_dir) / f"server-{self.port}.log"
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, str(self.port), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=child_env,
        )

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Poll /v2/health/ready every 0.1 s; RuntimeError if the server exits first,
        TimeoutError after timeout_s (both quote the end of its log)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/v2/health/ready", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout_s}s:\n{self.log()}")

    def log(self) -> str:
        """The end of the server's log so far."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait, SIGKILL if it hangs; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode
