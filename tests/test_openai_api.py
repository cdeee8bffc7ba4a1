"""The OpenAI-compatible API of `labkit serve`: /v1/models, /v1/completions and
/v1/chat/completions, streamed and not.

Two halves. The official `openai` SDK drives a real `labkit serve` on the embedded model (one
server for the module): greedy streams add up to the non-streamed text, usage counts what the
server generated, stop strings end the text. The stub model (tests/stub_backend.py) behind the
real app checks the rest exactly: the SSE bytes, every refused input in OpenAI's error shape,
a disconnect that stops the generation, stop strings held back across tokens, batched mode.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families
from stub_backend import StubBackend, held_loader
from test_server import serving, stats, wait_for, wait_loaded

from labkit.engine.request import OutOfMemory, PromptTooLong
from labkit.serve.http import STATE, create_app
from labkit.serve.launcher import launch

openai = pytest.importorskip("openai")  # a dev dependency: absent on the GPU machine

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
PROMPT = "Suggest a skincare routine for dry skin"
MESSAGES = [{"role": "system", "content": "You give short answers."},
            {"role": "user", "content": "Suggest a skincare routine for dry skin"}]
STUB_ID = "stub"  # the stub's display name up to " ("


# --- the official SDK against a real server on the embedded model -----------------------------

@pytest.fixture(scope="module")
def srv():
    with launch(model="model", warmup=0) as server:
        yield server


@pytest.fixture(scope="module")
def sdk(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


def generated_tokens(srv) -> float:
    """The server's own count of generated tokens so far (GET /metrics)."""
    with urllib.request.urlopen(srv.url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "labkit_generation_tokens_total":
                return sample.value
    raise AssertionError("no labkit_generation_tokens_total in /metrics")


def test_models_lists_the_served_model(sdk):
    [model] = sdk.models.list().data
    assert model.id == "model" and model.object == "model" and model.owned_by == "labkit"
    assert isinstance(model.created, int) and model.created <= time.time()


def test_completions_greedy_stream_adds_up_to_the_text_and_usage_counts_the_tokens(srv, sdk):
    before = generated_tokens(srv)
    whole = sdk.completions.create(model="model", prompt=PROMPT, max_tokens=24, temperature=0)
    [choice] = whole.choices
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.model == "model" and choice.text and choice.finish_reason in ("stop", "length")
    usage = whole.usage
    assert usage.completion_tokens == generated_tokens(srv) - before
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens > len(PROMPT.split()) // 2
    if choice.finish_reason == "length":
        assert usage.completion_tokens == 24

    before = generated_tokens(srv)
    chunks = list(sdk.completions.create(model="model", prompt=PROMPT, max_tokens=24,
                                         temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    *text_chunks, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage == usage
    assert "".join(c.choices[0].text for c in text_chunks) == choice.text
    assert len(text_chunks) > 3  # piece by piece, not one block
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == choice.finish_reason
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("cmpl-")
    assert generated_tokens(srv) - before == usage.completion_tokens


def test_chat_greedy_stream_adds_up_to_the_message(sdk):
    whole = sdk.chat.completions.create(model="model", messages=MESSAGES, temperature=0,
                                        max_completion_tokens=30)
    [choice] = whole.choices
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert whole.usage.completion_tokens <= 30

    chunks = list(sdk.chat.completions.create(model="model", messages=MESSAGES, temperature=0,
                                              max_completion_tokens=30, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_chat_without_max_tokens_answers_within_the_context(sdk):
    reply = sdk.chat.completions.create(model="model", messages=MESSAGES, temperature=0)
    assert reply.choices[0].message.content
    assert reply.usage.total_tokens <= 1024  # the embedded model's context


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_ends_the_text_and_the_generation(sdk, stream):
    full = sdk.completions.create(model="model", prompt=PROMPT, max_tokens=40, temperature=0)
    text = full.choices[0].text
    words = text.split()
    assert len(words) > 6, text
    stop = words[len(words) // 2]
    expected = text[:text.index(stop)]
    if stream:
        chunks = list(sdk.completions.create(model="model", prompt=PROMPT, max_tokens=40,
                                             temperature=0, stop=[stop, "never-seen-xyz"],
                                             stream=True, stream_options={"include_usage": True}))
        got = "".join(c.choices[0].text for c in chunks if c.choices)
        reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        usage = chunks[-1].usage
    else:
        reply = sdk.completions.create(model="model", prompt=PROMPT, max_tokens=40,
                                       temperature=0, stop=stop)
        got, reason, usage = reply.choices[0].text, reply.choices[0].finish_reason, reply.usage
    assert got == expected and reason == "stop"
    assert usage.completion_tokens < full.usage.completion_tokens  # the generation stopped


def test_the_sdk_sees_openai_errors(sdk):
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.completions.create(model="model", prompt=PROMPT, n=2)
    assert bad.value.param == "n" and bad.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert missing.value.code == "model_not_found" and "gpt-4o" in missing.value.message
    with pytest.raises(openai.BadRequestError) as over:
        sdk.completions.create(model="model", prompt=PROMPT, max_tokens=5000)
    assert over.value.param == "max_tokens" and "--max-tokens-limit" in over.value.message
    assert sdk.completions.create(model="model", prompt=PROMPT, max_tokens=2).choices


# --- the stub model behind the real app --------------------------------------------------------

def frames(body: bytes) -> list[bytes]:
    """The SSE frames of a body, each `data: ...\\n\\n`; nothing else may be in it."""
    parts = body.split(b"\n\n")
    assert parts[-1] == b"", body
    assert all(p.startswith(b"data: ") and b"\n" not in p for p in parts[:-1]), body
    return [p + b"\n\n" for p in parts[:-1]]


def events(body: bytes) -> list[dict]:
    return [json.loads(f[len(b"data: "):]) for f in frames(body)[:-1]]


def test_completion_stream_bytes():
    async def scenario():
        async with serving() as client:
            response = await client.post(COMPLETIONS, json={
                "model": STUB_ID, "prompt": "hi there", "max_tokens": 3, "stream": True,
                "stream_options": {"include_usage": True}})
            assert response.status == 200
            assert response.headers["Content-Type"] == "text/event-stream"
            assert response.headers["Cache-Control"] == "no-cache"
            return await response.read()

    body = asyncio.run(scenario())
    first = events(body)[0]
    head = f'"id":"{first["id"]}","object":"text_completion","created":{first["created"]}'
    assert first["id"].startswith("cmpl-")

    def text(piece: str, reason: str = "null") -> str:
        return (f'data: {{{head},"model":"stub","choices":[{{"index":0,"text":"{piece}",'
                f'"logprobs":null,"finish_reason":{reason}}}],"usage":null}}\n\n')

    expected = (text("word0 ") + text("word1 ") + text("word2 ") + text("", '"length"')
                + f'data: {{{head},"model":"stub","choices":[],"usage":{{"prompt_tokens":2,'
                  '"completion_tokens":3,"total_tokens":5}}\n\n'
                + "data: [DONE]\n\n")
    assert body.decode() == expected
    assert frames(body)[-1] == b"data: [DONE]\n\n"


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_continuous_usage_stats_puts_the_counts_so_far_in_every_chunk(path):
    """vLLM's stream_options.continuous_usage_stats, which benchmark clients (GuideLLM) send:
    with include_usage, every chunk carries the counts so far; without it, none does."""
    prompt = {"prompt": "hi there"} if path == COMPLETIONS else {
        "messages": [{"role": "user", "content": "hi there"}]}

    async def scenario(options):
        async with serving() as client:
            response = await client.post(path, json={**prompt, "max_tokens": 3, "stream": True,
                                                      "stream_options": options})
            assert response.status == 200
            return events(await response.read())

    chunks = asyncio.run(scenario({"include_usage": True, "continuous_usage_stats": True}))
    *text_chunks, final = chunks
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 3
    prompt_tokens = final["usage"]["prompt_tokens"]
    counts = [c["usage"]["completion_tokens"] for c in text_chunks]
    expected = [1, 2, 3, 3] if path == COMPLETIONS else [0, 1, 2, 3, 3]  # chat: role first
    assert counts == expected
    assert all(c["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                              "total_tokens": prompt_tokens + n}
               for c, n in zip(text_chunks, counts, strict=True))
    alone = asyncio.run(scenario({"continuous_usage_stats": True}))
    assert all("usage" not in c for c in alone)


def test_chat_stream_bytes_without_usage():
    async def scenario():
        async with serving() as client:
            response = await client.post(CHAT, json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                "stream": True})
            assert response.status == 200
            return await response.read()

    body = asyncio.run(scenario())
    first = events(body)[0]
    assert first["id"].startswith("chatcmpl-")
    head = (f'"id":"{first["id"]}","object":"chat.completion.chunk","created":'
            f'{first["created"]},"model":"stub"')

    def chunk(delta: str, reason: str = "null") -> str:
        return (f'data: {{{head},"choices":[{{"index":0,"delta":{delta},"logprobs":null,'
                f'"finish_reason":{reason}}}]}}\n\n')

    expected = (chunk('{"role":"assistant","content":""}') + chunk('{"content":"word0 "}')
                + chunk('{"content":"word1 "}') + chunk("{}", '"length"') + "data: [DONE]\n\n")
    assert body.decode() == expected


def test_non_streaming_answers_and_what_reaches_the_model():
    backend = StubBackend()

    async def scenario():
        async with serving(backend, max_tokens_limit=64) as client:
            plain = await (await client.post(COMPLETIONS, json={"prompt": ["hi there"]})).json()
            chat = await (await client.post(CHAT, json={
                "model": STUB_ID, "messages": [{"role": "developer", "content": "Be brief."},
                                               {"role": "user", "content": [
                                                   {"type": "text", "text": "hi "},
                                                   {"type": "text", "text": "you"}]}],
                "max_completion_tokens": 4, "temperature": 0, "top_p": 0.5, "seed": 7,
                "user": "u1", "n": 1, "logprobs": False, "tools": [],
                "response_format": {"type": "text"}, "parallel_tool_calls": True,
                "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {},
                "top_k": -1, "repetition_penalty": 1.0, "stream": False})).json()
            defaults = await (await client.post(CHAT, json={"messages": [
                {"role": "user", "content": "word " * 500}]})).json()
            app_metrics = client.server.app[STATE].metrics
            return plain, chat, defaults, app_metrics.generation_tokens

    plain, chat, defaults, generated = asyncio.run(scenario())
    assert plain["object"] == "text_completion" and plain["model"] == STUB_ID
    assert plain["choices"] == [{"index": 0, "text": "".join(f"word{i} " for i in range(16)),
                                 "logprobs": None, "finish_reason": "length"}]
    assert plain["usage"] == {"prompt_tokens": 2, "completion_tokens": 16, "total_tokens": 18}
    assert chat["object"] == "chat.completion" and chat["id"].startswith("chatcmpl-")
    assert chat["choices"] == [{"index": 0, "message": {"role": "assistant",
                                                        "content": "word0 word1 word2 word3 "},
                                "logprobs": None, "finish_reason": "length"}]
    first, second, third = backend.calls
    # completions: OpenAI's defaults (16 tokens, temperature 1, top_p 1)
    assert (first.prompt, first.max_tokens, first.temperature, first.top_p, first.seed,
            first.templated) == ("hi there", 16, 1.0, 1.0, None, False)
    assert (second.prompt, second.templated) == ("system: Be brief.\nuser: hi you\nassistant:",
                                                 True)
    assert (second.max_tokens, second.temperature, second.top_p, second.seed) == (4, 0.0, 0.5, 7)
    # chat without max_tokens: up to the server's limit, within the context: 512 - (500 + 2)
    assert third.max_tokens == 10 and defaults["usage"]["completion_tokens"] == 10
    assert generated == 16 + 4 + 10  # /metrics saw every answer


def test_stop_strings_cut_the_text_hold_back_a_partial_match_and_stop_the_generation():
    backend = StubBackend()

    async def send(client, stream: bool, stop, max_tokens: int = 50):
        response = await client.post(COMPLETIONS, json={
            "prompt": "hi", "max_tokens": max_tokens, "stop": stop, "stream": stream})
        assert response.status == 200
        if not stream:
            choice = (await response.json())["choices"][0]
            return [choice["text"]], choice["finish_reason"]
        chunks = [e["choices"][0] for e in events(await response.read())]
        return [c["text"] for c in chunks if c["text"]], chunks[-1]["finish_reason"]

    async def scenario():
        async with serving(backend) as client:
            return [await send(client, False, "word3"), await send(client, True, ["x", "1 word2"]),
                    await send(client, True, "2 x", max_tokens=3)]

    cut, spanning, unmatched = asyncio.run(scenario())
    assert cut == (["word0 word1 word2 "], "stop")
    assert spanning == (["word0 ", "word"], "stop")  # "1 " held back until "word2" decided it
    assert unmatched == (["word0 ", "word1 ", "word", "2 "], "length")  # held, then flushed
    # the first two generations were cancelled at the stop string, long before 50 tokens
    assert [(r.finish_reason, r.tokens_generated) for r in backend.results] == [
        ("cancelled", 4), ("cancelled", 3), ("length", 3)]


@pytest.mark.parametrize("stream", [False, True])
def test_usage_after_a_stop_string_counts_the_tokens_up_to_it(stream):
    """The engine process hears of a stop string's cancel a step or two late and generates on:
    usage counts the tokens answered, up to the one that completed the stop (as OpenAI and
    vLLM do), not those the client never gets."""
    backend = StubBackend()
    backend.cancel_lag = 2

    async def scenario():
        async with serving(backend) as client:
            response = await client.post(COMPLETIONS, json={
                "prompt": "hi", "max_tokens": 50, "stop": "word3", "stream": stream,
                **({"stream_options": {"include_usage": True}} if stream else {})})
            if stream:
                return events(await response.read())[-1]["usage"]
            return (await response.json())["usage"]

    usage = asyncio.run(scenario())
    assert backend.results[0].tokens_generated == 6  # word0..word3, then two more
    assert usage == {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5}


def test_stop_token_min_tokens_and_ignore_eos():
    backend = StubBackend()
    backend.stop_after = 2

    async def scenario():
        async with serving(backend) as client:
            replies = []
            for extra in ({}, {"min_tokens": 4}, {"ignore_eos": True}):
                response = await client.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 6,
                                                                **extra})
                replies.append((await response.json())["choices"][0]["finish_reason"])
            return replies

    assert asyncio.run(scenario()) == ["stop", "stop", "length"]
    assert [r.tokens_generated for r in backend.results] == [2, 4, 6]


BAD = [
    # (path, request kwargs, status, param, words the message must contain)
    (COMPLETIONS, {"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400,
     None, ["not valid JSON"]),
    (CHAT, {"data": b'{"messages": "\xc3\x28"}', "headers": {"Content-Type": "application/json"}},
     400, None, ["UTF-8"]),
    (COMPLETIONS, {"json": ["hi"]}, 400, None, ["JSON object", "array"]),
    (COMPLETIONS, {"json": {"prompt": "hi", "max_token": 5}}, 400, "max_token",
     ["Unrecognized", "max_tokens"]),
    (COMPLETIONS, {"json": {"prompt": "hi", "messages": []}}, 400, "messages", ["Unrecognized"]),
    (CHAT, {"json": {"messages": MESSAGES, "echo": False}}, 400, "echo", ["Unrecognized"]),
    (COMPLETIONS, {"json": {"prompt": "hi", "n": 2}}, 400, "n", ["n=2", "not supported"]),
    (CHAT, {"json": {"messages": MESSAGES, "n": 2}}, 400, "n", ["not supported"]),
    (COMPLETIONS, {"json": {"prompt": "hi", "logprobs": 1}}, 400, "logprobs", []),
    (CHAT, {"json": {"messages": MESSAGES, "logprobs": True}}, 400, "logprobs", []),
    (COMPLETIONS, {"json": {"prompt": "hi", "best_of": 2}}, 400, "best_of", []),
    (COMPLETIONS, {"json": {"prompt": "hi", "echo": True}}, 400, "echo", []),
    (COMPLETIONS, {"json": {"prompt": "hi", "frequency_penalty": 0.5}}, 400,
     "frequency_penalty", []),
    (COMPLETIONS, {"json": {"prompt": "hi", "presence_penalty": False}}, 400,
     "presence_penalty", []),
    (CHAT, {"json": {"messages": MESSAGES, "tools": [{"type": "function"}]}}, 400, "tools", []),
    (CHAT, {"json": {"messages": MESSAGES, "response_format": {"type": "json_object"}}}, 400,
     "response_format", []),
    (COMPLETIONS, {"json": {"prompt": "hi", "stream_options": {"include_usage": True}}}, 400,
     "stream_options", ["stream is true"]),
    (COMPLETIONS, {"json": {"prompt": "hi", "stream": True, "stream_options": {"usage": 1}}},
     400, "stream_options.usage", []),
    (COMPLETIONS, {"json": {"prompt": "hi", "stream": "yes"}}, 400, "stream", []),
    (COMPLETIONS, {"json": {"max_tokens": 5}}, 400, "prompt", ["Missing"]),
    (COMPLETIONS, {"json": {"prompt": ["one", "two"]}}, 400, "prompt", ["exactly one"]),
    (COMPLETIONS, {"json": {"prompt": [1, 2, 3]}}, 400, "prompt", []),
    (COMPLETIONS, {"json": {"prompt": 42}}, 400, "prompt", ["string"]),
    (COMPLETIONS, {"json": {"prompt": "  "}}, 400, "prompt", ["empty"]),
    (CHAT, {"json": {"messages": []}}, 400, "messages", ["non-empty"]),
    (CHAT, {"json": {"max_tokens": 5}}, 400, "messages", []),
    (CHAT, {"json": {"messages": {"role": "user"}}}, 400, "messages", []),
    (CHAT, {"json": {"messages": ["hi"]}}, 400, "messages[0]", []),
    (CHAT, {"json": {"messages": [{"role": "robot", "content": "hi"}]}}, 400,
     "messages[0].role", ["user"]),
    (CHAT, {"json": {"messages": [{"role": "user", "content": 5}]}}, 400,
     "messages[0].content", []),
    (CHAT, {"json": {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}}, 400, "messages[0].content",
     ["text"]),
    (CHAT, {"json": {"messages": [MESSAGES[1], {"role": "user"}]}}, 400,
     "messages[1].content", []),
    (CHAT, {"json": {"messages": [{"role": "assistant", "content": "x", "tool_calls": []}]}}, 400,
     "messages[0].tool_calls", []),
    (COMPLETIONS, {"json": {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}}, 400, "stop",
     ["at most 4"]),
    (COMPLETIONS, {"json": {"prompt": "hi", "stop": 3}}, 400, "stop", []),
    (COMPLETIONS, {"json": {"prompt": "hi", "stop": ""}}, 400, "stop", ["empty"]),
    (COMPLETIONS, {"json": {"prompt": "hi", "model": "gpt-4o"}}, 404, "model",
     ["gpt-4o", "stub"]),
    (COMPLETIONS, {"json": {"prompt": "hi", "model": 3}}, 400, "model", []),
    (COMPLETIONS, {"json": {"prompt": "hi", "max_tokens": 33}}, 400, "max_tokens",
     ["32", "--max-tokens-limit"]),
    (CHAT, {"json": {"messages": MESSAGES, "max_completion_tokens": 33}}, 400,
     "max_completion_tokens", ["32"]),
    (CHAT, {"json": {"messages": MESSAGES, "max_completion_tokens": 0}}, 400,
     "max_completion_tokens", ["at least 1"]),
    # both names, disagreeing: the invalid one used to be ignored (200)
    (CHAT, {"json": {"messages": MESSAGES, "max_completion_tokens": 3, "max_tokens": 0}}, 400,
     "max_tokens", ["disagree", "max_completion_tokens"]),
    (CHAT, {"json": {"messages": MESSAGES, "max_completion_tokens": 3, "max_tokens": 4}}, 400,
     "max_tokens", ["disagree"]),
    (COMPLETIONS, {"json": {"prompt": "hi", "max_tokens": "10"}}, 400, "max_tokens", []),
    (COMPLETIONS, {"json": {"prompt": "hi", "max_tokens": 0}}, 400, "max_tokens", []),
    (COMPLETIONS, {"json": {"prompt": "hi", "temperature": 3}}, 400, "temperature", ["0 to 2"]),
    (CHAT, {"json": {"messages": MESSAGES, "temperature": "hot"}}, 400, "temperature", []),
    (COMPLETIONS, {"json": {"prompt": "hi", "top_p": 0}}, 400, "top_p", []),
    (COMPLETIONS, {"json": {"prompt": "hi", "seed": -1}}, 400, "seed", []),
    (COMPLETIONS, {"json": {"prompt": "hi", "max_tokens": 3, "min_tokens": 5}}, 400,
     "min_tokens", []),
    (COMPLETIONS, {"json": {"prompt": "hi", "ignore_eos": "yes"}}, 400, "ignore_eos", []),
    (COMPLETIONS, {"json": {"prompt": "word " * 600, "max_tokens": 10}}, 413, "prompt",
     ["context"]),
    (CHAT, {"json": {"messages": [{"role": "user", "content": "word " * 600}]}}, 413,
     "messages", ["context"]),
    (COMPLETIONS, {"data": '{"prompt": "hi"}', "headers": {"Content-Type": "text/plain"}}, 415,
     None, ["application/json"]),
    (CHAT, {"data": "messages=hi"}, 415, None, ["application/json"]),
    (COMPLETIONS, {"data": b'{"prompt": "' + b"a" * (1024 * 1024) + b'"}',
                   "headers": {"Content-Type": "application/json"}}, 413, None, ["1 MiB"]),
]


def check_openai_error(body: dict, status: int, param, words=(), description="") -> None:
    assert set(body) == {"error"}, (description, body)
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, (description, error)
    kind = "invalid_request_error" if status < 500 else "server_error"
    assert error["type"] == kind and error["param"] == param, (description, error)
    for word in words:
        assert word in error["message"], (description, word, error["message"])


def test_every_bad_input_gets_an_openai_error_and_the_server_keeps_serving():
    backend = StubBackend()

    async def scenario():
        async with serving(backend, max_tokens_limit=32) as client:
            for i, (path, kwargs, status, param, words) in enumerate(BAD):
                response = await client.post(path, **kwargs)
                assert response.status == status, (i, path, await response.text())
                body = await response.json()
                check_openai_error(body, status, param, words, f"case {i}: {kwargs}")
                if status == 404:
                    assert body["error"]["code"] == "model_not_found"
                if status == 413 and param:
                    assert body["error"]["code"] == "context_length_exceeded"
            wrong_method = await client.get(CHAT)
            assert wrong_method.status == 405 and wrong_method.headers["Allow"] == "POST"
            check_openai_error(await wrong_method.json(), 405, None, ["use POST"])
            assert (await client.post("/v1/models")).status == 405
            unknown = await client.post("/v1/embeddings", json={"input": "hi"})
            assert unknown.status == 404
            check_openai_error(await unknown.json(), 404, None, ["/v1/chat/completions"])
            # the seed's endpoints keep their own error shape
            seed = await (await client.post("/generate", json={"prompt": ""})).json()
            assert isinstance(seed["error"], str)
            # ... and the server keeps serving
            ok = await client.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 2})
            assert ok.status == 200
            return await stats(client)

    server = asyncio.run(scenario())
    assert server["requests_rejected"] == len(BAD) + 1 + 1  # + GET on a POST path, + /generate
    assert server["requests_served"] == 1 and server["requests_failed"] == 0
    assert len(backend.calls) == 1  # nothing refused reached the model


class RefusedByTheEngine(StubBackend):
    """Passes the check at the door; the engine then finds the request can never fit."""

    def generate(self, request):
        raise PromptTooLong("prompt (2 tokens) + max_tokens (5) needs 7 tokens of KV cache, more "
                            "than the whole cache holds (4)")


@pytest.mark.parametrize("path, param", [(COMPLETIONS, "prompt"), (CHAT, "messages")])
def test_a_413_from_the_engine_keeps_param_and_code(path, param):
    async def scenario():
        async with serving(RefusedByTheEngine()) as client:
            body = {"prompt": "hi"} if path == COMPLETIONS else {"messages": MESSAGES}
            response = await client.post(path, json={**body, "max_tokens": 5})
            return response.status, await response.json()

    status, body = asyncio.run(scenario())
    assert status == 413
    check_openai_error(body, 413, param, ["KV cache"])
    assert body["error"]["code"] == "context_length_exceeded"


def test_503_while_loading_out_of_memory_and_500_in_openai_shape():
    backend = StubBackend()
    slow_loader, release = held_loader(backend)

    async def scenario():
        async with serving(loader=slow_loader, wait=False) as client:
            for response in (await client.get("/v1/models"),
                             await client.post(COMPLETIONS, json={"prompt": "hi"}),
                             await client.post(CHAT, json={"messages": MESSAGES})):
                assert response.status == 503
                check_openai_error(await response.json(), 503, None, ["not loaded"])
            release.set()
            await wait_loaded(client)
            models = await (await client.get("/v1/models")).json()
            assert models["object"] == "list" and models["data"][0]["id"] == STUB_ID
            for stream in (False, True):
                backend.fail_next = [OutOfMemory("Tried to allocate 2.00 GiB")]
                failed = await client.post(CHAT, json={"messages": MESSAGES, "stream": stream})
                assert failed.status == 503  # before the first token: a real status, streamed
                check_openai_error(await failed.json(), 503, None, ["2.00 GiB"])
            backend.fail_next = [KeyError("boom")]
            bug = await client.post(COMPLETIONS, json={"prompt": "hi"})
            assert bug.status == 500
            request_id = bug.headers["X-Request-ID"]
            body = await bug.json()
            check_openai_error(body, 500, None, ["Internal error", "bug", request_id])
            assert "boom" not in body["error"]["message"]  # the details go to the log only
            assert (await client.post(CHAT, json={"messages": MESSAGES, "max_tokens": 2,
                                                  "stream": True})).status == 200

    asyncio.run(scenario())


class FailsMidStream(StubBackend):
    """Generates two tokens, then runs out of memory."""

    def generate(self, request):
        request.emit(0)
        request.emit(1)
        raise OutOfMemory("Tried to allocate 2.00 GiB")


def test_an_error_after_the_stream_began_is_its_last_event():
    async def scenario():
        async with serving(FailsMidStream()) as client:
            response = await client.post(COMPLETIONS, json={"prompt": "hi", "stream": True})
            assert response.status == 200  # sent with the first piece of text
            return await response.read()

    body = asyncio.run(scenario())
    *chunks, error = events(body)
    assert [c["choices"][0]["text"] for c in chunks] == ["word0 ", "word1 "]
    check_openai_error(error, 503, None, ["Out of memory", "2.00 GiB"])
    assert frames(body)[-1] == b"data: [DONE]\n\n"


@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_a_disconnect_mid_stream_stops_the_generation(mode):
    backend = StubBackend(token_delay_s=0.01)

    async def scenario():
        async with serving(backend, mode=mode) as client:
            response = await client.post(CHAT, json={"messages": MESSAGES, "max_tokens": 400,
                                                     "stream": True})
            assert response.status == 200
            for _ in range(3):  # the role chunk and two pieces of text
                assert (await response.content.readuntil(b"\n\n")).startswith(b"data: ")
            response.close()  # the client goes away
            await wait_for(client, lambda s: s["requests_cancelled"] == 1
                           and s["in_flight"] == 0)
            ok = await client.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 2,
                                                      "stream": True})
            assert (await ok.read()).endswith(b"data: [DONE]\n\n")
            metrics = await (await client.get("/metrics")).text()
            return await stats(client), metrics

    server, metrics = asyncio.run(scenario())
    assert server["queue_depth"] == 0
    # the dropped stream is cancelled only, not also served (it used to count as both)
    assert server["requests_served"] == 1 and server["requests_cancelled"] == 1
    assert "vllm:request_success_total 1.0" in metrics
    assert 'labkit_requests_total{outcome="served"} 1.0' in metrics
    stopped, after = backend.results
    assert stopped.finish_reason == "cancelled" and 2 <= stopped.tokens_generated < 100
    assert after.finish_reason == "length"


def piece(choice: dict) -> str:
    """The text of a streamed choice, completion or chat."""
    return choice["text"] if "text" in choice else choice["delta"].get("content") or ""


def test_batched_mode_serves_both_endpoints_streamed_and_not():
    backend = StubBackend(token_delay_s=0.002)

    async def scenario():
        async with serving(backend, mode="batched", max_batch_size=4) as client:
            async def ask(path, stream):
                body = {"prompt": "hi"} if path == COMPLETIONS else {"messages": MESSAGES}
                response = await client.post(path, json={**body, "max_tokens": 3,
                                                         "stream": stream})
                assert response.status == 200
                if not stream:
                    choice = (await response.json())["choices"][0]
                    return choice.get("text") or choice["message"]["content"]
                return "".join(piece(c["choices"][0]) for c in events(await response.read()))

            return await asyncio.gather(*(ask(path, stream) for path in (COMPLETIONS, CHAT)
                                          for stream in (False, True)))

    assert asyncio.run(scenario()) == ["word0 word1 word2 "] * 4


def test_batched_real_model_streams_add_up_to_the_text():
    """The batched engine (one forward pass for several rows) behind the endpoints: three
    greedy streams generated together each add up to their non-streamed text."""
    from labkit.serve.backend import load_model_backend

    threads = torch.get_num_threads()  # leave this process's setting as it was
    app = create_app(lambda: load_model_backend("model", device="cpu", warmup_runs=0,
                                                threads=threads, max_batch_size=4),
                     mode="batched", max_batch_size=4, max_wait_ms=50)
    prompts = [PROMPT, "Describe a calm morning", "What helps oily skin?"]

    async def scenario():
        async with TestClient(TestServer(app)) as client:
            await wait_loaded(client, timeout=60)

            async def ask(prompt, stream):
                response = await client.post(COMPLETIONS, json={
                    "model": "model", "prompt": prompt, "max_tokens": 12, "temperature": 0,
                    "stream": stream})
                assert response.status == 200
                if stream:
                    return "".join(e["choices"][0]["text"] for e in events(await response.read()))
                return (await response.json())["choices"][0]["text"]

            whole = await asyncio.gather(*(ask(p, False) for p in prompts))
            streamed = await asyncio.gather(*(ask(p, True) for p in prompts))
            return whole, streamed, (await stats(client))["mean_batch_size"]

    whole, streamed, mean_batch = asyncio.run(scenario())
    assert streamed == whole and all(whole)
    assert mean_batch > 1  # they really were generated together


def test_labkits_own_load_tester_drives_the_openai_api(srv):
    """`labkit loadtest --api openai` against labkit serve: streamed, every request counted, the
    tokens it reports are the ones the server says it generated, TTFT measured by the client."""
    from labkit.measure import loadtest

    before = generated_tokens(srv)
    result = loadtest.run(srv.url, concurrency=2, requests=4, max_tokens=12, temperature=0,
                          api="openai", progress=False)
    s = result.summary()
    assert s["successful"] == 4 and s["ttft_source"].startswith("client")
    assert s["output_tokens"] == generated_tokens(srv) - before
    assert all(r.client_ttft_ms is not None and 0 < r.client_ttft_ms <= r.latency_ms
               for r in result.records)
