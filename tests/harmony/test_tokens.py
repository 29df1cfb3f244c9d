"""Tests for `harmony.tokens`: the o200k_harmony encoding and where its vocabulary is loaded from.

- With the official o200k_base vocabulary (skipped when ../shared/tiktoken is absent): our
  special tokens, stop tokens and ordinary-text encoding equal openai-harmony's.
- The order of sources in `load_harmony_encoding` (explicit file, model directory, tokenizer.json,
  `$TIKTOKEN_ENCODINGS_BASE`, tiktoken's cache), and the errors when nothing is found.
- Malformed `.tiktoken` files, sidecars and `tokenizer.json` files give `TokenizerFormatError`.
- Converting a Hugging Face byte-level BPE `tokenizer.json` to ranks, including openai-harmony's
  naming of o200k ids (`<|endofprompt|>` at 200018 becomes `<|reserved_200018|>`).
- `HarmonyEncoding` basics on the synthetic vocabulary, whose special tokens sit at unusual ids.

No test touches the network: `tiktoken.get_encoding` is replaced wherever a download could happen,
and every environment variable that selects a source is set or unset with `monkeypatch`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import pytest

from harmony import (
    HarmonyEncoding,
    TokenizerFormatError,
    TokenizerNotFoundError,
    encoding_from_ranks,
    load_harmony_encoding,
    o200k_harmony_special_tokens,
)
from harmony.tokens import (
    O200K_PATTERN,
    REQUIRED_SPECIAL_TOKENS,
    encoding_from_tiktoken_file,
    encoding_from_tokenizer_json,
    load_tiktoken_ranks,
)
from tests.conftest import NO_SHARED_VOCAB, SHARED_VOCAB
from tests.harmony.synthetic_vocab import synthetic_encoding

# Written out here rather than imported, so that a wrong constant in the module fails a test.
O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
CACHE_KEY = hashlib.sha1(O200K_URL.encode()).hexdigest()
SOURCE_ENV_VARS = ("TIKTOKEN_ENCODINGS_BASE", "TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")

NAMED_IDS = {
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

TEXTS = [
    "",
    "Hello, world!",
    "the thing is, there is another thing to the north",
    "héllo wörld — naïve café, Ωμέγα, Привет, 日本語のテキスト, 한국어",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\tif x != 0: pass",
    "spaces     between\t\ttabs\n\n\n   \r\n  trailing   ",
    "digits 0 12 123 1234 12345678901234567890 3.14159 -42 1e10",
    "She's here, they'LL go, it'S ok, I'd've",
    "a user wrote <|start|>assistant<|channel|>final<|message|>hi<|end|><|return|>",
    'functions.get_weather to=functions.get_weather json {"city": "Paris"}',
    "<|endoftext|><|reserved_200018|><|endofprompt|>",
]


# --- helpers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth() -> HarmonyEncoding:
    return synthetic_encoding()


def _ranks_of(enc: HarmonyEncoding) -> dict[bytes, int]:
    """The mergeable (non-special) tokens of an encoding, from its public byte table."""
    return {
        token_bytes: token_id
        for token_id, token_bytes in enumerate(enc.token_bytes_table())
        if token_bytes is not None and not enc.is_special(token_id)
    }


def _write_tiktoken(path: Path, ranks: dict[bytes, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in ranks.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _write_synthetic(path: Path, *, sidecar: bool = True) -> Path:
    """Write the synthetic vocabulary as a `.tiktoken` file (+ `special_tokens.json`)."""
    enc = synthetic_encoding()
    _write_tiktoken(path, _ranks_of(enc))
    if sidecar:
        (path.parent / "special_tokens.json").write_text(json.dumps(dict(enc.special_tokens)))
    return path


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No source variables set, tiktoken's default cache dir empty, downloads forbidden."""
    for var in SOURCE_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    temp = tmp_path / "systemp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"tiktoken.get_encoding{args} called: tests must not download")

    monkeypatch.setattr("harmony.tokens.tiktoken.get_encoding", no_download)
    return temp


@pytest.fixture
def shared_vocab() -> Path:
    if not SHARED_VOCAB.is_file():
        pytest.skip(NO_SHARED_VOCAB)
    return SHARED_VOCAB


def _link(target: Path, link: Path) -> Path:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link


# --- 1. the official vocabulary against openai-harmony ------------------------------------------


