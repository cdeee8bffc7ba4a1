"""The API key labkit's clients send: `$OPENAI_API_KEY` (what the OpenAI SDKs and vLLM's
clients read), else `$LABKIT_API_KEY` (what `labkit serve` reads), as `Authorization: Bearer`."""

from __future__ import annotations

import os

API_KEY_ENVS = ("OPENAI_API_KEY", "LABKIT_API_KEY")


def api_key_from_env() -> str | None:
    return next((os.environ[name] for name in API_KEY_ENVS if os.environ.get(name)), None)


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The header that sends `api_key`; none without a key."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}
