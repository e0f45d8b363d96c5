"""The request bodies of the OpenAI-compatible API, as Pydantic models.

One model per endpoint, with OpenAI's fields and ranges plus scribelm's
documented extensions (`top_k`, `min_p`, `repetition_penalty`). They serve
three purposes at once:

    validation     `parse_request(ChatCompletionRequest, data)`: types and ranges are
                   checked before anything reaches the engine; a parameter this
                   server does not know is refused by name, as OpenAI does
                   ("Unrecognized request argument supplied: foo"), never ignored
    documentation  the app's OpenAPI schema (/openapi.json) describes each body
                   exactly, so clients and generators see what is accepted
    fuzzing        the test suite generates requests from that schema

Validation is strict: `"max_tokens": "5"` or `5.0` is an error, not a 5. A
few fields are accepted only to refuse them with a clear message when used
(`tools`, `functions`): clients send their
empty defaults, and a request that really asks for them must not be answered
as if it had not.

Seeds: any 64-bit integer (signed or unsigned, as clients send) is accepted
and reduced modulo 2**63, so the same seed always draws the same tokens.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from scribelm.serve.errors import ApiError

SEED_MIN, SEED_END = -(1 << 63), 1 << 64  # int64 and uint64 seeds both arrive from clients
SEED_MODULUS = 1 << 63
TOKEN_ID_END = 1 << 31

TokenId = Annotated[int, Field(ge=0, lt=TOKEN_ID_END)]
NonEmptyString = Annotated[str, Field(min_length=1)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="who wrote the message ('developer' is read as 'system')")
    content: str | list[TextPart] | None = Field(None, description="a string or a list of text parts")
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = Field(None, max_length=0, description="tools are not supported: empty or absent")


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    name: str = Field(max_length=64, description="the schema's name")
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema", description="the JSON schema the answer follows")
    strict: bool | None = Field(None, description="accepted; the schema is always enforced")


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"] = Field(
        description="text, json_object (any JSON object) or json_schema (JSON valid under json_schema.schema)")
    json_schema: JsonSchemaFormat | None = None


class _Sampling(_Body):
    """Fields both endpoints share."""

    model: NonEmptyString = Field(description="a served model's name (GET /v1/models)")
    n: int = Field(1, ge=1, le=128, description="choices to generate")
    max_tokens: int | None = Field(None, ge=1, description="most tokens to generate per choice")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, description="token id (as a string) -> bias in [-100, 100]")
    seed: int | None = Field(None, ge=SEED_MIN, lt=SEED_END, description="any 64-bit integer; reduced modulo 2**63")
    stop: NonEmptyString | Annotated[list[NonEmptyString], Field(max_length=4)] | None = Field(
        None, description="a string or up to 4 strings that end a choice (not returned)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # scribelm's extensions (vLLM and llama.cpp servers take the same names)
    top_k: int | None = Field(None, ge=0, lt=TOKEN_ID_END, description="keep the k most likely tokens (0: off)")
    min_p: float | None = Field(None, ge=0, le=1, description="keep tokens with p >= min_p * p_max (0: off)")
    repetition_penalty: float | None = Field(
        None, ge=0.01, le=10, description="> 1 discourages tokens already seen (1: off)")


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions"""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = Field(None, description="not supported: absent or empty")
    tool_choice: str | dict[str, Any] | None = Field(None, description="not supported: absent or 'none'")
    functions: list[dict[str, Any]] | None = Field(None, description="not supported: absent or empty")
    function_call: str | dict[str, Any] | None = Field(None, description="not supported: absent or 'none'")
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None


class CompletionRequest(_Sampling):
    """POST /v1/completions"""

    prompt: NonEmptyString | Annotated[list[NonEmptyString], Field(min_length=1)] \
        | Annotated[list[TokenId], Field(min_length=1)] \
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)] = Field(
            description="a string, a list of strings, a list of token ids or a list of such lists")
    max_tokens: int | None = Field(None, ge=0, description="most tokens to generate per choice; 0 with echo: score the prompt only")
    logprobs: int | None = Field(None, ge=0, le=5, description="log-probabilities of the chosen and this many most likely "
                                                               "tokens (with echo: of the prompt's tokens too)")
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=128, description="only best_of == n is supported")
    # scribelm's extensions: the completion matches this regular expression or Lark grammar
    regex: NonEmptyString | None = Field(None, description="a regular expression the completion matches in full")
    grammar: NonEmptyString | None = Field(None, description="a Lark grammar (llguidance's dialect) the completion follows")
    suffix: str | None = Field(None, description="not supported: absent or empty")


