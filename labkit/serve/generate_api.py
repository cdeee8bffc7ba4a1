"""The /generate request contract: which JSON is valid, and the 4xx error for each way it is not.

A body becomes a `labkit.engine.request.Request`, whose own checks say which values are valid.
Every client error is an `ApiError(status, message)`: the server turns it into
`{"error": message}` with that status. Messages say what is wrong and show the valid form.
Unknown fields are rejected (400), so a typo such as `max_token` cannot silently fall back to a
default and skew a measurement.
"""

from __future__ import annotations

from labkit.engine.request import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, InvalidRequest, Request
from labkit.serve import body as json_body
from labkit.serve.errors import ApiError, json_type

MAX_BODY_BYTES = 1024 * 1024  # 1 MiB
DEFAULTS = {"max_tokens": DEFAULT_MAX_TOKENS, "temperature": DEFAULT_TEMPERATURE, "top_p": None,
            "seed": None}
FIELDS = ("prompt", *DEFAULTS)
EXAMPLE = '{"prompt": "Suggest a skincare routine", "max_tokens": 150, "temperature": 0.7}'
VALID_FORM = (f"Send a JSON object like {EXAMPLE}; fields: prompt (required, non-empty string), "
              "max_tokens (integer, default 150), temperature (0 to 2, default 0.7, 0 = greedy), "
              "top_p (in (0, 1], optional), seed (integer, optional).")
ENDPOINTS = "GET /, GET /health, POST /generate, GET /stats, GET /metrics"



def parse_generate_body(body: bytes, max_tokens_limit: int) -> Request:
    """Validate a /generate body (already size-checked) into a Request."""
    try:
        data = json_body.load(body)
    except json_body.BodyError as err:
        raise ApiError(400, f"{err} {VALID_FORM}", err.param) from None
    if not isinstance(data, dict):
        raise ApiError(400, f"Body must be a JSON object, got a JSON {json_type(data)}. "
                            f"{VALID_FORM}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ApiError(400, f"Unknown field(s): {', '.join(map(repr, unknown))}. Valid fields: "
                            f"{', '.join(FIELDS)}. {VALID_FORM}")
    if "prompt" not in data:
        raise ApiError(400, f"Missing field 'prompt'. {VALID_FORM}")
    if not isinstance(data["prompt"], str):
        raise ApiError(400, f"'prompt' must be a string, got a JSON "
                            f"{json_type(data['prompt'])}. {VALID_FORM}")
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

