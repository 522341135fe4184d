"""The OpenAI-compatible HTTP API, on aiohttp, on the server's own event loop.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming
as server-sent events), ``GET /health``, ``GET /metrics`` and ``/metrics/vmu``, and the session
routes ``GET|DELETE /v1/djinn/sessions/{id}`` and ``POST /v1/djinn/sessions/{id}/phase``.

Sessions. A request names one with the body field ``"djinn": {"session_id": ...}`` or the
``X-Djinn-Session-Id`` header; the session keeps its KV between requests. Each request sends the
whole conversation, as OpenAI clients do: the KV of the longest common token prefix is reused
and only the rest is prefilled (``usage.prompt_tokens_details.cached_tokens`` says how many were
reused). A request without a session gets a fresh one, closed when it ends. ``"phase_after"``
(``IO_WAIT`` or ``COMPUTE``, with ``"expected_resume_s"``) signals the phase once the response is
computed. A response that ends in a tool call puts the session in ``IO_WAIT`` by itself, with
the expected resume learned per tool name (the mean of the tool's observed durations, no hint
until one is seen); the next request that brings a ``tool`` message signals ``COMPUTE`` and
records how long the tool took. Idle sessions are closed after ``[server] http_session_ttl_s``.

Errors are OpenAI error objects ``{"error": {"message", "type", "param", "code"}}``: 400 for a
bad request, 401 for a wrong token, 404 for an unknown model or session, 503 when admission
refuses. Nothing in a body is evaluated: it is JSON, checked field by field.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from aiohttp import web

from djinn.engine.service import MAX_TOP_LOGPROBS, GenerateResult, SamplingParams
from djinn.kernel.errors import AdmissionError, DjinnError, ModelError, SessionError, TierFullError
from djinn.kernel.kernel import Session
from djinn.kernel.strategies import Phase
from djinn.server.http import vmu

if TYPE_CHECKING:
    from djinn.server.launch import Runtime

log = logging.getLogger(__name__)

SESSION_HEADER = "X-Djinn-Session-Id"
MAX_BODY_BYTES = 16 << 20
_SESSION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


class ApiError(Exception):
    """A request the API refuses, as an OpenAI error object with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> web.Response:
        """The error as a JSON response."""
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return web.json_response(body, status=self.status)


def require_token(request: web.Request, token: str | None) -> None:
    """``ApiError`` 401 unless an ``/v1/`` request carries ``Authorization: Bearer <token>``
    (no token configured: every request passes)."""
    if token is not None and request.path.startswith("/v1/"):
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise ApiError(401, "a valid 'Authorization: Bearer <token>' header is required",
                           type="authentication_error", code="invalid_api_key")


def api_errors(token: str | None, from_djinn: Callable[[DjinnError], ApiError]) -> Callable:
    """aiohttp middleware: the bearer-token check (``require_token``), then every failure as an
    OpenAI error object (a ``DjinnError`` through ``from_djinn``), so one request fails and the
    server serves on. Shared by the server's API and the cluster router's."""

    @web.middleware
    async def errors(request: web.Request, handler: Callable) -> web.StreamResponse:
        try:
            require_token(request, token)
            return await handler(request)
        except ApiError as exc:
            return exc.response()
        except web.HTTPException as exc:
            if exc.status == 413:
                return ApiError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes").response()
            return ApiError(exc.status, exc.reason or "not found",
                            type="invalid_request_error" if exc.status < 500 else "server_error").response()
        except DjinnError as exc:
            return from_djinn(exc).response()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one request fails, the server serves on
            log.exception("HTTP request %s %s failed", request.method, request.path)
            return ApiError(500, f"internal error: {type(exc).__name__}", type="server_error").response()

    return errors


