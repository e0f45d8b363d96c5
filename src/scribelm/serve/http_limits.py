"""Connection limits uvicorn does not have: a deadline for a request's headers.

uvicorn closes a kept-alive connection that stays silent, but a client that
sends a header byte now and then ("slowloris") resets that timer forever,
and a fresh connection that never completes its headers has no timer at all:
each one holds a socket and a little memory, and enough of them exhaust the
server. `HeaderDeadlineH11Protocol` gives every request `header_seconds` from
the moment the server waits for it (connection opened, or previous response
complete) to the end of its headers, and closes the connection otherwise.

    config = uvicorn.Config(app, http=HeaderDeadlineH11Protocol, timeout_keep_alive=5,
                            h11_max_incomplete_event_size=16 * 1024)
"""

from __future__ import annotations

import asyncio
import socket

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_HEADER_SECONDS = 10.0
MAX_HEADER_BYTES = 16 * 1024  # request line and headers; a longer head is refused (431)


def _send_without_delay(transport: asyncio.Transport) -> None:
    """TCP_NODELAY on the connection. A response goes out as several writes (head, then body or
    stream chunks); with Nagle's algorithm on, each write after the first waits for the client's
    acknowledgement of the last, which clients delay by up to 40 ms: every request on a kept-alive
    connection took 40 ms more. asyncio sets the option only on sockets whose protocol number is
    TCP's, which a listening socket made with socket.socket() (as `scribe serve` makes) is not."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # a socket that refuses it still works, only slower


class HeaderDeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for each request's headers."""

    header_seconds = DEFAULT_HEADER_SECONDS

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        _send_without_delay(transport)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._arm_header_deadline()

    def _arm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        self._header_deadline = self.loop.call_later(self.header_seconds, self._header_deadline_passed)

    def _header_deadline_passed(self) -> None:
        self._header_deadline = None
        # their_state IDLE: the request line and headers are not complete yet
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_deadline()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None
        super().connection_lost(exc)


def server_limits(header_seconds: float = DEFAULT_HEADER_SECONDS) -> dict:
    """uvicorn.Config keyword arguments that bound what one connection can hold."""
    protocol = type("HeaderDeadline", (HeaderDeadlineH11Protocol,), {"header_seconds": header_seconds})
    return dict(http=protocol, timeout_keep_alive=5, h11_max_incomplete_event_size=MAX_HEADER_BYTES)
