"""The OpenAI-compatible API: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

Owns what makes these endpoints OpenAI's: which fields a body may carry and the 400 for each it
cannot honour, the `Request` a body becomes, the response objects and stream chunks, the
Server-Sent Events framing, and OpenAI's error shape `{"error": {"message", "type", "param",
"code"}}` (which `labkit.serve.http` uses for every error on a /v1 path). The handlers in
`http.py` only string these together; queueing, limits and metrics are the same as /generate's.

A field the server cannot honour is refused, not ignored: an unknown field, or a supported
one at a value other than its no-op default (`n: 2`, `logprobs: true`, `echo: true`, ...) is a
400 naming it, so a client never gets silently different behaviour from what it asked for.
Sampling values are checked once, by `Request`; its `InvalidRequest` becomes a 400 whose `param`
is the field it names.

How an answer is produced and sent, whole or streamed, is `labkit.serve.streaming`'s.
"""

from __future__ import annotations

import difflib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from labkit.engine.request import (
    InvalidRequest,
    PromptTooLong,
    Request,
    Result,
    is_number,
)
from labkit.serve import body as json_body
from labkit.serve.errors import ApiError, json_type

if TYPE_CHECKING:
    from labkit.serve.backend import Backend

log = logging.getLogger(__name__)

PREFIX = "/v1/"
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
ENDPOINTS = "GET /v1/models, POST /v1/completions, POST /v1/chat/completions"
OWNED_BY = "labkit"
STARTED = int(time.time())  # a model's "created": when this server process started
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_TEMPERATURE = 1.0  # OpenAI's defaults
DEFAULT_TOP_P = 1.0
MAX_STOP_STRINGS = 4
ROLES = ("system", "developer", "user", "assistant")
DONE = b"data: [DONE]\n\n"


# --- which fields a body may carry -------------------------------------------------------------

def _same(value, default) -> bool:
    """`value` is `default` in JSON terms: 0 and 0.0 alike, but false is not 0."""
    if default is None or isinstance(default, bool):
        return value is default
    if is_number(default):
        return is_number(value) and value == default
    return value == default


def _no_op(*defaults) -> Callable[[object], bool]:
    return lambda value: value is None or any(_same(value, d) for d in defaults)


def _string_or_null(value) -> bool:
    return value is None or isinstance(value, str)


def _bool_or_null(value) -> bool:
    return value is None or isinstance(value, bool)


def _object_or_null(value) -> bool:
    return value is None or isinstance(value, dict)


# Fields accepted only at a value that changes nothing here; anything else is a 400 naming them.
# (Identifiers and metadata change no output, so any value of the right type is fine.)
_NO_OP_COMMON: dict[str, Callable[[object], bool]] = {
    "n": _no_op(1),
    "frequency_penalty": _no_op(0),
    "presence_penalty": _no_op(0),
    "logit_bias": _no_op({}),
    "user": _string_or_null,
    # vLLM's sampling extensions, at their no-op values
    "top_k": _no_op(-1, 0),
    "min_p": _no_op(0),
    "repetition_penalty": _no_op(1),
}
_NO_OP_COMPLETIONS = {
    **_NO_OP_COMMON,
    "best_of": _no_op(1),
    "echo": _no_op(False),
    "logprobs": _no_op(),  # an integer asks for that many alternatives per token
    "suffix": _no_op(""),
}
_NO_OP_CHAT = {
    **_NO_OP_COMMON,
    "logprobs": _no_op(False),
    "top_logprobs": _no_op(0),
    "tools": _no_op([]),
    "tool_choice": _no_op("none", "auto"),
    "functions": _no_op([]),
    "function_call": _no_op("none", "auto"),
    "parallel_tool_calls": _bool_or_null,  # no tools: nothing to call in parallel
    "response_format": _no_op({"type": "text"}),
    "modalities": _no_op(["text"]),
    "audio": _no_op(),
    "prediction": _no_op(),
    "reasoning_effort": _no_op(),
    "verbosity": _no_op(),
    "web_search_options": _no_op(),
    "store": _no_op(False),
    "metadata": _object_or_null,
    "service_tier": _no_op("auto", "default"),
    "prompt_cache_key": _string_or_null,
    "safety_identifier": _string_or_null,
}
_SUPPORTED_COMMON = ("model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream",
                     "stream_options", "ignore_eos", "min_tokens")
