"""Who may use the server, and how much of it one client may hold.

- An API key (`labkit serve --api-key`, or `LABKIT_API_KEY`), sent as `Authorization: Bearer KEY`
  as the OpenAI SDKs and vLLM's clients send it, locks every endpoint but the probes (`/` and
  `/health`), which an orchestrator calls without credentials.
- A Host-header allow-list: a server bound to loopback answers only requests addressed to a
  loopback name, so a web page cannot reach it through DNS rebinding (a hostile name that
  resolves to 127.0.0.1 sends its own name as Host).
- Limits on connections: how long a client may take to send its headers or stay idle between
  requests (aiohttp's keep-alive timer runs from the connection's start and is not reset by
  partial headers), how long it may take to send its body (declared as JSON: `read_body`), and
  how many connections are open.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging

from aiohttp import web

from labkit.serve.errors import ApiError

log = logging.getLogger(__name__)

API_KEY_ENV = "LABKIT_API_KEY"  # the server's key, when --api-key is not given
PROBE_PATHS = ("/", "/health")  # open for liveness and readiness probes
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
DEFAULT_IDLE_TIMEOUT_S = 30.0  # headers, and keep-alive idle time between requests
DEFAULT_BODY_TIMEOUT_S = 30.0
DEFAULT_MAX_CONNECTIONS = 2048
FILES_KEPT = 128  # file descriptors left for the model, the engine's pipe, logs and the loop


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind_host: str, extra: list[str] | None = None) -> frozenset[str] | None:
    """The Host names a server bound to `bind_host` answers: loopback names (plus `extra`) for a
    loopback bind; None (any) for another address, unless `extra` names some."""
    names = {name.lower() for name in extra or ()}
    if is_loopback(bind_host):
        return frozenset(LOOPBACK_NAMES | names)
    return frozenset(names) if names else None


def host_name(header: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1', 'Example.com' -> 'example.com'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def middleware(api_key: str | None, hosts: frozenset[str] | None):
    """The aiohttp middleware that applies the key and the Host allow-list."""

    @web.middleware
    async def check_access(request: web.Request, handler):
        if hosts is not None and host_name(request.host) not in hosts:
            raise ApiError(400, f"Host {request.host!r} is not allowed: this server answers "
                                f"requests addressed to {', '.join(sorted(hosts))} (labkit serve "
                                "--allowed-host NAME adds a name).", code="host_not_allowed")
        if api_key and request.path not in PROBE_PATHS and not _has_key(request, api_key):
            raise ApiError(401, "This server needs an API key: send 'Authorization: Bearer KEY' "
                                "(the OpenAI SDKs and labkit loadtest send $OPENAI_API_KEY).",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return check_access


def _has_key(request: web.Request, api_key: str) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # compare_digest: the time taken does not tell how much of a guess was right
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                                api_key.encode())


async def read_body(request: web.Request, timeout_s: float, hint: str = "") -> bytes:
    """The request's body: 415 unless it is declared as JSON (`hint`, what a valid body looks
    like, ends the message), 408 when the client takes longer than `timeout_s` to send it
    (aiohttp's 1 MiB limit answers 413 on its own)."""
    content_type = request.content_type
    if content_type != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got "
                            f"{content_type or 'none'!r}. With curl add "
                            f"-H 'Content-Type: application/json'.{' ' + hint if hint else ''}")
    try:
        return await asyncio.wait_for(request.read(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"The request body did not arrive within {timeout_s:g} s; send it "
                            "whole, at once.") from None


def default_max_connections() -> int:
    """DEFAULT_MAX_CONNECTIONS, or fewer where the process may open fewer files (a container's
    `ulimit -n` is often 1,024): past that limit, accept() fails for everyone."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return DEFAULT_MAX_CONNECTIONS
    return max(1, min(DEFAULT_MAX_CONNECTIONS, soft - FILES_KEPT))


def cap_connections(server: web.Server, limit: int) -> None:
    """Answer 503 and close a connection that would make more than `limit` open at once,
    before it costs a request handler."""
    body = json.dumps({"error": f"Too many connections (this server holds at most {limit}); "
                                "retry shortly."}).encode()
    refusal = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
               b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
               + str(len(body)).encode() + b"\r\n\r\n" + body)
    admit = server.connection_made
    refused = 0

    def connection_made(handler, transport) -> None:
        nonlocal refused
        if len(server.connections) >= limit:
            refused += 1
            if refused == 1 or refused % 1000 == 0:
                log.warning("Connection refused: %d open, the limit (--max-connections); %d "
                            "refused so far", limit, refused)
            transport.write(refusal)
            transport.close()
            return
        admit(handler, transport)

    server.connection_made = connection_made
