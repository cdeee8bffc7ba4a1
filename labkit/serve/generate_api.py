"""The /generate request contract: which JSON is valid, and the 4xx error for each way it is not.

A body is checked once, against its schema (`labkit.serve.schemas.GenerateBody`, whose fields
have the types a `labkit.engine.request.Request` checks), and becomes a Request made with
`checked=True`. Every client error is an `ApiError(status, message)`: the server turns it into
`{"error": message}` with that status. Messages say what is wrong and show the valid form.
Unknown fields are rejected (400), so a typo such as `max_token` cannot silently fall back to a
default and skew a measurement.
"""

from __future__ import annotations

from pydantic import ValidationError

from labkit.engine.request import Request, field_error
from labkit.serve import schemas
from labkit.serve.errors import ApiError, json_type

MAX_BODY_BYTES = 1024 * 1024  # 1 MiB
FIELDS = tuple(schemas.GenerateBody.model_fields)
EXAMPLE = '{"prompt": "Suggest a skincare routine", "max_tokens": 150, "temperature": 0.7}'
VALID_FORM = (f"Send a JSON object like {EXAMPLE}; fields: prompt (required, non-empty string), "
              "max_tokens (integer, default 150), temperature (0 to 2, default 0.7, 0 = greedy), "
              "top_p (in (0, 1], optional), seed (integer, optional).")
ENDPOINTS = "GET /, GET /health, POST /generate, GET /stats, GET /metrics"


def parse_generate_body(body: bytes, max_tokens_limit: int) -> Request:
    """A /generate body (already size-checked) as a Request, checked once against its schema
    (the server's max_tokens limit included)."""
    try:
        data = schemas.load(body)
    except schemas.BodyError as err:
        raise ApiError(400, f"{err} {VALID_FORM}", err.param) from None
    try:
        checked = schemas.check(schemas.GenerateBody, data, max_tokens_limit=max_tokens_limit)
    except ValidationError as err:
        raise refusal(err.errors(include_url=False), data, max_tokens_limit) from None
    return Request(checked.prompt, checked.max_tokens_within(max_tokens_limit),
                   checked.temperature, checked.top_p, checked.seed, checked=True)


def refusal(errors: list[dict], data, max_tokens_limit: int) -> ApiError:
    """The 400 for a body the schema refused: every unknown field, else the first problem."""
    unknown = sorted(e["loc"][0] for e in errors if e["type"] == "extra_forbidden")
    if unknown:
        return ApiError(400, f"Unknown field(s): {', '.join(map(repr, unknown))}. Valid fields: "
                             f"{', '.join(FIELDS)}. {VALID_FORM}")
    error = errors[0]
    limit = (f"This server accepts max_tokens from 1 to {max_tokens_limit} (labkit serve "
             "--max-tokens-limit).")
    if error["type"] == "over_limit":
        return ApiError(400, f"max_tokens {error['ctx']['value']} is over this server's limit. "
                             f"{limit}")
    if not error["loc"]:
        return ApiError(400, f"Body must be a JSON object, got a JSON {json_type(data)}. "
                             f"{VALID_FORM}")
    name = error["loc"][0]
    if name == "prompt" and error["type"] == "missing":
        return ApiError(400, f"Missing field 'prompt'. {VALID_FORM}")
    if name == "prompt" and error["type"].endswith("_type"):
        return ApiError(400, f"'prompt' must be a string, got a JSON "
                             f"{json_type(data['prompt'])}. {VALID_FORM}")
    return ApiError(400, f"{field_error(error)}. {limit if name == 'max_tokens' else VALID_FORM}")
