"""One log line and one metrics count per request, for every route and every outcome.

    127.0.0.1:51234 "POST /v1/chat/completions" 200 1.204s model=my-chat tokens=31+64

The line is written when the response is complete (for a stream, when its
last event went out or the client left), to the `scribelm.serve.access`
logger; `scribe serve` prints it on stderr. Handlers add the model and token
counts through `request.state.model` and `request.state.tokens`. The path is
written with control and non-ASCII characters escaped, so a client cannot
forge log lines.
"""

from __future__ import annotations

import logging
import time

from scribelm.serve.metrics import Metrics

access_log = logging.getLogger("scribelm.serve.access")


def printable(text: str, limit: int = 200) -> str:
    shown = ascii(text)[1:-1].replace('"', '\\"')
    return shown if len(shown) <= limit else shown[:limit] + "..."


class AccessLog:
    """ASGI middleware: count each request in `metrics` and log it when it is done."""

    def __init__(self, app, *, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 0

        async def watched_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        finally:
            shown_status = status or 500
            self.metrics.count_request(scope.get("path", ""), shown_status)
            if access_log.isEnabledFor(logging.INFO):
                state = scope.get("state") or {}
                client = scope.get("client")
                where = f"{client[0]}:{client[1]}" if client else "-"
                extra = ""
                if state.get("model"):
                    extra += f" model={printable(str(state['model']), 100)}"
                if state.get("tokens"):
                    extra += f" tokens={state['tokens'][0]}+{state['tokens'][1]}"
                access_log.info('%s "%s %s" %d %.3fs%s', where, scope.get("method", "-"),
                                printable(scope.get("path", "")), shown_status, time.monotonic() - started, extra)
