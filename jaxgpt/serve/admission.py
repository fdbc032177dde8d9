"""Taking requests on: a bounded number at a time (429 past it), none while draining (503), and
each place given back however its response ends (Admission, Ticket, ClosingStreamingResponse)."""
from __future__ import annotations

import threading

import anyio
from fastapi.responses import StreamingResponse

from jaxgpt.serve.openai_api import ApiError


class Admission:
    """Requests taken on (decoding or waiting for a slot): past `limit` a new one is refused at
    once (429) rather than left to wait minutes behind the others; after drain() every new one
    gets 503."""

    def __init__(self, limit: int, retry_after_s: int):
        self.limit, self.retry_after = limit, {"Retry-After": str(retry_after_s)}
        self.count, self.draining = 0, False
        self._lock = threading.Lock()

    def enter(self) -> "Ticket":
        with self._lock:
            if self.draining:
                raise ApiError(503, "the server is shutting down; send the request to another one",
                               type="server_unavailable", code="shutting_down",
                               headers=self.retry_after)
            if self.count >= self.limit:
                raise ApiError(429, f"the server is busy ({self.limit} requests taken on); "
                                    "try again", type="server_busy", code="server_busy",
                               headers=self.retry_after)
            self.count += 1
        return Ticket(self)

    def drain(self) -> None:
        self.draining = True

    def _leave(self) -> None:
        with self._lock:
            self.count -= 1


class Ticket:
    """One admitted request; close() (idempotent, from whichever path ends the response first)
    cancels its generation if still running and gives the place back."""

    def __init__(self, admission: Admission):
        self.admission, self.stream, self._closed = admission, None, False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.stream is not None and not self.stream.done:
            self.stream.cancel()
        self.admission._leave()


class ClosingStreamingResponse(StreamingResponse):
    """A streamed response that closes its ticket however it ends: finished, failed, or the client
    gone. A hang-up is watched for from the start: a request still waiting for a slot sends
    nothing, so no failed write would tell (and a body never started has no finally to run)."""

    def __init__(self, content, ticket: Ticket, **kwargs):
        super().__init__(content, **kwargs)
        self.ticket = ticket

    async def __call__(self, scope, receive, send) -> None:
        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.ticket.close()  # cancels the generation, so the body ends at the next step

        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(watch)
                await super().__call__(scope, receive, send)
                tasks.cancel_scope.cancel()
        finally:
            self.ticket.close()
