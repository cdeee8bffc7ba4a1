"""A test-only model backend for labkit.serve.http: controllable delay, blocking and failures.

It goes through the real server, scheduler and error handling; only the model is replaced, so
the tests can hold a generation open, inject an out-of-memory error, or time the queue exactly.
"""

from __future__ import annotations

import threading
import time

from labkit.engine.request import PromptTooLong, Request, Result


class StubBackend:
    name = "stub (test backend)"
    synthetic = False
    device = "cpu"
    gpu_name = None
    context_length = 512  # "tokens" are whitespace-separated words here
    load_time_s = 0.0
    cuda_graphs = False

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.gate: threading.Event | None = None  # when set up, generate waits for it
        self.started = threading.Event()  # set when a generation begins
        self.fail_next: list[BaseException] = []  # raised by the next generations, in order
        self.freed = 0
        self.calls: list[Request] = []

    def tokenize(self, request: Request) -> None:
        ids = list(range(len(request.prompt.split())))  # one "token" per word
        if len(ids) + request.max_tokens > self.context_length:
            raise PromptTooLong(
                f"prompt is {len(ids)} tokens; with max_tokens={request.max_tokens} that exceeds "
                f"the model's context of {self.context_length} tokens. Shorten the prompt or "
                "lower max_tokens.")
        request.prompt_ids = ids

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
        elapsed_ms = (time.perf_counter() - started) * 1000
        n = request.max_tokens
        return Result(
            generated_text=" ".join(["word"] * n), prompt=request.prompt, tokens_generated=n,
            prompt_tokens=len(request.prompt.split()),
            time_to_first_token_ms=round(elapsed_ms / max(n, 1), 2),
            inference_time_ms=round(elapsed_ms, 2),
            tokens_per_second=round(n / (elapsed_ms / 1000), 2) if elapsed_ms else 0.0,
            time_per_output_token_ms=None, device="cpu", model=self.name, synthetic=False,
            finish_reason="length")

    def free_memory(self) -> None:
        self.freed += 1

    def memory_used_gb(self) -> float | None:
        return None