def test_special_token_names_match_openai_harmony(o200k_encoding, oracle) -> None:
    names = o200k_encoding.special_token_names
    assert set(names) == set(range(199998, 201089))
    for token_id in range(199998, 201089):
        assert oracle.decode_utf8([token_id]) == names[token_id], token_id
    assert set(o200k_encoding.special_tokens) == set(oracle.special_tokens_set)


@pytest.mark.parametrize(
    ("name", "token_id"), [*NAMED_IDS.items(), ("<|reserved_200018|>", 200018)]
)
def test_named_special_token_ids(o200k_encoding, name: str, token_id: int) -> None:
    assert o200k_encoding.token(name) == token_id
    assert o200k_encoding.special_token_names[token_id] == name
    assert o200k_encoding.decode([token_id]) == name
    assert o200k_encoding.is_special(token_id)


def test_official_vocab_shape(o200k_encoding) -> None:
    assert o200k_encoding.n_vocab == 201089
    assert o200k_encoding.name == "o200k_harmony"
    assert "<|endofprompt|>" not in o200k_encoding.special_tokens
    assert o200k_encoding.is_valid_id(0)
    assert o200k_encoding.is_valid_id(199997)
    assert not o200k_encoding.is_special(199997)
    assert o200k_encoding.is_valid_id(201088)
    assert not o200k_encoding.is_valid_id(201089)
    with pytest.raises(KeyError):
        o200k_encoding.decode_bytes([201089])
    ids = o200k_encoding.ids
    assert (ids.start, ids.end, ids.message, ids.channel) == (200006, 200007, 200008, 200005)
    assert (ids.constrain, ids.return_, ids.call) == (200003, 200002, 200012)


def test_stop_tokens_match_openai_harmony(o200k_encoding, oracle) -> None:
    assert sorted(oracle.stop_tokens()) == sorted(o200k_encoding.stop_token_ids)
    assert sorted(oracle.stop_tokens_for_assistant_actions()) == sorted(
        o200k_encoding.assistant_stop_token_ids
    )
    assert set(o200k_encoding.stop_token_ids) == {200002, 200007, 200012}
    assert set(o200k_encoding.assistant_stop_token_ids) == {200002, 200012}


def test_o200k_harmony_special_tokens_table(oracle) -> None:
    specials = o200k_harmony_special_tokens()
    assert sorted(specials.values()) == list(range(199998, 201089))
    for name, token_id in specials.items():
        assert oracle.decode_utf8([token_id]) == name


@pytest.mark.parametrize("text", TEXTS)
def test_ordinary_text_encodes_like_openai_harmony(o200k_encoding, oracle, text: str) -> None:
    ours = o200k_encoding.encode(text)
    assert ours == oracle.encode(text, allowed_special=set(), disallowed_special=())
    assert not any(o200k_encoding.is_special(i) for i in ours)
    assert o200k_encoding.decode(ours) == text
    assert o200k_encoding.decode_bytes(ours) == text.encode()


def test_start_text_is_not_the_control_token(o200k_encoding, oracle) -> None:
    plain = o200k_encoding.encode("<|start|>")
    assert 200006 not in plain
    assert len(plain) > 1
    assert o200k_encoding.encode_with_special_tokens("<|start|>") == [200006]
    text = "<|start|>user<|message|>hi<|end|>"
    assert o200k_encoding.encode_with_special_tokens(text) == oracle.encode(
        text, allowed_special="all"
    )


# --- 2. the order of sources ----------------------------------------------------------------


def test_explicit_tiktoken_file_wins(tmp_path: Path, clean_env: Path) -> None:
    explicit = _write_synthetic(tmp_path / "explicit" / "explicit.tiktoken")
    model = tmp_path / "model"
    _write_synthetic(model / "model.tiktoken")
    base = tmp_path / "base"
    _write_synthetic(base / "o200k_base.tiktoken")
    enc = load_harmony_encoding(
        explicit, model_dir=model, env={"TIKTOKEN_ENCODINGS_BASE": str(base)}
    )
    assert enc.source == str(explicit)
    assert enc.name == "explicit"
    assert enc.special_tokens == synthetic_encoding().special_tokens


def test_directory_argument_is_a_model_dir(tmp_path: Path, clean_env: Path) -> None:
    as_arg = tmp_path / "as_arg"
    vocab = _write_synthetic(as_arg / "vocab.tiktoken")
    other = tmp_path / "other"
    _write_synthetic(other / "other.tiktoken")
    assert load_harmony_encoding(as_arg).source == str(vocab)
    # A directory given as the tokenizer replaces model_dir.
    assert load_harmony_encoding(str(as_arg), model_dir=other).source == str(vocab)