async def listen(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on ``host:port`` (0: any free port); its runner and the bound port."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def _from_djinn(exc: DjinnError) -> ApiError:
    if isinstance(exc, (AdmissionError, TierFullError)):
        return ApiError(503, str(exc), type="server_overloaded", code=exc.code)
    if isinstance(exc, (SessionError, ModelError)):
        return ApiError(400, str(exc), code=exc.code)
    return ApiError(500, str(exc), type="server_error", code=exc.code)


@attrs.define(eq=False)
class HttpSession:
    """An API session: the kernel session and what the API remembers about it."""

    id: str
    session: Session
    last_used: float = attrs.Factory(time.monotonic)
    #: the tools of the last response's calls and when they were handed to the client
    tools_out: tuple[str, ...] = ()
    tools_since: float | None = None
    requests: int = 0


@attrs.frozen
class _Request:
    """A completion request, checked: the prompt's token ids and how to generate."""

    prompt: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    session_id: str | None
    phase_after: Phase | None
    expected_resume_s: float | None
    tools: tuple[str, ...]
    tool_choice: Any
    brings_tool_result: bool


class OpenAIServer:
    """The HTTP API over a started runtime; ``start()`` listens, ``close()`` stops and frees."""

    def __init__(self, runtime: Runtime, *, host: str, port: int, token: str | None,
                 session_ttl_s: float, serve_metrics: bool = True) -> None:
        self.kernel = runtime.kernel
        self.model = runtime.model
        self.host, self.port, self.token = host, port, token
        self.session_ttl_s = session_ttl_s
        self.serve_metrics = serve_metrics
        self.sessions: dict[str, HttpSession] = {}
        #: tool name -> (observed seconds in all, observations)
        self.tool_durations: dict[str, tuple[float, int]] = {}
        self._runner: web.AppRunner | None = None
        self._reaper: asyncio.Task | None = None
        self._collector: Any = None
        self.created = int(time.time())

    # ------------------------------------------------------------------ lifecycle

    def app(self) -> web.Application:
        """The aiohttp application with every route."""
        app = web.Application(middlewares=[api_errors(self.token, _from_djinn)], client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/metrics/vmu", self.metrics_vmu)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/djinn/sessions/{id}", self.session_info)
        app.router.add_delete("/v1/djinn/sessions/{id}", self.session_delete)
        app.router.add_post("/v1/djinn/sessions/{id}/phase", self.session_phase)
        return app

    async def start(self) -> int:
        """Listen; returns the bound port."""
        if self.serve_metrics:
            from djinn.server.http import VmuCollector

            loop = asyncio.get_running_loop()

            def snapshot() -> dict[str, Any]:  # read on the loop; Prometheus calls it from a worker thread
                async def read() -> dict[str, Any]:
                    return vmu(self.kernel)

                return asyncio.run_coroutine_threadsafe(read(), loop).result(timeout=10)

            self._collector = VmuCollector(snapshot)
            self.kernel.metrics_registry.register(self._collector)
        self._runner, self.port = await listen(self.app(), self.host, self.port)
        self._reaper = asyncio.create_task(self._expire_sessions(), name="djinn-http-sessions")
        return self.port

    async def close(self) -> None:
        """Stop listening, close every API session."""
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        for entry in list(self.sessions.values()):
            await self._close(entry, "shutdown")
        if self._collector is not None:
            self.kernel.metrics_registry.unregister(self._collector)
            self._collector = None

    async def _expire_sessions(self) -> None:
        period = min(30.0, self.session_ttl_s / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for entry in list(self.sessions.values()):
                if now - entry.last_used > self.session_ttl_s and not entry.session.info.busy:
                    await self._close(entry, "expired")

    async def _close(self, entry: HttpSession, reason: str) -> None:
        self.sessions.pop(entry.id, None)
        try:
            await self.kernel.close_session(entry.session, reason=reason)
        except Exception:
            log.exception("closing HTTP session %s failed", entry.id)

    # ------------------------------------------------------------------ plumbing

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            raise _bad("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        return body

    def _check_model(self, body: dict[str, Any]) -> None:
        name = body.get("model")
        if not isinstance(name, str):
            raise _bad("model is required (a string)", "model")
        if name != self.kernel.config.model.name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                                f"{self.kernel.config.model.name!r}", param="model", code="model_not_found")

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, or None."""
        return self.model.loaded.tokenizer

    # ------------------------------------------------------------------ simple routes

    async def health(self, request: web.Request) -> web.Response:
        """Liveness: the server answers and its model is loaded."""
        return web.json_response({"status": "ok", "model": self.kernel.config.model.name})

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus text (the same series as the metrics port)."""
        from prometheus_client import generate_latest

        # collectors may block on the loop (they read the kernel there): generate off the loop
        body = await asyncio.get_running_loop().run_in_executor(None, generate_latest, self.kernel.metrics_registry)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})

    async def metrics_vmu(self, request: web.Request) -> web.Response:
        """The kernel's memory and session view as JSON."""
        return web.json_response(vmu(self.kernel))

    async def models(self, request: web.Request) -> web.Response:
        """The one model this server serves."""
        return web.json_response({"object": "list", "data": [{
            "id": self.kernel.config.model.name, "object": "model", "created": self.created, "owned_by": "djinn",
        }]})

    # ------------------------------------------------------------------ sessions

    def _describe(self, entry: HttpSession) -> dict[str, Any]:
        info = entry.session.info
        return {
            "session_id": entry.id, "phase": info.phase.value, "residency": info.residency.value,
            "tokens": len(self.model.context(entry.session)), "requests": entry.requests,
        }

    def _known(self, request: web.Request) -> HttpSession:
        entry = self.sessions.get(request.match_info["id"])
        if entry is None:
            raise ApiError(404, f"no session {request.match_info['id']!r}", param="session_id", code="session_not_found")
        return entry

    async def session_info(self, request: web.Request) -> web.Response:
        """A session's phase, residency and context length."""
        return web.json_response(self._describe(self._known(request)))

    async def session_delete(self, request: web.Request) -> web.Response:
        """Close a session and free its KV."""
        entry = self._known(request)
        await self._close(entry, "closed")
        return web.json_response({"session_id": entry.id, "deleted": True})

    async def session_phase(self, request: web.Request) -> web.Response:
        """Signal a session's phase: ``{"phase": "IO_WAIT", "expected_resume_s": 15}``."""
        entry = self._known(request)
        body = await self._body(request)
        phase = _phase(body.get("phase"), "phase")
        expected = _expected(body.get("expected_resume_s"))
        await self.kernel.signal_phase(entry.session, phase, expected)
        entry.last_used = time.monotonic()
        return web.json_response(self._describe(entry))

    def _session_for(self, session_id: str | None) -> tuple[HttpSession, bool]:
        """The named session (created on first use), or a fresh one for this request alone (True)."""
        if session_id is not None and session_id in self.sessions:
            entry = self.sessions[session_id]
            entry.last_used = time.monotonic()
            return entry, False
        session = self.kernel.open_session(owner=self)
        entry = HttpSession(id=session_id or f"req-{secrets.token_hex(8)}", session=session)
        if session_id is None:
            return entry, True
        self.sessions[session_id] = entry
        return entry, False

    # ------------------------------------------------------------------ completions

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/completions``: a text (or token-id) prompt."""
        body = await self._body(request)
        self._check_model(body)
        if body.get("echo"):
            raise _bad("echo is not supported", "echo")
        if body.get("suffix"):
            raise _bad("suffix is not supported", "suffix")
        prompt = self._prompt_ids(body.get("prompt"))
        logprobs = body.get("logprobs")
        if logprobs is not None:
            logprobs = _int_in(logprobs, "logprobs", 0, MAX_TOP_LOGPROBS)
        req = self._request(request, body, prompt, logprobs=logprobs, tools=(), brings_tool_result=False)
        return await self._respond(request, req, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/chat/completions``: messages rendered with the tokenizer's chat template."""
        body = await self._body(request)
        self._check_model(body)
        tokenizer = self.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise _bad("this model has no tokenizer with a chat template; use /v1/completions with token ids")
        messages = _messages(body.get("messages"))
        tools = body.get("tools")
        tool_names: tuple[str, ...] = ()
        if tools is not None:
            if not isinstance(tools, list) or not all(
                isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
                for t in tools
            ):
                raise _bad("tools must be a list of {\"type\": \"function\", \"function\": {\"name\", ...}}", "tools")
            tool_names = tuple(t["function"]["name"] for t in tools)
        tool_choice = body.get("tool_choice", "auto" if tools else "none")
        if not (tool_choice in ("auto", "none", "required") or (
            isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict)
            and tool_choice["function"].get("name") in tool_names
        )):
            raise _bad("tool_choice must be 'auto', 'none', 'required' or a function among tools", "tool_choice")
        try:
            text = tokenizer.apply_chat_template(
                messages, tools=tools or None, add_generation_prompt=True, tokenize=False,
            )
        except Exception as exc:  # noqa: BLE001 - the template's own complaint, as a bad request
            raise _bad(f"the chat template cannot render these messages: {exc}", "messages") from None
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        logprobs = None
        if body.get("logprobs"):
            if not isinstance(body["logprobs"], bool):
                raise _bad("logprobs must be true or false", "logprobs")
            top = body.get("top_logprobs")
            logprobs = 0 if top is None else _int_in(top, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        elif body.get("top_logprobs") is not None:
            raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
        brings = bool(messages) and messages[-1]["role"] == "tool"
        req = self._request(request, body, prompt, logprobs=logprobs, tools=tool_names,
                            tool_choice=tool_choice, brings_tool_result=brings)
        return await self._respond(request, req, chat=True)

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise _bad("this model has no tokenizer: send the prompt as token ids", "prompt")
            return list(self.tokenizer(prompt)["input_ids"])
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise _bad("prompt must be a non-empty string or a list of token ids (one prompt per request)", "prompt")

    def _request(self, request: web.Request, body: dict[str, Any], prompt: list[int], *, logprobs: int | None,
                 tools: tuple[str, ...], brings_tool_result: bool, tool_choice: Any = "none") -> _Request:
        n = body.get("n", 1)
        if n != 1:
            raise _bad("only n=1 is supported", "n")
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = 16 if limit is None else _int_in(limit, "max_tokens", 0, 1 << 16)
        temperature = _number(body.get("temperature", 1.0), "temperature", 0.0, 2.0)
        top_p = _number(body.get("top_p", 1.0), "top_p", 0.0, 1.0)
        if top_p == 0:
            raise _bad("top_p must be in (0, 1]", "top_p")
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not -(1 << 63) <= seed < 1 << 64):
            raise _bad("seed must be an integer", "seed")
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
            raise _bad("stop must be a string or a list of up to 4 non-empty strings", "stop")
        if stops and self.tokenizer is None:
            raise _bad("stop strings need a model with a tokenizer", "stop")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _bad("stream must be true or false", "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise _bad("stream_options must be an object", "stream_options")
        djinn = body.get("djinn") or {}
        if not isinstance(djinn, dict):
            raise _bad("djinn must be an object", "djinn")
        unknown = set(djinn) - {"session_id", "phase_after", "expected_resume_s"}
        if unknown:
            raise _bad(f"unknown djinn fields {sorted(unknown)}; allowed: session_id, phase_after, expected_resume_s",
                       "djinn")
        session_id = djinn.get("session_id", request.headers.get(SESSION_HEADER))
        if session_id is not None and (not isinstance(session_id, str) or not _SESSION_ID.match(session_id)):
            raise _bad("session_id must be 1-128 letters, digits or ._:-", "djinn.session_id")
        phase_after = djinn.get("phase_after")
        if phase_after is not None:
            phase_after = _phase(phase_after, "djinn.phase_after")
        try:
            params = SamplingParams(
                max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                ignore_eos=bool(body.get("ignore_eos", False)), stop_text=stops, logprobs=logprobs,
            )
        except SessionError as exc:
            raise _bad(str(exc)) from None
        self.model.check_ids(prompt)
        return _Request(
            prompt=prompt, params=params, stream=stream, include_usage=bool(options.get("include_usage")),
            session_id=session_id, phase_after=phase_after,
            expected_resume_s=_expected(djinn.get("expected_resume_s")), tools=tools, tool_choice=tool_choice,
            brings_tool_result=brings_tool_result,
        )

    # ------------------------------------------------------------------ generating and answering

    async def _respond(self, request: web.Request, req: _Request, *, chat: bool) -> web.StreamResponse:
        entry, temporary = self._session_for(req.session_id)
        try:
            await self._resume(entry, req)
            if req.stream:
                return await self._stream(request, entry, req, chat=chat)
            result = await self.model.generate(entry.session, req.prompt, req.params, whole_context=True)
            answer = self._answer(result, req)
            await self._after(entry, req, answer)
            kind = "chat.completion" if chat else "text_completion"
            choice = self._choice(answer, result, req, chat=chat)
            return web.json_response({
                "id": _completion_id(chat), "object": kind, "created": int(time.time()),
                "model": self.kernel.config.model.name, "choices": [choice],
                "usage": _usage(req, result), "system_fingerprint": None,
            }, headers={SESSION_HEADER: entry.id} if not temporary else None)
        finally:
            entry.requests += 1
            entry.last_used = time.monotonic()
            if temporary:
                await self._close(entry, "closed")

    async def _resume(self, entry: HttpSession, req: _Request) -> None:
        """A request to an idle session: it computes again; a tool result records the tool's time."""
        now = time.monotonic()
        if req.brings_tool_result and entry.tools_since is not None:
            took = now - entry.tools_since
            for name in entry.tools_out:
                total, count = self.tool_durations.get(name, (0.0, 0))
                self.tool_durations[name] = (total + took, count + 1)
            entry.tools_out, entry.tools_since = (), None
        if entry.session.info.phase is Phase.IO_WAIT:
            await self.kernel.signal_phase(entry.session, Phase.COMPUTE, None)

    def _expected_tool_s(self, names: tuple[str, ...]) -> float | None:
        """The learned wait for these tools (the longest mean), or None before any was observed."""
        means = [total / count for total, count in (self.tool_durations.get(n, (0.0, 0)) for n in names) if count]
        return max(means) if means else None

    async def _after(self, entry: HttpSession, req: _Request, answer: _Answer) -> None:
        """Signal the phase the response leads to: the client's ``phase_after``, else IO_WAIT for a tool call."""
        if answer.tool_calls:
            entry.tools_out = tuple(c["function"]["name"] for c in answer.tool_calls)
            entry.tools_since = time.monotonic()
        if req.phase_after is not None:
            await self.kernel.signal_phase(entry.session, req.phase_after, req.expected_resume_s)
        elif answer.tool_calls:
            expected = req.expected_resume_s
            if expected is None:
                expected = self._expected_tool_s(entry.tools_out)
            await self.kernel.signal_phase(entry.session, Phase.IO_WAIT, expected)

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else ""

    def _answer(self, result: GenerateResult, req: _Request) -> _Answer:
        text, finish = _cut_at_stop(self._text(result.tokens), req.params.stop_text, result.finish_reason)
        calls: list[dict[str, Any]] = []
        if req.tools and req.tool_choice != "none":
            text, calls = parse_tool_calls(text, req.tools)
        return _Answer(text=text, tool_calls=calls, finish_reason="tool_calls" if calls else finish)

    def _choice(self, answer: _Answer, result: GenerateResult, req: _Request, *, chat: bool) -> dict[str, Any]:
        logprobs = None
        if req.params.logprobs is not None:
            logprobs = self._logprobs(result, chat=chat)
        if not chat:  # the token ids too: a model without a tokenizer has no text to give
            return {"index": 0, "text": answer.text, "logprobs": logprobs, "finish_reason": answer.finish_reason,
                    "token_ids": list(result.tokens)}
        message: dict[str, Any] = {"role": "assistant", "content": answer.text or (None if answer.tool_calls else "")}
        if answer.tool_calls:
            message["tool_calls"] = answer.tool_calls
        return {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": answer.finish_reason}

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else str(token)

    def _logprobs(self, result: GenerateResult, *, chat: bool) -> dict[str, Any]:
        entries = list(zip(result.tokens, result.logprobs))
        if chat:
            def item(token: int, logprob: float) -> dict[str, Any]:
                text = self._token_text(token)
                return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

            return {"content": [
                {**item(token, logprob), "top_logprobs": [item(t, v) for t, v in top]}
                for token, (logprob, top) in entries
            ]}
        offsets, at = [], 0
        for token, _ in entries:
            offsets.append(at)
            at += len(self._token_text(token))
        return {
            "tokens": [self._token_text(t) for t, _ in entries],
            "token_logprobs": [lp for _, (lp, _top) in entries],
            "top_logprobs": [{self._token_text(t): v for t, v in top} for _, (_lp, top) in entries],
            "text_offset": offsets,
        }

    async def _stream(self, request: web.Request, entry: HttpSession, req: _Request, *, chat: bool) -> web.StreamResponse:
        """Server-sent events: a chunk per picked token (text held back while it may still be a
        stop string or a tool call; a completion's chunks carry the token's id too, so a model
        without a tokenizer streams), then the finish reason, the usage when asked, ``[DONE]``."""
        picked: asyncio.Queue = asyncio.Queue()
        work = asyncio.create_task(self.model.generate(
            entry.session, req.prompt, req.params, whole_context=True,
            on_token=lambda token, logprob: picked.put_nowait((token, logprob)),
        ))
        work.add_done_callback(lambda _t: picked.put_nowait(None))
        # the first token (or the failure) comes before the headers, so a refused request is an error object
        first = await picked.get()
        if first is None:
            await work  # raises the refusal
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            **({SESSION_HEADER: entry.id} if req.session_id else {}),
        })
        await response.prepare(request)
        ident, created, model = _completion_id(chat), int(time.time()), self.kernel.config.model.name
        kind = "chat.completion.chunk" if chat else "text_completion"

        async def send(payload: dict[str, Any]) -> None:
            await response.write(f"data: {json.dumps(payload)}\n\n".encode())

        def chunk(delta: dict[str, Any] | str, finish: str | None, logprobs: Any = None,
                  token_ids: list[int] | None = None) -> dict[str, Any]:
            choice: dict[str, Any] = {"index": 0, "logprobs": logprobs, "finish_reason": finish}
            if chat:
                choice["delta"] = delta
            else:
                choice["text"] = delta
                choice["token_ids"] = token_ids or []  # as in a whole completion's choice
            return {"id": ident, "object": kind, "created": created, "model": model, "choices": [choice]}

        try:
            if chat:
                await send(chunk({"role": "assistant", "content": ""}, None))
            tokens: list[int] = []
            sent = ""
            item = first
            while item is not None:
                token, logprob = item
                tokens.append(token)
                text = self._text(tokens)
                visible, _ = _cut_at_stop(text, req.params.stop_text, "length")
                visible = visible[: len(visible) - _held_back(visible, req.params.stop_text)]
                if req.tools and req.tool_choice != "none" and _may_be_tool_call(visible):
                    visible = sent  # a tool call is answered whole, at the end
                delta = visible[len(sent):] if visible.startswith(sent) else ""
                lp = None
                if req.params.logprobs is not None and logprob is not None:
                    lp = self._logprobs(GenerateResult(tokens=[token], logprobs=[logprob]), chat=chat)
                if delta or lp is not None or not chat:  # a completion streams every token's id
                    await send(chunk({"content": delta} if chat else delta, None, lp, [token]))
                    sent += delta
                item = await picked.get()
            result = await work
            answer = self._answer(result, req)
            rest = answer.text[len(sent):] if answer.text.startswith(sent) else ""
            await self._after(entry, req, answer)
            final: dict[str, Any] = {}
            if rest:
                final["content"] = rest
            if chat and answer.tool_calls:
                final["tool_calls"] = [{"index": i, **call} for i, call in enumerate(answer.tool_calls)]
            await send(chunk(final if chat else rest, answer.finish_reason))
            if req.include_usage:
                await send({"id": ident, "object": kind, "created": created, "model": model, "choices": [],
                            "usage": _usage(req, result)})
            await response.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            raise
        except DjinnError as exc:  # after the headers: the error is the stream's last event
            error = _from_djinn(exc)
            await send({"error": {"message": error.message, "type": error.type, "param": None, "code": error.code}})
        return response


