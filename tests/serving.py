"""A real `scribe serve` server on a loopback port, run in a thread, for the serving tests."""

from __future__ import annotations

import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time

import torch

from tests.conftest import tiny_config


def save_tiny_models(root, tokenizer, *, context_length: int = 256, text_only: bool = False) -> dict[str, str]:
    """Two small chat models that differ (to test switching): alpha (RoPE, RMSNorm), beta (learned positions, LayerNorm).

    text_only: the special tokens' unembedding rows are zero, so their logits are 0 while
    the best other token's is positive: greedy decoding writes text and never ends early."""
    from scribelm.lm import LM
    from scribelm.model import Transformer

    paths = {}
    for name, seed, overrides in (
        ("alpha", 1, dict()),
        ("beta", 2, dict(position="learned", norm="layernorm", activation="gelu", n_kv_heads=4)),
    ):
        torch.manual_seed(seed)
        model = Transformer(tiny_config(context_length=context_length, tie_embeddings=not text_only, **overrides)).eval()
        if text_only:
            with torch.no_grad():
                model.unembedding.weight[sorted(tokenizer.special_ids)] = 0.0
        paths[name] = str(LM(model, tokenizer).save(root / name))
    return paths


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a daemon thread (`config`: more uvicorn.Config options)."""

    def __init__(self, app, **config) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="error", timeout_graceful_shutdown=2, **config))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class ServeProcess:
    """`scribe serve ARGS --port 0` in a child process; its URL is read from the banner it prints.

    `stderr_lines` collects the server's log (model loads, access lines) while it runs."""

    def __init__(self, *args: str, start_timeout: float = 60.0) -> None:
        self.args = [sys.executable, "-m", "scribelm.cli", "serve", *args, "--port", "0", "--threads", "1"]
        self.start_timeout = start_timeout
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self.url = ""

    def _pump(self, stream, lines: list[str], wake: queue.Queue | None) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))
            if wake is not None:
                wake.put(line)
        if wake is not None:
            wake.put(None)

    def __enter__(self) -> "ServeProcess":
        import httpx

        self.process = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})
        banner: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, args=(self.process.stdout, self.stdout_lines, banner), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.process.stderr, self.stderr_lines, None), daemon=True).start()
        deadline = time.monotonic() + self.start_timeout
        while not self.url:
            try:
                line = banner.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.__exit__()
                raise RuntimeError(f"scribe serve did not start: {self.stderr_lines[-5:]}")
            found = re.search(r"at (http://\S+)/v1", line)
            if found:
                self.url = found.group(1)
        assert wait_until(lambda: _healthy(httpx, self.url), timeout=30)
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def _healthy(httpx, url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def run_scribe_serve(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """`scribe serve ARGS` expected to stop by itself (a start-up error): its exit code and output."""
    return subprocess.run([sys.executable, "-m", "scribelm.cli", "serve", *args, "--threads", "1"], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})
