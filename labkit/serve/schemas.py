"""A request body, from its bytes to checked fields: its JSON (`load`), then its schema
(pydantic): the fields each generation endpoint takes, their types and bounds, and the server's
limits on them.

`load` is the one place both APIs (/generate and /v1) decode JSON, with the limits that keep any
body a 400 rather than an error deep in the stack. What the standard library alone lets through,
and where it would fail later: lone surrogates (`"\\ud800"` is valid JSON but no tokenizer takes
it), nesting deep enough to exhaust the interpreter's recursion, integers of thousands of digits
(Python refuses to convert them) or past 64 bits (torch's seed cannot hold them), and
`NaN`/`Infinity`, which are not JSON at all. Each is refused with the field's path (`BodyError`),
so the message can name it.

Checking a body against its schema (`check`) is the one check a request gets on its way in:
what passes becomes a `Request` made with `checked=True`, which nothing checks again, in this
process or the engine's (ARCHITECTURE.md, "One check per request"). The
fields a Request carries (prompt, max_tokens, temperature, top_p, seed, min_tokens, ignore_eos)
have the types `labkit.engine.request` declares, those a Python caller's Request is checked
against, so both ways in hold the same rules.

A schema says what is valid; the endpoint's module words what is not, from pydantic's errors
(each with its kind, its path and the value): `generate_api` in the seed's messages, `openai_api`
in OpenAI's, with the field in `param`. The server's checks beyond a field's own type and bounds
raise errors of the kinds in `SERVER_CHECKS`, whose context carries what the words need.

Why pydantic rather than msgspec (benchmarks/RESULTS.md, "Request schemas (issue 24)"): both
check a typical body in a few µs, less than reading its JSON takes; pydantic reports every error
as data (kind, path as a tuple, value), which a 400 naming the field and listing every unknown
one needs, where msgspec gives the first error as a sentence with the path inside, and cannot
bound an integer past 64 signed bits (a seed).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from labkit.engine.request import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    MaxTokens,
    MinTokens,
    Prompt,
    Seed,
    Temperature,
    TopP,
    min_tokens_error,
)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's defaults
OPENAI_DEFAULT_TEMPERATURE = 1.0
OPENAI_DEFAULT_TOP_P = 1.0
MAX_STOP_STRINGS = 4
ROLES = ("system", "developer", "user", "assistant")

# The server's checks beyond a field's type and bounds, by kind: what each error says when
# printed (the endpoints word their own answers from its context).
SERVER_CHECKS = {
    "over_limit": "{field} {value} is over the server's limit of {limit}",
    "model_not_found": "the model {model} is not the one served ({served})",
    "max_tokens_disagree": "max_tokens {max_tokens} and max_completion_tokens "
                           "{max_completion_tokens} disagree",
    "stream_options_without_stream": "stream_options without stream: true",
    "min_tokens_over": "min_tokens {min_tokens} over max_tokens {max_tokens}",
}

# --- the body's bytes as JSON -----------------------------------------------------------------

MAX_DEPTH = 32  # objects and arrays within each other; real bodies use 4
INT_BITS = 64  # the widest integer any field takes (seed: a signed 64-bit integer)


class BodyError(ValueError):
    """A body that is not acceptable JSON; `param` is the path of the field at fault, if one."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class _OutOfRange:
    """An integer too wide for any field, kept unconverted until its path is known."""

    def __init__(self, digits: str):
        self.digits = digits


def load(body: bytes) -> object:
    """The JSON value of `body`; BodyError says what is wrong, and where."""
    try:
        text = body.decode("utf-8")  # explicit: json.loads(bytes) would also guess UTF-16/32
    except UnicodeDecodeError:
        raise BodyError("The body is not UTF-8 text.") from None
    try:
        value = json.loads(text, parse_int=_parse_int, parse_constant=_refuse_constant)
    except RecursionError:
        raise BodyError(f"The body is nested too deeply (at most {MAX_DEPTH} levels of objects "
                        "and arrays).") from None
    except ValueError as err:  # json.JSONDecodeError, or a NaN/Infinity
        raise BodyError(f"The body is not valid JSON ({err}).") from None
    _check_values(value)
    return value


