"""GGUF metadata -> `tokenizers.Tokenizer`, rebuilt as transformers' GGUF tokenizer path builds it
(`integrations/gguf/gguf_tokenizer_mapping.py` and the tokenizer classes it hands the vocabulary to), so
ids, added tokens and decoding agree with `AutoTokenizer.from_pretrained(dir, gguf_file=...)`.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import compress, count, islice, repeat
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from tokenloom.errors import ModelLoadError, TokenizerError
from tokenloom.loading import tokenizer_cache
from tokenloom.loading.checkpoint import TokenizerData
from tokenloom.loading.gguf_arrays import GGUFStrings
from tokenloom.loading.gguf_cache import parsed_gguf
from tokenloom.loading.gguf_tokenizer_checks import check_tokenizer_metadata
from tokenloom.loading.gguf_vocab import byte_level_vocab, bytes_to_unicode, file_merges

logger = logging.getLogger(__name__)

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
_SPACE = "\u2581"

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the split regex its merges were learned with; other values keep GPT-2's.
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        (
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
        )
        + ("dbrx", "smaug-bpe"),
        _LLAMA3_SPLIT,
    ),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}


Vocab = dict[str, int]
Merges = list[tuple[str, str]]


def _byte_level_inputs(md: dict[str, Any], tokens: list[str]) -> tuple[Vocab, Merges]:
    """GPT2Tokenizer: tokens outside the byte alphabet are respelled in it."""
    vocab = byte_level_vocab(tokens)
    return vocab, file_merges(md, tokens, vocab=vocab)


def _byte_level(vocab: Vocab, merges: Merges) -> Tokenizer:
    """GPT2Tokenizer: byte-level BPE."""
    model = BPE(
        vocab=vocab,
        merges=merges,
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
    )
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _plain_inputs(md: dict[str, Any], tokens: list[str]) -> tuple[Vocab, Merges]:
    """The tokens as they are, and the file's merges (or ones rebuilt by score)."""
    vocab = dict(zip(tokens, range(len(tokens))))  # a later duplicate wins
    return vocab, file_merges(md, tokens, vocab=vocab)


def _sentencepiece(vocab: Vocab, merges: Merges) -> Tokenizer:
    """LlamaTokenizer: BPE with byte fallback, a Metaspace prefix on the first word."""
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=_SPACE, prepend_scheme="first", split=False
    )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace(_SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1),
        ]
    )
    return tokenizer


def _gemma_model(vocab: Vocab, merges: Merges) -> Tokenizer:
    """GemmaTokenizer: spaces become U+2581 in a normalizer, and the text is split after each one."""
    tokenizer = Tokenizer(
        BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token="<unk>", dropout=None, byte_fallback=True)
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tokenizer.normalizer = normalizers.Replace(" ", _SPACE)
    return tokenizer


def _gemma_inputs(md: dict[str, Any], tokens: list[str]) -> tuple[Vocab, Merges]:
    """Gemma 1-3 files: whitespace-run tokens are stored as real spaces and there are no merges; the
    merges are rebuilt with the file's token order (not its scores) as the priority."""
    respelled = [_SPACE * len(token) if " " in token and not token.strip() else token for token in tokens]
    positions = dict(zip(respelled, range(0, -len(respelled), -1)))
    vocab = dict(zip(respelled, range(len(respelled))))
    return vocab, file_merges(md, respelled, positions, vocab)


def _phi3(vocab: Vocab, merges: Merges) -> Tokenizer:
    """Sentencepiece with the prefix space added by a normalizer instead of Metaspace."""
    tokenizer = _sentencepiece(vocab, merges)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend(prepend=_SPACE), normalizers.Replace(" ", _SPACE)]
    )
    tokenizer.pre_tokenizer = None
    return tokenizer


