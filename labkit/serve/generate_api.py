"""The /generate request contract: which JSON is valid, and the 4xx error for each way it is not.

A body becomes a `labkit.engine.request.Request`, whose own checks say which values are valid.
Every client error is an `ApiError(status, message)`: the server turns it into
`{"error": message}` with that status. Messages say what is wrong and show the valid form.
Unknown fields are rejected (400), so a typo such as `max_token` cannot silently fall back to a
default and skew a measurement.
"""

from __future__ import annotations

import json

from labkit.engine.request import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, InvalidRequest, Request

MAX_BODY_BYTES = 1024 * 1024  # 1 MiB
DEFAULTS = {"max_tokens": DEFAULT_MAX_TOKENS, "temperature": DEFAULT_TEMPERATURE, "top_p": None,
            "seed": None}
FIELDS = ("prompt", *DEFAULTS)
EXAMPLE = '{"prompt": "Suggest a skincare routine", "max_tokens": 150, "temperature": 0.7}'
VALID_FORM = (f"Send a JSON object like {EXAMPLE}; fields: prompt (required, non-empty string), "
              "max_tokens (integer, default 150), temperature (0 to 2, default 0.7, 0 = greedy), "
              "top_p (in (0, 1], optional), seed (integer, optional).")
ENDPOINTS = "GET /, GET /health, POST /generate, GET /stats, GET /metrics"


class ApiError(Exception):
    """A request the server refuses, with the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def check_content_type(content_type: str) -> None:
    if content_type != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got "
                            f"{content_type or 'none'!r}. With curl add "
                            f"-H 'Content-Type: application/json'. {VALID_FORM}")


def parse_generate_body(body: bytes, max_tokens_limit: int) -> Request:
    """Validate a /generate body (already size-checked) into a Request."""
    try:
        text = body.decode("utf-8")  # explicit: json.loads(bytes) would also guess UTF-16/32
    except UnicodeDecodeError:
        raise ApiError(400, f"Body is not UTF-8 text. {VALID_FORM}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ApiError(400, f"Body is not valid JSON ({err}). {VALID_FORM}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"Body must be a JSON object, got a JSON {_json_type(data)}. "
                            f"{VALID_FORM}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ApiError(400, f"Unknown field(s): {', '.join(map(repr, unknown))}. Valid fields: "
                            f"{', '.join(FIELDS)}. {VALID_FORM}")
    if "prompt" not in data:
        raise ApiError(400, f"Missing field 'prompt'. {VALID_FORM}")
    if not isinstance(data["prompt"], str):
        raise ApiError(400, f"'prompt' must be a string, got a JSON "
                            f"{_json_type(data['prompt'])}. {VALID_FORM}")
    # A server started with a limit below the default answers field-less requests at its limit.
    defaults = {**DEFAULTS, "max_tokens": min(DEFAULT_MAX_TOKENS, max_tokens_limit)}
    limit = (f"This server accepts max_tokens from 1 to {max_tokens_limit} (labkit serve "
             "--max-tokens-limit).")
    try:
        request = Request(**{**defaults, **data})
    except InvalidRequest as err:
        hint = limit if "max_tokens" in str(err) else VALID_FORM
        raise ApiError(400, f"{err}. {hint}") from None
    if request.max_tokens > max_tokens_limit:
        raise ApiError(400, f"max_tokens {request.max_tokens} is over this server's limit. "
                            f"{limit}")
    return request


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def error_body(message: str, **extra) -> str:
    return json.dumps({"error": message, **extra})
