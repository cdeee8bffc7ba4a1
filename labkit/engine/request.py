"""One request and its result, from where it enters (HTTP or Python) to the model and back.

A `Request` is checked once, where it enters. Made in Python, its fields are checked when it is
made: `Fields` declares each one's type and bounds (a pydantic schema), and a value outside them
is an `InvalidRequest` in the words of `FIELD_WORDS`. Made by the server, from a body that the
body's own schema (`labkit.serve.schemas`, built on the same field types) has checked, it is made
with `checked=True`, and nothing checks it again: not the engine, not the engine process.
Before it is generated, its prompt is tokenized and checked to fit, once
(`text.tokenize`: the model's context; `continuous.check_fits`: the whole KV cache), and
its token ids are stored on it. Every way of generating (one at a time, batched) returns the
same `Result`.

The errors a server turns into status codes live here too: `InvalidRequest` (400),
`PromptTooLong` (413), `OutOfMemory` and `EngineGone` (503). No torch here: a server imports
this module before its model, and torch with it, has loaded.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import KW_ONLY, InitVar, asdict, dataclass, field
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

DEFAULT_MAX_TOKENS = 150
DEFAULT_TEMPERATURE = 0.7
MAX_TEMPERATURE = 2.0
MAX_SEED = 2**64 - 1  # torch.manual_seed takes an unsigned 64-bit integer


class InvalidRequest(ValueError):
    """A request argument of the wrong type or out of range; the message names it and says
    what is valid."""


class PromptTooLong(InvalidRequest):
    """Prompt plus max_tokens does not fit in the model's context window."""


class OutOfMemory(RuntimeError):
    """The device ran out of memory while generating; the allocator's cache was freed."""


class EngineGone(RuntimeError):
    """The engine process exited; nothing can be generated until the server restarts."""


TokenSink = Callable[[int], None]


@dataclass(eq=False)
class Request:
    """What to generate and how to sample it. temperature 0 is greedy; top_p None keeps the
    whole distribution; a seed makes sampling repeatable. `min_tokens` and `ignore_eos` hold off
    the model's stop token (benchmark clients ask for fixed lengths this way).

    Two hooks connect a request to whoever waits for it, without the engine knowing who that is:
    `on_token(token_id)` is called on the generation thread with each new token as soon as it
    is on the host (a server streams it), and `cancelled`, once set (a client went away), makes
    the engine stop this request at its next step and free its place."""

    prompt: str
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float | None = None
    seed: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    templated: bool = False  # the prompt is already in the model's chat format: used as is
    prompt_ids: list[int] | None = field(default=None, repr=False)  # set by tokenize, once
    on_token: TokenSink | None = field(default=None, repr=False)
    # False: whoever waits builds the text from `on_token` (a server's stream): the result's
    # text may be left empty, sparing a second decode of the same tokens.
    wants_text: bool = field(default=True, repr=False)
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    # The KV cache (in tokens) it was checked to fit once tokenized (`continuous.check_fits`):
    # an engine with that cache takes it without checking again.
    fits_cache: int | None = field(default=None, repr=False)
    _: KW_ONLY
    # True: its fields were checked where it entered (the server's body schema), so they are
    # not checked again; for the server's edge and the engine process only.
    checked: InitVar[bool] = False

    def __post_init__(self, checked: bool) -> None:
        if not checked:
            check_fields(self)

    def may_stop(self, tokens_so_far: int) -> bool:
        """Whether a stop token may end the generation after `tokens_so_far` tokens."""
        return not self.ignore_eos and tokens_so_far >= self.min_tokens

    def emit(self, token_id: int) -> None:
        if self.on_token is not None:
            self.on_token(token_id)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Result:
    """One finished generation. Times are host clock readings after the device finished
    (ms); `queue_time_ms` and `memory_used_gb` are filled in by a server's scheduler."""

    generated_text: str
    prompt: str
    tokens_generated: int
    prompt_tokens: int
    time_to_first_token_ms: float
    inference_time_ms: float
    tokens_per_second: float
    time_per_output_token_ms: float | None
    device: str
    model: str
    synthetic: bool
    finish_reason: str  # "length" (hit max_tokens), "stop" (a stop token), "cancelled"
    queue_time_ms: float | None = None  # waiting in a server before its generation started
    memory_used_gb: float | None = None  # GPU memory held by tensors when it finished
    # The generated ids as sampled (a final stop token included): what `generated_text` is
    # decoded from. Not in `as_dict`, which is the seed's response.
    token_ids: list[int] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        fields = asdict(self)
        del fields["token_ids"]
        return fields


