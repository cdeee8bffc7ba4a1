"""A refused request, and the two shapes its answer takes: the seed's `{"error": message}` and,
on a /v1 path, OpenAI's `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations


class ApiError(Exception):
    """A request the server refuses, with the HTTP status to answer; `param` names the field at
    fault (OpenAI's shape shows it), `code` is OpenAI's machine-readable reason."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message = status, message
        self.param, self.code = param, code
        self.headers = headers or {}


def openai_error(status: int, message: str, param: str | None = None,
                 code: str | None = None) -> dict:
    """OpenAI's error object. `type` is invalid_request_error for a client's mistake (4xx),
    server_error for ours (5xx: loading, shutting down, out of memory, a bug)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def json_type(value) -> str:
    """JSON's name for the type of a decoded value (for messages: "got a JSON array")."""
    if isinstance(value, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string", int: "integer", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def internal_error_message(request_id: str) -> str:
    """A 500's whole message: the details (a traceback) go to the server's log only."""
    return (f"Internal error (request {request_id}); the server's log has the details under "
            "that id. This is a bug in labkit: please report it.")
