"""Chat completions request model: OpenAI's fields (and vLLM's common extensions), strictly typed.

Unknown fields are refused by name, as OpenAI does; documented fields that cannot change the output
here are accepted; fields this server cannot honour are refused by name.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# OpenAI fields with no effect on a self-hosted model's output: accepted, ignored.
ACCEPTED_NO_EFFECT = (
    "store",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
    "user",
    "metadata",
)
# Documented OpenAI fields this server cannot honour: a 400 that names them.
UNSUPPORTED = ("audio", "prediction", "web_search_options", "functions", "function_call")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatTemplateKwargs(BaseModel):
    model_config = ConfigDict(extra="allow")
    reasoning_effort: Literal["low", "medium", "high"] | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    response_format: dict[str, Any] | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    modalities: list[Literal["text"]] | None = None
    # vLLM extensions clients commonly send.
    top_k: int | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    include_reasoning: bool = True
    chat_template_kwargs: ChatTemplateKwargs | None = None
    # Accepted, no effect here.
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    # Refused by name (see UNSUPPORTED).
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    functions: Any = None
    function_call: Any = None

    def effort(self) -> str | None:
        if self.reasoning_effort:
            return self.reasoning_effort
        if self.chat_template_kwargs is not None:
            return self.chat_template_kwargs.reasoning_effort
        return None

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)
