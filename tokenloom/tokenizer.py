"""The engine's tokenizer: a `tokenizers.Tokenizer` plus special tokens and the chat template."""

from __future__ import annotations

import operator
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, overload

from tokenloom.chat_template import ChatTemplate, ChatTemplateError, compile_chat_template
from tokenloom.loading.checkpoint import NAMED_SPECIAL_TOKENS, ModelSource, TokenizerData

_CONTENT_REFERENCE = re.compile(r"""message\s*\[\s*['"]content['"]\s*\]|message\.content""")
# transformers' clean_up_tokenization, used only where the tokenizer asks for it and is not BPE
# End-of-turn tokens of common chat templates, preferred over the positional heuristic when the template
# writes one of them.
KNOWN_END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|eot|>", "<|end_of_turn|>")
_CLEANUPS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
    (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)


_MAX_ID = 1 << 32  # tokenizers' ids are u32


def checked_token_ids(ids: Any, name: str = "token_ids") -> list[int]:
    """`ids` as a list of ints: integers (Python, numpy or 0-d integer tensors) in [0, 2**32); a float,
    a bool, a string or a negative id is an error naming `name` and the value."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(f"{name} must be a sequence of integer token ids, got {type(ids).__name__}")
    checked = []
    for position, token in enumerate(ids):
        if type(token) is not int:
            if isinstance(token, bool) or not hasattr(token, "__index__"):
                raise TypeError(
                    f"{name}[{position}] must be an integer token id, got {token!r} ({type(token).__name__})"
                )
            try:
                token = operator.index(token)
            except TypeError as exc:  # a float tensor element
                raise TypeError(f"{name}[{position}] must be an integer token id, got {token!r}") from exc
        if not 0 <= token < _MAX_ID:
            raise ValueError(f"{name}[{position}] must be a token id in [0, 2**32), got {token}")
        checked.append(token)
    return checked


class Tokenizer:
    """Text <-> token ids for one model, with its special tokens and chat template.

    Encoding follows the tokenizer.json post-processor (it decides which special tokens
    `add_special_tokens=True` adds), exactly as transformers' fast tokenizers do.
    """

    def __init__(self, data: TokenizerData) -> None:
        from tokenizers import AddedToken

        self.data = data
        self.backend = data.tokenizer
        # Encoding here is always one sequence at a time: padding/truncation are done by callers.
        self.backend.no_truncation()
        self.backend.no_padding()
        self._tokens: dict[str, str | None] = {
            "bos_token": data.bos_token,
            "eos_token": data.eos_token,
            "unk_token": data.unk_token,
            "pad_token": data.pad_token,
        }
        for name in ("sep_token", "cls_token", "mask_token"):
            self._tokens[name] = data.extra.get(name)
        self.extra_special_tokens: list[str] = list(data.extra.get("extra_special_tokens") or [])
        # Like transformers, make sure every named special token that is in the vocabulary is a *special*
        # added token (so that decode(skip_special_tokens=True) drops it). Tokens that are not in the
        # vocabulary are not added: that would grow the vocabulary past the model's embedding.
        added = self.backend.get_added_tokens_decoder()
        to_register = []
        for token in [*self._tokens.values(), *self.extra_special_tokens]:
            token_id = self.backend.token_to_id(token) if token is not None else None
            if token_id is not None and not (token_id in added and added[token_id].special):
                to_register.append(AddedToken(token, special=True, normalized=False))
        if to_register:
            self.backend.add_special_tokens(to_register)
        self._cleanup = bool(data.extra.get("clean_up_tokenization_spaces")) and type(self.backend.model).__name__ != "BPE"

    @classmethod
    def from_source(cls, source: ModelSource) -> Tokenizer:
        """The tokenizer stored with a resolved model (GGUF metadata or an HF directory)."""
        if source.kind == "gguf":
            from tokenloom.loading.gguf_tokenizer import load_gguf_tokenizer

            return cls(load_gguf_tokenizer(source.path))
        from tokenloom.loading.hf_tokenizer import load_hf_tokenizer

        return cls(load_hf_tokenizer(Path(source.path)))

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, gguf_file: str | None = None, *, revision: str | None = None
    ) -> Tokenizer:
        """Resolve a path, `tokenloom pull` name or hub id (see `resolve_model`) and load its tokenizer;
        a directory holding tokenizer.json is a tokenizer directory (what tokenizer.save_pretrained writes)."""
        from tokenloom.loading.resolve import resolve_model

        if gguf_file is None and Path(name_or_path).is_dir() and (Path(name_or_path) / "tokenizer.json").is_file():
            return cls.from_source(ModelSource(kind="hf", path=Path(name_or_path).absolute()))
        return cls.from_source(resolve_model(str(name_or_path), gguf_file, revision=revision))

    # ---- encode / decode -------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens are added as the tokenizer's post-processor says.

        Warns when that doubles a BOS the text already starts with (a rendered chat template)."""
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens:
            self._check_double_bos(text, ids)
        return ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` for several texts at once (in parallel inside `tokenizers`)."""
        ids = [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]
        if add_special_tokens:
            for text, row in zip(texts, ids):
                self._check_double_bos(text, row)
        return ids

    def _check_double_bos(self, text: str, ids: list[int]) -> None:
        # A chat template that writes the BOS, tokenized again with add_special_tokens=True by a tokenizer
        # that adds one (Gemma, Llama): the model then sees two BOS tokens and quietly degrades.
        bos, bos_id = self.bos_token, self.bos_token_id
        if bos and bos_id is not None and len(ids) >= 2 and ids[0] == ids[1] == bos_id and text.startswith(bos):
            warnings.warn(
                f"the text already starts with the BOS token {bos!r} (a rendered chat template writes it) and "
                "this tokenizer adds another one with add_special_tokens=True, so the ids start with two BOS "
                "tokens; tokenize rendered chat templates with add_special_tokens=False",
                UserWarning,
                stacklevel=3,
            )

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; `skip_special_tokens` drops every added token marked special. An id that is not
        an integer in [0, 2**32) is a TypeError / ValueError naming it (ids past the vocabulary decode
        to nothing, as in transformers)."""
        text = self.backend.decode(checked_token_ids(ids), skip_special_tokens=skip_special_tokens)
        if self._cleanup:
            for before, after in _CLEANUPS:
                text = text.replace(before, after)
        return text

    def decode_batch(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        """`decode` for several sequences."""
        return [self.decode(ids, skip_special_tokens) for ids in sequences]

    @overload
    def convert_ids_to_tokens(self, ids: int, skip_special_tokens: bool = False) -> str | None: ...
    @overload
    def convert_ids_to_tokens(self, ids: Sequence[int], skip_special_tokens: bool = False) -> list[str | None]: ...

    def convert_ids_to_tokens(
        self, ids: int | Sequence[int], skip_special_tokens: bool = False
    ) -> str | None | list[str | None]:
        """Vocabulary strings of ids (None for an id outside the vocabulary).

        skip_special_tokens drops `all_special_ids` (the named special tokens), as transformers does.
        """
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self.backend.id_to_token(int(i)) for i in ids if int(i) not in skip]

    @overload
    def convert_tokens_to_ids(self, tokens: str) -> int | None: ...
    @overload
    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int | None]: ...

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        """Ids of vocabulary strings; unknown strings map to the unk token id (None without one)."""
        if isinstance(tokens, str):
            return self._token_to_id_or_unk(tokens)
        return [self._token_to_id_or_unk(t) for t in tokens]

    def token_to_id(self, token: str) -> int | None:
        """The id of `token`, or None when it is not in the vocabulary."""
        return self.backend.token_to_id(token)

    def _token_to_id_or_unk(self, token: str) -> int | None:
        token_id = self.backend.token_to_id(token)
        return token_id if token_id is not None else self.unk_token_id

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens (transformers' `vocab_size`)."""
        return self.backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        """Token string -> id, added tokens included."""
        return self.backend.get_vocab(with_added_tokens=True)

    # ---- special tokens --------------------------------------------------------------------------

    def _id_of(self, name: str) -> int | None:
        token = self._tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        """Beginning-of-sequence token string."""
        return self._tokens["bos_token"]

    @property
    def bos_token_id(self) -> int | None:
        """Beginning-of-sequence token id."""
        return self._id_of("bos_token")

    @property
    def eos_token(self) -> str | None:
        """End-of-sequence token string, as the tokenizer config gives it."""
        return self._tokens["eos_token"]

    @property
    def eos_token_id(self) -> int | None:
        """End-of-sequence token id."""
        return self._id_of("eos_token")

    @property
    def eos_token_ids(self) -> set[int]:
        """The end-of-sequence id as a set (empty without one); callers add generation_config's ids."""
        return {self.eos_token_id} if self.eos_token_id is not None else set()

    @property
    def unk_token(self) -> str | None:
        """Unknown token string."""
        return self._tokens["unk_token"]

    @property
    def unk_token_id(self) -> int | None:
        """Unknown token id."""
        return self._id_of("unk_token")

    @property
    def pad_token(self) -> str | None:
        """Padding token string (settable; must be in the vocabulary)."""
        return self._tokens["pad_token"]

    @pad_token.setter
    def pad_token(self, token: str | None) -> None:
        if token is not None and self.backend.token_to_id(token) is None:
            raise ValueError(
                f"pad_token={token!r} is not in the vocabulary; use an existing token, e.g. the eos token "
                f"{self.eos_token!r}"
            )
        self._tokens["pad_token"] = token

    @property
    def pad_token_id(self) -> int | None:
        """Padding token id."""
        return self._id_of("pad_token")

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens that are set, e.g. {"bos_token": "<s>", "eos_token": "</s>"}."""
        return {name: self._tokens[name] for name in NAMED_SPECIAL_TOKENS if self._tokens.get(name) is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        """Named special tokens then extra special tokens, without repeats (transformers' order)."""
        seen: dict[str, None] = {}
        for token in [*self.special_tokens_map.values(), *self.extra_special_tokens]:
            seen.setdefault(token, None)
        return list(seen)

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of `all_special_tokens` (those in the vocabulary)."""
        ids = (self.backend.token_to_id(t) for t in self.all_special_tokens)
        return [i for i in ids if i is not None]

    @property
    def special_token_ids(self) -> list[int]:
        """Ids of every added token marked special: what `skip_special_tokens=True` removes."""
        return sorted(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)

    @property
    def model_max_length(self) -> int | None:
        """The model's maximum sequence length from the tokenizer config, None when unknown."""
        return self.data.model_max_length

    # ---- chat template ---------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        """The default chat template source, None when the model has none."""
        return self.data.chat_template

    @property
    def chat_templates(self) -> dict[str, str]:
        """All named templates, when the model ships several ({} otherwise)."""
        return dict(self.data.extra.get("chat_templates") or {})

    def get_chat_template(self, chat_template: str | None = None, tools: Sequence[Any] | None = None) -> ChatTemplate:
        """The compiled template: `chat_template` may be a template name, a template source, or None."""
        named = self.chat_templates
        if chat_template is not None:
            source = named.get(chat_template, chat_template)
        elif tools is not None and "tool_use" in named:
            source = named["tool_use"]
        elif self.chat_template is not None:
            source = self.chat_template
        else:
            raise ChatTemplateError(
                "this tokenizer has no chat template; pass chat_template=... with a Jinja template",
                hint="base (non-instruct) models usually ship without one; the CLI takes --chat-template FILE",
            )
        return compile_chat_template(source)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        *,
        continue_final_message: bool | str = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render one conversation with the chat template (special tokens are passed to it)."""
        template = self.get_chat_template(chat_template, tools)
        return template.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            documents=documents,
            special_tokens=self.special_tokens_map,
            **template_kwargs,
        )

    def end_of_turn_token_ids(self) -> set[int]:
        """The special token the chat template writes after a message's content (e.g. `<|im_end|>`).

        A known end-of-turn token (`KNOWN_END_OF_TURN_TOKENS`) that the template writes and the vocabulary
        holds as a special token; otherwise the first added special token in the template text after the
        first `message['content']`. Empty without a template or such a token.
        """
        template = self.chat_template
        if template is None:
            return set()
        special = {t.content: i for i, t in self.backend.get_added_tokens_decoder().items() if t.special and t.content}
        known = {special[t] for t in KNOWN_END_OF_TURN_TOKENS if t in special and t in template}
        if known:
            return known
        match = _CONTENT_REFERENCE.search(template)
        if match is None:
            return set()
        tail = template[match.end() :]
        found = [(tail.find(token), i) for token, i in special.items() if token in tail]
        return {min(found)[1]} if found else set()


def end_of_turn_stops(tokenizer: Tokenizer, eos_token_ids: Iterable[int], stacklevel: int = 2) -> list[int]:
    """The chat template's end-of-turn token ids that `eos_token_ids` (generation_config's) omit, with a
    warning: a chat reply would otherwise run on past its turn. Callers add them as stop ids."""
    eos = set(eos_token_ids)
    missing = sorted(tokenizer.end_of_turn_token_ids() - eos)
    if missing:
        names = ", ".join(f"{tokenizer.convert_ids_to_tokens(i)!r} (id {i})" for i in missing)
        warnings.warn(
            f"generation_config's eos_token_id {sorted(eos)} omits the chat template's end-of-turn token {names}; "
            "it is treated as a stop token too, so chat replies end with their turn",
            UserWarning,
            stacklevel=stacklevel + 1,
        )
    return missing
