"""Starting and stopping `caldera serve` for the Python test scripts."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_path():
    models = os.environ.get("CALDERA_MODELS", os.path.join(ROOT, "models"))
    return os.path.join(models, "SmolLM2-135M-Instruct.Q4_1.gguf")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`caldera serve MODEL --backend cpu` on a free port; `args` are extra options."""

    def __init__(self, binary, model, args, api_key=None, log=None):
        self.port = free_port()
        self.api_key = api_key
        cmd = [binary, "serve", model, "--backend", "cpu", "--port", str(self.port)] + args
        if api_key:
            cmd += ["--api-key", api_key]
        self.log = log or open(os.devnull, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"caldera serve exited with {self.proc.returncode}: {cmd}")
            try:
                if self.get("/health")["status"] == "ok":
                    break
            except OSError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError("caldera serve did not come up within 60 s")
            time.sleep(0.1)

    def get(self, path):
        req = urllib.request.Request(self.base + path)
        if self.api_key and path != "/health":
            req.add_header("Authorization", f"Bearer {self.api_key}")
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
        return json.loads(body) if path != "/metrics" else body.decode()

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def default_binary():
    return os.environ.get("CALDERA_BIN", os.path.join(ROOT, "target", "debug", "caldera"))


def require(path, what):
    if not os.path.exists(path):
        sys.exit(f"{what} not found: {path}")
