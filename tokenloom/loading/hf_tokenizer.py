"""Read a Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json + templates)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenloom.errors import ModelNotFoundError, TokenizerError
from tokenloom.loading.checkpoint import NAMED_SPECIAL_TOKENS, TokenizerData
from tokenloom.loading.files import read_json_object, read_text

# transformers writes int(1e30) as model_max_length when a tokenizer has no limit.
_NO_LIMIT_THRESHOLD = int(1e29)
_MAX_TEMPLATE_FILE_CHARS = 1 << 20  # the template budget refuses sources past 256k characters anyway


def load_hf_tokenizer(directory: Path) -> TokenizerData:
    """Load the tokenizer stored in an HF-format `directory`.

    Reads tokenizer.json (required), tokenizer_config.json, special_tokens_map.json, and the chat
    template from chat_template.jinja / additional_chat_templates/*.jinja / chat_template.json /
    tokenizer_config.json, in that order of priority (the order transformers uses).

    Raises ModelNotFoundError without tokenizer.json, TokenizerError (naming the file, the key and the
    value) for a file that is unreadable, not UTF-8 / JSON, or holds a value of the wrong type.
    """
    import tokenizers

    directory = Path(directory)
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ModelNotFoundError(
            f"no tokenizer.json in {directory}",
            hint="tokenloom needs a 'fast' tokenizer file (tokenizer.json) in the model directory",
        )
    try:
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise TokenizerError(f"cannot read {tokenizer_file}: {str(exc)[:300]}") from exc

    config_file = directory / "tokenizer_config.json"
    config = read_json_object(config_file, missing_ok=True, error=TokenizerError)
    _check_config(config, config_file)
    tokens = {name: _token_content(config.get(name), name, config_file) for name in NAMED_SPECIAL_TOKENS}
    extra_special: list[str | None] = []
    for key in ("extra_special_tokens", "additional_special_tokens"):
        if not extra_special and isinstance(config.get(key), list):
            extra_special = [_token_content(t, f"{key}[{i}]", config_file) for i, t in enumerate(config[key])]

    # Like transformers: special_tokens_map.json is a legacy file, read only when the config does not
    # carry added_tokens_decoder, and then it wins over the config's values.
    map_file = directory / "special_tokens_map.json"
    special_map = read_json_object(map_file, missing_ok=True, error=TokenizerError)
    if special_map and "added_tokens_decoder" not in config:
        for name in NAMED_SPECIAL_TOKENS:
            if special_map.get(name) is not None:
                tokens[name] = _token_content(special_map[name], name, map_file)
        for key in ("extra_special_tokens", "additional_special_tokens"):
            listed = special_map.get(key) or []
            if not isinstance(listed, (list, dict)):
                raise TokenizerError(f"{map_file}: {key} must be a list of tokens, got {listed!r}"[:300])
            for i, token in enumerate(listed if isinstance(listed, list) else []):
                content = _token_content(token, f"{key}[{i}]", map_file)
                if content is not None and content not in extra_special:
                    extra_special.append(content)

    chat_template, named_templates = _read_chat_templates(directory, config)

    model_max_length = config.get("model_max_length")
    if not isinstance(model_max_length, int) or model_max_length >= _NO_LIMIT_THRESHOLD:
        model_max_length = None

    extra: dict[str, Any] = {
        "extra_special_tokens": [t for t in extra_special if t is not None],
        "clean_up_tokenization_spaces": bool(config.get("clean_up_tokenization_spaces", False)),
    }
    for name in ("sep_token", "cls_token", "mask_token"):
        if tokens[name] is not None:
            extra[name] = tokens[name]
    for name in ("padding_side", "truncation_side"):
        if config.get(name) in ("left", "right"):
            extra[name] = config[name]
    if named_templates:
        extra["chat_templates"] = named_templates

    return TokenizerData(
        tokenizer=backend,
        bos_token=tokens["bos_token"],
        eos_token=tokens["eos_token"],
        unk_token=tokens["unk_token"],
        pad_token=tokens["pad_token"],
        add_bos_token=bool(config.get("add_bos_token", False)),
        add_eos_token=bool(config.get("add_eos_token", False)),
        chat_template=chat_template,
        model_max_length=model_max_length,
        extra=extra,
    )


def _token_content(value: Any, key: str, path: Path) -> str | None:
    """A special token is saved either as a plain string or as a serialized AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(
        f"{path}: {key} must be a token string or an AddedToken object with a 'content' string, got {value!r}"[:300]
    )


def _check_config(config: dict[str, Any], path: Path) -> None:
    """The types of the tokenizer_config.json keys read here (named tokens are checked where read)."""

    def bad(key: str, expected: str) -> TokenizerError:
        return TokenizerError(f"{path}: {key} must be {expected}, got {config[key]!r}"[:300])

    for key in ("add_bos_token", "add_eos_token", "clean_up_tokenization_spaces"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise bad(key, "true or false")
    for key in ("padding_side", "truncation_side"):
        if config.get(key) is not None and config[key] not in ("left", "right"):
            raise bad(key, '"left" or "right"')
    length = config.get("model_max_length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, (int, float)) or length < 0):
        raise bad("model_max_length", "a non-negative number")
    for key in ("extra_special_tokens", "additional_special_tokens"):
        if config.get(key) is not None and not isinstance(config[key], (list, dict)):
            raise bad(key, "a list of tokens")
    decoder = config.get("added_tokens_decoder")
    if decoder is not None:
        if not isinstance(decoder, dict):
            raise bad("added_tokens_decoder", "an object mapping ids to AddedToken objects")
        for token_id, token in decoder.items():
            if not str(token_id).isdigit() or not isinstance(token, dict) or not isinstance(token.get("content"), str):
                raise TokenizerError(
                    f"{path}: added_tokens_decoder[{token_id!r}] must map an id to an AddedToken object with a "
                    f"'content' string, got {token!r}"[:300]
                )


def _read_chat_templates(directory: Path, config: dict[str, Any]) -> tuple[str | None, dict[str, str]]:
    """Return (default template, all named templates when there are several)."""
    templates: dict[str, str] = {}
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        templates["default"] = read_text(jinja_file, TokenizerError, max_chars=_MAX_TEMPLATE_FILE_CHARS)
    extra_dir = directory / "additional_chat_templates"
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = read_text(
                path, TokenizerError, max_chars=_MAX_TEMPLATE_FILE_CHARS
            )
    if not templates:
        legacy_file = directory / "chat_template.json"
        legacy = read_json_object(legacy_file, missing_ok=True, error=TokenizerError).get("chat_template")
        source = legacy if legacy is not None else config.get("chat_template")
        origin = legacy_file if legacy is not None else directory / "tokenizer_config.json"
        if isinstance(source, str):
            templates["default"] = source
        elif isinstance(source, list):  # [{"name": ..., "template": ...}, ...]
            for entry in source:
                if not (isinstance(entry, dict) and isinstance(entry.get("template"), str)
                        and isinstance(entry.get("name", "default"), str)):
                    raise TokenizerError(
                        f"{origin}: each chat_template entry must be {{'name': str, 'template': str}}, "
                        f"got {entry!r}"[:300]
                    )
                templates[entry.get("name", "default")] = entry["template"]
        elif isinstance(source, dict) and all(isinstance(v, str) for v in source.values()):
            templates.update({str(k): v for k, v in source.items()})
        elif source is not None:
            raise TokenizerError(
                f"{origin}: chat_template must be a template string, a list of {{'name', 'template'}} objects "
                f"or an object of named templates, got {source!r}"[:300]
            )
    default = templates.get("default")
    if default is None and len(templates) == 1:
        default = next(iter(templates.values()))
    named = templates if len(templates) > 1 else {}
    return default, named