REQUEST_FIELDS = ("temperature", "top_p", "seed", "min_tokens", "ignore_eos")  # as Request names
FIELDS = {
    COMPLETIONS: (("prompt", *_SUPPORTED_COMMON), _NO_OP_COMPLETIONS),
    CHAT: (("messages", "max_completion_tokens", *_SUPPORTED_COMMON), _NO_OP_CHAT),
}


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param)


class Text(Protocol):
    """What an answer needs of the text watched as it was generated (`streaming.TextSink`)."""

    text: str  # all of it, cut at the first stop string
    matched: bool  # a stop string ended it

    def flush(self) -> str: ...


# --- a parsed request --------------------------------------------------------------------------

@dataclass
class Call:
    """One /v1 completion request, parsed: what to generate and how to answer it."""

    chat: bool
    model: str  # the served model's id, echoed in every response
    prompt: str | None  # completions
    messages: list[dict] | None  # chat
    sampling: dict  # Request's keyword arguments, max_tokens excepted
    max_tokens: int | None  # None: the endpoint's default
    max_tokens_field: str  # the field that set it (chat: max_completion_tokens or max_tokens)
    stop: list[str]
    stream: bool
    include_usage: bool
    continuous_usage: bool = False  # vLLM's stream_options.continuous_usage_stats
    id: str = field(default="")
    created: int = field(default_factory=lambda: int(time.time()))
    _text_template: tuple[bytes, bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.id:
            self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    @property
    def prompt_field(self) -> str:
        return "messages" if self.chat else "prompt"

    # --- the Request it becomes (templating and tokenizing: on the check thread when long) ---

    def prepare(self, backend: Backend, max_tokens_limit: int) -> Request:
        """The Request for this call, validated and tokenized. A long body's runs off the event
        loop (a chat template and the tokenizer both work on up to 1 MiB of text). Without
        max_tokens, a completion gets OpenAI's 16 and a chat answer as much as the server
        allows and the context has room for."""
        prompt = backend.chat_prompt(self.messages) if self.chat else self.prompt
        if self.max_tokens is not None:
            max_tokens = self.max_tokens
        elif self.chat:
            max_tokens = max_tokens_limit
        else:
            max_tokens = min(COMPLETIONS_DEFAULT_MAX_TOKENS, max_tokens_limit)
        try:
            request = Request(prompt, max_tokens=max_tokens, templated=self.chat,
                              **self.sampling)
        except InvalidRequest as err:
            raise self._invalid(err) from None
        if request.max_tokens > max_tokens_limit:
            raise _bad(self.max_tokens_field,
                       f"{self.max_tokens_field} {request.max_tokens} is over this server's "
                       f"limit: it accepts 1 to {max_tokens_limit} (labkit serve "
                       "--max-tokens-limit).")
        try:
            if self.max_tokens is None and self.chat:
                self._fit_default_max_tokens(request, backend)
            else:
                backend.tokenize(request)
        except PromptTooLong as err:
            raise ApiError(413, str(err), self.prompt_field, "context_length_exceeded") \
                from None
        return request

    def _fit_default_max_tokens(self, request: Request, backend: Backend) -> None:
        """No max_tokens asked for: as many as the request can hold after the prompt (the
        model's context, and in continuous mode the whole KV cache), up to the server's limit
        (what vLLM does), rather than a 413 for a long conversation."""
        wanted, request.max_tokens = request.max_tokens, 1
        backend.tokenize(request)  # stores the prompt ids; PromptTooLong if nothing fits
        room = backend.token_budget - len(request.prompt_ids)
        request.max_tokens = max(1, min(wanted, room))
        if request.min_tokens > request.max_tokens:
            raise _bad("min_tokens", f"min_tokens ({request.min_tokens}) is more than the "
                                     f"{request.max_tokens} tokens the context has room for "
                                     "after these messages")

    def _invalid(self, err: InvalidRequest) -> ApiError:
        """A 400 naming the field: Request's message starts with the one it is about."""
        message = str(err)
        param = message.split(maxsplit=1)[0] if message else ""
        if param == "max_tokens":
            param = self.max_tokens_field
            message = param + message[len("max_tokens"):]
        elif param == "prompt":
            param = self.prompt_field
        elif param not in REQUEST_FIELDS:
            param = None
        return _bad(param, message)

    # --- answers ----------------------------------------------------------------------------

    def finish_reason(self, result: Result, sink: Text | None) -> str:
        if sink is not None and sink.matched:
            return "stop"  # a stop string (the engine then stopped: finish_reason cancelled)
        return "length" if result.finish_reason == "length" else "stop"

    def usage(self, result: Result) -> dict:
        return usage_counts(result.prompt_tokens, result.tokens_generated)

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
                "usage": self.usage(result)}

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
        frames.append(self.chunk(None, self.finish_reason(result, sink), usage=self.usage(result)))
        if self.include_usage:
            frames.append(self._frame([], self.usage(result)))
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


