"""A test-only model backend for labkit.serve.http: controllable delay, blocking and failures.

It goes through the real server, scheduler and error handling; only the model is replaced, so
the tests can hold a generation open, inject an out-of-memory error, or time the queue exactly.

Its "model" generates token ids 0, 1, 2, ..., whose text is "word0 ", "word1 ", ...: each token
goes to the request's `on_token` as it is generated (`token_delay_s` apart), a cancelled request
stops before its next token, and with `stop_after` set a stop token ends the answer after that
many tokens unless `min_tokens` or `ignore_eos` hold it off. Every Result is kept in `results`.
"""

from __future__ import annotations

import threading
import time

from labkit.engine import text
from labkit.engine.request import Request, Result

STOP_TOKEN = 1_000_000  # the stub's end-of-sequence token: no text


class StubDetokenizer:
    def push(self, token_id: int) -> str:
        return "" if token_id == STOP_TOKEN else f"word{token_id} "


class StubBackend:
    name = "stub (test backend)"
    source = "stub"
    synthetic = False
    device = "cpu"
    gpu_name = None
    context_length = token_budget = 512  # "tokens" are whitespace-separated words here
    load_time_s = 0.0
    cuda_graphs = False

    def __init__(self, delay_s: float = 0.0, token_delay_s: float = 0.0):
        self.delay_s = delay_s  # once per generation, before its first token
        self.token_delay_s = token_delay_s  # before each token
        self.stop_after: int | None = None  # emit the stop token after this many tokens
        # tokens still generated after a cancel, as an engine process hears it a step late
        self.cancel_lag = 0
        self.gate: threading.Event | None = None  # when set up, generate waits for it
        self.started = threading.Event()  # set when a generation begins
        self.fail_next: list[BaseException] = []  # raised by the next generations, in order
        self.freed = 0
        self.calls: list[Request] = []
        self.results: list[Result] = []  # every finished generation, cancelled ones included

    def tokenize(self, request: Request) -> None:
        ids = list(range(len(request.prompt.split())))  # one "token" per word
        text.check_context(len(ids), request.max_tokens, self.context_length)
        request.prompt_ids = ids

    def detokenizer(self) -> StubDetokenizer:
        return StubDetokenizer()

    def chat_prompt(self, messages: list[dict]) -> str:
        return "\n".join([f"{m['role']}: {m['content']}" for m in messages] + ["assistant:"])

    def warm_up(self) -> None:
        pass

    def generate(self, request: Request) -> Result:
        self.calls.append(request)
        self.started.set()
        started = time.perf_counter()
        if self.gate is not None:
            self.gate.wait(30)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_next:
            raise self.fail_next.pop(0)
        text, reason = self._decode(request)
        elapsed_ms = (time.perf_counter() - started) * 1000
        n = len(text)
        result = Result(
            generated_text="".join(text), prompt=request.prompt, tokens_generated=n,
            prompt_tokens=len(request.prompt.split()),
            time_to_first_token_ms=round(elapsed_ms / max(n, 1), 2),
            inference_time_ms=round(elapsed_ms, 2),
            tokens_per_second=round(n / (elapsed_ms / 1000), 2) if elapsed_ms else 0.0,
            time_per_output_token_ms=None, device="cpu", model=self.name, synthetic=False,
            finish_reason=reason)
        self.results.append(result)
        return result

    def _decode(self, request: Request) -> tuple[list[str], str]:
        """The pieces of text generated, and why it ended."""
        detokenizer, pieces, lag = self.detokenizer(), [], self.cancel_lag
        for token in range(request.max_tokens):
            if request.cancelled.is_set():
                if not lag:
                    return pieces, "cancelled"
                lag -= 1
            if self.token_delay_s:
                time.sleep(self.token_delay_s)
            if (self.stop_after is not None and token >= self.stop_after
                    and request.may_stop(token)):
                request.emit(STOP_TOKEN)
                return pieces, "stop"
            request.emit(token)
            pieces.append(detokenizer.push(token))
        return pieces, "length"

    def generate_batch(self, requests: list[Request], on_finish=None) -> list[Result]:
        """Batched mode's entry point; the stub generates the rows one after another."""
        results = []
        for index, request in enumerate(requests):
            results.append(self.generate(request))
            if on_finish is not None:
                on_finish(index, results[-1])
        return results

    def free_memory(self) -> None:
        self.freed += 1

    def memory_used_gb(self) -> float | None:
        return None

    def memory_gb(self) -> dict | None:
        return None


def held_loader(backend: StubBackend):
    """A model loader that holds the server in its loading state until `release.set()`:
    returns (loader, release)."""
    release = threading.Event()

    def load() -> StubBackend:
        release.wait(10)
        return backend

    return load, release