def _parse_int(digits: str) -> int | _OutOfRange:
    # Checked by length first: int() itself refuses over 4,300 digits, with a ValueError.
    if len(digits) > 21:
        return _OutOfRange(digits)
    number = int(digits)
    return number if -(2 ** (INT_BITS - 1)) <= number < 2 ** INT_BITS else _OutOfRange(digits)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _check_values(value: object) -> None:
    """Depth, strings and integers of every value, without recursion (the depth is the
    input's to choose)."""
    stack: list[tuple[object, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item, path or None)
        elif isinstance(item, _OutOfRange):
            size = len(item.digits.lstrip("-"))
            raise BodyError(f"{path or 'The body'}: the integer {_abridged(item.digits)} "
                            f"({size} digits) is out of range for any field (64-bit integers "
                            "at most).", path or None)
        elif isinstance(item, (dict, list)):
            if depth >= MAX_DEPTH:
                raise BodyError(f"The body is nested too deeply (at most {MAX_DEPTH} levels of "
                                "objects and arrays).", path or None)
            if isinstance(item, dict):
                for key, child in item.items():
                    _check_text(key, path or None, key=True)
                    stack.append((child, f"{path}.{key}" if path else key, depth + 1))
            else:
                stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))


def _check_text(text: str, path: str | None, key: bool = False) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        what = "a field name" if key else (path or "The body")
        raise BodyError(f"{what} holds a lone UTF-16 surrogate ({text[err.start]!a} at "
                        f"character {err.start}), which is not text: encode the string as "
                        "UTF-8 (or escape a character beyond U+FFFF as a surrogate pair).",
                        path) from None


def _abridged(digits: str) -> str:
    return digits if len(digits) <= 24 else f"{digits[:10]}...{digits[-6:]}"


# --- the body's fields ---------------------------------------------------------------------------

Schema = TypeVar("Schema", bound=BaseModel)


def check(schema: type[Schema], data: object, **limits) -> Schema:
    """The one check of a request body (decoded JSON): `schema`'s fields, types and bounds, and
    the server's `limits` (max_tokens_limit; served: the model's id for /v1). Raises pydantic's
    ValidationError, every problem in it, for the endpoint to word."""
    return schema.model_validate(data, context=limits)


def _refused(kind: str, **context) -> PydanticCustomError:
    return PydanticCustomError(kind, SERVER_CHECKS[kind], context)


class _Body(BaseModel):
    # An unknown field is refused, never ignored: a typo such as `max_token` must not fall back
    # to a default and skew a measurement.
    model_config = ConfigDict(extra="forbid")


# --- the seed's /generate ------------------------------------------------------------------------

class GenerateBody(_Body):
    """POST /generate. An explicit null is refused where a default exists (only top_p and seed
    take null), as the seed's contract has it."""

    prompt: Prompt
    max_tokens: MaxTokens = None  # absent: the server's default (below)
    temperature: Temperature = DEFAULT_TEMPERATURE
    top_p: TopP | None = None
    seed: Seed | None = None

    def max_tokens_within(self, limit: int) -> int:
        """The tokens to generate: as asked, else the default, or the server's limit when it is
        lower (a server started with a small limit answers field-less requests at it)."""
        return self.max_tokens if self.max_tokens is not None else min(DEFAULT_MAX_TOKENS, limit)

    @model_validator(mode="after")
    def _within_limit(self, info: ValidationInfo) -> GenerateBody:
        limit = info.context["max_tokens_limit"]
        if self.max_tokens is not None and self.max_tokens > limit:
            raise _refused("over_limit", field="max_tokens", value=self.max_tokens, limit=limit)
        return self


