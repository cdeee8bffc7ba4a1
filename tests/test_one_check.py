"""A request is checked once, where it enters (issue 24): counters planted in every check see
each kind of check exactly once on the way from HTTP to the engine and back.

The kinds: the fields (the body's schema, `schemas.check`, for HTTP; `request.check_fields`
for a Request made in Python), the fit to the model's context (`text.tokenize`, when it
tokenizes) and the fit to the whole KV cache (`continuous.check_fits`, continuous mode). The
engine process is run on a thread of this process, over a real pipe, so that the counters see
its side too."""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import threading
from contextlib import contextmanager

import pytest
from aiohttp.test_utils import TestClient, TestServer
from test_continuous import continuous_app
from test_server import wait_loaded

from labkit.engine import continuous, text
from labkit.engine import request as request_module
from labkit.engine.continuous import ContinuousEngine
from labkit.engine.kv_cache import PagedKVCache
from labkit.engine.llama import Llama
from labkit.engine.request import Request
from labkit.serve import engine_loop, engine_process, schemas
from labkit.serve.backend import ContinuousBackend, ModelBackend
from labkit.serve.http import create_app

PROMPT = "Suggest a skincare routine"
BODIES = {"/generate": {"prompt": PROMPT, "max_tokens": 5, "temperature": 0},
          "/v1/completions": {"prompt": PROMPT, "max_tokens": 5, "temperature": 0,
                              "stream": True, "stream_options": {"include_usage": True}},
          "/v1/chat/completions": {"messages": [{"role": "user", "content": PROMPT}],
                                   "temperature": 0, "stream": True}}


@pytest.fixture
def checks(monkeypatch) -> collections.Counter:
    """Counts of each kind of check, from any thread, as they run."""
    seen: collections.Counter = collections.Counter()
    lock = threading.Lock()

    def counted(kind: str, check, when=lambda *args: True):
        def wrapper(*args, **kwargs):
            if when(*args):
                with lock:
                    seen[kind] += 1
            return check(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(schemas, "check", counted("fields", schemas.check))
    monkeypatch.setattr(request_module, "check_fields",
                        counted("fields", request_module.check_fields))
    monkeypatch.setattr(text, "tokenize", counted(
        "context", text.tokenize, lambda lm, request: request.prompt_ids is None))
    monkeypatch.setattr(continuous, "check_fits", counted("cache", continuous.check_fits))
    return seen


class _EngineThread(threading.Thread):
    """Stands in for the engine's process: the same loop, on a thread."""

    exitcode = 0

    def kill(self) -> None:
        pass


@contextmanager
def engine_process_on_a_thread(lm):
    """An EngineProcessBackend whose engine side (`engine_loop.run_engine`, over a real
    pipe: requests cross as their pickled fields) runs on a thread of this process."""
    cache = PagedKVCache(lm.config, 32, lm.dtype, lm.device)
    model_side = ContinuousBackend(lm, ContinuousEngine(lm, Llama.from_hf(lm.model), cache))
    engine = engine_process.EngineProcess({})
    engine._conn, engine_end = multiprocessing.Pipe()
    engine._process = _EngineThread(target=engine_loop.run_engine,
                                    args=(engine_end, model_side), daemon=True)
    backend = engine_process.EngineProcessBackend(engine, engine.start())
    try:
        yield backend
    finally:
        backend.close()


def post_each(app, checks: collections.Counter) -> dict[str, collections.Counter]:
    """POST each body to `app`; the checks each one took."""
    async def scenario():
        per_path = {}
        async with TestClient(TestServer(app)) as client:
            await wait_loaded(client, timeout=60)
            for path, body in BODIES.items():
                checks.clear()
                response = await client.post(path, json=body)
                assert response.status == 200, await response.text()
                await response.read()
                per_path[path] = collections.Counter(checks)
        return per_path

    return asyncio.run(scenario())


def test_one_check_of_each_kind_with_the_engine_process(lm, checks):
    with engine_process_on_a_thread(lm) as backend:
        per_path = post_each(create_app(lambda: backend, mode="continuous"), checks)
    for path, seen in per_path.items():
        assert seen == {"fields": 1, "context": 1, "cache": 1}, (path, seen)


def test_one_check_of_each_kind_with_the_engine_on_a_thread_of_the_server(lm, checks):
    per_path = post_each(continuous_app(lm), checks)
    for path, seen in per_path.items():
        assert seen == {"fields": 1, "context": 1, "cache": 1}, (path, seen)


def test_one_check_of_each_kind_in_sequential_mode(lm, checks):
    per_path = post_each(create_app(lambda: ModelBackend(lm)), checks)
    for path, seen in per_path.items():
        assert seen == {"fields": 1, "context": 1}, (path, seen)


def test_a_python_caller_is_checked_once_too(lm, checks):
    """Made in Python and added to the engine directly: the fields when it is made, its fit
    when it is added, and nothing more while it runs."""
    cache = PagedKVCache(lm.config, 32, lm.dtype, lm.device)
    engine = ContinuousEngine(lm, Llama.from_hf(lm.model), cache)
    [result] = engine.generate([Request(PROMPT, 5, 0)])
    assert result.tokens_generated == 5
    assert checks == {"fields": 1, "context": 1, "cache": 1}


def test_the_engine_checks_what_was_not_checked_for_its_cache(lm, checks):
    cache = PagedKVCache(lm.config, 32, lm.dtype, lm.device)
    engine = ContinuousEngine(lm, Llama.from_hf(lm.model), cache)
    checked = Request(PROMPT, 5, 0)
    engine.check_fits(checked)
    elsewhere = Request(PROMPT, 5, 0)
    elsewhere.prompt_ids, elsewhere.fits_cache = checked.prompt_ids, cache.tokens * 2
    checks.clear()
    engine.add(checked)
    assert checks == {}  # checked for this cache: taken as it is
    engine.add(elsewhere)
    assert checks == {"cache": 1}  # checked for another cache: checked again
