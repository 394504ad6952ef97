"""`AutoTokenizer` with the transformers calling conventions, on tokenloom's engine `Tokenizer`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from tokenloom.compat.batch_encoding import BatchEncoding
from tokenloom.tokenizer import Tokenizer, checked_token_ids

# transformers' model_max_length when a tokenizer has no limit
VERY_LARGE_INTEGER = int(1e30)

# from_pretrained keywords accepted and ignored: remote code, slow/fast class, hub credentials and caching
# do not apply (tokenloom always uses tokenizer.json / GGUF vocabularies and resolves names itself).
IGNORED_FROM_PRETRAINED_KWARGS = frozenset({
    "trust_remote_code", "use_fast", "token", "use_auth_token", "cache_dir", "local_files_only",
    "force_download", "proxies", "subfolder", "legacy", "_from_auto", "tokenizer_type", "from_slow",
})
# Keyword arguments of __call__ that are accepted and ignored.
_IGNORED_CALL_KWARGS = frozenset({"verbose", "return_token_type_ids", "split_special_tokens"})


def _as_id_list(ids: Any) -> list[int]:
    if isinstance(ids, Mapping):
        ids = ids["input_ids"]
    ids = ids.tolist() if hasattr(ids, "tolist") else ids  # torch tensors, numpy arrays
    return checked_token_ids([ids] if isinstance(ids, int) else ids)


class TokenloomTokenizer:
    """A `PreTrainedTokenizer`-like object: call it, decode with it, render chats with it.

    The engine tokenizer it wraps is `engine_tokenizer`.
    """

    is_fast = True

    def __init__(
        self,
        engine_tokenizer: Tokenizer,
        *,
        name_or_path: str = "",
        padding_side: Literal["left", "right"] | None = None,
        truncation_side: Literal["left", "right"] | None = None,
    ) -> None:
        self.engine_tokenizer = engine_tokenizer
        self.name_or_path = name_or_path
        extra = engine_tokenizer.data.extra
        self.padding_side = padding_side or extra.get("padding_side", "right")
        self.truncation_side = truncation_side or extra.get("truncation_side", "right")
        self.model_max_length = engine_tokenizer.model_max_length or VERY_LARGE_INTEGER

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("padding_side", "truncation_side") and value not in ("left", "right"):
            raise ValueError(f"{name} must be 'left' or 'right', got {value!r}")
        super().__setattr__(name, value)

    def __repr__(self) -> str:
        return f"TokenloomTokenizer({self.name_or_path!r}, padding_side={self.padding_side!r})"

    # ---- special tokens --------------------------------------------------------------------------

    @property
    def bos_token(self) -> str | None:
        """Beginning-of-sequence token."""
        return self.engine_tokenizer.bos_token

    @property
    def bos_token_id(self) -> int | None:
        """Beginning-of-sequence token id."""
        return self.engine_tokenizer.bos_token_id

    @property
    def eos_token(self) -> str | None:
        """End-of-sequence token."""
        return self.engine_tokenizer.eos_token

    @property
    def eos_token_id(self) -> int | None:
        """End-of-sequence token id."""
        return self.engine_tokenizer.eos_token_id

    @property
    def unk_token(self) -> str | None:
        """Unknown token."""
        return self.engine_tokenizer.unk_token

    @property
    def unk_token_id(self) -> int | None:
        """Unknown token id."""
        return self.engine_tokenizer.unk_token_id

    @property
    def pad_token(self) -> str | None:
        """Padding token; settable (`tokenizer.pad_token = tokenizer.eos_token`)."""
        return self.engine_tokenizer.pad_token

    @pad_token.setter
    def pad_token(self, token: str | None) -> None:
        self.engine_tokenizer.pad_token = token

    @property
    def pad_token_id(self) -> int | None:
        """Padding token id; settable to any id in the vocabulary."""
        return self.engine_tokenizer.pad_token_id

    @pad_token_id.setter
    def pad_token_id(self, token_id: int | None) -> None:
        token = None if token_id is None else self.engine_tokenizer.convert_ids_to_tokens(int(token_id))
        if token_id is not None and token is None:
            raise ValueError(f"pad_token_id={token_id} is not in the vocabulary (size {len(self)})")
        self.engine_tokenizer.pad_token = token

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens that are set."""
        return self.engine_tokenizer.special_tokens_map

    @property
    def all_special_tokens(self) -> list[str]:
        """Named and extra special tokens."""
        return self.engine_tokenizer.all_special_tokens

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of `all_special_tokens`."""
        return self.engine_tokenizer.all_special_ids

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens."""
        return self.engine_tokenizer.vocab_size

    def __len__(self) -> int:
        return len(self.engine_tokenizer)

    def get_vocab(self) -> dict[str, int]:
        """Token string -> id, added tokens included."""
        return self.engine_tokenizer.get_vocab()

    @property
    def chat_template(self) -> str | None:
        """The chat template source; settable."""
        return self.engine_tokenizer.data.chat_template

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        self.engine_tokenizer.data.chat_template = template

    # ---- encoding ----------------------------------------------------------------------------------

    def __call__(
        self,
        text: str | Sequence[str],
        padding: bool | Literal["longest", "max_length", "do_not_pad"] = False,
        truncation: bool | str = False,
        max_length: int | None = None,
        return_tensors: Literal["pt", "np"] | None = None,
        add_special_tokens: bool = True,
        return_attention_mask: bool = True,
        pad_to_multiple_of: int | None = None,
        return_length: bool = False,
        padding_side: Literal["left", "right"] | None = None,
        **kwargs: Any,
    ) -> BatchEncoding:
        """Tokenize one text or a batch; pad/truncate/convert to tensors like transformers.
        `padding_side` overrides the tokenizer's side for this call only."""
        unknown = set(kwargs) - _IGNORED_CALL_KWARGS
        if unknown:
            raise TypeError(f"TokenloomTokenizer.__call__ got unsupported keyword arguments {sorted(unknown)}")
        is_batched = not isinstance(text, str)
        if is_batched and not all(isinstance(t, str) for t in text):
            raise TypeError("text must be a string or a list of strings")
        texts = list(text) if is_batched else [text]
        ids = self.engine_tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens) if texts else []
        return self._finish(ids, is_batched, padding, truncation, max_length, return_tensors,
                            return_attention_mask, pad_to_multiple_of, return_length, padding_side)

    def _finish(
        self,
        ids: list[list[int]],
        is_batched: bool,
        padding: bool | str,
        truncation: bool | str,
        max_length: int | None,
        return_tensors: str | None,
        return_attention_mask: bool,
        pad_to_multiple_of: int | None = None,
        return_length: bool = False,
        padding_side: str | None = None,
    ) -> BatchEncoding:
        if padding_side not in (None, "left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if truncation not in (False, "do_not_truncate"):
            limit = max_length if max_length is not None else self.model_max_length
            if self.truncation_side == "right":
                ids = [seq[:limit] for seq in ids]
            else:
                ids = [seq[max(len(seq) - limit, 0) :] for seq in ids]
        masks = [[1] * len(seq) for seq in ids]
        target = self._padded_length(ids, padding, max_length, pad_to_multiple_of)
        if target is not None:
            pad_id = self.pad_token_id
            if self.pad_token is None or pad_id is None:
                raise ValueError(
                    "Asking to pad but the tokenizer does not have a padding token. Please select a token to use "
                    "as `pad_token` `(tokenizer.pad_token = tokenizer.eos_token e.g.)`."
                )
            left = (padding_side or self.padding_side) == "left"
            padded_ids, padded_masks = [], []
            for seq, mask in zip(ids, masks, strict=True):
                fill = target - len(seq)
                padded_ids.append([pad_id] * fill + seq if left else seq + [pad_id] * fill)
                padded_masks.append([0] * fill + mask if left else mask + [0] * fill)
            ids, masks = padded_ids, padded_masks
        out = BatchEncoding(input_ids=ids)
        if return_attention_mask:
            out["attention_mask"] = masks
        if return_length:
            out["length"] = [sum(mask) for mask in masks]
        if return_tensors is not None:
            return self._to_tensors(out, return_tensors)
        if not is_batched:
            return BatchEncoding({key: value[0] for key, value in out.items()})
        return out

    def _padded_length(
        self, ids: list[list[int]], padding: bool | str, max_length: int | None, pad_to_multiple_of: int | None
    ) -> int | None:
        if padding in (False, None, "do_not_pad"):
            return None
        if padding in (True, "longest"):
            target = max((len(seq) for seq in ids), default=0)
        elif padding == "max_length":
            target = max_length if max_length is not None else self.model_max_length
            if target >= VERY_LARGE_INTEGER:
                raise ValueError("padding='max_length' needs max_length: this tokenizer has no model_max_length")
        else:
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        if pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        return target

    @staticmethod
    def _to_tensors(out: BatchEncoding, return_tensors: str) -> BatchEncoding:
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        for key, rows in out.items():
            if key != "length" and len({len(row) for row in rows}) > 1:
                raise ValueError(
                    "Unable to create tensor, you should probably activate truncation and/or padding with "
                    f"'padding=True' 'truncation=True' to have batched tensors with the same length (`{key}`)."
                )
        if return_tensors == "pt":
            import torch

            return BatchEncoding({key: torch.tensor(rows, dtype=torch.long) for key, rows in out.items()})
        import numpy as np

        return BatchEncoding({key: np.array(rows, dtype=np.int64) for key, rows in out.items()})

    def encode(
        self,
        text: str,
        add_special_tokens: bool = True,
        truncation: bool | str = False,
        max_length: int | None = None,
        return_tensors: Literal["pt", "np"] | None = None,
    ) -> Any:
        """Token ids of one text: list[int], or a [1, L] tensor with return_tensors."""
        return self(text, add_special_tokens=add_special_tokens, truncation=truncation, max_length=max_length,
                    return_tensors=return_tensors, return_attention_mask=False)["input_ids"]

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        """Token strings of `text`."""
        return self.engine_tokenizer.backend.encode(text, add_special_tokens=add_special_tokens).tokens

    def decode(self, token_ids: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str:
        """Text of one sequence (list, tensor or array of ids, or a single id)."""
        return self.engine_tokenizer.decode(_as_id_list(token_ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False, **kwargs: Any) -> list[str]:
        """Texts of several sequences (list of lists, or a 2-D tensor/array)."""
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(seq, skip_special_tokens=skip_special_tokens) for seq in sequences]

    def convert_ids_to_tokens(self, ids: Any, skip_special_tokens: bool = False) -> str | None | list[str | None]:
        """Token strings of ids (one id gives one string)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.engine_tokenizer.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        """Ids of token strings; unknown tokens map to unk_token_id."""
        return self.engine_tokenizer.convert_tokens_to_ids(tokens)

    # ---- chat ----------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        conversation: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        return_tensors: Literal["pt", "np"] | None = None,
        return_dict: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        continue_final_message: bool | str = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> Any:
        """Render (and by default tokenize) a conversation or a batch of conversations.

        As in transformers 5: tokenize=False -> str (list[str] for a batch); tokenize=True returns a
        BatchEncoding with input_ids and attention_mask (return_dict=True, the default), or with
        return_dict=False the ids alone: list[int] (list[list[int]]), or a [batch, L] tensor with
        return_tensors="pt". The rendered text is tokenized with add_special_tokens=False, as the template
        already wrote the special tokens.
        """
        if not conversation:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        first = conversation[0]
        is_batched = isinstance(first, (list, tuple)) or hasattr(first, "messages")
        conversations = list(conversation) if is_batched else [conversation]
        rendered = [
            self.engine_tokenizer.apply_chat_template(
                chat,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tools=tools,
                documents=documents,
                chat_template=chat_template,
                **template_kwargs,
            )
            for chat in conversations
        ]
        if not tokenize:
            return rendered if is_batched else rendered[0]
        ids = self.engine_tokenizer.encode_batch(rendered, add_special_tokens=False)
        out = self._finish(ids, is_batched, padding, truncation, max_length, return_tensors, True)
        return out if return_dict else out["input_ids"]


    # ---- saving --------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> tuple[str, ...]:
        """Write tokenizer.json, tokenizer_config.json and the chat template(s) to `save_directory`
        (transformers' and tokenloom's AutoTokenizer both load it); return the paths written."""
        from tokenloom.compat.tokenizer_save import save_tokenizer

        unknown = set(kwargs) - {"legacy_format", "filename_prefix", "push_to_hub"}
        if unknown or kwargs.get("push_to_hub") or kwargs.get("filename_prefix"):
            raise TypeError(f"save_pretrained got unsupported keyword arguments {sorted(set(kwargs))}")
        return save_tokenizer(self, save_directory)


class AutoTokenizer:
    """`AutoTokenizer.from_pretrained(...)` returning a `TokenloomTokenizer`."""

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        gguf_file: str | None = None,
        padding_side: Literal["left", "right"] | None = None,
        truncation_side: Literal["left", "right"] | None = None,
        pad_token: str | None = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> TokenloomTokenizer:
        """Load the tokenizer of a directory, GGUF file (`gguf_file=`), pull name or hub id.

        Keyword arguments listed in IGNORED_FROM_PRETRAINED_KWARGS (trust_remote_code, use_fast,
        token, cache_dir, ...) are accepted and ignored; any other raises TypeError.
        """
        unknown = set(kwargs) - IGNORED_FROM_PRETRAINED_KWARGS
        if unknown:
            raise TypeError(f"AutoTokenizer.from_pretrained got unsupported keyword arguments {sorted(unknown)}")
        engine = Tokenizer.from_pretrained(pretrained_model_name_or_path, gguf_file, revision=revision)
        tokenizer = TokenloomTokenizer(
            engine,
            name_or_path=str(pretrained_model_name_or_path),
            padding_side=padding_side,
            truncation_side=truncation_side,
        )
        if pad_token is not None:
            tokenizer.pad_token = pad_token
        return tokenizer
