"""POST /tokenize and /detokenize, compatible with vLLM's.

`/tokenize` takes a raw `prompt`, or chat `messages` (+ `tools`, `reasoning_effort`,
`add_generation_prompt`), and returns exactly the token ids the engine would see.
"""

from __future__ import annotations

import datetime
from typing import Any, NamedTuple

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from harmony import Role
from server.errors import InvalidRequestError, NotFoundError
from server.harmony_bridge import BridgeError, PromptDefaults, chat_to_harmony, reply_constraint
from server.state import Services, ServicesDep

router = APIRouter()


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    reasoning_effort: str | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


class ChatPrompt(NamedTuple):
    token_ids: list[int]
    # The grammar the reply must follow (constrained decoding); None: the reply runs free.
    grammar: str | None = None


def chat_prompt_ids(
    svc: Services,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None,
    tool_choice: str | dict | None,
    reasoning_effort: str | None,
    response_format: dict[str, Any] | None,
    defaults: PromptDefaults,
    add_generation_prompt: bool = True,
    strict_tools: bool = False,
) -> ChatPrompt:
    """The prompt token ids of a chat (the mapping, then harmony rendering) and the grammar of
    its reply."""
    try:
        constraint = reply_constraint(
            tools, tool_choice, response_format, strict_tools=strict_tools
        )
        conversation = chat_to_harmony(
            messages,
            today=datetime.datetime.now(datetime.UTC).date(),
            tools=tools,
            tool_choice=tool_choice,
            reasoning_effort=reasoning_effort,
            response_format=response_format,
            defaults=defaults,
        )
    except BridgeError as exc:
        raise InvalidRequestError(str(exc), param=exc.param) from exc
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from exc
    if not add_generation_prompt:
        return ChatPrompt(svc.renderer.render_conversation(conversation))
    ids = svc.renderer.render_for_completion(conversation, Role.ASSISTANT)
    return ChatPrompt(ids, None if constraint is None else svc.grammars.build(constraint))


def _check_model(model: str | None, request: Request) -> None:
    served = request.app.state.server.settings.model_id
    if model is not None and model != served:
        raise NotFoundError(
            f"the model {model!r} does not exist; this server serves {served!r}",
            param="model",
            code="model_not_found",
        )


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request, svc: ServicesDep) -> dict:
    _check_model(body.model, request)
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequestError("give exactly one of 'prompt' or 'messages'", param="prompt")
    if body.prompt is not None:
        tokens = svc.encoding.encode_with_special_tokens(body.prompt)
    else:
        tokens = chat_prompt_ids(
            svc,
            body.messages or [],
            tools=body.tools,
            tool_choice=None,
            reasoning_effort=body.reasoning_effort,
            response_format=None,
            defaults=svc.prompt_defaults,
            add_generation_prompt=body.add_generation_prompt,
        ).token_ids
    return {"tokens": tokens, "count": len(tokens), "max_model_len": svc.max_model_len}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request, svc: ServicesDep) -> dict:
    _check_model(body.model, request)
    bad = [t for t in body.tokens if not svc.encoding.is_valid_id(t)]
    if bad:
        raise InvalidRequestError(f"token ids {bad[:5]} are not in the vocabulary", param="tokens")
    return {"prompt": svc.encoding.decode(body.tokens)}