def test_model_dir_prefers_tokenizer_json(
    tmp_path: Path, clean_env: Path, synthetic_tokenizer_json: str
) -> None:
    model = tmp_path / "model"
    _write_synthetic(model / "vocab.tiktoken")
    (model / "tokenizer.json").write_text(synthetic_tokenizer_json)
    enc = load_harmony_encoding(model_dir=model)
    assert enc.source == str(model / "tokenizer.json")
    assert enc.special_tokens == synthetic_encoding().special_tokens


def test_model_dir_original_subdirectory(
    tmp_path: Path, clean_env: Path, synthetic_tokenizer_json: str
) -> None:
    model = tmp_path / "model"
    vocab = _write_synthetic(model / "original" / "vocab.tiktoken")
    assert load_harmony_encoding(model_dir=model).source == str(vocab)
    (model / "original" / "tokenizer.json").write_text(synthetic_tokenizer_json)
    assert load_harmony_encoding(model_dir=model).source == str(
        model / "original" / "tokenizer.json"
    )


def test_model_dir_tiktoken_beats_encodings_base(
    tmp_path: Path, clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "model"
    vocab = _write_synthetic(model / "mine.tiktoken")
    base = tmp_path / "base"
    _write_synthetic(base / "o200k_base.tiktoken")
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(base))
    enc = load_harmony_encoding(model_dir=model)
    assert enc.source == str(vocab)
    assert enc.name == "mine"


def test_empty_model_dir_falls_through_to_encodings_base(
    tmp_path: Path, clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    base = tmp_path / "base"
    vocab = _write_synthetic(base / "o200k_base.tiktoken")
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(base))
    assert load_harmony_encoding(model_dir=model).source == str(vocab)


def test_encodings_base_beats_tiktoken_cache(
    tmp_path: Path, clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tmp_path / "base"
    vocab = _write_synthetic(base / "o200k_base.tiktoken")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / CACHE_KEY).write_text("not the vocabulary\n")  # would raise if it were read
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(base))
    assert load_harmony_encoding().source == str(vocab)


def test_env_argument_replaces_os_environ_for_encodings_base(
    tmp_path: Path, clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tmp_path / "base"
    vocab = _write_synthetic(base / "o200k_base.tiktoken")
    assert load_harmony_encoding(env={"TIKTOKEN_ENCODINGS_BASE": str(base)}).source == str(vocab)
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(base))
    with pytest.raises(TokenizerNotFoundError, match=r"TIKTOKEN_ENCODINGS_BASE \(unset\)"):
        load_harmony_encoding(env={})


def test_env_argument_also_selects_cache_dirs(tmp_path: Path, clean_env: Path) -> None:
    cache = tmp_path / "cache-from-env-arg"
    with pytest.raises(TokenizerNotFoundError) as excinfo:
        load_harmony_encoding(env={"TIKTOKEN_CACHE_DIR": str(cache)})
    assert str(cache / CACHE_KEY) in str(excinfo.value)


def test_tiktoken_cache_file_is_loaded_and_verified(
    tmp_path: Path, clean_env: Path, monkeypatch: pytest.MonkeyPatch, shared_vocab: Path
) -> None:
    assert hashlib.sha256(shared_vocab.read_bytes()).hexdigest() == O200K_SHA256
    cached = _link(shared_vocab, tmp_path / "cache" / CACHE_KEY)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cached.parent))
    enc = load_harmony_encoding()
    assert enc.source == str(cached)
    assert enc.n_vocab == 201089
    assert enc.token("<|start|>") == 200006
    assert enc.token("<|reserved_200018|>") == 200018


def test_tiktoken_cache_with_wrong_hash_is_a_format_error(
    tmp_path: Path, clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached = _write_synthetic(tmp_path / "cache" / CACHE_KEY, sidecar=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cached.parent))
    with pytest.raises(TokenizerFormatError) as excinfo:
        load_harmony_encoding()
    assert str(cached) in str(excinfo.value)
    assert O200K_SHA256 in str(excinfo.value)