@dataclass(frozen=True)
class _Builder:
    """One tokenizer class: the BPE vocabulary and merges it derives from the file's tokens (the slow
    part, which `tokenizer_cache` keeps) and the tokenizer it assembles around them."""

    name: str
    inputs: Callable[[dict[str, Any], list[str]], tuple[Vocab, Merges]]
    assemble: Callable[[Vocab, Merges], Tokenizer]
    special_tokens: tuple[str, ...] = ()  # named special tokens beyond bos/eos/unk/pad (GemmaTokenizer's mask)


_BYTE_LEVEL = _Builder("gpt2", _byte_level_inputs, _byte_level)
_SENTENCEPIECE = _Builder("llama", _plain_inputs, _sentencepiece)
_GEMMA = _Builder("gemma", _gemma_inputs, _gemma_model, ("<mask>",))
_SENTENCEPIECE_BY_ARCH = {
    "gemma": _GEMMA,
    "gemma2": _GEMMA,
    "gemma3": _GEMMA,
    "phi3": _Builder("phi3", _plain_inputs, _phi3),
}
_BY_TYPE = {
    "gpt2": _BYTE_LEVEL,
    "llama": _SENTENCEPIECE,
    "gemma4": _Builder("gemma4", _plain_inputs, _gemma_model, ("<mask>",)),
}


def _add_file_special_tokens(
    tokenizer: Tokenizer, md: dict[str, Any], tokens: Sequence[str], byte_level: bool
) -> None:
    """Control tokens become special added tokens and user-defined ones plain added tokens, so both
    encode whole. A byte-level 'control' token spelled outside the byte alphabet is a llama.cpp mislabel
    and is skipped, as transformers does. (A type list longer or shorter than the vocabulary is cut to
    the shorter of the two, as zip does.)"""
    token_types = md.get("tokenizer.ggml.token_type") or []
    # the ids of every type from control on, at C speed (10^5 types, nearly all normal)
    marked = list(compress(count(), map(operator.ge, islice(token_types, len(tokens)), repeat(_CONTROL))))
    alphabet = set(bytes_to_unicode().values()) if byte_level else None
    control = [
        AddedToken(token, normalized=False, special=True)
        for token in (tokens[index] for index in marked if token_types[index] == _CONTROL)
        if alphabet is None or set(token) <= alphabet
    ]
    if control:
        tokenizer.add_special_tokens(control)
    user_defined = [
        AddedToken(token, normalized=False, special=False)
        for token in (tokens[index] for index in marked if token_types[index] == _USER_DEFINED)
        if tokenizer.token_to_id(token) is not None
    ]
    if user_defined:
        tokenizer.add_tokens(user_defined)


def _template(bos: str | None, eos: str | None, add_bos: bool, add_eos: bool, tokenizer: Tokenizer) -> Any:
    """TemplateProcessing as transformers' `update_post_processor` writes it."""
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
    pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
    special = [(token, tokenizer.token_to_id(token)) for token, add in ((bos, add_bos), (eos, add_eos)) if add]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def load_gguf_tokenizer(path: Path) -> TokenizerData:
    """Rebuild the tokenizer a GGUF file describes (`tokenizer.ggml.model` gpt2, llama or gemma4).

    Raises ModelLoadError when the file has no tokenizer (or one of a type not supported here) and
    TokenizerError, naming the file, the key and the value, when its tokenizer metadata is malformed."""
    path = Path(path)
    md = parsed_gguf(path).metadata
    check_tokenizer_metadata(md, path)
    try:
        return _load(path, md)
    except TokenizerError as exc:
        raise TokenizerError(f"{path}: {exc}", hint=exc.hint) from exc


def _assemble_cached(builder: _Builder, cached: tuple[Vocab, Merges]) -> Tokenizer | None:
    """The tokenizer assembled from a cache entry's vocabulary and merges; None if they do not make one
    (an entry written by hand: the file's own metadata decides then)."""
    try:
        return builder.assemble(*cached)
    except Exception:  # noqa: BLE001 - tokenizers raises bare Exceptions; any failure means "rebuild"
        logger.debug("a tokenizer cache entry does not make a %s tokenizer; rebuilding it", builder.name)
        return None