# --- OpenAI's /v1/completions and /v1/chat/completions --------------------------------------------

def _same(value, default) -> bool:
    """`value` is `default` as JSON has it: 0 and 0.0 alike, but false is not 0."""
    if default is None or isinstance(default, bool):
        return value is default
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) \
            and value == default
    return value == default


def NoOp(*values) -> Any:  # noqa: N802 (a type, as it is used)
    """A field accepted at null or at one of `values`, each of which changes nothing here; any
    other value is refused (n: 2, logprobs: true, ...), so a client never gets silently
    different behaviour from what it asked for."""
    def only_no_op(value):
        if value is not None and not any(_same(value, v) for v in values):
            raise PydanticCustomError("no_op", "not supported by this server")
        return value
    return Annotated[Any, AfterValidator(only_no_op)]


class _CommonNoOps(_Body):
    """Fields accepted only at a value that changes nothing here. (Identifiers and metadata
    change no output, so any value of their type is fine.)"""

    n: NoOp(1) = None
    frequency_penalty: NoOp(0) = None
    presence_penalty: NoOp(0) = None
    logit_bias: NoOp({}) = None
    user: StrictStr | None = None
    top_k: NoOp(-1, 0) = None  # vLLM's sampling extensions, at their no-op values
    min_p: NoOp(0) = None
    repetition_penalty: NoOp(1) = None


class CompletionNoOps(_CommonNoOps):
    best_of: NoOp(1) = None
    echo: NoOp(False) = None
    logprobs: NoOp() = None  # an integer asks for that many alternatives per token
    suffix: NoOp("") = None


class ChatNoOps(_CommonNoOps):
    logprobs: NoOp(False) = None
    top_logprobs: NoOp(0) = None
    tools: NoOp([]) = None
    tool_choice: NoOp("none", "auto") = None
    functions: NoOp([]) = None
    function_call: NoOp("none", "auto") = None
    parallel_tool_calls: StrictBool | None = None  # no tools: nothing to call in parallel
    response_format: NoOp({"type": "text"}) = None
    modalities: NoOp(["text"]) = None
    audio: NoOp() = None
    prediction: NoOp() = None
    reasoning_effort: NoOp() = None
    verbosity: NoOp() = None
    web_search_options: NoOp() = None
    store: NoOp(False) = None
    metadata: dict | None = None
    service_tier: NoOp("auto", "default") = None
    prompt_cache_key: StrictStr | None = None
    safety_identifier: StrictStr | None = None


class StreamOptions(_Body):
    include_usage: StrictBool | None = None
    include_obfuscation: StrictBool | None = None  # no obfuscation padding is sent
    continuous_usage_stats: StrictBool | None = None  # vLLM's: usage in every chunk


def _listed(value):
    return [value] if isinstance(value, str) else value


# stop: a string, or up to four; none of them empty.
Stop = Annotated[list[Annotated[StrictStr, Field(min_length=1)]],
                 BeforeValidator(_listed), Field(max_length=MAX_STOP_STRINGS)]


