"""perf/serve_harness.py with stand-in servers (no engine): readiness, early exit, stop."""

from __future__ import annotations

import httpx
import pytest

from spinserve.perf.serve_harness import ServerProcess

# answers 503 to the first `not_ready` probes of /v2/health/ready, then 200; echoes argv on /argv
READY_SCRIPT = """
import http.server, json, os, sys
port, not_ready = int(sys.argv[1]), int(sys.argv[2])
probes = [0]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/v2/health/ready":
            probes[0] += 1
            code, body = (503 if probes[0] <= not_ready else 200), b"{}"
        else:
            code = 200
            body = json.dumps({"argv": sys.argv[1:], "omp": os.environ["OMP_NUM_THREADS"]}).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
print("serving", port, flush=True)
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def test_ready_after_probes_then_stopped_by_sigterm(tmp_path):
    srv = ServerProcess(READY_SCRIPT, ["3", "extra"], log_dir=tmp_path)
    try:
        srv.wait_ready(30)
        info = httpx.get(f"{srv.base_url}/argv", timeout=5).json()
        assert info == {"argv": [str(srv.port), "3", "extra"], "omp": "1"}
        assert httpx.get(f"{srv.base_url}/v2/health/ready", timeout=5).status_code == 200
    finally:
        code = srv.stop()
    assert code == -15  # SIGTERM (the stand-in installs no handler)
    assert srv.log_path == tmp_path / f"server-{srv.port}.log"
    assert f"serving {srv.port}" in srv.log()


def test_early_exit_raises_with_the_log(tmp_path):
    script = "import sys; print('boom: bad engine', sys.argv[2]); sys.exit(3)"
    srv = ServerProcess(script, ["folder-x"], log_dir=tmp_path)
    with pytest.raises(RuntimeError, match=r"server exited \(3\):\nboom: bad engine folder-x"):
        srv.wait_ready(30)
    assert srv.stop() == 3


def test_not_ready_in_time_raises_timeout(tmp_path):
    srv = ServerProcess(READY_SCRIPT, ["1000000"], log_dir=tmp_path)
    try:
        with pytest.raises(TimeoutError, match="not ready after 1.5s"):
            srv.wait_ready(1.5)
        assert srv.proc.poll() is None  # still running: stop() ends it
    finally:
        assert srv.stop() == -15
