"""A validated request body -> what the engine takes: chat messages, prompt token ids,
`SamplingSettings`; and the fields OpenAI has that this server refuses by name.

Sampling parameters map onto `scribelm.sampling.SamplingSettings` one to one
(`max_tokens` -> max_new_tokens); a parameter the request leaves out takes the model's
own default (generation.json) where it has one, as `LM.generate` does.
"""

from __future__ import annotations

from typing import Any

from scribelm.generate import prompt_token_ids
from scribelm.sampling import SamplingError, SamplingSettings
from scribelm.serve.errors import ApiError
from scribelm.serve.schema import Message, reduce_seed
from scribelm.structured import StructuredOutputError, grammar_from_json_schema, grammar_from_lark, grammar_from_regex


def message_text(message: Message) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)


def chat_messages(messages: list[Message]) -> list[dict[str, str]]:
    return [{"role": "system" if m.role == "developer" else m.role, "content": message_text(m)} for m in messages]


def prompt_ids(prompt: Any, lm) -> list[list[int]]:
    """`prompt`: a string, a list of strings, a list of token ids, or a list of such lists.
    Text is encoded as `LM.generate` encodes it (BOS if the checkpoint asks for one)."""
    if isinstance(prompt, str):
        return [prompt_token_ids(lm, prompt)]
    if all(isinstance(p, str) for p in prompt):
        return [prompt_token_ids(lm, p) for p in prompt]
    if all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    return [list(p) for p in prompt]


def sampling_settings(req, *, chat: bool, prompt_tokens: int, context: int, defaults: dict) -> SamplingSettings:
    """The request's sampling settings (types and ranges were checked by the schema)."""
    name = "max_completion_tokens" if chat and req.max_completion_tokens is not None else "max_tokens"
    max_tokens = getattr(req, name)
    if max_tokens is None:
        max_tokens = max(1, context - prompt_tokens) if chat else 16
    if prompt_tokens + max_tokens > context:
        raise ApiError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested {prompt_tokens + max_tokens} "
            f"tokens ({prompt_tokens} in the {'messages' if chat else 'prompt'}, {max_tokens} in the completion). "
            "Please reduce the length of the messages or completion.",
            param="messages" if chat else "prompt", code="context_length_exceeded",
        )
    if chat:
        logprobs, top_logprobs = req.logprobs, req.top_logprobs or 0
        if top_logprobs and not logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs' set to true", param="top_logprobs")
    else:
        logprobs, top_logprobs = req.logprobs is not None, req.logprobs or 0
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    extra: dict[str, Any] = {}
    for key in ("top_k", "min_p", "repetition_penalty"):
        if getattr(req, key) is not None:
            extra[key] = getattr(req, key)
        elif defaults.get(key) is not None:  # the model's own default (generation.json), as for temperature
            extra[key] = defaults[key]
    temperature = req.temperature if req.temperature is not None else defaults.get("temperature", 1.0)
    top_p = req.top_p if req.top_p is not None else defaults.get("top_p", 1.0)
    try:
        return SamplingSettings(
            max_new_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            logit_bias=req.logit_bias, seed=reduce_seed(req.seed), stop=stop, logprobs=logprobs,
            top_logprobs=top_logprobs, **extra,
        )
    except (SamplingError, TypeError, ValueError) as err:  # also a model default of the wrong type
        raise ApiError(400, str(err), param=_param_of(str(err))) from None


def _param_of(message: str) -> str | None:
    for name in ("logit_bias", "top_logprobs", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop"):
        if name in message:
            return name
    return None


def output_grammar(req, chat: bool) -> tuple[str | None, str | None]:
    """(the llguidance grammar the output must follow, the parameter that asked for it), or (None, None)."""
    try:
        if chat:
            fmt = req.response_format
            if fmt is None or fmt.type == "text":
                return None, None
            if fmt.type == "json_object":
                return grammar_from_json_schema(None), "response_format"
            if fmt.json_schema is None or fmt.json_schema.json_schema is None:
                raise ApiError(400, "response_format of type 'json_schema' needs json_schema.schema", param="response_format")
            return grammar_from_json_schema(fmt.json_schema.json_schema), "response_format"
        if req.regex is not None and req.grammar is not None:
            raise ApiError(400, "give 'regex' or 'grammar', not both", param="grammar")
        if req.regex is not None:
            return grammar_from_regex(req.regex), "regex"
        if req.grammar is not None:
            return grammar_from_lark(req.grammar), "grammar"
        return None, None
    except StructuredOutputError as err:
        raise ApiError(400, str(err), param="response_format" if chat else ("regex" if req.regex else "grammar")) from None


def refuse_unsupported(req, chat: bool) -> None:
    """Fields accepted by the schema only so that using them is refused by name."""
    if chat:
        for name in ("tools", "functions", "tool_choice", "function_call"):
            if getattr(req, name) not in (None, [], "none"):
                raise ApiError(400, f"'{name}' is not supported by this server; call without tools", param=name)
    else:
        if req.suffix:
            raise ApiError(400, "'suffix' is not supported by this server", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise ApiError(400, f"'best_of' must equal 'n' ({req.n}) on this server: every choice is returned", param="best_of")
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options")
