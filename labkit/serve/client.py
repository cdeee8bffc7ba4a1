"""A small synchronous HTTP client for notebooks: call an endpoint, get status, JSON and time.
(The load tester uses aiohttp; one-off calls from a cell don't need an event loop.)"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from labkit.measure.auth import api_key_from_env, auth_headers


@dataclass
class Reply:
    status: int
    body: object  # parsed JSON, or the raw text when the body is not JSON
    elapsed_ms: float

    def __repr__(self) -> str:
        return f"{self.status} in {self.elapsed_ms:.1f} ms: {json.dumps(self.body, indent=2)}"


def call(method: str, url: str, payload: object = None, *, data: bytes | None = None,
         content_type: str = "application/json", timeout: float = 300.0) -> Reply:
    """Send one request. `payload` is sent as JSON; `data` sends raw bytes (for bad-input demos).
    HTTP errors are returned as replies, not raised: a 4xx is an answer worth reading. A server
    locked with an API key gets $OPENAI_API_KEY (or $LABKIT_API_KEY) as a Bearer token."""
    if payload is not None:
        data = json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers=auth_headers(api_key_from_env()))
    if data is not None:
        request.add_header("Content-Type", content_type)
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    elapsed = (time.perf_counter() - started) * 1000
    try:
        body = json.loads(raw)
    except ValueError:
        body = raw.decode(errors="replace")
    return Reply(status, body, elapsed)


def get(url: str, **kwargs) -> Reply:
    return call("GET", url, **kwargs)


def post(url: str, payload: object = None, **kwargs) -> Reply:
    return call("POST", url, payload, **kwargs)
