"""transformers-compatible model face (L6): AutoModelForCausalLM.from_pretrained(...).generate(...).

generate() strips the padding with the attention mask, submits one engine request per row (so the
padding side cannot change the result), steps the engine to completion and re-pads the output the
way transformers does: [batch, input_width + longest_generation], finished rows filled with pad."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from tokenloom.compat.generate_output import (
    GenerateOutput,
    RowResult,
    beam_indices_tensor,
    per_beam_step,
    per_step,
)
from tokenloom.compat.generation_config import GenerationConfig
from tokenloom.compat.inputs import check_inputs
from tokenloom.compat.model_config import ModelConfig
from tokenloom.compat.module import EngineModule
from tokenloom.compat.padding import infer_attention_mask as _infer_attention_mask
from tokenloom.compat.padding import repad as _repad
from tokenloom.compat.padding import strip_padding as _strip_padding
from tokenloom.compat.streamers import stop_requested
from tokenloom.config import EngineConfig
from tokenloom.engine.engine import Engine
from tokenloom.errors import ModelLoadError, TokenizerError
from tokenloom.generation_settings import UNSUPPORTED_GENERATE_ARGS, DecodingPlan, warn_if_default_length
from tokenloom.loading import LoadedModel, load_model
from tokenloom.models.base import CausalLM
from tokenloom.speculative_config import SpeculativeConfig
from tokenloom.tokenizer import Tokenizer, end_of_turn_stops


class TokenloomForCausalLM(EngineModule):
    """What AutoModelForCausalLM.from_pretrained returns: a torch module bound to its own engine.

    Its module tree is the model's own, under transformers' names (`model.layers.0.self_attn.q_proj`,
    `lm_head`), so parameters(), named_parameters(), state_dict(), modules() and `model.model` work as
    with transformers (see EngineModule for forward, save_pretrained, to(), ...)."""

    def __init__(
        self, loaded: LoadedModel, engine_config: EngineConfig | None = None, name_or_path: str | None = None
    ) -> None:
        super().__init__(loaded)
        causal_lm = loaded.model
        self.name_or_path = str(name_or_path if name_or_path is not None else loaded.checkpoint.source.path)
        self.config = ModelConfig.for_model(loaded.checkpoint.config, type(causal_lm), self.name_or_path, loaded.dtype)
        self.generation_config = self._default_generation_config(loaded)
        try:  # for stop_strings, the EOS lint and pipeline(); a checkpoint may come without one
            tokenizer: Tokenizer | None = Tokenizer.from_source(loaded.checkpoint.source)
        except TokenizerError:  # one that is there but malformed fails as AutoTokenizer does
            raise
        except ModelLoadError:
            tokenizer = None
        self.engine = Engine(causal_lm, engine_config, tokenizer=tokenizer)
        if tokenizer is not None:
            eos = self.generation_config.eos_token_ids
            extra = end_of_turn_stops(tokenizer, eos, stacklevel=3)
            if extra:
                self.generation_config.eos_token_id = [*eos, *extra]

    @staticmethod
    def _default_generation_config(loaded: LoadedModel) -> GenerationConfig:
        ckpt = loaded.checkpoint
        if ckpt.generation_config:
            return GenerationConfig.from_dict(ckpt.generation_config)
        return GenerationConfig.from_model_config(ckpt.config)

    # ---- generation -------------------------------------------------------------------------
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        streamer: Any = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor | GenerateOutput:
        """transformers' generate(): prompt + new tokens, [batch * num_return_sequences, width + new],
        each input row repeated num_return_sequences times in a row. With return_dict_in_generate=True,
        a GenerateOutput (sequences, scores, logits; sequences_scores and beam_indices for beams).

        `tokenizer` is accepted as in transformers (which needs it for stop_strings); the model's own
        tokenizer serves when it is not given."""
        input_ids, attention_mask = _inputs(input_ids, attention_mask, kwargs)
        assistant_model = kwargs.pop("assistant_model", None)
        config = self._call_config(generation_config, kwargs)
        if attention_mask is None:
            attention_mask = _infer_attention_mask(input_ids, config)
        plan = config.plan(input_ids.shape[1])
        if not plan.return_dict_in_generate:  # transformers ignores the outputs without the dict
            plan = dataclasses.replace(
                plan, sampling=dataclasses.replace(plan.sampling, output_scores=False, output_logits=False)
            )
        if assistant_model is not None:
            plan = self._with_assistant(plan, assistant_model)
        if plan.sampling.stop or plan.sampling.structured is not None:
            self._use_tokenizer(tokenizer)
        rows, _ = _strip_padding(input_ids, attention_mask)
        results = self.generate_rows(rows, plan, streamer=streamer, prompt_ids=input_ids)
        warn_if_default_length(plan, [(len(r.token_ids), r.finish_reason) for r in results], stacklevel=2)
        n = plan.num_return_sequences
        fill = config.pad_token_id
        if plan.is_beam_search and not fill and config.eos_token_ids:
            fill = config.eos_token_ids[0]  # transformers' beam search fills with `pad or eos[0]`
        sequences = _repad(
            input_ids.repeat_interleave(n, dim=0), attention_mask.repeat_interleave(n, dim=0),
            [r.token_ids for r in results], fill,
        )
        if not plan.return_dict_in_generate:
            return sequences
        vocab = self.causal_lm.config.vocab_size
        if plan.is_beam_search:
            return self._beam_output(sequences, results, plan, vocab)
        return GenerateOutput(
            sequences=sequences,
            scores=per_step([r.scores for r in results], vocab) if plan.sampling.output_scores else None,
            logits=per_step([r.logits for r in results], vocab) if plan.sampling.output_logits else None,
        )

    @staticmethod
    def _beam_output(
        sequences: torch.Tensor, results: list[RowResult], plan: DecodingPlan, vocab: int
    ) -> GenerateOutput:
        """transformers' GenerateBeamDecoderOnlyOutput: per step the scores/logits of every beam of every
        prompt ([batch * num_beams, vocab]), sequences_scores only with output_scores, and beam_indices
        (the flat beam row, prompt * num_beams + beam, each token extended)."""
        n, nb, sampling = plan.num_return_sequences, plan.num_beams, plan.sampling
        first_of_prompt = results[::n]  # a prompt's hypotheses share its per-step tensors
        return GenerateOutput(
            sequences=sequences,
            sequences_scores=torch.tensor([r.score for r in results]) if sampling.output_scores else None,
            scores=per_beam_step([r.beam_scores or [] for r in first_of_prompt], nb, vocab)
            if sampling.output_scores else None,
            logits=per_beam_step([r.beam_logits or [] for r in first_of_prompt], nb, vocab)
            if sampling.output_logits else None,
            beam_indices=beam_indices_tensor(
                [[b + (i // n) * nb for b in r.beam_indices or []] for i, r in enumerate(results)]
            ),
        )

    def generate_rows(
        self, rows: list[list[int]], plan: DecodingPlan, streamer: Any = None, prompt_ids: torch.Tensor | None = None
    ) -> list[RowResult]:
        """Generate for unpadded rows: num_return_sequences results per row, in row order. The streamer
        (not with beams) gets `prompt_ids` first, then each row's new tokens: put(ids) for a single
        output row, put_row(row, ids) for several."""
        if plan.is_beam_search:
            if streamer is not None:
                raise ValueError("streamer cannot be used with beam search (num_beams > 1); use num_beams=1")
            return self._beam_rows(rows, plan)
        n = plan.num_return_sequences
        expanded = [row for row in rows for _ in range(n)]
        if streamer is not None and len(expanded) > 1 and not callable(getattr(streamer, "put_row", None)):
            raise ValueError(
                f"a transformers-style streamer takes one sequence, this call generates {len(expanded)}: pass a "
                "batch of 1 with num_return_sequences=1, or a streamer with put_row(row, token_ids)"
            )
        if streamer is not None:
            # one prompt row per output row: each input row repeated num_return_sequences times
            streamer.put(prompt_ids.cpu().repeat_interleave(n, 0) if prompt_ids is not None else expanded)
        try:
            if not expanded:
                return []
            # transformers matches stop strings on the tokens' text, special tokens included
            params = dataclasses.replace(plan.sampling, skip_special_tokens=False)
            # n copies of one seeded request would draw the same sample: copy k uses seed + k
            per_copy = [
                dataclasses.replace(params, seed=params.seed + k) if params.seed is not None and n > 1 else params
                for k in range(n)
            ]
            requests = [(row, per_copy[i % n]) for i, row in enumerate(expanded)]
            request_ids = self.engine.add_requests(requests, detokenize=bool(params.stop))
            results = {rid: RowResult([]) for rid in request_ids}
            index = {rid: i for i, rid in enumerate(request_ids)}
            stream = self.engine.stream(request_ids)
            for out in stream:
                result = results[out.request_id]
                result.token_ids.extend(out.new_token_ids)
                result.scores.extend(out.scores or [])
                result.logits.extend(out.logits or [])
                if out.finished:
                    result.finish_reason = out.finish_reason
                if streamer is not None and len(expanded) == 1:
                    streamer.put(torch.tensor(out.new_token_ids))
                elif streamer is not None:
                    streamer.put_row(index[out.request_id], torch.tensor(out.new_token_ids))
                if streamer is not None and stop_requested(streamer):
                    stream.close()  # the consumer left: its unfinished requests are aborted in the engine
                    break
            return [results[rid] for rid in request_ids]
        finally:
            if streamer is not None:
                streamer.end()

    def _beam_rows(self, rows: list[list[int]], plan: DecodingPlan) -> list[RowResult]:
        from tokenloom.engine.beam_search import BeamSearchParams, beam_search

        params = plan.sampling
        beam_params = BeamSearchParams(
            num_beams=plan.num_beams,
            length_penalty=plan.length_penalty,
            early_stopping=plan.early_stopping,
            num_return_sequences=plan.num_return_sequences,
            max_tokens=params.max_tokens,
            min_tokens=params.min_tokens,
            stop_token_ids=params.stop_token_ids,
            sampling_params=params,
            output_scores=params.output_scores,
            output_logits=params.output_logits,
        )
        hypotheses = beam_search(self.engine, rows, beam_params) if rows else []
        return [
            RowResult(
                list(h.token_ids), h.finish_reason, score=float(h.score), beam_indices=list(h.beam_indices),
                beam_scores=h.step_scores, beam_logits=h.step_logits,
            )
            for per_prompt in hypotheses
            for h in per_prompt[: plan.num_return_sequences]
        ]

    def _call_config(self, generation_config: Any, kwargs: dict[str, Any]) -> GenerationConfig:
        """As transformers: the model's generation_config, then what a passed one sets, then kwargs."""
        refused = sorted(k for k in UNSUPPORTED_GENERATE_ARGS if kwargs.get(k) is not None)
        if refused:
            raise ValueError(f"generate() argument(s) not supported by tokenloom: {', '.join(refused)}")
        config = self.generation_config.copy()
        if generation_config is not None:
            config.update(**_explicit_settings(generation_config))
        unused = config.update(**{k: v for k, v in kwargs.items() if k not in UNSUPPORTED_GENERATE_ARGS})
        if unused:
            raise ValueError(f"generate() got argument(s) it does not use: {', '.join(sorted(unused))}")
        config.validate()
        if config.pad_token_id is None and config.eos_token_ids:
            config.pad_token_id = config.eos_token_ids[0]
        return config

    def _with_assistant(self, plan: DecodingPlan, assistant_model: Any) -> DecodingPlan:
        """transformers' assistant_model: the draft model of speculative decoding (5 tokens a step)."""
        if plan.is_beam_search:
            raise ValueError("assistant_model cannot be combined with beam search (num_beams > 1)")
        draft = getattr(assistant_model, "causal_lm", assistant_model)
        if not isinstance(draft, CausalLM):
            raise ValueError(
                f"assistant_model must be a model loaded by tokenloom's AutoModelForCausalLM, got "
                f"{type(assistant_model).__name__}"
            )
        self.engine.set_draft_model(draft)
        speculative = SpeculativeConfig("draft_model", num_speculative_tokens=5)
        return dataclasses.replace(plan, sampling=dataclasses.replace(plan.sampling, speculative=speculative))

    def _use_tokenizer(self, tokenizer: Any) -> None:
        """stop_strings are matched on text and grammars need the vocabulary: the engine needs a tokenizer
        (its own, else the one passed)."""
        if self.engine.tokenizer is not None:
            return
        engine_tokenizer = getattr(tokenizer, "engine_tokenizer", tokenizer)
        if not isinstance(engine_tokenizer, Tokenizer):
            raise ValueError(
                "stop_strings and structured output need a tokenizer and this model has none: pass tokenizer= a tokenloom tokenizer "
                "(AutoTokenizer.from_pretrained of the same model)"
            )
        self.engine.tokenizer = engine_tokenizer


