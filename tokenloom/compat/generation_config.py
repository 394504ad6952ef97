"""transformers-compatible GenerationConfig (L6): same names and defaults, mapped to SamplingParams by
`tokenloom.generation_settings` (the mapping every face shares)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from tokenloom.generation_settings import (
    DEFAULTS,
    IGNORED,
    UNSUPPORTED,
    DecodingPlan,
    plan_generation,
    resolve,
)
from tokenloom.generation_settings import eos_token_ids as _eos_list
from tokenloom.sampling_params import SamplingParams

_ALL: dict[str, Any] = {**DEFAULTS, **UNSUPPORTED}


class GenerationConfig:
    """Generation settings with transformers' attribute names and defaults (max_length=20,
    do_sample=False, top_k=50, ...): every knob in `generation_settings.DEFAULTS` (sampling warpers,
    penalties, bans, biases, stop strings, max_time, beams, num_return_sequences, outputs) plus
    tokenloom's presence_penalty, frequency_penalty, logit_bias and seed; the knobs in
    `generation_settings.UNSUPPORTED` are refused by name. As in transformers >= 5, a max_length left at its default
    means 20 new tokens; one that was set (here, in generation_config.json or per call) is the
    total length, prompt included."""

    def __init__(self, **kwargs: Any) -> None:
        # Which settings were given (constructor, update(), attribute assignment, a loaded file): like
        # transformers' "not None", this tells an explicit max_length=20 from the default one, and
        # lets a generation_config passed to generate() inherit what it leaves unset from the model's.
        object.__setattr__(self, "_explicit", set())
        for key, value in _ALL.items():
            object.__setattr__(self, key, copy.deepcopy(value))
        unused = self.update(**kwargs)
        self._extra = {k: v for k, v in unused.items() if k in IGNORED}
        unknown = sorted(k for k in unused if k not in IGNORED)
        if unknown:
            raise ValueError(f"GenerationConfig got unknown parameter(s): {', '.join(unknown)}")

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, config: dict[str, Any], **kwargs: Any) -> GenerationConfig:
        known = {k: v for k, v in {**config, **kwargs}.items() if k in _ALL or k in IGNORED}
        return cls(**known)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **kwargs: Any) -> GenerationConfig:
        """Read generation_config.json from a directory (or a path to the file itself)."""
        path = Path(path)
        file = path / "generation_config.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"no generation_config.json at {file}")
        return cls.from_dict(json.loads(file.read_text()), **kwargs)

    @classmethod
    def from_model_config(cls, config: dict[str, Any]) -> GenerationConfig:
        keys = ("bos_token_id", "eos_token_id", "pad_token_id")
        return cls(**{k: config[k] for k in keys if config.get(k) is not None})

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set known attributes; return the unknown ones (as transformers does)."""
        unused = {}
        for key, value in kwargs.items():
            if key in _ALL:
                setattr(self, key, value)
            else:
                unused[key] = value
        return unused

    def __setattr__(self, key: str, value: Any) -> None:
        object.__setattr__(self, key, value)
        if key in _ALL:
            self._explicit.add(key)

    def explicitly_set(self) -> dict[str, Any]:
        """The settings that were given rather than defaulted (what generate() layers over the
        model's own generation_config, as transformers does with a passed generation_config)."""
        return {k: getattr(self, k) for k in _ALL if k in self._explicit}

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _ALL}

    def to_diff_dict(self) -> dict[str, Any]:
        """Settings that differ from the defaults or were given explicitly (so that a saved
        max_length=20 stays a total length when read back)."""
        return {k: v for k, v in self.to_dict().items() if v != _ALL[k] or k in self._explicit}

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "generation_config.json").write_text(json.dumps(self.to_diff_dict(), indent=2))

    def copy(self) -> GenerationConfig:
        return copy.deepcopy(self)

    def __repr__(self) -> str:
        return f"GenerationConfig {json.dumps(self.to_diff_dict(), indent=2, sort_keys=True)}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GenerationConfig) and self.to_dict() == other.to_dict()

    # ---- mapping --------------------------------------------------------------------------
    @property
    def eos_token_ids(self) -> list[int]:
        return _eos_list(self.eos_token_id)

    def settings(self) -> dict[str, Any]:
        """Every setting as transformers names it, for `generation_settings`; max_length only when it
        was set (the default one means 20 new tokens, not a total)."""
        values = self.to_dict()
        if "max_length" not in self._explicit:
            values.pop("max_length")
        return values

    def validate(self) -> None:
        """Raise ValueError naming any parameter that is out of range or not supported.
        None means "not set" (as in transformers >= 5) and takes the default."""
        resolve(self.settings())

    def plan(self, prompt_length: int) -> DecodingPlan:
        """Per-request parameters and the beam / num_return_sequences choices for an input of
        `prompt_length` (the padded width, which transformers measures max_length against)."""
        return plan_generation(self.settings(), prompt_length)

    def to_sampling_params(self, prompt_length: int) -> SamplingParams:
        """Per-request parameters. `prompt_length` is the (padded) input width, which is what
        transformers measures max_length and min_length against."""
        return self.plan(prompt_length).sampling
