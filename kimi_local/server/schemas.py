"""Request bodies of the OpenAI and Anthropic routes, as pydantic models.

Clients send many fields this server does not use (``user``, ``metadata``, ``parallel_tool_calls``,
``response_format``, ``logprobs``, ...): every model ignores unknown fields, as OpenAI-compatible servers are
expected to.  Types and ranges that can be checked here are, so that a bad request is answered with a 400
naming the field; the chat-format and sampling layers check the rest (roles, tool-call pairing, ranges).

Responses are plain dicts built in the route modules; their shapes follow the public API references.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

# Bounds that keep absurd values out before they reach the engine.
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 1024


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Open(BaseModel):
    """Objects that are passed through (tool schemas, tool-call arguments): extra keys are kept."""
    model_config = ConfigDict(extra="allow")


# --------------------------------------------------------------------------------------------- OpenAI

class ContentPart(_Open):
    type: str = Field(description="'text' is rendered; 'image_url' is refused (K2-Instruct is text-only)")
    text: Optional[str] = None


class FunctionCall(_Lenient):
    name: str
    arguments: Union[str, dict[str, Any]] = "{}"


class ToolCallIn(_Lenient):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCallIn]] = None
    tool_call_id: Optional[str] = None


class FunctionDef(_Open):
    name: str = Field(min_length=1, max_length=256)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None


class ToolDef(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(_Lenient):
    include_usage: bool = False


class _SamplingFields(_Lenient):
    """Sampling fields shared by /v1/chat/completions and /v1/completions (OpenAI names, plus the
    llama.cpp/vLLM extensions top_k, min_p and repetition_penalty)."""
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    top_k: Optional[int] = Field(default=None, ge=0)
    min_p: Optional[float] = Field(default=None, ge=0, le=1)
    presence_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    repetition_penalty: Optional[float] = Field(default=None, gt=0)
    seed: Optional[int] = Field(default=None, ge=-(2**63), le=2**64 - 1)
    logit_bias: Optional[dict[str, float]] = None
    stop: Union[str, list[str], None] = None
    n: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    tools: Optional[list[ToolDef]] = None
    tool_choice: Union[Literal["auto", "none", "required"], NamedToolChoice, None] = None


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int]] = Field(description="text (special tokens allowed) or token ids")
    echo: bool = False


# --------------------------------------------------------------------------------------------- Anthropic

class AnthropicBlock(_Open):
    """A content block.  ``text``, ``tool_use``, ``tool_result`` and ``thinking`` are understood; images and
    documents are refused with a 400 (text-only model)."""
    type: str
    text: Optional[str] = None
    id: Optional[str] = None
    name: Optional[str] = None
    input: Optional[Any] = None
    tool_use_id: Optional[str] = None
    content: Union[str, list[dict[str, Any]], None] = None
    is_error: Optional[bool] = None


class AnthropicMessage(_Lenient):
    role: Literal["user", "assistant"]
    content: Union[str, list[AnthropicBlock]]


class AnthropicTool(_Open):
    name: str = Field(min_length=1, max_length=256)
    description: Optional[str] = None
    input_schema: Optional[dict[str, Any]] = None
    type: Optional[str] = None


class AnthropicToolChoice(_Lenient):
    type: Literal["auto", "any", "tool", "none"]
    name: Optional[str] = None
    disable_parallel_tool_use: Optional[bool] = None


class AnthropicSystemBlock(_Open):
    type: str = "text"
    text: str


class CountTokensRequest(_Lenient):
    model: Optional[str] = None
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: Union[str, list[AnthropicSystemBlock], None] = None
    tools: Optional[list[AnthropicTool]] = None
    tool_choice: Optional[AnthropicToolChoice] = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=1)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    top_k: Optional[int] = Field(default=None, ge=0)
    stop_sequences: Optional[list[str]] = None
    stream: bool = False
    seed: Optional[int] = Field(default=None, ge=-(2**63), le=2**64 - 1,
                                description="extension: Anthropic has no seed; kimi-local accepts one")
