"""The OpenAI-compatible API: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

Owns what makes these endpoints OpenAI's: which fields a body may carry and the 400 for each it
cannot honour, the `Request` a body becomes, the response objects and stream chunks, the
Server-Sent Events framing, and OpenAI's error shape `{"error": {"message", "type", "param",
"code"}}` (which `labkit.serve.http` uses for every error on a /v1 path). The handlers in
`http.py` only string these together; queueing, limits and metrics are the same as /generate's.

A field the server cannot honour is refused, not ignored: an unknown field, or a supported
one at a value other than its no-op default (`n: 2`, `logprobs: true`, `echo: true`, ...) is a
400 naming it, so a client never gets silently different behaviour from what it asked for.
Which fields a body may carry, and at which values, is its schema's (`labkit.serve.schemas`,
checked once); what the 400 says, with the field in `param`, is this module's.

How an answer is produced and sent, whole or streamed, is `labkit.serve.streaming`'s.
"""

from __future__ import annotations

import difflib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from pydantic import ValidationError

from labkit.engine.request import PromptTooLong, Request, Result, field_error, min_tokens_error
from labkit.serve import schemas
from labkit.serve.errors import ApiError, json_type

if TYPE_CHECKING:
    from labkit.serve.backend import Backend

log = logging.getLogger(__name__)

PREFIX = "/v1/"
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
ENDPOINTS = "GET /v1/models, POST /v1/completions, POST /v1/chat/completions"
OWNED_BY = "labkit"
STARTED = int(time.time())  # a model's "created": when this server process started
DONE = b"data: [DONE]\n\n"
SCHEMAS = {COMPLETIONS: schemas.CompletionBody, CHAT: schemas.ChatBody}


def _bad(param: str | None, message: str) -> ApiError:
    return ApiError(400, message, param)


class Text(Protocol):
    """What an answer needs of the text watched as it was generated (`streaming.TextSink`)."""

    text: str  # all of it, cut at the first stop string
    matched: bool  # a stop string ended it
    tokens_to_stop: int  # with `matched`: the tokens up to the one that completed the stop

    def flush(self) -> str: ...


# --- a parsed request --------------------------------------------------------------------------

