"""Request bodies of the OpenAI and TGI routes (L6). Types are checked here (pydantic); ranges are
checked by `tokenloom.sampling_params`' one table after each face maps its names onto it. Unknown
fields are refused by name, never silently ignored."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

TokenIds = list[int]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _OpenAISampling(_Strict):
    """Fields shared by chat and completions: OpenAI's plus vLLM's extra sampling parameters."""

    takes_tools: ClassVar[bool] = False  # tools and tool_choice: chat only

    model: str | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted and ignored, as the API allows
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # structured output (tokenloom.serving.structured): OpenAI's response_format, vLLM's guided_*, and on
    # chat tools + tool_choice
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    # known OpenAI parameters that tokenloom does not implement: refused with a 400 naming them
    functions: list[Any] | None = None
    function_call: Any = None
    best_of: int | None = None
    suffix: str | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    reasoning_effort: Any = None
    service_tier: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    web_search_options: Any = None

    def unsupported(self) -> list[str]:
        """The unimplemented parameters this request sets to something other than their neutral value."""
        names = []
        tool_fields = () if self.takes_tools else ("tools", "tool_choice", "parallel_tool_calls")
        for name in (*tool_fields, "functions", "function_call", "suffix", "audio",
                     "prediction", "reasoning_effort", "web_search_options"):
            value = getattr(self, name)
            if value is not None and value != [] and not (name == "tool_choice" and value == "none"):
                names.append(name)
        if self.best_of is not None and self.best_of != self.n:
            names.append(f"best_of={self.best_of} (only best_of == n)")
        if self.modalities not in (None, ["text"]):
            names.append(f"modalities={self.modalities!r}")
        if self.store:
            names.append("store=true")
        return names


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # templates may read name, tool_calls, reasoning_content, ...

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_OpenAISampling):
    takes_tools: ClassVar[bool] = True
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    echo: bool = False  # vLLM: prefix the reply with the last message's content
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_OpenAISampling):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False


# ---- TGI ------------------------------------------------------------------------------------


class TGIParameters(_Strict):
    best_of: int | None = None
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = None
    grammar: Any = None
    max_new_tokens: int | None = None
    repetition_penalty: float | None = None
    return_full_text: bool | None = False
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    temperature: float | None = None
    top_k: int | None = None
    top_n_tokens: int | None = None
    top_p: float | None = None
    truncate: int | None = None
    typical_p: float | None = None
    watermark: bool = False
    adapter_id: str | None = None

    def unsupported(self) -> list[str]:
        names = []
        if self.best_of not in (None, 1):
            names.append(f"best_of={self.best_of}")
        if self.decoder_input_details:
            names.append("decoder_input_details=true")
        if self.watermark:
            names.append("watermark=true")
        if self.adapter_id is not None:
            names.append("adapter_id")
        return names


class TGIGenerateRequest(_Strict):
    inputs: str
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False


class TGITokenizeRequest(_Strict):
    inputs: str
    parameters: TGIParameters = Field(default_factory=TGIParameters)