class EmbeddingRequest(_Body):
    """POST /v1/embeddings"""

    model: NonEmptyString = Field(description="a served model's name (GET /v1/models)")
    input: NonEmptyString | Annotated[list[NonEmptyString], Field(min_length=1, max_length=2048)] \
        | Annotated[list[TokenId], Field(min_length=1)] \
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=2048)] = Field(
            description="a non-empty string, a list of up to 2048 such strings, a list of token ids or a list of such lists")
    encoding_format: Literal["float", "base64"] = Field("float", description="float: JSON numbers; base64: float32 bytes")
    dimensions: int | None = Field(None, ge=1, description="accepted only when it equals the model's width")
    user: str | None = None
    # scribelm's extension: cut inputs longer than the model's embedding length instead of refusing them
    truncate: bool = Field(False, description="cut a too long input to the model's embedding length (default: 400)")



class RagSearchRequest(_Body):
    """POST /v1/rag/search"""

    index: NonEmptyString = Field(description="a served retrieval index's name (scribe serve --rag NAME=INDEX)")
    query: NonEmptyString = Field(pattern=r"\S", description="what to search for")
    k: int | None = Field(None, ge=1, le=100, description="how many passages (default: the server's --rag-k)")
    mode: Literal["bm25", "dense", "hybrid"] | None = Field(None, description="default: the server's --rag-mode")

_FIELD = re.compile(r"^[a-z_][a-z0-9_]*$")
_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _path(loc: tuple) -> str:
    """('messages', 0, 'TextPart', 'text') -> "messages[0].text" (union member tags left out)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and _FIELD.match(part) and part not in _TYPE_TAGS:
            out += ("." if out else "") + part
    return out


def parse_request(model: type[_Body], data: dict) -> Any:
    """Validate a parsed JSON body; a bad one raises ApiError(400) naming the parameter."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        errors = err.errors(include_url=False)
    first = errors[0]
    param = first["loc"][0] if first["loc"] and isinstance(first["loc"][0], str) else None
    if first["type"] == "extra_forbidden" and len(first["loc"]) == 1:
        raise ApiError(400, f"Unrecognized request argument supplied: {param}", param=param)
    same = [e for e in errors if e["loc"][:1] == first["loc"][:1]]
    described = model.model_fields.get(param).description if param in model.model_fields else None
    if len(same) > 1 and described:  # a union: say what would be accepted, not each member's complaint
        message = f"Invalid value for '{param}': expected {described}"
    else:
        deepest = max(same, key=lambda e: len(e["loc"]))
        path = _path(deepest["loc"]) or param
        if deepest["type"] == "extra_forbidden":
            message = f"Unrecognized argument '{path}'"
        else:
            message = f"Invalid value for '{path}': {deepest['msg']}"
            shown = _shown(deepest.get("input"))
            if shown is not None and deepest["type"] != "missing":
                message += f", got {shown}"
    raise ApiError(400, message, param=param)


def _shown(value: Any) -> str | None:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return None
    return text if len(text) <= 60 else text[:57] + "..."


def reduce_seed(seed: int | None) -> int | None:
    """A 64-bit seed as the generator takes it: the same seed gives the same tokens."""
    return None if seed is None else seed % SEED_MODULUS


def request_body_schemas() -> dict[str, dict]:
    """OpenAPI component schemas of every request body, keyed by model name."""
    from pydantic.json_schema import models_json_schema

    _, top = models_json_schema([(ChatCompletionRequest, "validation"), (CompletionRequest, "validation"),
                                 (EmbeddingRequest, "validation"), (RagSearchRequest, "validation")],
                                ref_template="#/components/schemas/{model}")
    return top.get("$defs", {})