def test_cache_dirs_are_tried_in_tiktoken_order(
    tmp_path: Path, clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each cache file has the wrong hash, so the error names the first one found.
    default = clean_env / "data-gym-cache" / CACHE_KEY
    data_gym = tmp_path / "data_gym" / CACHE_KEY
    tiktoken_cache = tmp_path / "tiktoken_cache" / CACHE_KEY
    for path in (default, data_gym, tiktoken_cache):
        path.parent.mkdir(parents=True)
        path.write_text("x")
    with pytest.raises(TokenizerFormatError, match=re.escape(str(default))):
        load_harmony_encoding()
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(data_gym.parent))
    with pytest.raises(TokenizerFormatError, match=re.escape(str(data_gym))):
        load_harmony_encoding()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tiktoken_cache.parent))
    with pytest.raises(TokenizerFormatError, match=re.escape(str(tiktoken_cache))):
        load_harmony_encoding()


def test_download_only_when_allowed_and_nothing_local(
    tmp_path: Path, clean_env: Path, monkeypatch: pytest.MonkeyPatch, synth: HarmonyEncoding
) -> None:
    calls: list[str] = []

    class FakeBase:
        _mergeable_ranks = _ranks_of(synth)

    def fake_get_encoding(name: str) -> FakeBase:
        calls.append(name)
        return FakeBase()

    monkeypatch.setattr("harmony.tokens.tiktoken.get_encoding", fake_get_encoding)
    with pytest.raises(TokenizerNotFoundError):
        load_harmony_encoding()
    assert calls == []
    base = tmp_path / "base"
    _write_synthetic(base / "o200k_base.tiktoken")
    load_harmony_encoding(allow_download=True, env={"TIKTOKEN_ENCODINGS_BASE": str(base)})
    assert calls == []
    enc = load_harmony_encoding(allow_download=True)
    assert calls == ["o200k_base"]
    assert enc.token("<|start|>") == 200006
    assert enc.special_tokens == o200k_harmony_special_tokens()


# --- 3. nothing found -----------------------------------------------------------------------


def test_not_found_names_every_place_and_the_fix(
    tmp_path: Path, clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    base = tmp_path / "base"
    base.mkdir()
    tiktoken_cache = tmp_path / "tiktoken_cache"
    data_gym = tmp_path / "data_gym"
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(base))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tiktoken_cache))
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(data_gym))
    with pytest.raises(TokenizerNotFoundError) as excinfo:
        load_harmony_encoding(model_dir=model)
    assert isinstance(excinfo.value, FileNotFoundError)
    message = str(excinfo.value)
    for place in (
        model,
        base / "o200k_base.tiktoken",
        tiktoken_cache / CACHE_KEY,
        data_gym / CACHE_KEY,
        clean_env / "data-gym-cache" / CACHE_KEY,
    ):
        assert str(place) in message
    assert "--tokenizer" in message
    assert "TIKTOKEN_ENCODINGS_BASE" in message


def test_not_found_with_no_configuration_says_base_is_unset(clean_env: Path) -> None:
    with pytest.raises(TokenizerNotFoundError) as excinfo:
        load_harmony_encoding()
    message = str(excinfo.value)
    assert "$TIKTOKEN_ENCODINGS_BASE (unset)" in message
    assert str(clean_env / "data-gym-cache" / CACHE_KEY) in message
    assert "--tokenizer" in message
    assert "- model directory" not in message  # no model directory was given


def test_missing_explicit_path_is_not_found_and_does_not_fall_back(
    tmp_path: Path, clean_env: Path
) -> None:
    base = tmp_path / "base"
    _write_synthetic(base / "o200k_base.tiktoken")
    missing = tmp_path / "nope" / "o200k_base.tiktoken"
    with pytest.raises(TokenizerNotFoundError, match=re.escape(str(missing))):
        load_harmony_encoding(missing, env={"TIKTOKEN_ENCODINGS_BASE": str(base)})


# --- 4. malformed files ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad_line",
    ["YWI=", "YWI= 3 4", "!!notbase64!! 3", "YWI= three", "YWI=3"],
    ids=["one-field", "three-fields", "bad-base64", "bad-rank", "no-space"],
)
def test_tiktoken_line_not_base64_rank(tmp_path: Path, bad_line: str) -> None:
    path = tmp_path / "bad.tiktoken"
    path.write_text(f"YQ== 0\n\nYg== 1\n{bad_line}\nYw== 2\n")
    with pytest.raises(TokenizerFormatError) as excinfo:
        encoding_from_tiktoken_file(path)
    assert f"{path}:4" in str(excinfo.value)


