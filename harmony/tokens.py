"""The o200k_harmony encoding: BPE ranks, harmony special tokens by name, and where to load them from.

This module owns the tokenizer the rest of the server sees: a `HarmonyEncoding` wraps a tiktoken
`Encoding` and exposes the harmony control tokens *by name* (`enc.token("<|start|>")`), so a model
whose vocabulary carries the harmony special tokens at other ids works unchanged.

Sources, tried in this order (the network is never touched unless the caller opts in):
1. an explicit `.tiktoken` ranks file, or a model directory given explicitly;
2. a model directory: its `tokenizer.json` (byte-level BPE, converted to ranks) or a `.tiktoken` file;
3. `$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken` (the variable openai-harmony reads too);
4. tiktoken's own cache (`$TIKTOKEN_CACHE_DIR`, `$DATA_GYM_CACHE_DIR` or the temp-dir default);
5. only with `allow_download=True`: tiktoken downloads o200k_base.
When nothing is found the error names every place looked at and how to fix it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import regex
import tiktoken

logger = logging.getLogger(__name__)

ENCODING_NAME = "o200k_harmony"
O200K_BASE_FILE = "o200k_base.tiktoken"
O200K_BASE_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
O200K_BASE_N_RANKS = 199_998
# Beside a `.tiktoken` file: the vocabulary's own pre-tokenization regex (one line).
PATTERN_SIDECAR = "tokenizer_pattern.txt"

# The o200k pre-tokenization pattern (shared by o200k_base and o200k_harmony).
O200K_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

# Harmony's named special tokens on the o200k vocabulary, as openai-harmony defines them.
# Every other id from 200000 to 201088 is `<|reserved_{id}|>` (200018 included: some
# tokenizer.json files call it `<|endofprompt|>`; ids win, names follow openai-harmony).
_HARMONY_NAMED_IDS: dict[str, int] = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
}
_LAST_RESERVED_ID = 201088


def o200k_harmony_special_tokens() -> dict[str, int]:
    """The special tokens of o200k_harmony: name -> id."""
    named_ids = set(_HARMONY_NAMED_IDS.values())
    specials = dict(_HARMONY_NAMED_IDS)
    for token_id in range(200000, _LAST_RESERVED_ID + 1):
        if token_id not in named_ids:
            specials[f"<|reserved_{token_id}|>"] = token_id
    return specials


# The control tokens the harmony format needs; every vocabulary must carry these by name.
REQUIRED_SPECIAL_TOKENS = (
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|channel|>",
    "<|constrain|>",
    "<|return|>",
    "<|call|>",
)


class TokenizerNotFoundError(FileNotFoundError):
    """No vocabulary was found in any of the places looked at."""


class TokenizerFormatError(ValueError):
    """A vocabulary file exists but is not what it should be."""


@dataclass(frozen=True, slots=True)
class SpecialTokenIds:
    """Ids of harmony's control tokens in one vocabulary, resolved once by name."""

    start: int
    end: int
    message: int
    channel: int
    constrain: int
    return_: int
    call: int


