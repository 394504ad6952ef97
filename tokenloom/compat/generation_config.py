"""transformers-compatible GenerationConfig (L6): same names and defaults, mapped to SamplingParams."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from tokenloom.sampling_params import SamplingParams

# transformers' defaults. Knobs tokenloom does not implement yet are listed with their neutral value:
# setting them to anything else is an error rather than a silent no-op.
_DEFAULTS: dict[str, Any] = {
    "max_length": 20,
    "max_new_tokens": None,
    "min_length": 0,
    "min_new_tokens": None,
    "do_sample": False,
    "num_beams": 1,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "num_return_sequences": 1,
    "pad_token_id": None,
    "bos_token_id": None,
    "eos_token_id": None,
    "use_cache": True,
    "output_scores": False,
    "output_logits": False,
    "return_dict_in_generate": False,
}
_NOT_YET: dict[str, Any] = {
    "repetition_penalty": 1.0,
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "sequence_bias": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "stop_strings": None,
    "max_time": None,
    "length_penalty": 1.0,
    "early_stopping": False,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "renormalize_logits": False,
}
_ALL: dict[str, Any] = {**_DEFAULTS, **_NOT_YET}
# Keys that appear in generation_config.json files but do not affect decoding here.
_IGNORED = {"transformers_version", "_from_model_config", "output_attentions", "output_hidden_states",
            "cache_implementation", "forced_eos_token_id", "forced_bos_token_id", "decoder_start_token_id"}


class GenerationConfig:
    """Generation settings with transformers' attribute names and defaults (max_length=20,
    do_sample=False, top_k=50, ...). As in transformers >= 5, a max_length left at its default
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
        self._extra = {k: v for k, v in unused.items() if k in _IGNORED}
        unknown = sorted(k for k in unused if k not in _IGNORED)
        if unknown:
            raise ValueError(f"GenerationConfig got unknown parameter(s): {', '.join(unknown)}")

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, config: dict[str, Any], **kwargs: Any) -> GenerationConfig:
        known = {k: v for k, v in {**config, **kwargs}.items() if k in _ALL or k in _IGNORED}
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
        eos = self.eos_token_id
        if eos is None:
            return []
        return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]

    def validate(self) -> None:
        """Raise ValueError naming any parameter that is out of range or not supported yet.
        None means "not set" (as in transformers >= 5) and takes the default."""
        for key, neutral in _NOT_YET.items():
            if getattr(self, key) is not None and getattr(self, key) != neutral:
                raise ValueError(
                    f"{key}={getattr(self, key)!r} is not supported by tokenloom yet (leave it at {neutral!r})"
                )
        if self.num_beams not in (None, 1):
            raise ValueError(f"num_beams={self.num_beams!r}: beam search is not supported yet (use 1)")
        if self.num_return_sequences not in (None, 1):
            raise ValueError(f"num_return_sequences={self.num_return_sequences!r} is not supported yet (use 1)")
        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        temperature = 1.0 if self.temperature is None else self.temperature
        if self.do_sample and not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(
                f"temperature must be > 0 when do_sample=True, got {self.temperature!r} "
                "(use do_sample=False for greedy decoding)"
            )
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 1):
            raise ValueError(f"max_length must be an integer >= 1, got {self.max_length!r}")

    def to_sampling_params(self, prompt_length: int) -> SamplingParams:
        """Per-request parameters. `prompt_length` is the (padded) input width, which is what
        transformers measures max_length and min_length against."""
        self.validate()
        if self.max_new_tokens is not None:
            max_new = self.max_new_tokens
        elif self.max_length is None or "max_length" not in self._explicit:
            # transformers >= 5: a max_length nobody set means 20 *new* tokens (the engine still stops
            # at the model's context length).
            max_new = _DEFAULTS["max_length"]
        else:
            max_new = self.max_length - prompt_length
            if max_new < 1:
                raise ValueError(
                    f"the input is {prompt_length} tokens long, which reaches max_length={self.max_length}; "
                    "set max_new_tokens to say how many tokens to generate"
                )
        if self.min_new_tokens is not None:
            min_new = self.min_new_tokens
        else:
            min_new = max(0, (self.min_length or 0) - prompt_length)
        sampling = bool(self.do_sample)
        return SamplingParams(
            temperature=float(self.temperature if self.temperature is not None else 1.0) if sampling else 0.0,
            top_k=int(self.top_k or 0) if sampling else 0,
            top_p=float(self.top_p if self.top_p is not None else 1.0) if sampling else 1.0,
            max_tokens=max_new,
            min_tokens=min(min_new, max_new),
            stop_token_ids=self.eos_token_ids,
        )
