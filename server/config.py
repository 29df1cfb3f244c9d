"""Server settings: the one place that reads command-line flags and the environment.

Every flag also comes from an environment variable: `--max-num-seqs 32` or `GPT_OSS_MAX_NUM_SEQS=32`
(flags win). The API key also comes from `GPT_OSS_API_KEY`. Settings are built once at start-up,
frozen, and passed down; the engine and harmony layers get their own configs made from them.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.model_source import served_name


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GPT_OSS_", frozen=True, extra="forbid")

    model: str | None = Field(
        None,
        description="checkpoint directory (either layout) or Hugging Face repo id; "
        "default: the bundled demo model",
    )
    allow_download: bool = Field(
        False, description="let --model fetch a Hugging Face repo that is not in the local cache"
    )
    tokenizer: Path | None = Field(None, description="a .tiktoken file, when the model has none")
    served_model_name: str | None = Field(None, description="the model id clients use")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: SecretStr | None = Field(None, description="required on /v1/* when set")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    max_model_len: int = Field(131072, ge=16)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=16)
    kv_cache_tokens: int = Field(65536, ge=256, description="KV cache size, in tokens")
    max_waiting_requests: int = Field(256, ge=1, description="queued requests before 429")
    default_reasoning_effort: Literal["low", "medium", "high"] = "medium"
    reasoning_field: Literal["both", "reasoning", "reasoning_content"] = "both"
    strict_tool_arguments: bool = Field(
        False,
        description="constrain every tool call's arguments to the tool's JSON Schema, as if "
        "each tool had strict: true",
    )
    max_request_bytes: int = Field(32 * 2**20, ge=1024)
    max_n: int = Field(16, ge=1)
    max_stop_sequences: int = Field(4, ge=0)
    max_top_logprobs: int = Field(20, ge=0)
    protect_metrics: bool = False
    state_dir: Path = Field(
        Path.home() / ".local" / "state" / "gpt-oss-server",
        description="where stored responses live (an SQLite database)",
    )
    response_max_age_s: float = Field(30 * 24 * 3600, gt=0, description="stored responses expire")
    response_max_count: int = Field(10_000, ge=1, description="stored responses kept at most")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    engine_process: bool = Field(
        True,
        description="run the engine core in its own process (its own GIL); "
        "--no-engine-process runs it in a thread of the server",
    )

    @field_validator("model", mode="before")
    @classmethod
    def _path_to_str(cls, value: object) -> object:
        return str(value) if isinstance(value, os.PathLike) else value

    @property
    def model_id(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return served_name(self.model)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--flag` per setting; defaults stay unset so the environment can fill them."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = (field.description or "") + f" (env GPT_OSS_{name.upper()})"
        if field.annotation is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            parser.add_argument(flag, dest=name, default=None, help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {
        name: value
        for name in Settings.model_fields
        if (value := getattr(args, name, None)) is not None
    }
    return Settings(**given)