def test_tiktoken_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "ok.tiktoken"
    path.write_text("\nYQ== 0\n   \nYg== 7\r\n\n")
    assert load_tiktoken_ranks(path) == {b"a": 0, b"b": 7}


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["empty", "blank"])
def test_empty_tiktoken_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.tiktoken"
    path.write_text(content)
    with pytest.raises(TokenizerFormatError, match=re.escape(str(path))):
        load_tiktoken_ranks(path)
    # Even with special tokens named beside it, a file without ranks is no vocabulary.
    (tmp_path / "special_tokens.json").write_text(
        json.dumps(dict(synthetic_encoding().special_tokens))
    )
    with pytest.raises(TokenizerFormatError, match=re.escape(str(path))):
        encoding_from_tiktoken_file(path)


def test_unreadable_tiktoken_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(TokenizerNotFoundError, match=r"missing\.tiktoken"):
        load_tiktoken_ranks(tmp_path / "missing.tiktoken")


def test_non_o200k_size_without_sidecar(tmp_path: Path) -> None:
    path = _write_synthetic(tmp_path / "small.tiktoken", sidecar=False)
    with pytest.raises(TokenizerFormatError) as excinfo:
        encoding_from_tiktoken_file(path)
    message = str(excinfo.value)
    assert str(path) in message
    assert "special_tokens.json" in message
    assert str(len(_ranks_of(synthetic_encoding()))) in message


def test_vocabulary_missing_required_tokens(tmp_path: Path, synth: HarmonyEncoding) -> None:
    path = _write_synthetic(tmp_path / "v.tiktoken")
    specials = dict(synth.special_tokens)
    del specials["<|start|>"], specials["<|call|>"]
    (tmp_path / "special_tokens.json").write_text(json.dumps(specials))
    with pytest.raises(TokenizerFormatError) as excinfo:
        encoding_from_tiktoken_file(path)
    message = str(excinfo.value)
    assert "<|start|>" in message
    assert "<|call|>" in message
    assert "<|end|>" not in message
    assert str(path) in message


def test_encoding_from_ranks_requires_every_control_token(synth: HarmonyEncoding) -> None:
    ranks = _ranks_of(synth)
    with pytest.raises(TokenizerFormatError) as excinfo:
        encoding_from_ranks(ranks, {"<|endoftext|>": 1000})
    for name in REQUIRED_SPECIAL_TOKENS:
        assert name in str(excinfo.value)


@pytest.mark.parametrize(
    "sidecar",
    ["{not json", '["<|start|>", 3]', '{"<|start|>": "300"}', '{"<|start|>": 3.5}'],
    ids=["not-json", "a-list", "string-id", "float-id"],
)
def test_malformed_sidecar(tmp_path: Path, sidecar: str) -> None:
    path = _write_synthetic(tmp_path / "v.tiktoken")
    (tmp_path / "special_tokens.json").write_text(sidecar)
    with pytest.raises(TokenizerFormatError, match=r"special_tokens\.json"):
        encoding_from_tiktoken_file(path)


def test_duplicate_rank_is_a_format_error(tmp_path: Path) -> None:
    path = tmp_path / "dup.tiktoken"
    _write_tiktoken(path, {**{bytes([b]): b for b in range(256)}, b"ab": 7})
    (tmp_path / "special_tokens.json").write_text(
        json.dumps({name: 300 + i for i, name in enumerate(REQUIRED_SPECIAL_TOKENS)})
    )
    with pytest.raises(TokenizerFormatError):
        encoding_from_tiktoken_file(path)


def test_special_id_colliding_with_a_rank_is_a_format_error(tmp_path: Path) -> None:
    path = _write_tiktoken(tmp_path / "v.tiktoken", {bytes([b]): b for b in range(256)})
    specials = {name: 300 + i for i, name in enumerate(REQUIRED_SPECIAL_TOKENS)}
    specials["<|start|>"] = 5  # also the rank of b"\x05"
    (tmp_path / "special_tokens.json").write_text(json.dumps(specials))
    with pytest.raises(TokenizerFormatError):
        encoding_from_tiktoken_file(path)


