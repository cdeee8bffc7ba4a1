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

Streaming: each new token reaches `Request.on_token` on the generation thread, where a
detokenizer turns it into text and `TextSink` cuts it at the first stop string (cancelling the
rest of the generation); the text crosses to the event loop with `call_soon_threadsafe` and
leaves as a chunk at once. The response starts with the first piece of text, so an error
before it (out of memory in the prefill) still gets a real status code; an error after it is
sent as a final `data: {"error": ...}` event. A client that disconnects mid-stream cancels its
request: the engine stops it at its next step.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from labkit.engine.request import (
    EngineGone,
    InvalidRequest,
    OutOfMemory,
    PromptTooLong,
    Request,
    Result,
    is_number,
)
from labkit.serve import body as json_body
from labkit.serve.errors import ApiError, internal_error_message, json_type, openai_error
from labkit.serve.relay import Relay

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
# A stream's frames waiting for a slow reader, beyond what the socket buffers: past this, the
# request is cancelled (its KV cache pages go to others) rather than held for a stalled client.
STREAM_BUFFER_BYTES = 256 * 1024
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}  # a proxy (nginx) must not hold the stream back


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

    def finish_reason(self, result: Result, sink: TextSink | None) -> str:
        if sink is not None and sink.matched:
            return "stop"  # a stop string (the engine then stopped: finish_reason cancelled)
        return "length" if result.finish_reason == "length" else "stop"

    def usage(self, result: Result) -> dict:
        return usage_counts(result.prompt_tokens, result.tokens_generated)

    def response(self, result: Result, sink: TextSink | None) -> dict:
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

    def closing_frames(self, result: Result, sink: TextSink) -> list[bytes]:
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
    --model`: "model", "synthetic:llama-3.2-3b", a Hub id or a directory). A backend without
    one (the test stub) gets its display name up to " (".
    """
    source = getattr(getattr(backend, "lm", None), "source", None)
    return source if isinstance(source, str) and source else backend.name.split(" (")[0]


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


# --- the text of a generation, on the generation thread ----------------------------------------

class TextSink:
    """The text of one generation as its tokens arrive, on the generation thread: each token is
    detokenized, the text is cut at the first stop string (which sets `request.cancelled`, so the
    engine stops at its next step), and each new piece goes to `deliver` with the number of
    tokens generated so far. A piece that could be the start of a stop string is held back until
    the next tokens show it is not."""

    def __init__(self, request: Request, detokenizer, stop: list[str],
                 deliver: Callable[[str, int], None] | None = None):
        self.request, self.detokenizer, self.stop = request, detokenizer, stop
        self.deliver = deliver
        self.tokens = 0  # generated so far
        self.text = ""  # everything so far (cut at a stop string)
        self.sent = 0  # characters of `text` delivered
        self.matched = False
        request.on_token = self.on_token
        request.wants_text = False  # `text` is the answer's text

    def on_token(self, token_id: int) -> None:
        self.tokens += 1
        piece = self.detokenizer.push(token_id)  # on the generation thread, as it must be
        if self.matched or not piece:
            return
        self.text += piece
        cut = min((i for s in self.stop if (i := self.text.find(s, self.sent)) >= 0),
                  default=-1)
        if cut >= 0:
            self.text, self.matched = self.text[:cut], True
            self.request.cancelled.set()
            ready = len(self.text)
        else:
            ready = len(self.text) - self._held_back()
        if ready > self.sent:
            new, self.sent = self.text[self.sent:ready], ready
            if self.deliver is not None:
                self.deliver(new, self.tokens)

    def _held_back(self) -> int:
        """Length of the longest end of `text` that begins a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text) - self.sent), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def flush(self) -> str:
        """Once the generation has ended: the text still held back."""
        rest, self.sent = self.text[self.sent:], len(self.text)
        return rest


# --- answering ---------------------------------------------------------------------------------

async def complete(call: Call, request: Request, backend: Backend,
                   submit: Callable[[Request], Awaitable[Result]],
                   observe: Callable[[Result], None]) -> web.Response:
    """The non-streaming answer. With stop strings the text is watched as it is generated, so
    the generation ends at the first one."""
    sink = TextSink(request, backend.detokenizer(), call.stop) if call.stop else None
    result = await submit(request)
    observe(result)
    return web.json_response(call.response(result, sink))


class FrameQueue:
    """A stream's SSE frames, from the thread that generates to the handler that writes them.
    Frames gather here as they are made; the writer takes all there are at each wake-up and
    writes them at once, so a loop that falls behind writes fewer, larger pieces. The wake-ups
    go through the scheduler's `Relay`, after the frames and before the request's result. A
    client that reads more slowly than the engine writes leaves frames piling up here; past
    `limit` bytes, `overflow` runs (on the loop) and the writer stops."""

    def __init__(self, relay: Relay, limit: int, overflow: Callable[[], None]):
        self.relay, self.limit, self.overflow = relay, limit, overflow
        self._lock = threading.Lock()
        self._frames: list[bytes] = []
        self._size = 0
        self._wake_posted = self.overflowed = self._closed = False
        self._waiter: asyncio.Future | None = None

    def put(self, frame: bytes) -> None:
        """From any thread."""
        with self._lock:
            if self.overflowed:
                return
            self._frames.append(frame)
            self._size += len(frame)
            if self._size > self.limit:
                self.overflowed = True
                self._frames.clear()
                post = self._overflow
            elif self._wake_posted:
                return
            else:
                self._wake_posted, post = True, self._wake
        self.relay.post(post)

    async def take(self) -> list[bytes]:
        """On the loop: every frame so far, once there is one; [] once closed and drained."""
        while True:
            with self._lock:
                if self.overflowed:
                    raise ConnectionResetError("the client read too slowly: stream cancelled")
                if self._frames:
                    frames, self._frames, self._size = self._frames, [], 0
                    return frames
            if self._closed:
                return []
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    def close(self) -> None:
        """On the loop, once the generation has ended (after its last frame was posted)."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        with self._lock:
            self._wake_posted = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _overflow(self) -> None:
        self.overflow()
        self._wake()


async def stream(http_request: web.Request, call: Call, request: Request, backend: Backend,
                 submit: Callable[[Request], Awaitable[Result]],
                 observe: Callable[[Result], None], relay: Relay) -> web.StreamResponse:
    """The streaming answer: each piece of text as a chunk as soon as it exists, then the
    closing chunks. A disconnect (the handler cancelled, a write to a closed connection, or a
    reader too slow for `STREAM_BUFFER_BYTES`) cancels the request, so the engine stops it."""
    prompt_tokens = len(request.prompt_ids)

    def too_slow() -> None:
        log.warning("%s: the client read too slowly (over %d bytes waiting): cancelled",
                    call.id, STREAM_BUFFER_BYTES)
        work.cancel()  # as for a client that left: counted cancelled, the engine stops it
        if http_request.transport is not None:
            http_request.transport.abort()  # a writer stuck on the full socket gives up now

    frames = FrameQueue(relay, STREAM_BUFFER_BYTES, too_slow)
    sink = TextSink(request, backend.detokenizer(), call.stop,
                    deliver=lambda piece, tokens: frames.put(
                        call.text_frame(piece, prompt_tokens, tokens)))
    work = asyncio.ensure_future(submit(request))

    def finished(task: asyncio.Future) -> None:
        if not task.cancelled():
            task.exception()  # retrieved here too, in case nobody is left to await it
        frames.close()

    work.add_done_callback(finished)
    response = web.StreamResponse(headers=SSE_HEADERS)

    async def send(data: bytes) -> None:
        if not response.prepared:  # starts with the first piece of text, or the result
            await response.prepare(http_request)
            if call.chat:
                data = call.chunk(first=True, usage=usage_counts(prompt_tokens, 0)) + data
        await response.write(data)

    try:
        while batch := await frames.take():
            await send(b"".join(batch))
        result = work.result()  # before the first byte, an error gets its own status code
        observe(result)
        await send(b"".join(call.closing_frames(result, sink)))
        await response.write_eof()
    except ConnectionResetError:  # the client went away between two chunks, or lagged
        request.cancelled.set()
    except asyncio.CancelledError:  # the client went away (aiohttp cancels its handler)
        request.cancelled.set()
        raise
    except Exception as err:
        if not response.prepared:
            raise  # nothing sent yet: the error middleware answers with its status
        await _stream_error(response, err, call.id)
    finally:
        if not work.done():
            work.cancel()  # the scheduler withdraws or cancels it, and counts it
    return response


async def _stream_error(response: web.StreamResponse, err: Exception, request_id: str) -> None:
    """An error after the stream began: the status is sent, so it goes in a last event."""
    if isinstance(err, OutOfMemory):
        status, message = 503, (f"Out of memory while generating ({err}). The server freed its "
                                "cache and keeps serving: retry, or ask for fewer tokens.")
    elif isinstance(err, EngineGone):
        status, message = 503, str(err)
    else:
        log.error("Internal error while streaming %s", request_id, exc_info=err)
        status, message = 500, internal_error_message(request_id)
    try:
        await response.write(sse(openai_error(status, message)))
        await response.write(DONE)
        await response.write_eof()
    except ConnectionResetError:
        pass


def is_openai_path(path: str) -> bool:
    return path.startswith(PREFIX) or path == PREFIX.rstrip("/")

