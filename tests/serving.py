"""A real `scribe serve` server on a loopback port, run in a thread, for the serving tests."""

from __future__ import annotations

import socket
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
    """uvicorn serving `app` on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="error", timeout_graceful_shutdown=2))
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