def _inputs(
    input_ids: Any, attention_mask: torch.Tensor | None, kwargs: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if input_ids is None:
        input_ids = kwargs.pop("inputs", None)
    if isinstance(input_ids, Mapping):  # a BatchEncoding passed positionally
        encoding = input_ids
        input_ids = encoding["input_ids"]
        if attention_mask is None:
            attention_mask = encoding.get("attention_mask")
    if input_ids is None:
        raise ValueError("generate() needs input_ids (a [batch, seq_len] tensor of token ids)")
    return check_inputs(input_ids, attention_mask)


def _explicit_settings(generation_config: Any) -> dict[str, Any]:
    """What a generation_config passed to generate() sets; a transformers GenerationConfig (whose
    unset values are None) is accepted too, and a setting tokenloom does not know is an error."""
    if isinstance(generation_config, GenerationConfig):
        return generation_config.explicitly_set()
    if callable(getattr(generation_config, "to_diff_dict", None)):
        return GenerationConfig(**generation_config.to_diff_dict()).explicitly_set()
    raise TypeError(f"generation_config must be a GenerationConfig, got {type(generation_config).__name__}")


class AutoModelForCausalLM:
    """`AutoModelForCausalLM.from_pretrained(name_or_path, ...)` as in transformers."""

    def __init__(self) -> None:
        raise TypeError("use AutoModelForCausalLM.from_pretrained(...)")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        *,
        gguf_file: str | None = None,
        device_map: Any = "auto",
        dtype: Any = None,
        torch_dtype: Any = None,
        load_in_4bit: bool = False,
        load_in_8bit: bool = False,
        quantization_config: Any = None,
        revision: str | None = None,
        engine_config: EngineConfig | None = None,
        progress: bool = False,
        **kwargs: Any,
    ) -> TokenloomForCausalLM:
        """Load from a directory, a .gguf path, dir + gguf_file, a hub id or a pull name.

        device_map="auto" picks CUDA when available, else the CPU; dtype None/"auto" means float32
        on the CPU and the checkpoint's half dtype on CUDA. load_in_8bit / load_in_4bit quantize
        the linear layers' weights (weight-only)."""
        ignored = {"trust_remote_code", "low_cpu_mem_usage", "attn_implementation", "use_safetensors",
                   "local_files_only", "cache_dir", "token"}
        unknown = sorted(set(kwargs) - ignored)
        if unknown:
            raise TypeError(f"from_pretrained() got unexpected argument(s): {', '.join(unknown)}")
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass only dtype")
        if torch_dtype is not None:
            warnings.warn("torch_dtype is deprecated in transformers; use dtype", FutureWarning, stacklevel=2)
        if quantization_config is not None:
            load_in_4bit = load_in_4bit or bool(_get(quantization_config, "load_in_4bit"))
            load_in_8bit = load_in_8bit or bool(_get(quantization_config, "load_in_8bit"))
        if load_in_4bit and load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are exclusive; choose one")
        bits = 4 if load_in_4bit else 8 if load_in_8bit else None
        loaded = load_model(
            pretrained_model_name_or_path,
            gguf_file,
            device_map=device_map,
            dtype=dtype if dtype is not None else torch_dtype,
            quantize_bits=bits,
            revision=revision,
            progress=progress,
        )
        return TokenloomForCausalLM(loaded, engine_config, name_or_path=os.fspath(pretrained_model_name_or_path))


def _get(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)
