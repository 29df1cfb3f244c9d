"""A request's life inside the engine: its tokens, how many are computed, and why it finished.

The one number the scheduler reasons about is the gap between `num_computed` (tokens whose KV is in
the cache) and `num_tokens` (prompt + output so far). A step closes part of that gap; when it closes
it fully, the step's logits sample the next token. Prefix caching starts `num_computed` above zero;
preemption sets it back to zero (the KV is recomputed later, outputs are kept).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from engine.sampler import SamplingParams, SamplingState


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # a stop token
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # the client went away or asked to cancel
    ERROR = "error"  # this request failed; the others go on


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: float = 0.0
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    # Prompt tokens served from the prefix cache at first admission (reported in usage).
    num_cached_prompt_tokens: int = 0
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    error: str | None = None
    sampling: SamplingState = field(init=False)

    def __post_init__(self) -> None:
        self.sampling = SamplingState(self.params, self.prompt_token_ids, self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
