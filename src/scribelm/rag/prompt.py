"""Answering with citations: the prompt the model sees and the sources it cited.

The retrieved passages go into the conversation as numbered sources, rendered with the
model's chat template:

    system:  Answer the question using only the numbered sources below. Cite every source
             you use by its number in square brackets, like [1] or [2][3]. If the sources
             do not contain the answer, say that you do not know.
    user:    Sources:

             [1] (notes/alpha.md, characters 0-512)
             <the chunk's text>

             [2] (manual.pdf, page 3, characters 1840-2302)
             <the chunk's text>

             Question: <the question>

The prompt must leave room for the answer inside the model's context: passages are
added best first while the rendered prompt stays within the budget, and a passage that
does not fit is dropped whole (never cut mid-sentence); later, shorter ones may still
fit. Sources are numbered in the order they are shown, so [n] in the answer is the
n-th passage the model saw.
"""

from __future__ import annotations

import re
from typing import Any

from scribelm.errors import ScribeError

SYSTEM_PROMPT = ("Answer the question using only the numbered sources below. Cite every source you use by its "
                 "number in square brackets, like [1] or [2][3]. If the sources do not contain the answer, say "
                 "that you do not know.")
DEFAULT_ANSWER_TOKENS = 256
_CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


def source_label(chunk) -> str:
    """Where a passage comes from: path, page (PDF) and character offsets."""
    page = f", page {chunk.page}" if chunk.page is not None else ""
    return f"{chunk.source}{page}, characters {chunk.start}-{chunk.end}"


def render_sources(hits: list[Any]) -> str:
    return "\n\n".join(f"[{n}] ({source_label(hit.chunk)})\n{hit.chunk.text.strip()}" for n, hit in enumerate(hits, 1))


def _messages(question: str, hits: list[Any]) -> list[dict[str, str]]:
    sources = render_sources(hits) if hits else "(no sources were found)"
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"Sources:\n\n{sources}\n\nQuestion: {question.strip()}"}]


def prompt_budget(lm, answer_tokens: int | None = None) -> int:
    """Tokens the rendered prompt may take: the context minus room for the answer."""
    context = lm.config.context_length
    answer = min(DEFAULT_ANSWER_TOKENS, context // 4) if answer_tokens is None else answer_tokens
    return context - answer


def grounded_messages(question: str, hits: list[Any], lm, max_context_tokens: int | None = None, *,
                      answer_tokens: int | None = None) -> tuple[list[dict[str, str]], list[Any]]:
    """(chat messages, the hits they show, numbered from 1). `max_context_tokens`: the budget
    for the rendered prompt in the model's tokens (default: its context minus `answer_tokens`,
    which defaults to min(256, a quarter of the context))."""
    if not isinstance(question, str) or not question.strip():
        raise ScribeError("the question is empty")
    tokenizer = lm.tokenizer
    if tokenizer is None or not tokenizer.chat_template:
        raise ScribeError("the answering model has no chat template; choose one with --chat-template "
                          "(chatml, llama3, mistral or a file)")
    budget = prompt_budget(lm, answer_tokens) if max_context_tokens is None else max_context_tokens
    if budget < 1:
        raise ScribeError(f"no room for a prompt: the budget is {budget} tokens")

    def size(shown: list[Any]) -> int:
        return len(tokenizer.encode_chat(_messages(question, shown)))

    needed = size([])
    if needed > budget:
        raise ScribeError(f"the question takes {needed} tokens with the instructions, more than the {budget} the "
                          f"model's context of {lm.config.context_length} leaves for the prompt; ask a shorter question")
    used: list[Any] = []
    for hit in hits:
        if size(used + [hit]) <= budget:
            used.append(hit)
    return _messages(question, used), used


def cited_sources(answer: str, used_hits: list[Any]) -> list[Any]:
    """The hits the answer cites as [n] (also [n, m]), in order of first citation; numbers
    that name no source are ignored."""
    cited, seen = [], set()
    for match in _CITATION.finditer(answer or ""):
        for number in match.group(1).split(","):
            n = int(number)
            if 1 <= n <= len(used_hits) and n not in seen:
                seen.add(n)
                cited.append(used_hits[n - 1])
    return cited