# --- 5. tokenizer.json conversion -----------------------------------------------------------


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet, written out independently of harmony.tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@pytest.fixture(scope="module")
def synthetic_tokenizer_json() -> str:
    """The synthetic vocabulary as a Hugging Face tokenizer.json, built with `tokenizers`."""
    tokenizers = pytest.importorskip("tokenizers")
    enc = synthetic_encoding()
    ranks = _ranks_of(enc)
    b2u = _byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(b2u[b] for b in token)

    # Every split of a token into two lower-ranked tokens is a merge, in rank order; with
    # ignore_merges (a whole pre-token in the vocab is one token) this is tiktoken's BPE.
    merges = [
        (text(tok[:k]), text(tok[k:]))
        for tok, rank in sorted(ranks.items(), key=lambda item: item[1])
        for k in range(1, len(tok))
        if tok[:k] in ranks and tok[k:] in ranks and max(ranks[tok[:k]], ranks[tok[k:]]) < rank
    ]
    model = tokenizers.models.BPE(
        vocab={text(tok): rank for tok, rank in ranks.items()}, merges=merges, ignore_merges=True
    )
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [
            tokenizers.pre_tokenizers.Split(
                tokenizers.Regex(O200K_PATTERN), behavior="isolated", invert=False
            ),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    by_id = sorted(enc.special_tokens.items(), key=lambda item: item[1])
    tokenizer.add_special_tokens([tokenizers.AddedToken(name, special=True) for name, _ in by_id])
    data = json.loads(tokenizer.to_str())
    # `tokenizers` numbers added tokens right after the vocab; give them the synthetic ids (gap).
    for added in data["added_tokens"]:
        added["id"] = enc.special_tokens[added["content"]]
    return json.dumps(data)


def test_tokenizer_json_fixture_is_faithful(
    synthetic_tokenizer_json: str, synth: HarmonyEncoding
) -> None:
    """Hugging Face's own tokenizer agrees with the synthetic tiktoken encoding."""
    from tokenizers import Tokenizer

    hf = Tokenizer.from_str(synthetic_tokenizer_json)
    # `tokenizers` renumbers added tokens after its vocab on load; map them back by name.
    hf_to_ours = {hf.token_to_id(name): token_id for name, token_id in synth.special_tokens.items()}
    for text in TEXTS:
        hf_ids = [hf_to_ours.get(i, i) for i in hf.encode(text).ids]
        assert hf_ids == synth.encode_with_special_tokens(text), text
    assert hf.encode("<|start|>").tokens == ["<|start|>"]


def test_tokenizer_json_converts_to_the_same_encoding(
    tmp_path: Path, synthetic_tokenizer_json: str, synth: HarmonyEncoding
) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text(synthetic_tokenizer_json)
    enc = encoding_from_tokenizer_json(path)
    assert enc.special_tokens == synth.special_tokens
    assert enc.ids == synth.ids
    assert enc.n_vocab == synth.n_vocab
    assert enc.token_bytes_table() == synth.token_bytes_table()
    assert enc.source == str(path)
    for text in TEXTS:
        assert enc.encode(text) == synth.encode(text), text
        assert enc.encode_with_special_tokens(text) == synth.encode_with_special_tokens(text)
    # The explicit-file path dispatches on the .json suffix.
    assert load_harmony_encoding(path).special_tokens == synth.special_tokens


def test_tokenizer_json_split_pattern_is_used(
    tmp_path: Path, synthetic_tokenizer_json: str, synth: HarmonyEncoding
) -> None:
    data = json.loads(synthetic_tokenizer_json)
    other_pattern = r"\S+|\s+"
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = other_pattern
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    enc = encoding_from_tokenizer_json(path)
    expected = encoding_from_ranks(_ranks_of(synth), synth.special_tokens, pattern=other_pattern)
    text = "the thing is to the north"
    assert enc.encode(text) == expected.encode(text)
    assert enc.encode(text) != synth.encode(text)  # the pattern matters for this text


def _o200k_like_tokenizer_json(added: dict[int, str]) -> dict:
    b2u = _byte_to_unicode()
    return {
        "version": "1.0",
        "added_tokens": [
            {
                "id": token_id,
                "content": name,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for token_id, name in added.items()
        ],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
        "model": {"type": "BPE", "vocab": {b2u[b]: b for b in range(256)}, "merges": []},
    }


def test_tokenizer_json_o200k_ids_take_openai_harmony_names(tmp_path: Path) -> None:
    added = {token_id: name for name, token_id in NAMED_IDS.items()}
    added[200018] = "<|endofprompt|>"
    added[200001] = "<|some_other_name|>"
    added[201090] = "<|beyond_harmony|>"  # outside harmony's table: keeps its name
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(_o200k_like_tokenizer_json(added)))
    enc = encoding_from_tokenizer_json(path)
    expected = {
        **NAMED_IDS,
        "<|reserved_200018|>": 200018,
        "<|reserved_200001|>": 200001,
        "<|beyond_harmony|>": 201090,
    }
    assert dict(enc.special_tokens) == expected
    assert enc.decode([200018]) == "<|reserved_200018|>"
    assert enc.n_vocab == 201091
    assert enc.is_valid_id(255)
    assert not enc.is_valid_id(256)
    assert not enc.is_valid_id(200000)
    assert enc.encode("ab") == [ord("a"), ord("b")]


def test_tokenizer_json_elsewhere_keeps_its_names(tmp_path: Path, synth: HarmonyEncoding) -> None:
    added = {token_id: name for name, token_id in synth.special_tokens.items()}
    added[200018] = "<|endofprompt|>"
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(_o200k_like_tokenizer_json(added)))
    enc = encoding_from_tokenizer_json(path)
    assert enc.token("<|endofprompt|>") == 200018
    assert enc.token("<|start|>") == synth.token("<|start|>")
    assert "<|reserved_200018|>" not in enc.special_tokens


