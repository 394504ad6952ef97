"""`tokenizer.save_pretrained(directory)`: tokenizer.json, tokenizer_config.json and the chat
template(s), as transformers writes them; transformers' and tokenloom's AutoTokenizer both load it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def save_tokenizer(tokenizer: Any, save_directory: str | os.PathLike[str]) -> tuple[str, ...]:
    """Write `tokenizer` (a TokenloomTokenizer) into `save_directory`; return the files written."""
    directory = Path(save_directory)
    if directory.is_file():
        raise ValueError(f"save_pretrained: {directory} is a file, not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    engine = tokenizer.engine_tokenizer
    written = [directory / "tokenizer.json", directory / "tokenizer_config.json"]
    # the backend's post-processor is what decides the special tokens added on encode: it is kept as is
    engine.backend.save(str(written[0]))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **engine.special_tokens_map,
        "clean_up_tokenization_spaces": bool(engine.data.extra.get("clean_up_tokenization_spaces", False)),
        "model_max_length": tokenizer.model_max_length,
        "padding_side": tokenizer.padding_side,
        "truncation_side": tokenizer.truncation_side,
    }
    if engine.extra_special_tokens:
        config["additional_special_tokens"] = list(engine.extra_special_tokens)
    templates = dict(engine.chat_templates)
    if engine.chat_template is not None:
        path = directory / "chat_template.jinja"
        path.write_text(engine.chat_template, encoding="utf-8")
        written.append(path)
    named = {name: source for name, source in templates.items() if name != "default"}
    if named:
        (directory / "additional_chat_templates").mkdir(exist_ok=True)
        for name, source in named.items():
            path = directory / "additional_chat_templates" / f"{name}.jinja"
            path.write_text(source, encoding="utf-8")
            written.append(path)
    written[1].write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return tuple(str(p) for p in written)