class HarmonyEncoding:
    """A BPE vocabulary plus harmony's special tokens, looked up by name.

    Text is always encoded as ordinary text (`encode_ordinary`): a user who writes `<|start|>`
    gets the plain tokens for those characters, never the control token.
    """

    def __init__(self, encoding: tiktoken.Encoding, source: str) -> None:
        missing = [name for name in REQUIRED_SPECIAL_TOKENS if name not in encoding._special_tokens]
        if missing:
            raise TokenizerFormatError(
                f"vocabulary from {source} lacks the harmony special tokens {missing}; "
                "a gpt-oss vocabulary must carry them by name"
            )
        self._encoding = encoding
        self.source = source
        self.name = encoding.name
        self.special_tokens: Mapping[str, int] = dict(encoding._special_tokens)
        self.special_token_names: Mapping[int, str] = {i: n for n, i in self.special_tokens.items()}
        tok = self.special_tokens
        self.ids = SpecialTokenIds(
            start=tok["<|start|>"],
            end=tok["<|end|>"],
            message=tok["<|message|>"],
            channel=tok["<|channel|>"],
            constrain=tok["<|constrain|>"],
            return_=tok["<|return|>"],
            call=tok["<|call|>"],
        )
        # The parser's stop tokens: any of them closes the message being parsed.
        self.stop_token_ids: frozenset[int] = frozenset(
            (self.ids.return_, self.ids.call, self.ids.end)
        )
        # What a sampler stops on after an assistant turn (`<|end|>` only separates messages).
        self.assistant_stop_token_ids: frozenset[int] = frozenset((self.ids.return_, self.ids.call))
        self._token_bytes: list[bytes] | None = None
        self._token_text: list[str | None] | None = None

    # --- ordinary text ------------------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return self._encoding.n_vocab

    @property
    def mergeable_ranks(self) -> Mapping[bytes, int]:
        """The ordinary tokens: bytes -> id (a grammar library builds its tokenizer from these)."""
        return self._encoding._mergeable_ranks

    @property
    def pattern(self) -> str:
        """The pre-tokenization regex."""
        return self._encoding._pat_str

    def encode(self, text: str) -> list[int]:
        """Encode text as ordinary text: special-token strings become plain tokens."""
        return self._encoding.encode_ordinary(text)

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """Encode text where special-token strings *are* control tokens (raw prompts only)."""
        return self._encoding.encode(text, allowed_special="all")

    def decode(self, token_ids: Iterable[int], errors: str = "replace") -> str:
        return self.decode_bytes(token_ids).decode("utf-8", errors=errors)

    def decode_bytes(self, token_ids: Iterable[int]) -> bytes:
        """Bytes of the tokens; special tokens decode to their names. Raises KeyError on unknown ids."""
        table = self.token_bytes_table()
        chunks = []
        for token_id in token_ids:
            token_bytes = table[token_id] if 0 <= token_id < len(table) else None
            if token_bytes is None:
                raise KeyError(f"token id {token_id} is not in vocabulary {self.name!r}")
            chunks.append(token_bytes)
        return b"".join(chunks)

    def token(self, name: str) -> int:
        """Id of a special token by name, e.g. `token("<|start|>")`."""
        try:
            return self.special_tokens[name]
        except KeyError:
            raise KeyError(f"special token {name!r} is not in vocabulary {self.name!r}") from None

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_token_names

    # --- per-token tables (built once, used by the streaming parser) ---------------------------
    def token_bytes_table(self) -> list[bytes | None]:
        """Bytes of every token id (special tokens: their names); None where an id has no token."""
        if self._token_bytes is None:
            table: list[bytes | None] = [None] * self.n_vocab
            for token_bytes, rank in self.mergeable_ranks.items():
                table[rank] = token_bytes
            for name, token_id in self.special_tokens.items():
                table[token_id] = name.encode()
            self._token_bytes = table
        return self._token_bytes

    def token_text_table(self) -> list[str | None]:
        """Per id: the token's text when its bytes are complete UTF-8 on their own, else None."""
        if self._token_text is None:
            texts: list[str | None] = []
            for token_bytes in self.token_bytes_table():
                try:
                    texts.append(None if token_bytes is None else token_bytes.decode("utf-8"))
                except UnicodeDecodeError:
                    texts.append(None)
            self._token_text = texts
        return self._token_text

    def is_valid_id(self, token_id: int) -> bool:
        return 0 <= token_id < self.n_vocab and self.token_bytes_table()[token_id] is not None

    def __repr__(self) -> str:
        return (
            f"HarmonyEncoding(name={self.name!r}, n_vocab={self.n_vocab}, source={self.source!r})"
        )


# --- building encodings ---------------------------------------------------------------------


def encoding_from_ranks(
    mergeable_ranks: dict[bytes, int],
    special_tokens: Mapping[str, int],
    *,
    name: str = ENCODING_NAME,
    pattern: str = O200K_PATTERN,
    source: str = "<in memory>",
) -> HarmonyEncoding:
    """Build a HarmonyEncoding from BPE ranks and special tokens (name -> id).

    Every id must name one token: duplicate ranks, or a special token on an ordinary token's id
    (which would let plain text encode to a control token), are rejected.
    """
    rank_ids = set(mergeable_ranks.values())
    if len(rank_ids) != len(mergeable_ranks):
        raise TokenizerFormatError(f"{source}: two tokens share a rank; every rank must be unique")
    special_ids = list(special_tokens.values())
    if len(set(special_ids)) != len(special_ids):
        raise TokenizerFormatError(f"{source}: two special tokens share an id")
    clashes = sorted(name for name, i in special_tokens.items() if i in rank_ids)
    if clashes:
        raise TokenizerFormatError(
            f"{source}: special tokens {clashes[:5]} use ids of ordinary tokens"
        )
    n_vocab = max([*mergeable_ranks.values(), *special_tokens.values()]) + 1
    encoding = tiktoken.Encoding(
        name=name,
        pat_str=pattern,
        mergeable_ranks=mergeable_ranks,
        special_tokens=dict(special_tokens),
        explicit_n_vocab=None if _has_gaps(mergeable_ranks, special_tokens, n_vocab) else n_vocab,
    )
    return HarmonyEncoding(encoding, source)