@dataclass
class Call:
    """One /v1 completion request: its body as its schema checked it (what to generate), and
    how to answer it."""

    body: schemas.CompletionBody | schemas.ChatBody
    model: str  # the served model's id, echoed in every response
    max_tokens_limit: int  # the server's
    id: str = field(default="")
    created: int = field(default_factory=lambda: int(time.time()))
    include_usage: bool = field(init=False)
    continuous_usage: bool = field(init=False)  # vLLM's stream_options.continuous_usage_stats
    _text_template: tuple[bytes, bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.id:
            self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.include_usage, self.continuous_usage = self.body.usage_options

    @property
    def chat(self) -> bool:
        return isinstance(self.body, schemas.ChatBody)

    @property
    def stream(self) -> bool:
        return bool(self.body.stream)

    @property
    def stop(self) -> list[str]:
        return self.body.stop or []

    @property
    def prompt_field(self) -> str:
        return "messages" if self.chat else "prompt"

    # --- the Request it becomes (templating and tokenizing: on the check thread when long) ---

    def prepare(self, backend: Backend) -> Request:
        """The Request for this call (its fields checked by the schema already), tokenized and
        checked to fit. A long body's runs off the event loop (a chat template and the
        tokenizer both work on up to 1 MiB of text)."""
        body = self.body
        prompt = backend.chat_prompt([m.as_chat() for m in body.messages]) if self.chat \
            else body.prompt
        request = Request(prompt, max_tokens=body.max_tokens_within(self.max_tokens_limit),
                          templated=self.chat, **body.sampling, checked=True)
        try:
            if self.chat and body.asked_max_tokens is None:
                self._fit_max_tokens(request, backend)
            else:
                backend.tokenize(request)
        except PromptTooLong as err:
            raise ApiError(413, str(err), self.prompt_field, "context_length_exceeded") \
                from None
        return request

    def _fit_max_tokens(self, request: Request, backend: Backend) -> None:
        """No max_tokens asked for: as many as the request can hold after the prompt (the
        model's context, and in continuous mode the whole KV cache), up to the server's limit
        (what vLLM does), rather than a 413 for a long conversation."""
        wanted, request.max_tokens = request.max_tokens, 1
        backend.tokenize(request)  # stores the prompt ids; PromptTooLong if nothing fits
        room = backend.token_budget - len(request.prompt_ids)
        request.max_tokens = max(1, min(wanted, room))  # fits still: within the token budget
        if request.min_tokens > request.max_tokens:
            raise _bad("min_tokens", f"min_tokens ({request.min_tokens}) is more than the "
                                     f"{request.max_tokens} tokens the context has room for "
                                     "after these messages")

    # --- answers ----------------------------------------------------------------------------

    def finish_reason(self, result: Result, sink: Text | None) -> str:
        if sink is not None and sink.matched:
            return "stop"  # a stop string (the engine then stopped: finish_reason cancelled)
        return "length" if result.finish_reason == "length" else "stop"

    def usage(self, result: Result, sink: Text | None = None) -> dict:
        """The tokens answered: after a stop string, those up to the one that completed it
        (as OpenAI and vLLM count), not the one or two the engine made before it heard."""
        tokens = (sink.tokens_to_stop if sink is not None and sink.matched
                  else result.tokens_generated)
        return usage_counts(result.prompt_tokens, tokens)

    def response(self, result: Result, sink: Text | None) -> dict:
        """The non-streaming answer (with stop strings, the sink has the text)."""
        text = sink.text if sink is not None else result.generated_text
        reason = self.finish_reason(result, sink)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice],
                "usage": self.usage(result, sink)}

    def text_frame(self, text: str, prompt_tokens: int, tokens: int) -> bytes:
        """The SSE frame of a piece of text, `tokens` generated so far: the same bytes as
        `chunk(text)`, from a template made once per call (a piece is a token or so, and a
        general JSON encoder spent more time on the rest of the chunk than on it)."""
        if self.continuous_usage:
            return self.chunk(text, usage=usage_counts(prompt_tokens, tokens))
        if self._text_template is None:
            marker = "\x00piece\x00"
            head, tail = self.chunk(marker).split(json.dumps(marker).encode())
            self._text_template = (head, tail)
        head, tail = self._text_template
        return head + json.dumps(text, ensure_ascii=False).encode() + tail

    def chunk(self, text: str | None = None, finish_reason: str | None = None, *,
              first: bool = False, usage: dict | None = None) -> bytes:
        """One SSE frame of the stream: a piece of text, or (text None) the closing chunk.
        `usage` (the counts so far) is sent only with continuous usage stats."""
        if self.chat:
            if first:
                delta = {"role": "assistant", "content": ""}
            else:
                delta = {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None,
                      "finish_reason": finish_reason}
        return self._frame([choice], usage if self.continuous_usage else None)

    def closing_frames(self, result: Result, sink: Text) -> list[bytes]:
        """After the last piece of text: the text held back for a stop string that never came,
        the chunk with finish_reason, the usage chunk when asked for, and [DONE]."""
        frames = []
        rest = sink.flush()
        if rest:
            frames.append(self.chunk(rest))
        usage = self.usage(result, sink)
        frames.append(self.chunk(None, self.finish_reason(result, sink), usage=usage))
        if self.include_usage:
            frames.append(self._frame([], usage))
        frames.append(DONE)
        return frames

    def _frame(self, choices: list[dict], usage: dict | None = None) -> bytes:
        body = {"id": self.id,
                "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage:
            body["usage"] = usage
        return sse(body)


def usage_counts(prompt_tokens: int, completion_tokens: int) -> dict:
    """OpenAI's `usage` object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(body: dict) -> bytes:
    """One Server-Sent Events frame: `data: {json}` and a blank line."""
    return b"data: " + json.dumps(body, ensure_ascii=False,
                                  separators=(",", ":")).encode() + b"\n\n"


def model_id(backend: Backend) -> str:
    """The id clients name the served model by: the source it was loaded from (`labkit serve
    --model`: "model", "synthetic:llama-3.2-3b", a Hub id or a directory)."""
    return backend.source


def models_list(backend: Backend) -> dict:
    return {"object": "list", "data": [{"id": model_id(backend), "object": "model",
                                        "created": STARTED, "owned_by": OWNED_BY}]}


def parse(path: str, body: bytes, served: str, max_tokens_limit: int) -> Call:
    """A /v1/completions or /v1/chat/completions body (already size-checked) as a Call, checked
    against its schema once (the server's limits included); each problem is an ApiError naming
    its field."""
    try:
        data = schemas.load(body)
    except schemas.BodyError as err:
        raise _bad(err.param, str(err)) from None
    schema = SCHEMAS[path]
    try:
        checked = schemas.check(schema, data, served=served, max_tokens_limit=max_tokens_limit)
    except ValidationError as err:
        raise refusal(schema, err.errors(include_url=False), data) from None
    return Call(checked, served, max_tokens_limit)


# --- what a 400 says -----------------------------------------------------------------------------

# A body with several problems gets a 400 for one: every unknown field, else a no-op field at
# another value, else the first of these fields with a problem (then a check across fields).
REPORTED_FIRST = ("model", "stream", "stream_options", "prompt", "messages", "stop",
                  "max_completion_tokens", "max_tokens", "temperature", "top_p", "seed",
                  "min_tokens", "ignore_eos")


def refusal(schema, errors: list[dict], data) -> ApiError:
    """The answer to a body its schema refused: every unknown field (each with the field it
    may be a typo of), else the first problem (`REPORTED_FIRST`)."""
    unknown = sorted(e["loc"][0] for e in errors if e["type"] == "extra_forbidden"
                     and len(e["loc"]) == 1)
    if unknown:
        named = ", ".join(_with_hint(name, schema.model_fields) for name in unknown)
        plural = "s" if len(unknown) > 1 else ""
        return _bad(unknown[0], f"Unrecognized request argument{plural} supplied: {named}.")
    no_ops = schemas.no_op_fields(schema)

    def rank(error: dict) -> int:
        name = error["loc"][0] if error["loc"] else None
        if name in no_ops:
            return 0
        return 1 + (REPORTED_FIRST.index(name) if name in REPORTED_FIRST
                    else len(REPORTED_FIRST))

    error = min(errors, key=rank)
    if error["type"] in _SERVER_CHECK_WORDS:
        return _SERVER_CHECK_WORDS[error["type"]](**error["ctx"])
    if not error["loc"]:
        return _bad(None, f"The body must be a JSON object, got a JSON {json_type(data)}.")
    name = error["loc"][0]
    if name in no_ops:
        return _bad(name, f"{name}={json.dumps(data[name])} is not supported by this server; "
                          "leave it out (or at its default).")
    field_errors = [e for e in errors if e["loc"][:1] == (name,)]
    if name in _FIELD_WORDS:
        return _FIELD_WORDS[name](field_errors, data)
    # a Request's field: the words a Request uses (chat's max_completion_tokens is max_tokens)
    return _bad(name, field_error(error, "max_tokens" if name == "max_completion_tokens"
                                  else name, name))


def _with_hint(name: str, known) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name)


def _over_limit(field: str, value: int, limit: int) -> ApiError:
    return _bad(field, f"{field} {value} is over this server's limit: it accepts 1 to {limit} "
                       "(labkit serve --max-tokens-limit).")


def _model_not_found(model: str, served: str) -> ApiError:
    return ApiError(404, f"The model {model!r} does not exist: this server serves {served!r} "
                         "(GET /v1/models).", "model", "model_not_found")


def _disagree(max_tokens, max_completion_tokens) -> ApiError:
    return _bad("max_tokens", f"max_tokens ({json.dumps(max_tokens)}) and max_completion_tokens "
                              f"({json.dumps(max_completion_tokens)}) disagree; send one of "
                              "them (max_tokens is the older name).")


_SERVER_CHECK_WORDS = {
    "over_limit": _over_limit,
    "model_not_found": _model_not_found,
    "max_tokens_disagree": _disagree,
    "stream_options_without_stream": lambda: _bad(
        "stream_options", "stream_options is only allowed when stream is true."),
    "min_tokens_over": lambda min_tokens, max_tokens: _bad(
        "min_tokens", min_tokens_error(min_tokens, max_tokens)),
}


def _model_words(errors: list[dict], data: dict) -> ApiError:
    return _bad("model", f"model must be a string, got a JSON {json_type(data['model'])}.")


def _stream_words(errors: list[dict], data: dict) -> ApiError:
    return _bad("stream", f"stream must be true or false, got {json.dumps(data['stream'])}.")


def _stream_options_words(errors: list[dict], data: dict) -> ApiError:
    error = _unknown_first(errors, depth=2)
    loc = error["loc"]
    if len(loc) == 1:
        return _bad("stream_options", "stream_options must be an object like "
                                      '{"include_usage": true}.')
    where = f"stream_options.{loc[1]}"
    if error["type"] == "extra_forbidden":
        options = ", ".join(schemas.StreamOptions.model_fields)
        return _bad(where, f"{where} is not supported (these are: {options}).")
    return _bad(where, f"{where} must be true or false.")


def _prompt_words(errors: list[dict], data: dict) -> ApiError:
    error, prompt = errors[0], schemas.one_prompt(data.get("prompt"))
    if error["type"] == "missing":
        return _bad("prompt", "Missing required argument: prompt.")
    if isinstance(prompt, list):
        return _bad("prompt", f"prompt must be a string or a list of exactly one string (one "
                              f"completion per request), got a list of {len(prompt)} "
                              f"{json_type(prompt[0]) if prompt else 'item'}s.")
    if isinstance(prompt, str):
        return _bad("prompt", field_error(error))  # empty
    return _bad("prompt", f"prompt must be a string, got a JSON {json_type(prompt)}.")


def _messages_words(errors: list[dict], data: dict) -> ApiError:
    error, messages = errors[0], data.get("messages")
    if len(error["loc"]) == 1:
        got = "none" if messages is None else f"a JSON {json_type(messages)}"
        if isinstance(messages, list):
            got = "an empty list"
        return _bad("messages", f"messages must be a non-empty list of {{role, content}} "
                                f"objects, got {got}.")
    index = error["loc"][1]
    where, message = f"messages[{index}]", messages[index]
    error = _unknown_first([e for e in errors if e["loc"][1] == index], depth=3)
    if len(error["loc"]) == 2:
        return _bad(where, f"{where} must be an object with role and content, got a JSON "
                           f"{json_type(message)}.")
    key = error["loc"][2]
    if error["type"] == "extra_forbidden":
        return _bad(f"{where}.{key}", f"{where}.{key} is not supported (messages carry role, "
                                      "content and optionally name).")
    if key == "role":
        return _bad(f"{where}.role", f"{where}.role must be one of {', '.join(schemas.ROLES)}, "
                                     f"got {json.dumps(message.get('role'))}.")
    if key == "name":
        return _bad(f"{where}.name", f"{where}.name must be a string.")
    return _bad(f"{where}.content", f"{where}.content must be a string (or a list of text "
                                    f"parts), got a JSON {json_type(message.get('content'))}; "
                                    "this server reads text only.")


def _stop_words(errors: list[dict], data: dict) -> ApiError:
    kinds = {e["type"] for e in errors}
    if any(kind.endswith("_type") for kind in kinds):
        return _bad("stop", "stop must be a string or a list of strings.")
    if "too_long" in kinds:
        return _bad("stop", f"stop takes at most {schemas.MAX_STOP_STRINGS} strings, got "
                            f"{len(data['stop'])}.")
    return _bad("stop", "stop strings must not be empty.")


def _unknown_first(errors: list[dict], depth: int) -> dict:
    """Within one object (a message, stream_options: its keys' paths are `depth` long), an
    unknown key before the rest."""
    unknown = sorted((e for e in errors if e["type"] == "extra_forbidden"
                      and len(e["loc"]) == depth), key=lambda e: e["loc"][-1])
    return unknown[0] if unknown else errors[0]


# The words of a 400 about one of the body's own fields (a Request's fields use Request's).
_FIELD_WORDS = {"model": _model_words, "stream": _stream_words,
                "stream_options": _stream_options_words, "prompt": _prompt_words,
                "messages": _messages_words, "stop": _stop_words}


def is_openai_path(path: str) -> bool:
    return path.startswith(PREFIX) or path == PREFIX.rstrip("/")