@pytest.mark.parametrize("model_type", ["WordPiece", "Unigram", None])
def test_tokenizer_json_non_bpe_model(tmp_path: Path, model_type: str | None) -> None:
    data = _o200k_like_tokenizer_json({i: n for n, i in NAMED_IDS.items()})
    if model_type is None:
        del data["model"]["type"]
    else:
        data["model"]["type"] = model_type
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TokenizerFormatError, match="BPE") as excinfo:
        encoding_from_tokenizer_json(path)
    assert str(path) in str(excinfo.value)


@pytest.mark.parametrize(
    "content",
    ["{not json", "[]", '{"model": {}}', '{"version": "1.0"}'],
    ids=["not-json", "a-list", "no-vocab", "no-model"],
)
def test_tokenizer_json_not_a_tokenizer(tmp_path: Path, content: str) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(TokenizerFormatError, match=re.escape(str(path))):
        encoding_from_tokenizer_json(path)


def test_tokenizer_json_token_outside_byte_alphabet(tmp_path: Path) -> None:
    data = _o200k_like_tokenizer_json({i: n for n, i in NAMED_IDS.items()})
    data["model"]["vocab"]["€uro"] = 256
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TokenizerFormatError, match="byte-level"):
        encoding_from_tokenizer_json(path)


# --- 6. HarmonyEncoding basics on the synthetic vocabulary ----------------------------------


def test_token_by_name(synth: HarmonyEncoding) -> None:
    for name, token_id in synth.special_tokens.items():
        assert synth.token(name) == token_id
        assert synth.special_token_names[token_id] == name
    start = synth.token("<|start|>")
    assert start != 200006
    assert synth.ids.start == start
    assert synth.ids.return_ == synth.token("<|return|>")
    assert synth.stop_token_ids == {
        synth.token("<|return|>"),
        synth.token("<|call|>"),
        synth.token("<|end|>"),
    }
    assert synth.assistant_stop_token_ids == {synth.token("<|return|>"), synth.token("<|call|>")}


def test_unknown_token_name(synth: HarmonyEncoding) -> None:
    with pytest.raises(KeyError) as excinfo:
        synth.token("<|reserved_200018|>")
    message = str(excinfo.value)
    assert "<|reserved_200018|>" in message
    assert "synthetic_harmony" in message


def test_decode_bytes_unknown_ids(synth: HarmonyEncoding) -> None:
    gap_id = max(_ranks_of(synth).values()) + 1
    assert not synth.is_special(gap_id)
    for bad in (gap_id, -1, -synth.n_vocab, synth.n_vocab, synth.n_vocab + 5):
        with pytest.raises(KeyError, match=re.escape(str(bad))):
            synth.decode_bytes([ord("a"), bad])
        with pytest.raises(KeyError):
            synth.decode([bad])


def test_decode_special_and_partial_bytes(synth: HarmonyEncoding) -> None:
    start = synth.token("<|start|>")
    assert synth.decode_bytes([start, ord("h"), ord("i")]) == b"<|start|>hi"
    assert synth.decode([0xC3]) == "\ufffd"
    assert synth.decode([0xC3, 0xA9]) == "é"
    with pytest.raises(UnicodeDecodeError):
        synth.decode([0xC3], errors="strict")


def test_encode_is_ordinary_text(synth: HarmonyEncoding) -> None:
    start = synth.token("<|start|>")
    plain = synth.encode("<|start|>")
    assert start not in plain
    assert synth.decode(plain) == "<|start|>"
    assert synth.encode_with_special_tokens("<|start|>hi") == [start, *synth.encode("hi")]


