"""Chat templates for models that bring none: built-in ones by name, or a Jinja file.

A chat template turns a conversation into the prompt text a model was trained
on. Most instruction-tuned checkpoints ship theirs in tokenizer_config.json;
a base model, a GGUF conversion or a hand-made checkpoint may not, and then a
server has nothing to render chat requests with. `--chat-template` fills that
gap (it is used only when the model has no template of its own):

    chatml    <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n        (Qwen, many fine-tunes)
    llama3    <|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|>...     (Llama 3.x)
    mistral   <s> [INST] Hi [/INST]                                            (Mistral, Llama 2 style)
    FILE      any Jinja template, written as Hugging Face's are

Templates render in Jinja's ImmutableSandboxedEnvironment (see
`Tokenizer.render_chat`): a template cannot reach Python attributes, call
unsafe methods or change the values it is given; a template that tries fails
that request with a clear message, never the server. A file is compiled once
when chosen, so a syntax error is reported then with its line number.

Each built-in template also names the text that closes an assistant turn, so
generation stops there even when the tokenizer has no special token for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from scribelm.errors import ScribeError

__all__ = ["BUILTIN_TEMPLATES", "ChatTemplate", "apply_fallback_template", "check_template_syntax", "resolve_chat_template"]

MAX_TEMPLATE_BYTES = 256 * 1024  # real templates are a few KiB; a bigger file is a mistake

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

MISTRAL = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set loop_messages = messages %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system_message is defined %}"
    "{{ ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('after the system message, the mistral template takes user and assistant turns only') }}"
    "{% endif %}"
    "{% endfor %}"
)


@dataclass(frozen=True)
class ChatTemplate:
    """A template chosen by the user: its name as shown (/v1/models, logs), its text, and the
    strings that end an assistant turn under it."""

    name: str
    text: str
    stop: tuple[str, ...] = field(default=())


BUILTIN_TEMPLATES: dict[str, ChatTemplate] = {
    "chatml": ChatTemplate("chatml", CHATML, ("<|im_end|>", "<|im_start|>")),
    "llama3": ChatTemplate("llama3", LLAMA3, ("<|eot_id|>", "<|start_header_id|>")),
    "mistral": ChatTemplate("mistral", MISTRAL, ("[INST]",)),
}


def check_template_syntax(text: str, where: str) -> None:
    """Compile a template in the sandbox; a syntax error is one line naming `where` and the line."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    try:
        env.parse(text)
    except TemplateSyntaxError as err:
        raise ScribeError(f"{where}: chat template syntax error on line {err.lineno}: {err.message}") from None


def resolve_chat_template(spec: str) -> ChatTemplate:
    """`--chat-template` NAME_OR_FILE -> the template (a built-in name, else a Jinja file)."""
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ScribeError(f"--chat-template {spec!r} is neither a built-in template ({', '.join(BUILTIN_TEMPLATES)}) "
                          "nor a file")
    if path.stat().st_size > MAX_TEMPLATE_BYTES:
        raise ScribeError(f"{path}: a chat template of {path.stat().st_size} bytes is too large "
                          f"(at most {MAX_TEMPLATE_BYTES}); is this the right file?")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ScribeError(f"{path}: a chat template must be UTF-8 text") from None
    check_template_syntax(text, str(path))
    return ChatTemplate(f"file {path.name}", text)


def apply_fallback_template(tokenizer, template: ChatTemplate | None) -> str | None:
    """Give `tokenizer` the template when it has none of its own; the name of the template in use
    ('model' for its own, None for none)."""
    if tokenizer is None:
        return None
    if tokenizer.chat_template:
        return "model"
    if template is None:
        return None
    tokenizer.chat_template = template.text
    return template.name
