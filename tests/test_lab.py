"""`make lab` works: JupyterLab serves the tutorials on 127.0.0.1.

Starts ``jupyter lab`` the way the Makefile does (root ``tutorials/``, bound to 127.0.0.1) but headless,
on a free port and with a known token, then fetches the lab page and a notebook through the contents
API, and shuts the server down. Skips only when JupyterLab is not installed (``pip install -e
".[notebooks]"``; the dev extra has it).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("jupyterlab", reason="needs JupyterLab: pip install -e '.[notebooks]' (make lab does)")

pytestmark = pytest.mark.slow  # starting the server takes a few seconds

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "00_manual_backprop.ipynb"
TOKEN = "diffusion-np-test-token"
START_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"token {TOKEN}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_lab_serves_the_tutorials(tmp_path):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "run"),
           "JUPYTER_DATA_DIR": str(tmp_path / "data"), "JUPYTER_PREFER_ENV_PATH": "1"}  # fmt: skip
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip", "127.0.0.1", "--port", str(port),
           f"--ServerApp.token={TOKEN}", "--ServerApp.port_retries=0",
           f"--ServerApp.root_dir={ROOT / 'tutorials'}"]  # fmt: skip
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # containers and CI run as root; `make lab` does the same
    log = tmp_path / "lab.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        status = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"jupyter lab exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                status, _ = _get(f"{base}/api/status", timeout=2)
                if status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert status == 200, f"jupyter lab did not answer within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}"

        status, body = _get(f"{base}/lab")
        assert status == 200, f"/lab answered {status}"
        assert b"JupyterLab" in body or b"jupyter-config-data" in body

        status, body = _get(f"{base}/api/contents/{NOTEBOOK}?content=1")
        assert status == 200, f"/api/contents/{NOTEBOOK} answered {status}: {body[:300]!r}"
        model = json.loads(body)
        assert model["type"] == "notebook" and model["content"]["cells"], "the notebook came back empty"

        request = urllib.request.Request(f"{base}/api/shutdown", method="POST",
                                         headers={"Authorization": f"token {TOKEN}"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=10):
            pass
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
