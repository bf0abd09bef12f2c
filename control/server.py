"""The HTTP server: a Starlette app (KServe v2 / Triton + OpenAI + /metrics) served by uvicorn.

    run_server(engine_dir, settings)     # what `spinserve serve` calls; blocks until SIGTERM

The app starts listening at once and loads the engine in the engine thread (AsyncEngine); until
it is loaded /v2/health/ready and every inference endpoint answer 503. SIGTERM/SIGINT: readiness
drops to 503, new requests get 503, in-flight ones may finish within shutdown_grace_s, the rest
are aborted, then the engine thread stops.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import server_kserve as kserve
from . import server_openai as openai
from .async_engine import AsyncEngine, EngineState
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import ProtocolError
from .server_common import AppState, ServerConfig, error_response

log = logging.getLogger("spinserve.server")

PUBLIC_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})  # no auth (probes)


async def metrics_endpoint(request: Request) -> Response:
    st: AppState = request.app.state.spin
    return Response(st.metrics.render(), media_type=CONTENT_TYPE)


def _routes() -> list[Route]:
    m = "/v2/models/{model}"
    mv = "/v2/models/{model}/versions/{version}"
    routes = [
        Route("/v2/health/live", kserve.live),
        Route("/v2/health/ready", kserve.ready),
        Route("/v2", kserve.server_metadata),
        Route("/v1/models", openai.list_models),
        Route("/v1/completions", openai.completions, methods=["POST"]),
        Route("/v1/chat/completions", openai.chat_completions, methods=["POST"]),
        Route("/metrics", metrics_endpoint),
    ]
    for base in (m, mv):
        routes += [
            Route(base, kserve.model_meta),
            Route(f"{base}/ready", kserve.model_ready),
            Route(f"{base}/infer", kserve.infer, methods=["POST"]),
            Route(f"{base}/generate", kserve.generate, methods=["POST"]),
            Route(f"{base}/generate_stream", kserve.generate_stream, methods=["POST"]),
        ]
    return routes


class _AuthMiddleware:
    """Bearer-token check on every path but the health probes (constant-time compare)."""

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        got = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(got, self.expected):
            await self.app(scope, receive, send)
            return
        err = ProtocolError(
            401,
            "missing or invalid API key: send 'Authorization: Bearer <key>'",
            code="invalid_api_key",
        )
        response = error_response(scope["path"], err, self.metrics)
        await response(scope, receive, send)


def create_app(loader: Callable[[], Any], config: ServerConfig) -> Starlette:
    """The app; `loader` builds the LLMEngine (it runs in the engine thread)."""
    metrics_box: list[ServerMetrics] = []
    engine = AsyncEngine(
        loader,
        max_inflight=config.max_inflight,
        integrity_checks=config.integrity_checks,
        on_request_done=lambda s: metrics_box[0].observe(s),
    )
    metrics = ServerMetrics(engine.stats)
    metrics_box.append(metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine.start()
        yield
        await engine.shutdown(grace_s=0.0)  # uvicorn already waited shutdown_grace_s

    app = Starlette(routes=_routes(), lifespan=lifespan)
    app.state.spin = AppState(config, engine, metrics)
    app.add_middleware(_AuthMiddleware, api_key=config.api_key, metrics=metrics)
    return app


class _Server(uvicorn.Server):
    """uvicorn.Server that drops readiness as soon as a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine) -> None:
        super().__init__(config)
        self._engine = engine

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._engine.state is EngineState.READY:
            self._engine.state = EngineState.DRAINING
        super().handle_exit(sig, frame)


def run_server(
    engine_dir: Path | None,
    settings: Any = None,
    *,
    host: str | None = None,
    port: int | None = None,
    shutdown_grace_s: float = 30.0,
    max_inflight: int = 4096,
    integrity_checks: bool = False,
    log_level: str = "info",
) -> None:
    """Serve an engine folder over HTTP until SIGTERM/SIGINT (None: the embedded SmolLM2)."""
    from spinserve.configs.settings import load_settings

    settings = settings or load_settings()
    if engine_dir is None:
        from spinserve.engines.embedded import embedded_engine_dir

        engine_dir = embedded_engine_dir(settings.cache_dir)
    engine_dir = Path(engine_dir)
    srv = settings.server
    config = ServerConfig(
        model_name=srv.model_name or engine_dir.name,
        api_key=srv.api_key,
        max_body_bytes=srv.max_body_bytes,
        shutdown_grace_s=shutdown_grace_s,
        max_inflight=max_inflight,
        integrity_checks=integrity_checks,
    )

    def loader() -> Any:
        from .engine import LLMEngine

        return LLMEngine(engine_dir, settings)

    app = create_app(loader, config)
    uv_config = uvicorn.Config(
        app,
        host=host or srv.host,
        port=srv.port if port is None else port,
        log_level=log_level,
        timeout_graceful_shutdown=shutdown_grace_s,
        access_log=False,
    )
    _Server(uv_config, app.state.spin.engine).run()