def _has_gaps(ranks: dict[bytes, int], specials: Mapping[str, int], n_vocab: int) -> bool:
    return len(ranks) + len(specials) != n_vocab


def load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Read a `.tiktoken` file: one `base64(token_bytes) rank` per line."""
    ranks: dict[bytes, int] = {}
    try:
        with path.open("rb") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    token_b64, rank = line.split()
                    ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
                except ValueError as exc:
                    raise TokenizerFormatError(
                        f"{path}:{line_no}: expected 'base64_token rank', found {line[:80]!r}"
                    ) from exc
    except OSError as exc:
        raise TokenizerNotFoundError(f"cannot read vocabulary file {path}: {exc}") from exc
    if not ranks:
        raise TokenizerFormatError(f"{path} holds no ranks")
    return ranks


def encoding_from_tiktoken_file(path: str | os.PathLike[str]) -> HarmonyEncoding:
    """o200k_harmony from an o200k_base ranks file, or another vocabulary with its special tokens.

    A vocabulary other than o200k_base names its special tokens in `special_tokens.json`
    (`{"<|start|>": 4100, ...}`) beside the ranks file, and may give its own pre-tokenization
    regex in `tokenizer_pattern.txt` (e.g. one digit per piece); without it, o200k's pattern.
    """
    path = Path(path)
    ranks = load_tiktoken_ranks(path)
    pattern = _read_pattern(path.with_name(PATTERN_SIDECAR))
    sidecar = path.with_name("special_tokens.json")
    if sidecar.is_file():
        specials = _read_special_tokens_json(sidecar)
        name = path.stem
    elif len(ranks) == O200K_BASE_N_RANKS:
        specials = o200k_harmony_special_tokens()
        name = ENCODING_NAME
    else:
        raise TokenizerFormatError(
            f"{path} has {len(ranks)} ranks, not o200k_base's {O200K_BASE_N_RANKS}, and no "
            f"{sidecar.name} beside it naming its special tokens"
        )
    return encoding_from_ranks(ranks, specials, name=name, pattern=pattern, source=str(path))


def _read_pattern(path: Path) -> str:
    """The sidecar's regex (trailing newlines dropped), or o200k's when there is no sidecar."""
    if not path.is_file():
        return O200K_PATTERN
    try:
        pattern = path.read_text(encoding="utf-8").rstrip("\r\n")
        # tiktoken compiles the pattern lazily and panics on a bad one: check it here.
        regex.compile(pattern)
    except (OSError, UnicodeDecodeError, regex.error) as exc:
        raise TokenizerFormatError(
            f"cannot use the pre-tokenization pattern in {path}: {exc}"
        ) from exc
    if not pattern:
        raise TokenizerFormatError(f"{path} is empty; expected a pre-tokenization regex")
    return pattern


def _read_special_tokens_json(path: Path) -> dict[str, int]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TokenizerFormatError(f"cannot read special tokens from {path}: {exc}") from exc
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, int) for k, v in data.items()
    ):
        raise TokenizerFormatError(f"{path} must be a JSON object of token name -> id")
    return data


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: every byte maps to one printable character."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def encoding_from_tokenizer_json(path: str | os.PathLike[str]) -> HarmonyEncoding:
    """Convert a Hugging Face byte-level BPE `tokenizer.json` to ranks (rank = token id).

    Added tokens become special tokens by their names; where the vocabulary is o200k_harmony's
    (`<|start|>` at 200006), ids are named as openai-harmony names them.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        model = data["model"]
        vocab: dict[str, int] = model["vocab"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise TokenizerFormatError(f"{path} is not a Hugging Face tokenizer.json: {exc}") from exc
    if model.get("type") != "BPE":
        raise TokenizerFormatError(f"{path}: expected a BPE model, found {model.get('type')!r}")
    char_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for token, token_id in vocab.items():
        try:
            ranks[bytes(char_to_byte[c] for c in token)] = token_id
        except KeyError as exc:
            raise TokenizerFormatError(
                f"{path}: token {token!r} is not byte-level BPE (character {exc} has no byte)"
            ) from None
    specials = {
        t["content"]: t["id"] for t in data.get("added_tokens", []) if t.get("special", True)
    }
    specials = {name: i for name, i in specials.items() if bytes(name, "utf-8") not in ranks}
    if specials.get("<|start|>") == _HARMONY_NAMED_IDS["<|start|>"]:
        by_id = {i: n for n, i in o200k_harmony_special_tokens().items()}
        specials = {by_id.get(i, name): i for name, i in specials.items()}
    pattern = _pattern_from_tokenizer_json(data) or O200K_PATTERN
    return encoding_from_ranks(
        ranks, specials, name=ENCODING_NAME, pattern=pattern, source=str(path)
    )


def _pattern_from_tokenizer_json(data: dict) -> str | None:
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if isinstance(pre, dict) else []
    for step in steps:
        if isinstance(step, dict) and step.get("type") == "Split":
            regex = (step.get("pattern") or {}).get("Regex")
            if regex:
                return regex
    return None


def _tiktoken_cache_candidates(env: Mapping[str, str]) -> list[Path]:
    """Where tiktoken itself caches o200k_base (the file is named by the sha1 of its URL)."""
    cache_key = hashlib.sha1(O200K_BASE_URL.encode()).hexdigest()
    dirs = []
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if env.get(var):
            dirs.append(Path(env[var]))
    dirs.append(Path(tempfile.gettempdir()) / "data-gym-cache")
    return [d / cache_key for d in dirs]


def _model_dir_candidates(model_dir: Path) -> list[Path]:
    candidates = [model_dir / "tokenizer.json", model_dir / "original" / "tokenizer.json"]
    candidates += sorted(model_dir.glob("*.tiktoken")) + sorted(
        model_dir.glob("original/*.tiktoken")
    )
    return candidates


def _load_file(path: Path) -> HarmonyEncoding:
    if path.suffix == ".json":
        return encoding_from_tokenizer_json(path)
    return encoding_from_tiktoken_file(path)


def load_harmony_encoding(
    tokenizer: str | os.PathLike[str] | None = None,
    *,
    model_dir: str | os.PathLike[str] | None = None,
    allow_download: bool = False,
    env: Mapping[str, str] | None = None,
) -> HarmonyEncoding:
    """Find and load the vocabulary; see the module docstring for the order of sources."""
    env = os.environ if env is None else env
    looked_at: list[str] = []
    if tokenizer is not None:
        path = Path(tokenizer)
        if path.is_dir():
            model_dir, tokenizer = path, None
        elif path.is_file():
            return _load_file(path)
        else:
            raise TokenizerNotFoundError(f"tokenizer file {path} does not exist")
    if model_dir is not None:
        for candidate in _model_dir_candidates(Path(model_dir)):
            if candidate.is_file():
                return _load_file(candidate)
        looked_at.append(f"model directory {model_dir} (tokenizer.json or *.tiktoken)")
    base = env.get("TIKTOKEN_ENCODINGS_BASE")
    if base:
        candidate = Path(base) / O200K_BASE_FILE
        if candidate.is_file():
            return encoding_from_tiktoken_file(candidate)
        looked_at.append(f"$TIKTOKEN_ENCODINGS_BASE/{O200K_BASE_FILE} = {candidate}")
    else:
        looked_at.append("$TIKTOKEN_ENCODINGS_BASE (unset)")
    for candidate in _tiktoken_cache_candidates(env):
        if candidate.is_file():
            logger.info("using tiktoken's cached o200k_base at %s", candidate)
            return _from_cache_file(candidate)
        looked_at.append(f"tiktoken cache {candidate}")
    if allow_download:
        logger.info("downloading o200k_base through tiktoken (network allowed)")
        base_encoding = tiktoken.get_encoding("o200k_base")
        return encoding_from_ranks(
            base_encoding._mergeable_ranks,
            o200k_harmony_special_tokens(),
            source="tiktoken download of o200k_base",
        )
    raise TokenizerNotFoundError(
        "no gpt-oss vocabulary found. Looked at:\n  - "
        + "\n  - ".join(looked_at)
        + "\nFix: pass --tokenizer /path/to/o200k_base.tiktoken (or a model directory with "
        "tokenizer.json), or set TIKTOKEN_ENCODINGS_BASE to a directory holding "
        f"{O200K_BASE_FILE}, or allow network access to download it once."
    )


def _from_cache_file(path: Path) -> HarmonyEncoding:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != O200K_BASE_SHA256:
        raise TokenizerFormatError(
            f"tiktoken cache file {path} has sha256 {digest}, expected {O200K_BASE_SHA256}"
        )
    return encoding_from_ranks(
        load_tiktoken_ranks(path), o200k_harmony_special_tokens(), source=str(path)
    )