def test_is_valid_id(synth: HarmonyEncoding) -> None:
    ranks = _ranks_of(synth)
    gap_ids = set(range(synth.n_vocab)) - set(ranks.values()) - set(synth.special_tokens.values())
    assert len(gap_ids) == 17
    for token_id in range(-3, synth.n_vocab + 3):
        expected = token_id in ranks.values() or token_id in synth.special_token_names
        assert synth.is_valid_id(token_id) == expected, token_id
    assert synth.n_vocab == max(synth.special_tokens.values()) + 1


def test_token_text_table(synth: HarmonyEncoding) -> None:
    texts = synth.token_text_table()
    table = synth.token_bytes_table()
    assert len(texts) == len(table) == synth.n_vocab
    for token_id in range(128):
        assert texts[token_id] == chr(token_id)
    for token_id in range(128, 256):
        assert texts[token_id] is None  # a lone byte >= 0x80 is never complete UTF-8
    for name, token_id in synth.special_tokens.items():
        assert texts[token_id] == name
    for token_id, token_bytes in enumerate(table):
        if token_bytes is None:
            assert texts[token_id] is None
    assert texts[synth.encode("the")[0]] == "the"
    assert synth.token_text_table() is texts  # built once


def test_token_text_table_multibyte_tokens() -> None:
    ranks = {bytes([b]): b for b in range(256)}
    ranks["é".encode()] = 256  # complete 2-byte character
    ranks["€".encode()[:2]] = 257  # first two of three bytes
    ranks["🙂".encode()] = 258  # complete 4-byte character
    ranks[b"a\xff"] = 259  # ASCII followed by a byte that is never UTF-8
    specials = {name: 300 + i for i, name in enumerate(REQUIRED_SPECIAL_TOKENS)}
    enc = encoding_from_ranks(ranks, specials, name="multibyte")
    texts = enc.token_text_table()
    assert texts[256] == "é"
    assert texts[257] is None
    assert texts[258] == "🙂"
    assert texts[259] is None
    assert texts[260] is None  # a gap
    assert texts[300] == REQUIRED_SPECIAL_TOKENS[0]
    assert enc.encode("é🙂") == [256, 258]


def test_repr_and_source(synth: HarmonyEncoding) -> None:
    text = repr(synth)
    assert "synthetic_harmony" in text
    assert str(synth.n_vocab) in text
    assert synth.source == "tests"


def test_no_source_variable_leaks_into_tests(clean_env: Path) -> None:
    """The clean_env fixture really isolates: the session fixture `oracle` sets a variable."""
    for var in SOURCE_ENV_VARS:
        assert var not in os.environ
    assert tempfile.gettempdir() == str(clean_env)


# --- a vocabulary's own pre-tokenization pattern (tokenizer_pattern.txt) -----------------------


def _write_digit_vocab(directory: Path) -> Path:
    """Bytes plus the merge "12", so o200k's pattern (digits in threes) can use it."""
    ranks = {bytes([b]): b for b in range(256)} | {b"12": 256}
    path = directory / "digits.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    specials = {name: 300 + i for i, name in enumerate(REQUIRED_SPECIAL_TOKENS)}
    (directory / "special_tokens.json").write_text(json.dumps(specials))
    return path


def test_pattern_sidecar_sets_the_pre_tokenization(tmp_path: Path) -> None:
    path = _write_digit_vocab(tmp_path)
    without = encoding_from_tiktoken_file(path)
    assert without.encode("123") == [256, ord("3")]  # o200k's pattern: "123" is one piece
    (tmp_path / "tokenizer_pattern.txt").write_text(r"\p{N}|[^\p{N}]+" + "\n")
    with_sidecar = encoding_from_tiktoken_file(path)
    assert with_sidecar.encode("123") == [ord("1"), ord("2"), ord("3")]  # one digit per piece
    assert with_sidecar.decode(with_sidecar.encode("a 123 b")) == "a 123 b"
    assert load_harmony_encoding(model_dir=tmp_path).encode("12") == [ord("1"), ord("2")]


@pytest.mark.parametrize("content", ["", "\n", "(unclosed"])
def test_bad_pattern_sidecar_is_a_format_error(tmp_path: Path, content: str) -> None:
    path = _write_digit_vocab(tmp_path)
    (tmp_path / "tokenizer_pattern.txt").write_text(content)
    with pytest.raises(TokenizerFormatError, match=r"tokenizer_pattern\.txt"):
        encoding_from_tiktoken_file(path)