class _OpenAIBody(_Body):
    """What both /v1 generation bodies take besides their prompt. A body's fields are checked
    in order: its no-op fields, these, then its own. null means the default, as OpenAI reads
    it."""

    model: StrictStr | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: MaxTokens | None = None
    stop: Stop | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    min_tokens: MinTokens | None = None
    ignore_eos: StrictBool | None = None

    @field_validator("model")
    @classmethod
    def _served(cls, model: str | None, info: ValidationInfo) -> str | None:
        served = info.context["served"]
        if model is not None and model != served:
            raise _refused("model_not_found", model=model, served=served)
        return model

    @field_validator("stream_options", mode="before")
    @classmethod
    def _only_streamed(cls, options, info: ValidationInfo):
        if options is not None and not info.data.get("stream"):
            raise _refused("stream_options_without_stream")
        return options

    @model_validator(mode="after")
    def _within_limits(self, info: ValidationInfo):
        limit = info.context["max_tokens_limit"]
        max_tokens = self.max_tokens_within(limit)
        if self.min_tokens is not None and min_tokens_error(self.min_tokens, max_tokens):
            raise _refused("min_tokens_over", min_tokens=self.min_tokens, max_tokens=max_tokens)
        asked = self.asked_max_tokens
        if asked is not None and asked > limit:
            raise _refused("over_limit", field=self.max_tokens_field, value=asked, limit=limit)
        return self

    # what the fields come to

    @property
    def max_tokens_field(self) -> str:
        """The field that sets the limit (chat: either of two)."""
        return "max_tokens"

    @property
    def asked_max_tokens(self) -> int | None:
        return getattr(self, self.max_tokens_field)

    def max_tokens_within(self, limit: int) -> int:
        """As asked, else the endpoint's default (completions: OpenAI's 16; chat: the
        server's limit, cut down to what the context has room for once tokenized)."""
        if self.asked_max_tokens is not None:
            return self.asked_max_tokens
        return min(COMPLETIONS_DEFAULT_MAX_TOKENS, limit)

    @property
    def sampling(self) -> dict:
        """The Request's sampling arguments: OpenAI's defaults where null."""
        return {"temperature": OPENAI_DEFAULT_TEMPERATURE if self.temperature is None
                else self.temperature,
                "top_p": OPENAI_DEFAULT_TOP_P if self.top_p is None else self.top_p,
                "seed": self.seed,
                "min_tokens": self.min_tokens or 0, "ignore_eos": bool(self.ignore_eos)}

    @property
    def usage_options(self) -> tuple[bool, bool]:
        """(include_usage, continuous usage stats): as in vLLM, usage goes in every chunk only
        when both are true."""
        options = self.stream_options
        usage = options is not None and bool(options.include_usage)
        return usage, usage and bool(options.continuous_usage_stats)


def one_prompt(value):
    """A list of one string is that string (one completion per request)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    return value


class CompletionBody(_OpenAIBody, CompletionNoOps):
    """POST /v1/completions."""

    prompt: Annotated[Prompt, BeforeValidator(one_prompt)]


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class Message(_Body):
    role: Literal[ROLES]
    name: StrictStr | None = None
    content: StrictStr | list[TextPart]  # text parts are joined; this server reads text only

    def as_chat(self) -> dict:
        """{role, content} for a chat template: developer is the system role, parts joined."""
        content = self.content if isinstance(self.content, str) else \
            "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role,
                "content": content}


class ChatBody(_OpenAIBody, ChatNoOps):
    """POST /v1/chat/completions. max_completion_tokens is OpenAI's current name for the
    limit, max_tokens the older one."""

    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: MaxTokens | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_limit(cls, data):
        """Both names at different values is a 400, so neither is silently ignored (checked
        first, unknown fields aside: they are named first everywhere)."""
        if isinstance(data, dict) and data.keys() <= cls.model_fields.keys():
            new, old = data.get("max_completion_tokens"), data.get("max_tokens")
            if new is not None and old is not None and not (type(old) is type(new)
                                                            and old == new):
                raise _refused("max_tokens_disagree", max_tokens=old,
                               max_completion_tokens=new)
        return data

    @property
    def max_tokens_field(self) -> str:
        return "max_tokens" if self.max_completion_tokens is None else "max_completion_tokens"

    def max_tokens_within(self, limit: int) -> int:
        return self.asked_max_tokens if self.asked_max_tokens is not None else limit


def no_op_fields(schema: type[BaseModel]) -> frozenset[str]:
    """The fields of `schema` accepted only at a value that changes nothing here."""
    base = ChatNoOps if issubclass(schema, ChatNoOps) else CompletionNoOps
    return frozenset(base.model_fields)