def parse(path: str, body: bytes, served: str) -> Call:
    """A /v1/completions or /v1/chat/completions body (already size-checked) as a Call; each
    problem is an ApiError naming its field. Sampling values are left to `Request`."""
    chat = path == CHAT
    try:
        data = json_body.load(body)
    except json_body.BodyError as err:
        raise _bad(err.param, str(err)) from None
    if not isinstance(data, dict):
        raise _bad(None, f"The body must be a JSON object, got a JSON {json_type(data)}.")
    supported, no_ops = FIELDS[path]
    unknown = sorted(set(data) - set(supported) - set(no_ops))
    if unknown:
        named = ", ".join(_with_hint(name, (*supported, *no_ops)) for name in unknown)
        plural = "s" if len(unknown) > 1 else ""
        raise _bad(unknown[0], f"Unrecognized request argument{plural} supplied: {named}.")
    for name, accepts in no_ops.items():
        if name in data and not accepts(data[name]):
            raise _bad(name, f"{name}={json.dumps(data[name])} is not supported by this server; "
                             "leave it out (or at its default).")

    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", f"model must be a string, got a JSON {json_type(model)}.")
    if model is not None and model != served:
        raise ApiError(404, f"The model {model!r} does not exist: this server serves "
                               f"{served!r} (GET /v1/models).", "model", "model_not_found")

    stream = data.get("stream")
    if not _bool_or_null(stream):
        raise _bad("stream", f"stream must be true or false, got {json.dumps(stream)}.")
    include_usage, continuous_usage = _stream_options(data.get("stream_options"), bool(stream))

    prompt = messages = None
    if chat:
        messages = _messages(data.get("messages"))
        max_tokens_field = _chat_max_tokens_field(data)
    else:
        if "prompt" not in data:
            raise _bad("prompt", "Missing required argument: prompt.")
        prompt = _prompt(data["prompt"])
        max_tokens_field = "max_tokens"
    max_tokens = data.get(max_tokens_field)

    sampling = {"temperature": DEFAULT_TEMPERATURE, "top_p": DEFAULT_TOP_P}
    for name in REQUEST_FIELDS:
        if data.get(name) is not None:  # null: the default, as OpenAI reads it
            sampling[name] = data[name]
    return Call(chat=chat, model=served, prompt=prompt, messages=messages, sampling=sampling,
                max_tokens=max_tokens, max_tokens_field=max_tokens_field,
                stop=_stop(data.get("stop")), stream=bool(stream), include_usage=include_usage,
                continuous_usage=continuous_usage)