def _load(path: Path, md: dict[str, Any]) -> TokenizerData:
    tokenizer_type = md.get("tokenizer.ggml.model")
    architecture = md.get("general.architecture", "")
    tokens = md.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError(f"{path}: the GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    if tokenizer_type == "llama" and architecture in _SENTENCEPIECE_BY_ARCH:
        builder = _SENTENCEPIECE_BY_ARCH[architecture]
    elif tokenizer_type in _BY_TYPE:
        builder = _BY_TYPE[tokenizer_type]
    else:
        raise ModelLoadError(
            f"{path}: cannot build a tokenizer of type {tokenizer_type!r} from GGUF metadata",
            hint=f"supported tokenizer.ggml.model values: {', '.join(sorted(_BY_TYPE))}",
        )
    byte_level = tokenizer_type == "gpt2"
    entry = tokenizer_cache.entry_for(path, builder.name, len(tokens))
    cached = tokenizer_cache.load(entry) if entry is not None else None
    tokenizer = _assemble_cached(builder, cached) if cached is not None else None
    try:
        if tokenizer is None:  # no sound cache entry: derive the vocabulary from the file
            cached = None
            vocab, merges = builder.inputs(md, tokens.tolist() if isinstance(tokens, GGUFStrings) else tokens)
            tokenizer = builder.assemble(vocab, merges)
        _add_file_special_tokens(tokenizer, md, tokens, byte_level)
    except TokenizerError:
        raise
    except Exception as exc:  # tokenizers raises bare Exceptions (merges naming unknown tokens, ...)
        raise TokenizerError(f"the tokenizer metadata does not make a tokenizer: {exc}") from exc
    if byte_level and (split := PRE_TOKENIZER_SPLITS.get(md.get("tokenizer.ggml.pre", ""))) is not None:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    def token_for(key: str) -> str | None:
        token_id = md.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

    named = {
        name: token_for(key)
        for name, key in (
            ("bos", "bos_token_id"),
            ("eos", "eos_token_id"),
            ("unk", "unknown_token_id"),
            ("pad", "padding_token_id"),
        )
    }
    # transformers makes every named special token an added special token (kept whole, skipped on decode)
    added = {token.content for token in tokenizer.get_added_tokens_decoder().values()}
    for token in [
        named["bos"],
        named["eos"],
        named["unk"],
        named["pad"],
        *builder.special_tokens,
    ]:
        if token is not None and token not in added and tokenizer.token_to_id(token) is not None:
            tokenizer.add_special_tokens([AddedToken(token, special=True)])
            added.add(token)

    add_bos = md.get("tokenizer.ggml.add_bos_token")
    if tokenizer_type == "llama" and add_bos is None:
        add_bos = True  # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise
    elif tokenizer_type == "gemma4":
        add_bos = False  # the chat template writes <bos> itself
    add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
    add_bos = bool(add_bos) and named["bos"] is not None
    add_eos = add_eos and named["eos"] is not None
    try:
        tokenizer.post_processor = _template(named["bos"], named["eos"], add_bos, add_eos, tokenizer)
    except Exception as exc:  # a special token whose id the rebuilt vocabulary does not have
        raise TokenizerError(
            f"the BOS/EOS tokens {named['bos']!r}/{named['eos']!r} are not in the rebuilt vocabulary: {exc}"
        ) from exc
    data = TokenizerData(
        tokenizer=tokenizer,
        bos_token=named["bos"],
        eos_token=named["eos"],
        unk_token=named["unk"],
        pad_token=named["pad"],
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        chat_template=md.get("tokenizer.chat_template"),
        model_max_length=None,
        extra={"tokenizer_type": tokenizer_type, "pre_tokenizer_type": md.get("tokenizer.ggml.pre")},
    )
    if entry is not None and cached is None:  # only a file that made a tokenizer is cached
        tokenizer_cache.store(entry, vocab, merges)
    return data
