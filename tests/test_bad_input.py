"""No input makes a 500: each kind of body that once did (a lone surrogate, nesting deeper than
the interpreter's recursion, an integer of thousands of digits, a seed past 64 bits) and its
relatives get a 400 naming the field, in every serving mode, and a fuzz test (hypothesis) sends
a few hundred generated bodies to each generation endpoint of a stub-backed server."""

from __future__ import annotations

import json

import pytest
from stub_backend import StubBackend
from test_continuous import continuous_app
from threaded_server import serving

from labkit.serve.backend import ModelBackend
from labkit.serve.http import create_app

hypothesis = pytest.importorskip("hypothesis")  # a dev dependency: absent on the GPU machine
st = hypothesis.strategies

PATHS = ("/generate", "/v1/completions", "/v1/chat/completions")
PROMPT_FIELD = {"/generate": "prompt", "/v1/completions": "prompt",
                "/v1/chat/completions": "messages"}


def valid(path: str) -> dict:
    if path.endswith("chat/completions"):
        return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    return {"prompt": "hi", "max_tokens": 3}


def raw(path: str, **fields: str) -> bytes:
    """A valid body with some fields' JSON text replaced verbatim (what json.dumps won't write)."""
    body = json.dumps(valid(path))[:-1]
    return (body + "".join(f', "{k}": {v}' for k, v in fields.items()) + "}").encode()


# (what, body for a path, the field the error must name; None: the body as a whole)
BAD = [
    ("lone surrogate in the prompt",
     lambda p: raw(p, **({"messages": '[{"role": "user", "content": "\\ud800"}]'}
                         if "chat" in p else {"prompt": '"\\ud800"'})), "prompt-field"),
    ("lone low surrogate mid-string", lambda p: raw(p, **(
        {"messages": '[{"role": "user", "content": "ab\\udc00cd"}]'} if "chat" in p
        else {"prompt": '"ab\\udc00cd"'})), "prompt-field"),
    ("lone surrogate in a field name", lambda p: raw(p, **{"\\ud800": "1"}), None),
    ("2,000 nested arrays", lambda p: b"[" * 2000 + b"]" * 2000, None),
    ("nested arrays in a field", lambda p: raw(p, stop="[" * 100 + "]" * 100), "stop"),
    ("5,000-digit max_tokens", lambda p: raw(p, max_tokens="9" * 5000), "max_tokens"),
    ("seed past 64 bits", lambda p: raw(p, seed=str(2**64)), "seed"),
    ("negative seed past 64 bits", lambda p: raw(p, seed=str(-(2**70))), "seed"),
    ("30-digit temperature", lambda p: raw(p, temperature="1" + "0" * 30), "temperature"),
    ("temperature 1e400 (infinite)", lambda p: raw(p, temperature="1e400"), "temperature"),
    ("NaN top_p", lambda p: raw(p, top_p="NaN"), None),
    ("max_tokens 2**63", lambda p: raw(p, max_tokens=str(2**63)), "max_tokens"),
    ("top_p 1e-400 (zero)", lambda p: raw(p, top_p="1e-400"), "top_p"),
]


def check_error(path: str, status: int, data: bytes, param: str | None = "any") -> str:
    """The body is the endpoint's error shape; returns the message."""
    assert status != 500, data
    body = json.loads(data)
    assert set(body) == {"error"}, body
    if path == "/generate":
        assert isinstance(body["error"], str)
        return body["error"]
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param != "any":
        assert error["param"] == param or (param and str(error["param"]).startswith(param)), \
            error
    return error["message"]


@pytest.fixture(scope="module", params=["sequential", "batched", "sequential-model",
                                        "continuous"])
def server(request, lm):
    if request.param == "sequential-model":  # the real HF generate path (torch.manual_seed)
        app = create_app(lambda: ModelBackend(lm))
    elif request.param == "continuous":
        app = continuous_app(lm)
    else:
        app = create_app(StubBackend, mode=request.param)
    with serving(app) as server:
        yield server


@pytest.mark.parametrize("path", PATHS)
def test_bodies_that_once_made_500s_get_400s_naming_the_field_in_every_mode(server, path):
    before = server.stats()
    for what, make, field in BAD:
        status, data = server.post(path, make(path))
        assert status == 400, (what, data)
        param = PROMPT_FIELD[path] if field == "prompt-field" else field
        message = check_error(path, status, data, param if path != "/generate" else "any")
        if field is not None and path == "/generate":
            assert field.split("-")[0] in message or PROMPT_FIELD[path] in message, (what,
                                                                                      message)
    status, data = server.post(path, json.dumps(valid(path)).encode())
    assert status == 200, data  # and the server keeps serving
    after = server.stats()
    assert after["requests_rejected"] - before["requests_rejected"] == len(BAD)
    assert after["requests_served"] - before["requests_served"] == 1


def test_a_seed_at_the_top_of_64_bits_is_valid_on_the_hf_path(lm):
    with serving(create_app(lambda: ModelBackend(lm))) as server:
        for path in PATHS:
            body = {**valid(path), "seed": 2**64 - 1, "temperature": 0.7}
            status, data = server.post(path, json.dumps(body).encode())
            assert status == 200, data


# --- fuzzing ------------------------------------------------------------------------------------

FIELD_NAMES = ["prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
               "top_p", "seed", "stop", "stream", "stream_options", "min_tokens", "ignore_eos",
               "model", "n", "logprobs", "role", "content", "include_usage"]
any_text = st.text(st.characters(exclude_categories=()), max_size=12)  # surrogates included
scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | any_text)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(FIELD_NAMES) | any_text, inner,
                                        max_size=3), max_leaves=8)
objects = st.dictionaries(st.sampled_from(FIELD_NAMES) | any_text, values, max_size=6)


@st.composite
def bodies(draw) -> bytes:
    kind = draw(st.sampled_from(["object", "object", "object", "value", "bytes", "cut",
                                 "digits", "deep"]))
    if kind == "object":
        return json.dumps(draw(objects)).encode()  # NaN/Infinity written as such
    if kind == "value":
        return json.dumps(draw(values)).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=40))
    if kind == "cut":
        text = json.dumps(draw(objects)).encode()
        return text[:draw(st.integers(0, len(text)))]
    if kind == "digits":
        field = draw(st.sampled_from(["max_tokens", "seed", "temperature", "top_p"]))
        return f'{{"prompt": "hi", "{field}": {"-" * draw(st.booleans())}' \
               f'{"7" * draw(st.integers(1, 6000))}}}'.encode()
    depth = draw(st.integers(1, 3000))
    return b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.fixture(scope="module")
def stub_server():
    with serving(create_app(StubBackend)) as server:
        yield server


@pytest.mark.parametrize("path", PATHS)
@hypothesis.settings(max_examples=150, deadline=None, derandomize=True, database=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture,
                                            hypothesis.HealthCheck.too_slow])
@hypothesis.given(body=bodies(),
                  content_type=st.sampled_from(["application/json"] * 9 + ["text/plain"]))
def test_fuzzed_bodies_never_make_a_500(stub_server, path, body, content_type):
    status, data = stub_server.post(path, body, content_type)
    assert status != 500, (body[:200], data[:300])
    if status >= 400:
        check_error(path, status, data)
    else:
        assert status == 200 and data, (body[:200], data[:300])