def _chat_max_tokens_field(data: dict) -> str:
    """Which of chat's two names for the limit sets it: max_completion_tokens (OpenAI's
    current name) or max_tokens (the older one). Both at different values is a 400, so neither
    is silently ignored."""
    new, old = data.get("max_completion_tokens"), data.get("max_tokens")
    if new is None:
        return "max_tokens"
    if old is not None and not (type(old) is type(new) and old == new):
        raise _bad("max_tokens", f"max_tokens ({json.dumps(old)}) and max_completion_tokens "
                                 f"({json.dumps(new)}) disagree; send one of them "
                                 "(max_tokens is the older name).")
    return "max_completion_tokens"


def _with_hint(name: str, known) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name)


def _prompt(prompt) -> str:
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise _bad("prompt", f"prompt must be a string or a list of exactly one string "
                                 f"(one completion per request), got a list of {len(prompt)} "
                                 f"{json_type(prompt[0]) if prompt else 'item'}s.")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _bad("prompt", f"prompt must be a string, got a JSON {json_type(prompt)}.")
    return prompt


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        got = "none" if messages is None else f"a JSON {json_type(messages)}"
        if isinstance(messages, list):
            got = "an empty list"
        raise _bad("messages", f"messages must be a non-empty list of {{role, content}} "
                               f"objects, got {got}.")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(where, f"{where} must be an object with role and content, got a JSON "
                              f"{json_type(message)}.")
        extra = sorted(set(message) - {"role", "content", "name"})
        if extra:
            raise _bad(f"{where}.{extra[0]}", f"{where}.{extra[0]} is not supported (messages "
                                              "carry role, content and optionally name).")
        role = message.get("role")
        if role not in ROLES:
            raise _bad(f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)}, got "
                                        f"{json.dumps(role)}.")
        name = message.get("name")
        if not _string_or_null(name):
            raise _bad(f"{where}.name", f"{where}.name must be a string.")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content(message.get("content"), f"{where}.content")})
    return out


def _content(content, where: str) -> str:
    """A string, or a list of text parts ({"type": "text", "text": ...}), joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
            isinstance(part, dict) and part.get("type") == "text" and set(part) == {"type", "text"}
            and isinstance(part.get("text"), str) for part in content):
        return "".join(part["text"] for part in content)
    raise _bad(where, f"{where} must be a string (or a list of text parts), got a JSON "
                      f"{json_type(content)}; this server reads text only.")


def _stop(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", "stop must be a string or a list of strings.")
    if len(stops) > MAX_STOP_STRINGS:
        raise _bad("stop", f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}.")
    if any(not s for s in stops):
        raise _bad("stop", "stop strings must not be empty.")
    return stops


STREAM_OPTIONS = ("include_usage", "include_obfuscation",  # no obfuscation padding is sent
                  "continuous_usage_stats")  # vLLM's: usage in every chunk (benchmark clients)


def _stream_options(options, stream: bool) -> tuple[bool, bool]:
    """(include_usage, continuous usage stats); stream_options is valid only with stream: true.
    As in vLLM, usage goes in every chunk only when both are true."""
    if options is None:
        return False, False
    if not stream:
        raise _bad("stream_options", "stream_options is only allowed when stream is true.")
    if not isinstance(options, dict):
        raise _bad("stream_options", "stream_options must be an object like "
                                     '{"include_usage": true}.')
    extra = sorted(set(options) - set(STREAM_OPTIONS))
    if extra:
        raise _bad(f"stream_options.{extra[0]}", f"stream_options.{extra[0]} is not supported "
                                                 f"(these are: {', '.join(STREAM_OPTIONS)}).")
    for name in STREAM_OPTIONS:
        if not _bool_or_null(options.get(name)):
            raise _bad(f"stream_options.{name}", f"stream_options.{name} must be true or false.")
    usage = bool(options.get("include_usage"))
    return usage, usage and bool(options.get("continuous_usage_stats"))


def is_openai_path(path: str) -> bool:
    return path.startswith(PREFIX) or path == PREFIX.rstrip("/")

