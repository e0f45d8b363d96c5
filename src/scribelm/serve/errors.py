"""Errors answered in OpenAI's JSON shape.

Every error the API returns, whatever went wrong, has the same body

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

so a client (the `openai` package, LangChain, curl) reads it the same way.
The message is for the person calling: it says what to change, and never
carries server internals (file paths, tracebacks); those go to the server log.
"""

from __future__ import annotations

from starlette.responses import JSONResponse


class ApiError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)
