"""Read a Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json + templates)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenloom.errors import ModelLoadError, ModelNotFoundError
from tokenloom.loading.checkpoint import NAMED_SPECIAL_TOKENS, TokenizerData
from tokenloom.loading.files import read_json_object

# transformers writes int(1e30) as model_max_length when a tokenizer has no limit.
_NO_LIMIT_THRESHOLD = int(1e29)


def load_hf_tokenizer(directory: Path) -> TokenizerData:
    """Load the tokenizer stored in an HF-format `directory`.

    Reads tokenizer.json (required), tokenizer_config.json, special_tokens_map.json, and the chat
    template from chat_template.jinja / additional_chat_templates/*.jinja / chat_template.json /
    tokenizer_config.json, in that order of priority (the order transformers uses).
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
        raise ModelLoadError(f"cannot read {tokenizer_file}: {exc}") from exc

    config = read_json_object(directory / "tokenizer_config.json", missing_ok=True)
    tokens = {name: _token_content(config.get(name)) for name in NAMED_SPECIAL_TOKENS}
    extra_special: list[str | None] = []
    for key in ("extra_special_tokens", "additional_special_tokens"):
        if not extra_special and isinstance(config.get(key), list):
            extra_special = [_token_content(t) for t in config[key]]

    # Like transformers: special_tokens_map.json is a legacy file, read only when the config does not
    # carry added_tokens_decoder, and then it wins over the config's values.
    special_map = read_json_object(directory / "special_tokens_map.json", missing_ok=True)
    if special_map and "added_tokens_decoder" not in config:
        for name in NAMED_SPECIAL_TOKENS:
            if special_map.get(name) is not None:
                tokens[name] = _token_content(special_map[name])
        for key in ("extra_special_tokens", "additional_special_tokens"):
            for token in special_map.get(key) or []:
                content = _token_content(token)
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


def _token_content(value: Any) -> str | None:
    """A special token is saved either as a plain string or as a serialized AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_chat_templates(directory: Path, config: dict[str, Any]) -> tuple[str | None, dict[str, str]]:
    """Return (default template, all named templates when there are several)."""
    templates: dict[str, str] = {}
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        templates["default"] = jinja_file.read_text(encoding="utf-8")
    extra_dir = directory / "additional_chat_templates"
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if not templates:
        legacy = read_json_object(directory / "chat_template.json", missing_ok=True).get("chat_template")
        source = legacy if legacy is not None else config.get("chat_template")
        if isinstance(source, str):
            templates["default"] = source
        elif isinstance(source, list):  # [{"name": ..., "template": ...}, ...]
            for entry in source:
                if isinstance(entry, dict) and isinstance(entry.get("template"), str):
                    templates[str(entry.get("name", "default"))] = entry["template"]
        elif isinstance(source, dict):
            templates.update({str(k): v for k, v in source.items() if isinstance(v, str)})
    default = templates.get("default")
    if default is None and len(templates) == 1:
        default = next(iter(templates.values()))
    named = templates if len(templates) > 1 else {}
    return default, named
