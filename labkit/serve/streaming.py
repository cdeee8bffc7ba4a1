"""Answering a /v1 completion: the text as it is generated, and the response, whole or streamed.

`TextSink` turns a request's tokens into text on the thread that delivers them (a detokenizer,
then the first stop string cuts it and cancels the rest of the generation). A streamed answer
builds each piece's SSE frame there too, and the frames reach the event loop through the
scheduler's `Relay` into a `FrameQueue`, from which the handler writes all that wait at once.
The response starts with the first piece of text, so an error before it (out of memory in the
prefill) still gets a real status code; an error after it is sent as a final `data: {"error":
...}` event. A client that disconnects, or reads so slowly that `STREAM_BUFFER_BYTES` of frames
wait for it, cancels its request: the engine stops it at its next step. What the bytes say is
`labkit.serve.openai_api`'s (`Call`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from labkit.engine.request import EngineGone, OutOfMemory, Request, Result
from labkit.serve.errors import internal_error_message, openai_error
from labkit.serve.openai_api import DONE, Call, sse, usage_counts
from labkit.serve.relay import Relay

if TYPE_CHECKING:
    from labkit.serve.backend import Backend

log = logging.getLogger(__name__)

# A stream's frames waiting for a slow reader, beyond what the socket buffers: past this, the
# request is cancelled (its KV cache pages go to others) rather than held for a stalled client.
STREAM_BUFFER_BYTES = 256 * 1024
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}  # a proxy (nginx) must not hold the stream back


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
        self.tokens_to_stop = 0  # once matched: tokens up to the one completing the stop
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
            self.text, self.matched, self.tokens_to_stop = self.text[:cut], True, self.tokens
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
                 observe: Callable[[Result, float | None], None],
                 relay: Relay) -> web.StreamResponse:
    """The streaming answer: each piece of text as a chunk as soon as it exists, then the
    closing chunks; `observe` gets the result and when the first chunk went out (the server's
    TTFT, which a slow reader's tail must not stretch). A disconnect (the handler cancelled, a
    write to a closed connection, or a reader too slow for `STREAM_BUFFER_BYTES`) cancels the
    request, so the engine stops it."""
    prompt_tokens = len(request.prompt_ids)
    frames, sink, work = _submit_framed(http_request, call, request, backend, submit, relay)
    response = web.StreamResponse(headers=SSE_HEADERS)
    first_sent: float | None = None

    async def send(data: bytes) -> None:
        nonlocal first_sent
        if not response.prepared:  # starts with the first piece of text, or the result
            first_sent = time.perf_counter()
            await response.prepare(http_request)
            if call.chat:
                data = call.chunk(first=True, usage=usage_counts(prompt_tokens, 0)) + data
        await response.write(data)

    try:
        while batch := await frames.take():
            await send(b"".join(batch))
        result = work.result()  # before the first byte, an error gets its own status code
        observe(result, first_sent)
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


def _submit_framed(http_request: web.Request, call: Call, request: Request, backend: Backend,
                   submit: Callable[[Request], Awaitable[Result]],
                   relay: Relay) -> tuple[FrameQueue, TextSink, asyncio.Future]:
    """Submit `request`, each new piece of its text made into an SSE frame on the generation
    thread: the frames' queue (closed once the generation ends; a reader too slow for it
    cancels the request and aborts the connection), the text's sink, and the submitted work."""
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
    return frames, sink, work

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
