"""Server state shared by the routes: the loaded services, readiness, and request dependencies."""

from __future__ import annotations

import hmac
import threading
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from engine.async_engine import AsyncEngineBase
from harmony import HarmonyEncoding, Renderer
from harmony.grammar import ReplyGrammars
from server.config import Settings
from server.errors import AuthenticationError, ServiceUnavailableError
from server.harmony_bridge import PromptDefaults


@dataclass
class Services:
    """What the routes use: the vocabulary, the renderer, the reply grammars and the engine's door."""

    encoding: HarmonyEncoding
    engine: AsyncEngineBase
    max_model_len: int
    prompt_defaults: PromptDefaults = field(default_factory=PromptDefaults)
    renderer: Renderer = field(init=False)
    grammars: ReplyGrammars = field(init=False)

    def __post_init__(self) -> None:
        self.renderer = Renderer(self.encoding)
        self.grammars = ReplyGrammars(self.encoding)


@dataclass
class ServerState:
    settings: Settings
    services: Services | None = None
    load_error: str | None = None
    ready: threading.Event = field(default_factory=threading.Event)


def services(request: Request) -> Services:
    state: ServerState = request.app.state.server
    if state.services is None:
        reason = state.load_error or "the model is still loading"
        raise ServiceUnavailableError(f"not ready: {reason}")
    failure = state.services.engine.failure
    if failure is not None:  # the engine's process died: every request is refused, not hung
        raise ServiceUnavailableError(failure)
    return state.services


def require_api_key(request: Request) -> None:
    settings: Settings = request.app.state.server.settings
    if settings.api_key is None:
        return
    header = request.headers.get("authorization", "")
    given = header[7:] if header.lower().startswith("bearer ") else ""
    expected = settings.api_key.get_secret_value()
    if not given or not hmac.compare_digest(given.encode(), expected.encode()):
        raise AuthenticationError(
            "missing or invalid API key: send it as 'Authorization: Bearer <key>'",
            code="invalid_api_key",
        )


ServicesDep = Annotated[Services, Depends(services)]
