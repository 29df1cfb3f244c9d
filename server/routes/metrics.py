"""GET /metrics: Prometheus text exposition of the server's and the engine's metrics.

Open by default (scrapers rarely carry API keys); with `--protect-metrics` it needs the API key like
`/v1/*`. It answers while the model loads too, without the engine's gauges.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from server.metrics import CONTENT_TYPE, metrics_of
from server.state import ServerState, require_api_key

router = APIRouter()


def _key_if_protected(request: Request) -> None:
    if request.app.state.server.settings.protect_metrics:
        require_api_key(request)


@router.get("/metrics", dependencies=[Depends(_key_if_protected)])
async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.server
    stats = state.services.engine.stats() if state.services is not None else None
    return Response(metrics_of(request.app).render(stats), media_type=CONTENT_TYPE)
