"""GGUF metadata -> `tokenizers.Tokenizer`, rebuilt as transformers' GGUF tokenizer path builds it
(`integrations/gguf/gguf_tokenizer_mapping.py` and the tokenizer classes it hands the vocabulary to), so
ids, added tokens and decoding agree with `AutoTokenizer.from_pretrained(dir, gguf_file=...)`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from tokenloom.errors import ModelLoadError, TokenizerError
from tokenloom.loading.checkpoint import TokenizerData
from tokenloom.loading.gguf_cache import parsed_gguf
from tokenloom.loading.gguf_tokenizer_checks import check_tokenizer_metadata

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


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table for byte-level BPE vocabularies."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


# The merge rebuild slices every token at every position: sum(len * (len - 1)) characters. Gemma 3's
# 262k vocabulary needs 9.3M; a crafted one ('a', 'aa', ... 2000 long) 2.7G and ~2M merges.
MAX_MERGE_REBUILD_CHARS = 64_000_000


def generate_merges(
    vocab: dict[str, int], vocab_scores: dict[str, float] | None = None
) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary (transformers' `generate_merges`): every split of a token into
    two vocabulary tokens, ordered by the token's score (best first) or by id when there are no scores.
    Refuses (TokenizerError) a vocabulary whose rebuild would slice more than MAX_MERGE_REBUILD_CHARS
    characters, before starting."""
    work = sum(len(token) * (len(token) - 1) for token in vocab)
    if work > MAX_MERGE_REBUILD_CHARS:
        longest = max(vocab, key=len)
        raise TokenizerError(
            f"rebuilding BPE merges from this vocabulary of {len(vocab)} tokens would slice {work} characters "
            f"(limit MAX_MERGE_REBUILD_CHARS={MAX_MERGE_REBUILD_CHARS}); its longest token has {len(longest)} "
            "characters, real vocabularies' a few dozen",
        )
    reverse = vocab_scores is not None
    scores = dict(vocab_scores) if vocab_scores is not None else vocab
    merges: list[tuple[str, str, float]] = []
    for merge, score in scores.items():
        local = []
        for i in range(1, len(merge)):
            left = merge[:i]
            if left in vocab:
                right = merge[i:]
                if right in vocab:
                    local.append((left, right, score))
        if len(local) > 1:
            local.sort(key=lambda item: (vocab[item[0]], vocab[item[1]]))
        merges.extend(local)
    merges.sort(key=lambda item: (item[2], len(item[0]), len(item[1])), reverse=reverse)
    return [(left, right) for left, right, _ in merges]


def _merges(
    md: dict[str, Any], tokens: list[str], vocab_scores: dict[str, float] | None = None
) -> list[tuple[str, str]]:
    if "tokenizer.ggml.merges" in md:
        return _parsed_merges(md["tokenizer.ggml.merges"])
    if vocab_scores is None and "tokenizer.ggml.scores" in md:
        vocab_scores = dict(zip(tokens, md["tokenizer.ggml.scores"], strict=False))
    return generate_merges({token: index for index, token in enumerate(tokens)}, vocab_scores)


def _byte_level(md: dict[str, Any], tokens: list[str]) -> Tokenizer:
    """GPT2Tokenizer: byte-level BPE; tokens outside the byte alphabet are respelled in it."""
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[byte] for byte in token.encode("utf-8")): index
        for index, token in enumerate(tokens)
    }
    model = BPE(
        vocab=vocab,
        merges=_merges(md, tokens),
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
    )
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece(md: dict[str, Any], tokens: list[str]) -> Tokenizer:
    """LlamaTokenizer: BPE with byte fallback, a Metaspace prefix on the first word."""
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(
        BPE(vocab=vocab, merges=_merges(md, tokens), fuse_unk=True, byte_fallback=True, dropout=None)
    )
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


