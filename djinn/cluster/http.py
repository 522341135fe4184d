"""The router's OpenAI-compatible HTTP API: each request forwarded to the server of its session.

Every server of a cluster serves the OpenAI API of ``djinn.server.openai_api`` on a port of its
own; this front end serves the same routes and forwards each request, its body untouched and
its response streamed back as it comes (server-sent events included). A request that names a
session (``"djinn": {"session_id": ...}`` or the ``X-Djinn-Session-Id`` header) goes to the
server that holds that session, where the session's KV stays between requests and where its
tool-call IO_WAIT is signalled; a session the router has not seen yet, and a request without a
session, goes where admission is cheapest (``Router.place``). The session routes
(``/v1/djinn/sessions/{id}``) go to the session's server. A server that is gone fails only the
sessions it held: their requests get a 503 whose error names the server.

The body is parsed only to find the session id (JSON, nothing evaluated); the server checks the
rest. HTTP sessions are not migrated: their records live in each server's HTTP front end, which
the node's control calls do not reach.
"""

from __future__ import annotations

import asyncio
import json
import logging

from aiohttp import ClientError, ClientSession, ClientTimeout, web

from djinn.cluster.router import Backend, Router
from djinn.kernel.errors import DjinnError
from djinn.server.openai_api import MAX_BODY_BYTES, SESSION_HEADER, ApiError, api_errors, listen

log = logging.getLogger(__name__)

#: response headers passed back to the client (the rest belong to the hop)
_PASSED_HEADERS = ("Content-Type", "Cache-Control", SESSION_HEADER)


def _unavailable(exc: DjinnError) -> ApiError:
    """A router's own failure (no server can take the request, one is gone): 503."""
    return ApiError(503, str(exc), type="server_error", code=exc.code)


class HttpRouter:
    """The OpenAI API in front of ``router``'s servers (each ``Backend.http_url``)."""

    def __init__(self, router: Router, *, host: str, port: int, token: str | None) -> None:
        self.router, self.host, self.port, self.token = router, host, port, token
        #: HTTP session id -> the server that holds it
        self.sessions: dict[str, Backend] = {}
        self._runner: web.AppRunner | None = None
        self._client: ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[api_errors(self.token, _unavailable)], client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics/vmu", self.status)
        app.router.add_get("/v1/models", self.anywhere)
        app.router.add_post("/v1/completions", self.completion)
        app.router.add_post("/v1/chat/completions", self.completion)
        for method in ("GET", "DELETE"):
            app.router.add_route(method, "/v1/djinn/sessions/{id}", self.session_route)
        app.router.add_post("/v1/djinn/sessions/{id}/phase", self.session_route)
        return app

    async def start(self) -> int:
        """Listen; the bound port."""
        # no total timeout: a streamed completion lasts as long as it generates
        self._client = ClientSession(timeout=ClientTimeout(total=None, sock_connect=10))
        self._runner, self.port = await listen(self.app(), self.host, self.port)
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._client is not None:
            await self._client.close()

    # ------------------------------------------------------------------ routes

    async def health(self, request: web.Request) -> web.Response:
        alive = [b.name for b in self.router.backends.values() if b.alive]
        return web.json_response({"status": "ok" if alive else "down", "servers": alive},
                                 status=200 if alive else 503)

    async def status(self, request: web.Request) -> web.Response:
        await self.router.refresh_loads()
        return web.json_response(self.router.status())

    async def anywhere(self, request: web.Request) -> web.StreamResponse:
        """A route every server answers alike (``/v1/models``)."""
        return await self._forward(request, await self.router.place(), b"")

    async def completion(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        djinn = parsed.get("djinn") if isinstance(parsed, dict) else None
        session_id = djinn.get("session_id") if isinstance(djinn, dict) else None
        session_id = session_id if session_id is not None else request.headers.get(SESSION_HEADER)
        if not isinstance(session_id, str):
            return await self._forward(request, await self.router.place(), body)  # a one-request session
        backend = self._owner(session_id, create=True)
        if backend is None:
            backend = self.sessions[session_id] = await self.router.place()
        return await self._forward(request, backend, body, session_id)

    async def session_route(self, request: web.Request) -> web.StreamResponse:
        session_id = request.match_info["id"]
        backend = self._owner(session_id, create=False)
        if backend is None:
            raise ApiError(404, f"no session {session_id!r}", param="session_id", code="session_not_found")
        response = await self._forward(request, backend, await request.read(), session_id)
        if request.method == "DELETE" and response.status == 200:
            self.sessions.pop(session_id, None)
        return response

    def _owner(self, session_id: str, *, create: bool) -> Backend | None:
        """The live server of a known session; None for a new one; a 503 for one whose server is gone."""
        backend = self.sessions.get(session_id)
        if backend is not None and not backend.alive:
            self.sessions.pop(session_id, None)
            raise ApiError(503, f"server {backend.name} is gone ({backend.gone_reason}): session "
                                f"{session_id!r} and its KV are lost" + ("; the next request starts it anew"
                                                                          if create else ""),
                           type="server_error", code="server_gone")
        return backend

    async def _forward(self, request: web.Request, backend: Backend, body: bytes,
                       session_id: str | None = None) -> web.StreamResponse:
        if not backend.http_url:
            raise ApiError(503, f"server {backend.name} serves no HTTP API", type="server_error")
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        if self.router.server_token:
            headers["Authorization"] = f"Bearer {self.router.server_token}"
        if SESSION_HEADER in request.headers:
            headers[SESSION_HEADER] = request.headers[SESSION_HEADER]
        url = backend.http_url + request.path_qs
        response: web.StreamResponse | None = None
        try:
            async with self._client.request(request.method, url, data=body or None, headers=headers) as upstream:
                response = web.StreamResponse(status=upstream.status, headers={
                    k: upstream.headers[k] for k in _PASSED_HEADERS if k in upstream.headers})
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (ClientError, OSError) as exc:
            # the server did not answer, or stopped mid-response: it may be gone; the router checks
            asyncio.create_task(self.router.check_alive(backend))
            if session_id is not None and self.sessions.get(session_id) is backend:
                self.sessions.pop(session_id, None)
            if response is not None and response.prepared:  # cut short: the client sees the stream end
                log.warning("server %s stopped mid-response to %s: %s", backend.name, request.path, exc)
                return response
            raise ApiError(503, f"server {backend.name} is gone ({type(exc).__name__}: {exc})"
                                + (f": session {session_id!r} and its KV are lost" if session_id else ""),
                           type="server_error", code="server_gone") from None
