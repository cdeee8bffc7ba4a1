"""One request and its result, from where it enters (HTTP or Python) to the model and back.

A `Request` is validated once, when it is made: the sampling parameters are checked here and
nowhere else. Before it is generated, `hf_generate.tokenize` checks that its prompt fits the
model's context and stores the prompt's token ids on it, so the prompt is tokenized once. Every
way of generating (one at a time, batched) returns the same `Result`.

The errors a server turns into status codes live here too: `InvalidRequest` (400),
`PromptTooLong` (413), `OutOfMemory` and `EngineGone` (503). No torch here: a server imports
this module before its model, and torch with it, has loaded.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

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

    def __post_init__(self) -> None:
        _check_prompt(self.prompt)
        _check_max_tokens(self.max_tokens)
        self.temperature = _check_temperature(self.temperature)
        self.top_p = _check_top_p(self.top_p)
        _check_seed(self.seed)
        _check_min_tokens(self.min_tokens, self.max_tokens)
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequest(f"ignore_eos must be true or false, got {self.ignore_eos!r}")

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


def is_number(value) -> bool:
    """An int or a float, not a bool (which Python counts as an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_prompt(prompt) -> None:
    if not isinstance(prompt, str):
        raise InvalidRequest(f"prompt must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise InvalidRequest("prompt is empty; send some text to continue")


def _check_max_tokens(max_tokens) -> None:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise InvalidRequest(f"max_tokens must be an integer, at least 1, got {max_tokens!r}")
    if max_tokens < 1:
        raise InvalidRequest(f"max_tokens must be at least 1, got {max_tokens}")


def _check_temperature(temperature) -> float:
    if not is_number(temperature):
        raise InvalidRequest(f"temperature must be a number from 0 to {MAX_TEMPERATURE:g}, got "
                             f"{temperature!r}")
    if not 0 <= temperature <= MAX_TEMPERATURE:  # NaN and infinities fail it too
        raise InvalidRequest(f"temperature must be from 0 to {MAX_TEMPERATURE:g} (0 = greedy), "
                             f"got {temperature}")
    return float(temperature)


def _check_top_p(top_p) -> float | None:
    if top_p is None:
        return None
    if not is_number(top_p):
        raise InvalidRequest(f"top_p must be a number in (0, 1], got {top_p!r}")
    if not 0 < top_p <= 1:  # NaN fails it too
        raise InvalidRequest(f"top_p must be in (0, 1], got {top_p}")
    return float(top_p)


def _check_min_tokens(min_tokens, max_tokens: int) -> None:
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
        raise InvalidRequest(f"min_tokens must be a whole number, 0 or more, got {min_tokens!r}")
    if min_tokens > max_tokens:
        raise InvalidRequest(f"min_tokens ({min_tokens}) must not exceed max_tokens "
                             f"({max_tokens})")


def _check_seed(seed) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not 0 <= seed <= MAX_SEED):
        raise InvalidRequest(f"seed must be an integer from 0 to {MAX_SEED} (64 bits) or null, "
                             f"got {seed!r}")
