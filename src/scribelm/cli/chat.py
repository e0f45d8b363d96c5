"""`scribe chat MODEL`: talk to a model, turn by turn, with streamed answers.

    scribe chat my-model --system "You are terse." --temperature 0.7

Inside the chat:
    /reset          forget the conversation (the system prompt stays)
    /system TEXT    set the system prompt (no TEXT: remove it)
    /save PATH      write the conversation as JSON
    /help           list the commands
    /exit, /bye     leave (or Ctrl-D)
    Ctrl-C          stop the answer being written, stay in the chat

The conversation is rendered with the tokenizer's chat template; when it no
longer fits the context (with room for the answer), the oldest turns are
dropped, the system prompt is kept.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from scribelm.cli.common import err_console
from scribelm.cli.generate import add_sampling_arguments, apply_threads, load_model, sampling_overrides
from scribelm.errors import ScribeError

HELP = "commands: /reset, /system TEXT, /save PATH, /help, /exit (Ctrl-C stops an answer, Ctrl-D leaves)"
INTERRUPTED = "[stopped]"


def register(subparsers) -> None:
    p = subparsers.add_parser("chat", help="interactive chat with streaming answers")
    p.add_argument("model", help="checkpoint directory")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--chat-template", metavar="NAME_OR_FILE",
                   help="chat template if the model has none: chatml, llama3, mistral, or a Jinja file")
    add_sampling_arguments(p)
    p.set_defaults(handler=run)


class ChatSession:
    """The conversation and the commands; `respond` streams one answer.

    Library-like on purpose (the REPL in `run` only reads lines and prints), so
    the behaviour, interruption included, can be driven directly."""

    def __init__(self, lm, *, system: str | None = None, settings: dict[str, Any] | None = None) -> None:
        if lm.tokenizer is None or not lm.tokenizer.chat_template:
            raise ScribeError("this model's tokenizer has no chat template, so it cannot chat; use `scribe generate`")
        self.lm = lm
        self.system = system
        self.settings = dict(settings or {})
        self.history: list[dict[str, str]] = []
        from scribelm.generate import resolve_settings

        self.max_new_tokens = resolve_settings(lm, **self.settings).max_new_tokens

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def _fit_history(self) -> None:
        """Drop the oldest turns until the prompt leaves room for an answer."""
        context = self.lm.config.context_length
        room = min(self.max_new_tokens, context // 2)
        while len(self.lm.tokenizer.encode_chat(self.messages())) + room > context:
            if len(self.history) <= 1:
                raise ScribeError(
                    f"the message does not fit the model's context of {context} tokens; write a shorter one or /reset"
                )
            self.history = self.history[2:] if self.history[0]["role"] == "user" and len(self.history) > 2 else self.history[1:]

    def command(self, line: str) -> tuple[bool, str]:
        """Run a /command. Returns (keep going, message to show)."""
        name, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        if name in ("/exit", "/bye", "/quit"):
            return False, ""
        if name == "/reset":
            self.history = []
            return True, "conversation cleared"
        if name == "/system":
            self.system = rest or None
            return True, "system prompt set" if rest else "system prompt removed"
        if name == "/save":
            if not rest:
                raise ScribeError("/save needs a file name, e.g. /save chat.json")
            path = save_conversation(rest, self.messages())
            return True, f"saved to {path}"
        if name == "/help":
            return True, HELP
        raise ScribeError(f"unknown command {name}; {HELP}")

    def respond(self, user_text: str, write: Callable[[str], None]) -> str:
        """Add the user's message, stream the answer through `write`, keep it in the history.
        Ctrl-C (KeyboardInterrupt) while writing ends the answer where it is."""
        self.history.append({"role": "user", "content": user_text})
        try:
            self._fit_history()
        except ScribeError:
            self.history.pop()
            raise
        reply = ""
        deltas: Iterator[str] = self.lm.chat(self.messages(), stream=True, **self.settings)
        try:
            for delta in deltas:
                if not reply:  # the line break many templates' models start with would show as a blank line
                    delta = delta.lstrip("\r\n")
                reply += delta
                if delta:
                    write(delta)
        except KeyboardInterrupt:
            write(" " + INTERRUPTED)
        finally:
            close = getattr(deltas, "close", None)
            if close is not None:
                close()
        self.history.append({"role": "assistant", "content": reply})
        return reply


def save_conversation(path: str | os.PathLike, messages: list[dict[str, str]]) -> Path:
    """Write {"messages": [...]} as JSON, atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"messages": messages}, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def run(args) -> int:
    settings = sampling_overrides(args)
    apply_threads(args)
    template = None
    if args.chat_template:
        from scribelm.chat_templates import resolve_chat_template

        template = resolve_chat_template(args.chat_template)  # a bad file is refused before the model loads
    lm = load_model(args.model, args.device, args.adapter)
    if template is not None:
        from scribelm.chat_templates import apply_fallback_template

        if apply_fallback_template(lm.tokenizer, template) == template.name and template.stop and "stop" not in settings:
            settings["stop"] = list(template.stop)  # the chosen template's turn markers end a reply
    session = ChatSession(lm, system=args.system, settings=settings)
    interactive = sys.stdin.isatty()
    if not lm.chat_tuned:
        err_console.print(f"note: {args.model} was not fine-tuned on conversations, so its answers will read like "
                          "continued text; fine-tune it first (scribe finetune sft|lora) or use scribe generate",
                          markup=False, soft_wrap=True)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if interactive:
        err_console.print(f"[dim]chatting with {args.model}; {HELP}[/dim]")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, not an exit
            write("\n")
            err_console.print("[dim](Ctrl-D or /exit to leave)[/dim]")
            continue
        if not line.strip():
            continue
        try:
            if line.startswith("/"):
                keep_going, message = session.command(line)
                if message:
                    err_console.print(f"[dim]{message}[/dim]")
                if not keep_going:
                    break
                continue
            session.respond(line, write)
            write("\n")
        except ScribeError as err:
            err_console.print(f"error: {err}", markup=False)
    return 0
