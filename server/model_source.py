"""Where the weights come from: `--model` as a directory, a Hugging Face repo id, or nothing.

- nothing: the bundled demo model (`demo/gpt-oss-demo`, a toy gpt-oss trained by this project), so
  a fresh install answers offline; the log says so and names the flag for real weights;
- an existing directory: served as it is (either checkpoint layout);
- `owner/name` that is no directory: a Hugging Face repo, taken from the local Hugging Face cache,
  or downloaded with huggingface_hub when `--allow-download` is given. Only the Hugging Face layout
  is fetched (gpt-oss repos also carry the `original/` layout: the same weights again).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "demo" / "gpt-oss-demo"
DEMO_MODEL_NAME = "gpt-oss-demo"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What serving needs from a gpt-oss repo: the config, the HF-layout weights and the tokenizer.
_HF_LAYOUT_FILES = ["*.json", "*.safetensors", "*.tiktoken", "tokenizer*"]


class ModelNotFoundError(RuntimeError):
    """`--model` names nothing that can be served; the message says what to do."""


@dataclass(frozen=True, slots=True)
class ModelSource:
    path: Path
    is_demo: bool


def served_name(model: str | None) -> str:
    """The model id clients use when no --served-model-name is given."""
    return DEMO_MODEL_NAME if model is None else Path(model).name


def resolve_model(model: str | None, *, allow_download: bool) -> ModelSource:
    if model is None:
        if not (DEMO_MODEL_DIR / "config.json").is_file():
            raise ModelNotFoundError(
                f"no --model given and the bundled demo model is missing from {DEMO_MODEL_DIR}; "
                "pass --model /path/to/gpt-oss-20b"
            )
        logger.info(
            "no --model given: serving the bundled demo model %s (a toy gpt-oss trained by this "
            "project). For real weights pass --model /path/to/gpt-oss-20b "
            "(or --model openai/gpt-oss-20b --allow-download)",
            DEMO_MODEL_DIR,
        )
        return ModelSource(DEMO_MODEL_DIR, is_demo=True)
    path = Path(model).expanduser()
    if path.is_dir():
        return ModelSource(path, is_demo=False)
    if not _REPO_ID.match(model):
        raise ModelNotFoundError(
            f"--model {model}: no such directory (and not a Hugging Face repo id like "
            "openai/gpt-oss-20b)"
        )
    return ModelSource(_from_hugging_face(model, allow_download), is_demo=False)


def _from_hugging_face(repo_id: str, allow_download: bool) -> Path:
    try:
        import huggingface_hub  # noqa: PLC0415 - only a repo id needs it
    except ImportError as exc:
        raise ModelNotFoundError(
            f"--model {repo_id} is a Hugging Face repo id, which needs huggingface_hub "
            "(pip install huggingface_hub), or pass a local directory"
        ) from exc
    try:
        path = huggingface_hub.snapshot_download(
            repo_id, allow_patterns=_HF_LAYOUT_FILES, local_files_only=not allow_download
        )
    except Exception as exc:  # offline, unknown repo, no access: all told to the user the same way
        hint = (
            "it is not in the local Hugging Face cache; pass --allow-download to fetch it"
            if not allow_download
            else "the download failed"
        )
        raise ModelNotFoundError(
            f"--model {repo_id}: {hint} ({type(exc).__name__}: {exc})"
        ) from exc
    logger.info("Hugging Face repo %s at %s", repo_id, path)
    return Path(path)
