"""ASGI middleware: refuse bodies over a limit before they are read, requests without the API
key, and requests while the server is loading or draining, with OpenAI-shaped JSON errors."""

from __future__ import annotations

import json

from .jobs import ApiError


class BodyTooLarge(Exception):
    pass


async def send_error(send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """For the API routes (/v1/...): 503 while ``state.ready`` is false (but a draining server still
    answers reads and cancellations of its jobs), 401 without the API key
    (``Authorization: Bearer KEY``) when one is set; for every route, Content-Length checked
    against ``max_bytes`` and the streamed body counted too (413 either way, before the whole
    body is read)."""

    def __init__(self, app, state, max_bytes: int, api_key: str | None = None):
        self.app, self.state, self.max_bytes, self.api_key = app, state, max_bytes, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        # While draining, clients still read (and cancel) the jobs they were given: only new work is refused.
        job_read = self.state.draining and path.startswith("/v1/jobs/") and scope.get("method") in ("GET", "DELETE")
        if path.startswith("/v1/") and not self.state.ready and not job_read:
            why = "draining" if self.state.draining else "loading"
            msg = "the server is shutting down" if self.state.draining else "the model is still loading"
            return await send_error(send, ApiError(503, f"{msg}; retry shortly", "server_error", None, why,
                                                   {"Retry-After": "5"}))
        if self.api_key and path.startswith("/v1/"):
            auth = dict(scope.get("headers", [])).get(b"authorization", b"")
            if auth != f"Bearer {self.api_key}".encode():
                return await send_error(send, ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                                       "invalid_request_error", None, "invalid_api_key"))
        too_large = ApiError(413, f"request body over the {self.max_bytes}-byte limit", "invalid_request_error",
                             None, "body_too_large")
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await send_error(send, too_large)
        seen, started = 0, False

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except BodyTooLarge:
            if not started:
                await send_error(send, too_large)
