"""GET /v1/models: the one model this server serves."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

router = APIRouter()
_CREATED = int(time.time())


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    model_id = request.app.state.server.settings.model_id
    return {
        "object": "list",
        "data": [
            {"id": model_id, "object": "model", "created": _CREATED, "owned_by": "gpt-oss-server"}
        ],
    }
