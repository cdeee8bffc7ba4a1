"""An aiohttp app served on an event loop of its own thread, for tests that talk to it with
plain blocking sockets (http.client): fuzzing, raw bytes, slow or many connections."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import threading
import time

from aiohttp.test_utils import TestServer


class Server:
    """An app served on a loop of its own thread; `post` sends raw bytes with http.client."""

    def __init__(self, app, **runner_options):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.server = TestServer(app)
        # No access log: the loop's thread outlives a test's captured output.
        self._run(self.server.start_server(**{"access_log": None, **runner_options}))
        self.port = self.server.port
        self.conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=60)
        deadline = time.monotonic() + 60
        while not self.get("/").get("model_loaded"):
            assert time.monotonic() < deadline, "the model never loaded"
            time.sleep(0.02)

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def get(self, path: str, headers: dict | None = None) -> dict:
        self.conn.request("GET", path, headers=headers or {})
        return json.loads(self.conn.getresponse().read())

    def post(self, path: str, body: bytes, content_type: str = "application/json",
             headers: dict | None = None) -> tuple[int, bytes]:
        headers = {"Content-Type": content_type, **(headers or {})}
        try:
            self.conn.request("POST", path, body, headers)
            response = self.conn.getresponse()
        except (http.client.HTTPException, OSError):
            self.conn.close()  # the server closed a connection it could not read: reconnect
            self.conn.request("POST", path, body, headers)
            response = self.conn.getresponse()
        return response.status, response.read()

    def stats(self) -> dict:
        return self.get("/stats")["server"]

    def close(self) -> None:
        self.conn.close()
        self._run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)


@contextlib.contextmanager
def serving(app, **runner_options):
    server = Server(app, **runner_options)
    try:
        yield server
    finally:
        server.close()
