"""Checks and parameter helpers the generation routes share (chat, responses, completions)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from engine.sampler import SamplingParams
from server.config import Settings
from server.errors import InvalidRequestError, NotFoundError, TooManyRequestsError
from server.state import Services


def check_model(model: str | None, settings: Settings) -> None:
    if model is not None and model != settings.model_id:
        raise NotFoundError(
            f"the model {model!r} does not exist; this server serves {settings.model_id!r}",
            param="model",
            code="model_not_found",
        )


def check_unsupported(body: Any, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(body, name) is not None:
            raise InvalidRequestError(f"{name} is not supported by this server", param=name)


def check_queue(svc: Services, settings: Settings) -> None:
    if svc.engine.stats().waiting >= settings.max_waiting_requests:
        raise TooManyRequestsError("the request queue is full; retry shortly")


def check_stops(stops: list[str], settings: Settings) -> None:
    if len(stops) > settings.max_stop_sequences:
        raise InvalidRequestError(
            f"at most {settings.max_stop_sequences} stop sequences", param="stop"
        )
    if not all(stops):
        raise InvalidRequestError("stop sequences must not be empty", param="stop")


def output_budget(
    svc: Services,
    prompt_len: int,
    requested: int | None,
    default: int | None,
    *,
    param: str,
    prompt_param: str,
) -> int:
    """max_tokens within what the context leaves (CONTRACT: never more than that)."""
    room = svc.max_model_len - prompt_len
    if room < 1:
        raise InvalidRequestError(
            f"the prompt has {prompt_len} tokens; the context holds {svc.max_model_len}",
            param=prompt_param,
            code="context_length_exceeded",
        )
    max_tokens = requested or default or room
    if max_tokens > room:
        raise InvalidRequestError(
            f"{param} is {max_tokens} but only {room} tokens are left in the context "
            f"({prompt_len} in the prompt, {svc.max_model_len} in all)",
            param=param,
        )
    return max_tokens


def parse_logit_bias(bias: dict[str, float] | None, vocab: int) -> dict[int, float]:
    try:
        parsed = {int(k): v for k, v in (bias or {}).items()}
    except ValueError as exc:
        raise InvalidRequestError("logit_bias keys must be token ids", param="logit_bias") from exc
    outside = [k for k in parsed if not 0 <= k < vocab]
    if outside:
        raise InvalidRequestError(
            f"logit_bias token ids {outside[:5]} are outside the vocabulary (0..{vocab - 1})",
            param="logit_bias",
        )
    return parsed


def seeded(params: SamplingParams, seed: int | None, index: int) -> SamplingParams:
    """The params of choice `index`: n choices from one seed differ, and repeat across runs."""
    return params if seed is None else replace(params, seed=seed + index)


def sampling_params(body: Any, **fields: Any) -> SamplingParams:
    """SamplingParams from a request's common sampling fields (OpenAI's defaults where unset),
    plus route-specific `fields`; a value SamplingParams refuses is a 400."""
    try:
        return SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=-1 if body.top_k is None else body.top_k,
            min_p=body.min_p or 0.0,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=body.repetition_penalty or 1.0,
            **fields,
        )
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from exc
