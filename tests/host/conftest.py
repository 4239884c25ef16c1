"""A real ComfyUI server with this pack loaded, for host tests (skipped unless COMFYUI_PATH is set).

COMFYUI_PATH: a ComfyUI checkout (>= 0.8.0). COMFYUI_PYTHON: the interpreter with ComfyUI's
requirements and this pack's (default: the current one). The pack is linked into a temporary
custom_nodes folder and loaded alone (--disable-all-custom-nodes + whitelist).
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import http.client
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACK_DIR_NAME = "ComfyUI-NVS-under-test"
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")


def pytest_collection_modifyitems(config, items):
    if COMFYUI_PATH:
        return
    skip = pytest.mark.skip(reason="host tests need a real ComfyUI: set COMFYUI_PATH to a ComfyUI checkout "
                                   "(see ../shared/comfy_host/README.md)")
    for item in items:
        if "tests/host/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A client for the local server's HTTP API (loopback only)."""

    def __init__(self, port: int, log_path: Path, output_dir: Path):
        self.port, self.log_path, self.output_dir = port, log_path, output_dir

    def _request(self, method: str, path: str, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"{}")
        finally:
            conn.close()

    def get(self, path: str):
        status, body = self._request("GET", path)
        if status != 200:
            raise ConnectionError(f"GET {path} answered {status}")
        return body

    def post(self, path: str, body: dict):
        return self._request("POST", path, body)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue an API prompt and wait for its history entry."""
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
        if status != 200:
            raise AssertionError(f"prompt rejected ({status}): {json.dumps(body)[:2000]}")
        prompt_id = body["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.5)
        self.post("/interrupt", {})
        raise AssertionError(f"prompt {prompt_id} did not finish within {timeout} s")


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy")
    (base / "custom_nodes").mkdir()
    os.symlink(ROOT, base / "custom_nodes" / PACK_DIR_NAME)
    for sub in ("output", "input", "user"):
        (base / sub).mkdir()
    # The pack's model folders under base/models/nvs/<method>/, where host tests put their tiny models.
    model_keys = "".join(f"  nvs_{m}: models/nvs/{m}/\n" for m in ("viewneti", "nvs_adapter", "genvs", "vivid",
                                                                   "realfusion", "lpips"))
    (base / "extra_model_paths.yaml").write_text(f"nvs_host_test:\n  base_path: {base}\n  custom_nodes: custom_nodes/\n"
                                                 + model_keys)
    port = _free_port()
    log_path = base / "server.log"
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_WAIT_POLICY="PASSIVE")
    cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--extra-model-paths-config", str(base / "extra_model_paths.yaml"),
           "--output-directory", str(base / "output"), "--input-directory", str(base / "input"),
           "--user-directory", str(base / "user"),
           "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK_DIR_NAME]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=COMFYUI_PATH, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ComfyServer(port, log_path, base / "output")
    deadline = time.time() + 300
    while True:
        try:
            server.get("/object_info/NVSCamera")
            break
        except (ConnectionError, OSError):
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise AssertionError(f"ComfyUI did not start; log tail:\n{server.log()[-4000:]}")
            time.sleep(0.5)
    yield server
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    shutil.rmtree(base / "output", ignore_errors=True)
