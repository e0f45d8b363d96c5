"""Which Host and Origin headers the server answers: defence against cross-site requests.

A server on 127.0.0.1 without an API key is reachable by every web page the
user opens: a page on evil.example can POST to http://127.0.0.1:8000 (a
cross-site request the browser sends without asking), or rebind its own DNS
name to 127.0.0.1 so that its scripts read the answers (DNS rebinding). Local
servers such as Ollama refuse both, and so does this one:

    Host     when bound to a loopback address, only localhost, 127.0.0.1 and [::1]
             (any port) and the host names of --allowed-origins (a reverse proxy's
             name) are answered; a rebound name (evil.example) gets 403.
             Bound to a public address (--host 0.0.0.0), or with --allowed-origins "*",
             any Host is answered.
    Origin   a browser's request is answered if it comes from the server's own
             page (same origin), from a loopback origin, or from an origin given
             with --allowed-origins ("*" allows all); anything else gets 403.
             Requests without an Origin (curl, SDKs) are not browser requests
             and pass.

The answer is OpenAI's error shape with status 403.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from scribelm.serve.errors import ApiError

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def host_name(host: str) -> str:
    """'Example.COM:8000' -> 'example.com', '[::1]:80' -> '::1' (a Host header's name, no port)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name.rstrip(".")


def is_loopback_name(name: str) -> bool:
    """localhost, *.localhost (RFC 6761: always this machine) or a loopback IP address."""
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def normalise_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


class HostOriginGuard:
    """ASGI middleware: 403 for requests whose Host or Origin this server must not answer."""

    def __init__(self, app, *, check_host: bool = True, allowed_origins: list[str] | None = None) -> None:
        self.app = app
        self.check_host = check_host
        self.allowed = {normalise_origin(o) for o in allowed_origins or [] if o.strip()}
        # the names the allowed pages are served under may reach us through a local reverse proxy
        self.allowed_hosts = {host_name(urlsplit(o).netloc) for o in self.allowed if urlsplit(o).netloc}

    def refusal(self, host: str | None, origin: str | None) -> ApiError | None:
        if self.check_host and "*" not in self.allowed:
            name = host_name(host) if host is not None else ""
            if not (is_loopback_name(name) or name in self.allowed_hosts):
                shown = (host or "")[:80]
                return ApiError(403, f"Host {shown!r} is not served: this server answers only localhost. To serve it under "
                                     "other names, start it with --host 0.0.0.0 (and --api-key) or --allowed-origins.",
                                code="host_not_allowed")
        if origin is not None and not self.origin_allowed(origin, host):
            return ApiError(403, f"cross-origin requests from {origin[:80]!r} are not allowed; "
                                 f"start the server with --allowed-origins {origin[:80]} to allow them",
                            code="origin_not_allowed")
        return None

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        wanted = normalise_origin(origin)
        if "*" in self.allowed or wanted in self.allowed:
            return True
        parts = urlsplit(wanted)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False  # "null" (sandboxed frames, files) and other schemes
        if host is not None and parts.netloc == host.strip().lower():
            return True  # the server's own page
        return is_loopback_name(host_name(parts.netloc))

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {}
        for key, value in scope.get("headers", []):
            headers.setdefault(key.lower(), value.decode("latin-1"))
        refusal = self.refusal(headers.get(b"host"), headers.get(b"origin"))
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            await refusal.response()(scope, receive, send)