# --- the fields' rules ----------------------------------------------------------------------------

def _not_blank(prompt: str) -> str:
    if not prompt.strip():
        raise ValueError("blank")
    return prompt


# Each field's type and bounds; the server's body schemas are built on the same types. Strict:
# no coercion ("10" is not 10, true is not 1), but an integer is a valid float.
Prompt = Annotated[StrictStr, AfterValidator(_not_blank)]
MaxTokens = Annotated[StrictInt, Field(ge=1)]
Temperature = Annotated[StrictFloat, Field(ge=0, le=MAX_TEMPERATURE)]  # NaN fails it too
TopP = Annotated[StrictFloat, Field(gt=0, le=1)]
Seed = Annotated[StrictInt, Field(ge=0, le=MAX_SEED)]
MinTokens = Annotated[StrictInt, Field(ge=0)]


class Fields(BaseModel):
    """A Request's checked fields, in the order they are checked."""

    model_config = ConfigDict(extra="forbid")

    prompt: Prompt
    max_tokens: MaxTokens
    temperature: Temperature
    top_p: TopP | None
    seed: Seed | None
    min_tokens: MinTokens
    ignore_eos: StrictBool


# The words of a field's InvalidRequest (and of the server's 400): (a value of the wrong type,
# a value out of its bounds). `{field}` is the name the caller gave the field, `{value!r}` what
# it sent.
FIELD_WORDS = {
    "prompt": ("{field} must be a string, got {type}",
               "{field} is empty; send some text to continue"),
    "max_tokens": ("{field} must be an integer, at least 1, got {value!r}",
                   "{field} must be at least 1, got {value}"),
    "temperature": (f"{{field}} must be a number from 0 to {MAX_TEMPERATURE:g}, got {{value!r}}",
                    f"{{field}} must be from 0 to {MAX_TEMPERATURE:g} (0 = greedy), got "
                    "{value}"),
    "top_p": ("{field} must be a number in (0, 1], got {value!r}",
              "{field} must be in (0, 1], got {value}"),
    "seed": (f"{{field}} must be an integer from 0 to {MAX_SEED} (64 bits) or null, got "
             "{value!r}",) * 2,
    "min_tokens": ("{field} must be a whole number, 0 or more, got {value!r}",) * 2,
    "ignore_eos": ("{field} must be true or false, got {value!r}",) * 2,
}


def field_error(error: dict, field_name: str | None = None, called: str | None = None) -> str:
    """The words for a pydantic error about one of a Request's fields: `field_name` (else the
    field the error is at), called `called` where the caller names it otherwise."""
    field_name = field_name or error["loc"][0]
    wrong_type, out_of_bounds = FIELD_WORDS[field_name]
    words = wrong_type if error["type"].endswith("_type") else out_of_bounds
    value = error["input"]
    return words.format(field=called or field_name, value=value, type=type(value).__name__)


def min_tokens_error(min_tokens: int, max_tokens: int) -> str | None:
    """The words for min_tokens over max_tokens; None when it is not."""
    if min_tokens <= max_tokens:
        return None
    return f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})"


def check_fields(request: Request) -> None:
    """The one check of a request made in Python: InvalidRequest naming the first field at
    fault. Numbers come out as the floats the engine uses."""
    try:
        fields = Fields.model_validate({name: getattr(request, name)
                                        for name in Fields.model_fields})
    except ValidationError as err:
        raise InvalidRequest(field_error(err.errors()[0])) from None
    request.temperature, request.top_p = fields.temperature, fields.top_p
    relation = min_tokens_error(fields.min_tokens, fields.max_tokens)
    if relation:
        raise InvalidRequest(relation)