def _gemma_model(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
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


def _gemma(md: dict[str, Any], tokens: list[str]) -> Tokenizer:
    """Gemma 1-3 files: whitespace-run tokens are stored as real spaces and there are no merges; the
    merges are rebuilt with the file's token order (not its scores) as the priority."""
    respelled = [_SPACE * len(token) if " " in token and not token.strip() else token for token in tokens]
    positions = {token: -index for index, token in enumerate(respelled)}
    vocab = {token: index for index, token in enumerate(respelled)}
    return _gemma_model(vocab, _merges(md, respelled, positions))


def _gemma4(md: dict[str, Any], tokens: list[str]) -> Tokenizer:
    return _gemma_model({token: index for index, token in enumerate(tokens)}, _merges(md, tokens))


def _phi3(md: dict[str, Any], tokens: list[str]) -> Tokenizer:
    """Sentencepiece with the prefix space added by a normalizer instead of Metaspace."""
    tokenizer = _sentencepiece(md, tokens)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend(prepend=_SPACE), normalizers.Replace(" ", _SPACE)]
    )
    tokenizer.pre_tokenizer = None
    return tokenizer


_SENTENCEPIECE_BY_ARCH: dict[str, Callable[[dict[str, Any], list[str]], Tokenizer]] = {
    "gemma": _gemma,
    "gemma2": _gemma,
    "gemma3": _gemma,
    "phi3": _phi3,
}
_BY_TYPE: dict[str, Callable[[dict[str, Any], list[str]], Tokenizer]] = {
    "gpt2": _byte_level,
    "llama": _sentencepiece,
    "gemma4": _gemma4,
}
# Named special tokens a tokenizer class defines beyond bos/eos/unk/pad (GemmaTokenizer's mask).
_CLASS_SPECIAL_TOKENS = {_gemma: ["<mask>"], _gemma4: ["<mask>"]}


def _add_file_special_tokens(
    tokenizer: Tokenizer, md: dict[str, Any], tokens: list[str], byte_level: bool
) -> dict[str, int]:
    """Control tokens become special added tokens and user-defined ones plain added tokens, so both
    encode whole. A byte-level 'control' token spelled outside the byte alphabet is a llama.cpp mislabel
    and is skipped, as transformers does. Returns the vocabulary, added tokens included."""
    token_types = md.get("tokenizer.ggml.token_type") or []
    alphabet = set(bytes_to_unicode().values()) if byte_level else None
    control = [
        AddedToken(token, normalized=False, special=True)
        for token, kind in zip(tokens, token_types, strict=False)
        if kind == _CONTROL and (alphabet is None or set(token) <= alphabet)
    ]
    if control:
        tokenizer.add_special_tokens(control)
    vocab = tokenizer.get_vocab()
    user_defined = [
        AddedToken(token, normalized=False, special=False)
        for token, kind in zip(tokens, token_types, strict=False)
        if kind == _USER_DEFINED and token in vocab
    ]
    if user_defined:
        tokenizer.add_tokens(user_defined)
        vocab = tokenizer.get_vocab()
    return vocab


def _template(bos: str | None, eos: str | None, add_bos: bool, add_eos: bool, vocab: dict[str, int]) -> Any:
    """TemplateProcessing as transformers' `update_post_processor` writes it."""
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
    pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
    special = [(token, vocab.get(token)) for token, add in ((bos, add_bos), (eos, add_eos)) if add]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _parsed_merges(merges: list[str]) -> list[tuple[str, str]]:
    parsed = []
    for index, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise TokenizerError(
                f"tokenizer.ggml.merges[{index}] = {merge[:80]!r} is not two tokens separated by one space"
            )
        parsed.append((parts[0], parts[1]))
    return parsed


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
    try:
        tokenizer = builder(md, tokens)
        vocab = _add_file_special_tokens(tokenizer, md, tokens, byte_level)
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
        *_CLASS_SPECIAL_TOKENS.get(builder, []),
    ]:
        if token is not None and token not in added and token in vocab:
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
        tokenizer.post_processor = _template(named["bos"], named["eos"], add_bos, add_eos, vocab)
    except Exception as exc:  # a special token whose id the rebuilt vocabulary does not have
        raise TokenizerError(
            f"the BOS/EOS tokens {named['bos']!r}/{named['eos']!r} are not in the rebuilt vocabulary: {exc}"
        ) from exc
    return TokenizerData(
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
