"""Request schemas, pydantic v2 against msgspec (issue 24): what one typical /v1/completions
body costs to decode and check, what one SSE chunk costs to encode, and what each library's
errors can say about a bad body. CPU only; no server.

Both libraries get the same schema of the body (its fields, their types and bounds, unknown
fields refused, the no-op fields accepted only at a value that changes nothing), written here
so that either can be timed whichever the server uses. Beside them, labkit's own path as it
stands (`openai_api.parse`: `schemas.load`, then the check, then the `Call`; run the script with
an earlier checkout on PYTHONPATH for the hand-written checks) and its schema
(`labkit.serve.schemas`, pydantic, with the validators of the server's limits).

    python benchmarks/request_schemas.py [--repeat 7] [--json FILE]

msgspec is not a labkit dependency: `pip install msgspec` to time it (skipped otherwise).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import statistics
import timeit
from pathlib import Path
from typing import Annotated, Any

import pydantic
import pydantic_core
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictStr

from labkit.engine.request import Request
from labkit.serve import openai_api
from labkit.serve.errors import ApiError

try:
    import msgspec
except ModuleNotFoundError:  # not a labkit dependency
    msgspec = None
try:  # labkit's own schemas (issue 24 on): absent in an earlier checkout
    from labkit.serve import schemas
except ImportError:
    schemas = None
# labkit's JSON decode with its guards ("body.load" in the rows): schemas.load since it moved
# there, serve/body.py's load in an earlier checkout
json_body = schemas if hasattr(schemas, "load") else importlib.import_module("labkit.serve.body")

BODY = json.dumps({
    "model": "model", "prompt": "Suggest a skincare routine for dry skin", "max_tokens": 150,
    "temperature": 0.7, "top_p": 0.9, "seed": 7, "stream": True,
    "stream_options": {"include_usage": True}}).encode()
CHUNK = {"id": "cmpl-5f0c2d8e9b7a4c1e8d6f3a2b1c0d9e8f", "object": "text_completion",
         "created": 1765100000, "model": "model",
         "choices": [{"index": 0, "text": " moisturizer", "logprobs": None,
                      "finish_reason": None}], "usage": None}
PIECE = CHUNK["choices"][0]["text"]
BAD = {  # what is wrong -> the body
    "a typo (max_token)": {"prompt": "hi", "max_token": 5},
    "two unknown fields": {"prompt": "hi", "max_token": 5, "tempreature": 1},
    "temperature 3": {"prompt": "hi", "temperature": 3},
    "n 2 (a no-op field)": {"prompt": "hi", "n": 2},
    "prompt 42, stop 3": {"prompt": 42, "stop": 3},
}
MAX_SEED = 2**64 - 1


def _same(value, default) -> bool:
    """`value` is `default` as JSON has it: 0 and 0.0 alike, but false is not 0."""
    if default is None or isinstance(default, bool):
        return value is default
    if type(default) in (int, float):
        return type(value) in (int, float) and value == default
    return value == default


# --- pydantic ------------------------------------------------------------------------------------

def _pydantic_no_op(*defaults):
    def check(value):
        if value is not None and not any(_same(value, d) for d in defaults):
            raise ValueError("not supported by this server")
        return value
    return Annotated[Any, AfterValidator(check)]


StrictInt, StrictFloat = pydantic.StrictInt, pydantic.StrictFloat


class PydanticStreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool | None = None
    include_obfuscation: StrictBool | None = None
    continuous_usage_stats: StrictBool | None = None


class PydanticCompletion(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[StrictFloat, Field(ge=0, le=2)] | None = None
    top_p: Annotated[StrictFloat, Field(gt=0, le=1)] | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=MAX_SEED)] | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    stream: StrictBool | None = None
    stream_options: PydanticStreamOptions | None = None
    min_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    ignore_eos: StrictBool | None = None
    n: _pydantic_no_op(1) = None
    best_of: _pydantic_no_op(1) = None
    echo: _pydantic_no_op(False) = None
    logprobs: _pydantic_no_op() = None
    suffix: _pydantic_no_op("") = None
    frequency_penalty: _pydantic_no_op(0) = None
    presence_penalty: _pydantic_no_op(0) = None
    logit_bias: _pydantic_no_op({}) = None
    user: StrictStr | None = None
    top_k: _pydantic_no_op(-1, 0) = None
    min_p: _pydantic_no_op(0) = None
    repetition_penalty: _pydantic_no_op(1) = None


def pydantic_errors(body: dict) -> list[str]:
    try:
        PydanticCompletion.model_validate(body)
    except pydantic.ValidationError as err:
        return [f"type={e['type']} loc={e['loc']} input={e['input']!r}: {e['msg']}"
                for e in err.errors(include_url=False)]
    return []


# --- msgspec -------------------------------------------------------------------------------------

MSGSPEC_NO_OPS = {"n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (), "suffix": ("",),
                  "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},),
                  "top_k": (-1, 0), "min_p": (0,), "repetition_penalty": (1,)}

if msgspec is not None:
    # Constraints as Meta; the no-op rule and seed's upper bound (bounds past int64 are refused)
    # have no declarative form in msgspec: a __post_init__ (its ValueError becomes the
    # ValidationError's text).
    Meta = msgspec.Meta

    class MsgspecStreamOptions(msgspec.Struct, forbid_unknown_fields=True):
        include_usage: bool | None = None
        include_obfuscation: bool | None = None
        continuous_usage_stats: bool | None = None

    class MsgspecCompletion(msgspec.Struct, forbid_unknown_fields=True):
        prompt: str | Annotated[list[str], Meta(min_length=1, max_length=1)]
        model: str | None = None
        max_tokens: Annotated[int, Meta(ge=1)] | None = None
        temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
        top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
        seed: Annotated[int, Meta(ge=0)] | None = None  # le=2**64-1: "not supported" (int64)
        stop: str | Annotated[list[str], Meta(max_length=4)] | None = None
        stream: bool | None = None
        stream_options: MsgspecStreamOptions | None = None
        min_tokens: Annotated[int, Meta(ge=0)] | None = None
        ignore_eos: bool | None = None
        n: Any = None
        best_of: Any = None
        echo: Any = None
        logprobs: Any = None
        suffix: Any = None
        frequency_penalty: Any = None
        presence_penalty: Any = None
        logit_bias: Any = None
        user: str | None = None
        top_k: Any = None
        min_p: Any = None
        repetition_penalty: Any = None

        def __post_init__(self):
            if self.seed is not None and self.seed > MAX_SEED:
                raise ValueError("seed must fit in 64 bits")
            for name, defaults in MSGSPEC_NO_OPS.items():
                value = getattr(self, name)
                if value is not None and not any(_same(value, d) for d in defaults):
                    raise ValueError(f"{name} is not supported by this server")


def msgspec_errors(body: dict) -> list[str]:
    try:
        msgspec.convert(body, MsgspecCompletion)
    except msgspec.ValidationError as err:
        return [str(err)]
    return []


# --- timing --------------------------------------------------------------------------------------

def per_call_us(fn, repeat: int) -> float:
    """Median over `repeat` runs of the mean time per call, in µs (each run ~0.2 s)."""
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()
    return round(statistics.median(t / number for t in timer.repeat(repeat, number)) * 1e6, 2)


def timings(repeat: int) -> dict:
    data = json_body.load(BODY)
    limit = _limit()

    def parse_and_request():
        """parse, then the Request (before issue 24, the Request checked the sampling fields)."""
        call = openai_api.parse(openai_api.COMPLETIONS, BODY, "model", **limit)
        if hasattr(call, "body"):  # issue 24 on: checked by the schema
            body = call.body
            return Request(body.prompt, body.max_tokens_within(1024), **body.sampling,
                           checked=True)
        return Request(call.prompt, call.max_tokens, **call.sampling)

    rows = {
        "labkit openai_api.parse (body.load + checks + Call)":
            lambda: openai_api.parse(openai_api.COMPLETIONS, BODY, "model", **limit),
        "labkit parse + its Request (every check of the fields)": parse_and_request,
        "body.load (json + labkit's guards) alone": lambda: json_body.load(BODY),
        **({"labkit schemas.check(CompletionBody) alone": lambda: schemas.check(
            schemas.CompletionBody, data, served="model", max_tokens_limit=1024)}
           if schemas else {}),
        "pydantic: model_validate(dict) alone": lambda: PydanticCompletion.model_validate(data),
        "pydantic: body.load + model_validate":
            lambda: PydanticCompletion.model_validate(json_body.load(BODY)),
        "pydantic: model_validate_json(bytes)":
            lambda: PydanticCompletion.model_validate_json(BODY),
        "encode chunk: json.dumps (labkit's sse)": lambda: openai_api.sse(CHUNK),
        "encode chunk: pydantic_core.to_json":
            lambda: b"data: " + pydantic_core.to_json(CHUNK) + b"\n\n",
        # what the server encodes per streamed token: the piece, into a per-call template
        "encode piece: json.dumps (labkit's text_frame)":
            lambda: json.dumps(PIECE, ensure_ascii=False).encode(),
        "encode piece: pydantic_core.to_json": lambda: pydantic_core.to_json(PIECE),
    }
    if msgspec is not None:
        schema = MsgspecCompletion
        encoder = msgspec.json.Encoder()
        decoder = msgspec.json.Decoder(schema)
        rows.update({
            "msgspec: convert(dict) alone": lambda: msgspec.convert(data, schema),
            "msgspec: body.load + convert": lambda: msgspec.convert(json_body.load(BODY), schema),
            "msgspec: json.decode(bytes, type)": lambda: decoder.decode(BODY),
            "encode chunk: msgspec.json.encode": lambda: b"data: " + encoder.encode(CHUNK)
            + b"\n\n",
            "encode piece: msgspec.json.encode": lambda: encoder.encode(PIECE),
        })
    return {name: per_call_us(fn, repeat) for name, fn in rows.items()}


def labkit_error(body: dict) -> str:
    """What labkit's server answers (its 400's param and message), from whichever library."""
    try:
        openai_api.parse(openai_api.COMPLETIONS, json.dumps(body).encode(), "model",
                         **_limit())
    except ApiError as err:
        return f"param={err.param}: {err.message}"
    return "accepted"


def errors() -> dict:
    return {what: {"pydantic": pydantic_errors(body),
                   "msgspec": msgspec_errors(body) if msgspec else "not installed",
                   "labkit answers": labkit_error(body)}
            for what, body in BAD.items()}


def _limit() -> dict:
    """parse's arguments as of this checkout (the server's limit joined them in issue 24)."""
    parameters = inspect.signature(openai_api.parse).parameters
    return {"max_tokens_limit": 1024} if "max_tokens_limit" in parameters else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average": os.getloadavg(),
        "versions": {"pydantic": pydantic.VERSION,
                     "msgspec": msgspec.__version__ if msgspec else None},
        "body_bytes": len(BODY),
        "us_per_call": timings(args.repeat),
        "errors": errors(),
    }
    text = json.dumps(report, indent=2, ensure_ascii=False)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