@attrs.frozen
class _Answer:
    text: str
    tool_calls: list[dict[str, Any]]
    finish_reason: str


def _completion_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)


def _usage(req: _Request, result: GenerateResult) -> dict[str, Any]:
    return {
        "prompt_tokens": len(req.prompt), "completion_tokens": len(result.tokens),
        "total_tokens": len(req.prompt) + len(result.tokens),
        "prompt_tokens_details": {"cached_tokens": result.cached_tokens},
    }


def _cut_at_stop(text: str, stops: tuple[str, ...], finish: str) -> tuple[str, str]:
    """``text`` up to the first stop string (which OpenAI leaves out), and the finish reason."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], "stop") if cuts else (text, finish)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many of ``text``'s last characters could begin a stop string (sent once they cannot)."""
    held = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                held = max(held, n)
                break
    return held


def _may_be_tool_call(text: str) -> bool:
    stripped = text.lstrip()
    return not stripped or stripped.startswith(("{", "[", "<tool_call>", "<|python_tag|>")) or \
        "<tool_call>".startswith(stripped) or "<tool_call>" in stripped


def parse_tool_calls(text: str, tools: tuple[str, ...]) -> tuple[str, list[dict[str, Any]]]:
    """Tool calls in a model's output: Hermes/Qwen ``<tool_call>{"name", "arguments"}</tool_call>``
    blocks, or Llama-3's bare JSON ``{"name", "parameters"}`` (one object or a list, optionally
    after ``<|python_tag|>``). Returns the text left over and the calls in OpenAI form; calls of
    tools not offered are left in the text."""
    calls: list[dict[str, Any]] = []
    blocks = _HERMES_CALL.findall(text)
    if blocks:
        for block in blocks:
            call = _call(_json(block), tools)
            if call is None:
                return text, []
            calls.append(call)
        return _HERMES_CALL.sub("", text).strip(), calls
    body = text.strip().removeprefix("<|python_tag|>").strip()
    parsed = _json(body)
    items = parsed if isinstance(parsed, list) else [parsed]
    for item in items:
        call = _call(item, tools)
        if call is None:
            return text, []
        calls.append(call)
    return "", calls


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _call(item: Any, tools: tuple[str, ...]) -> dict[str, Any] | None:
    if not isinstance(item, dict) or item.get("name") not in tools:
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = _json(arguments) if _json(arguments) is not None else arguments
    return {
        "id": "call_" + secrets.token_hex(12), "type": "function",
        "function": {"name": item["name"], "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)},
    }


def _messages(value: Any) -> list[dict[str, Any]]:
    """Chat messages as plain dicts for the template: text content, tool calls with their
    arguments as objects (what chat templates expect)."""
    if not isinstance(value, list) or not value:
        raise _bad("messages must be a non-empty list", "messages")
    out = []
    for i, message in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise _bad(f"{param} must be an object with a role of system, user, assistant or tool", param)
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise _bad(f"{param}.content: only text parts are supported", param)
            content = "".join(p["text"] for p in content)
        if content is not None and not isinstance(content, str):
            raise _bad(f"{param}.content must be a string or a list of text parts", param)
        plain: dict[str, Any] = {"role": "system" if message["role"] == "developer" else message["role"],
                                 "content": content or ""}
        calls = message.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list) or not all(
                isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
                for c in calls
            ):
                raise _bad(f"{param}.tool_calls must be a list of function calls", param)
            plain["tool_calls"] = [{
                "id": c.get("id"), "type": "function",
                "function": {"name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments"))},
            } for c in calls]
        for key in ("name", "tool_call_id"):
            if isinstance(message.get(key), str):
                plain[key] = message[key]
        out.append(plain)
    return out


def _arguments(value: Any) -> Any:
    if isinstance(value, str):
        parsed = _json(value)
        return parsed if isinstance(parsed, dict) else value
    return value if isinstance(value, dict) else {}


def _phase(value: Any, param: str) -> Phase:
    try:
        return Phase(value)
    except ValueError:
        raise _bad(f"{value!r} is not a phase; valid phases: {', '.join(p.value for p in Phase)}", param) from None


def _expected(value: Any) -> float | None:
    if value is None:
        return None
    return _number(value, "djinn.expected_resume_s", 0.0, 1e9)


def _number(value: Any, param: str, low: float, high: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise _bad(f"{param} must be a number in [{low:g}, {high:g}]", param)
    return float(value)


def _int_in(value: Any, param: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _bad(f"{param} must be an integer in [{low}, {high}]", param)
    return value
