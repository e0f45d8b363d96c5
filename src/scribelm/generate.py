"""Generation: prompts in, tokens (and text) out.

    prefill   run the prompts through the model once, writing every
              position's keys and values into a preallocated `KVCache`
    decode    then one token per step: feed each row's last token, read the
              cache, get the next-token logits, pick a token

The step itself (processors, choice, log-probabilities, stops, text) is the
decode core, `scribelm.decode`, shared with the serving engine. Several
prompts of different lengths run as one batch: each is a row of the cache
with its own length, so each row generates exactly what it would alone
(greedy). A row stops on EOS, a stop token id, a stop string (the text
before it is kept), or `max_new_tokens` ("length").

API (what `LM.generate`, `LM.stream`, `LM.chat` and the serving code use):

    gen = BatchGeneration(model, tokenizer, prompt_ids_list, settings_list)
    for events in gen:                   # one list per decode step
        for e in events:                 # TokenEvent(index, token_id, text, logprob, top_logprobs, finish_reason)
            pieces[e.index].append(e.text)
    gen.completions                      # one Completion per row, filled in as rows finish

    beam_search(model, tokenizer, prompt_ids, settings) -> list[Completion], best first

    generate(lm, "prompt" | ["p1", "p2"], return_details=False, **settings)
    stream(lm, "prompt", **settings)     # yields text deltas
    chat(lm, [{"role": "user", "content": "hi"}], stream=False, **settings)

A `Completion` holds `text`, `token_ids` (a stop token id that ended the row
is included, its text is not), `finish_reason` ("stop" or "length", as in
OpenAI's API), `stop_reason` (the stop string or token id), `prompt_tokens`,
`logprobs` (list of `TokenLogprob`, when asked) and `score` (beam search).

Context overflow: a prompt longer than the model's context is an error,
unless `context_overflow="slide"`: then only the most recent tokens are kept
and, whenever the context fills during generation, the oldest quarter is
dropped and the rest is run through the model again (positions restart at
0, so this works for every position type). Each row slides on its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from scribelm.cache import ContextOverflowError, new_cache
from scribelm.decode import (  # noqa: F401  (TokenEvent, TokenLogprob, token_text: part of this module's API)
    DecodeRow,
    TokenEvent,
    TokenLogprob,
    decode_step,
    feed,
    prefill,
    stop_ids_for,
    token_text,
)
from scribelm.errors import ScribeError, reject_unknown_fields
from scribelm.sampling import IncrementalDetokenizer, RowSampler, SamplingError, SamplingSettings, apply_penalties

#: Tokens that close an assistant turn in common chat formats (ours is <|end|>).
END_OF_TURN_TOKENS = ("<|end|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>")


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    prompt_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    score: float | None = None  # beam search: sum(logprob) / length ** length_penalty
    draft_tokens: int | None = None  # speculative decoding: tokens guessed for this row
    accepted_draft_tokens: int | None = None  # ... and how many of them the model kept

    @property
    def acceptance_rate(self) -> float | None:
        """Speculative decoding: the share of drafted tokens kept (None without speculation or drafts)."""
        return self.accepted_draft_tokens / self.draft_tokens if self.draft_tokens else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def require_decoder(config) -> None:
    """Generation writes one token after another, each seeing only those before it: an
    encoder (bidirectional attention, BERT) was never trained to do that."""
    if not getattr(config, "causal", True):
        raise ScribeError(
            f"this model ({config.name}) is an encoder with bidirectional attention and cannot generate text; "
            "use it for embeddings: lm.embed(texts) (or `scribe embed`)"
        )


def _check_prompt(ids: Sequence[int], vocab_size: int, index: int) -> list[int]:
    ids = [int(i) for i in ids]
    if not ids:
        raise ScribeError(
            f"prompt {index} is empty and there is no BOS token to start from; give some text or a tokenizer with a BOS token"
        )
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ScribeError(f"prompt {index} holds token id {bad[0]}, outside the model's vocabulary (0..{vocab_size - 1})")
    return ids


# ----------------------------------------------------------------------------- batched sampling / greedy


class BatchGeneration:
    """Generate for several prompts at once, one `SamplingSettings` per row.

    Iterating runs the loop and yields, per decode step, the `TokenEvent`s of
    rows still running. `completions` holds the results once iteration ends
    (or `run()` does both)."""

    def __init__(
        self,
        model,
        tokenizer,
        prompts: Sequence[Sequence[int]],
        settings: SamplingSettings | Sequence[SamplingSettings],
        *,
        skip_special_tokens: bool = True,
        extra_stop_ids: Sequence[int] = (),
        seed_offsets: Sequence[int] | None = None,
        compile: bool = False,
        speculator=None,
        defer_text: bool = False,
    ) -> None:
        """`defer_text`: rows without stop strings decode their text once, at the end (their
        events carry '' until the last, which carries it all): for callers that stream nothing."""
        if not prompts:
            raise ScribeError("no prompts to generate from")
        if isinstance(settings, SamplingSettings):
            settings = [settings] * len(prompts)
        if len(settings) != len(prompts):
            raise SamplingError(f"{len(prompts)} prompts but {len(settings)} settings")
        for s in settings:
            if s.num_beams > 1:
                raise SamplingError("BatchGeneration samples or decodes greedily; use beam_search for num_beams > 1")
        require_decoder(model.config)
        if getattr(model, "is_encoder_decoder", False):
            raise ScribeError("an encoder-decoder model generates through LM.generate (the prompt goes to its encoder)")
        self.model, self.tokenizer = model, tokenizer
        config = model.config
        self.context = config.context_length
        self.settings = list(settings)
        self.prompts = [_check_prompt(p, config.vocab_size, i) for i, p in enumerate(prompts)]
        for i, (p, s) in enumerate(zip(self.prompts, self.settings)):
            if len(p) > self.context:
                if s.context_overflow != "slide":
                    which = "the prompt" if len(prompts) == 1 else f"prompt {i}"
                    raise ContextOverflowError(
                        f"{which} is {len(p)} tokens but the model's context is {self.context}; shorten it, or "
                        "keep only its most recent tokens with --slide (in Python: context_overflow='slide')"
                    )
                self.prompts[i] = p[-self._window_keep():]
        if tokenizer is None and any(s.stop for s in self.settings):
            raise SamplingError("stop strings need a tokenizer to turn tokens into text")
        self.device = next(model.parameters()).device
        offsets = seed_offsets or [0] * len(prompts)
        skip = tokenizer.special_ids if (tokenizer is not None and skip_special_tokens) else set()
        self.rows = [
            DecodeRow(b, p, s, tokenizer=tokenizer, vocab_size=config.vocab_size, device=self.device,
                      stop_ids=extra_stop_ids, skip_ids=skip, seed_offset=o, record_logprobs=True,
                      defer_text=defer_text)
            for b, (p, s, o) in enumerate(zip(self.prompts, self.settings, offsets))
        ]
        self.completions: list[Completion | None] = [None] * len(prompts)
        self._started = False
        self._step = None  # the decode step: `feed` (eager), or one compiled graph (compile=True)
        #: A `scribelm.speculative.Speculator`: after the first token, each step guesses and checks several.
        self.speculator = speculator
        if speculator is not None:
            _check_speculation(model, speculator, self.settings, compile)
        if compile:
            from scribelm.compiled_decode import compiled_step_for

            self._step = compiled_step_for(model)

    def _window_keep(self) -> int:
        return max(1, self.context - max(1, self.context // 4))

    def run(self) -> list[Completion]:
        for _ in self:
            pass
        return self.completions  # type: ignore[return-value]

    # -- the loop ---------------------------------------------------------------------
    @torch.inference_mode()
    def __iter__(self) -> Iterator[list[TokenEvent]]:
        if self._started:
            raise ScribeError("a BatchGeneration runs once; make a new one")
        self._started = True
        for row in self.rows:
            if row.settings.max_new_tokens == 0:
                row.finish("length")
                self._complete(row)
        if all(row.done for row in self.rows):
            return
        sliding = any(s.context_overflow == "slide" for s in self.settings)
        longest = max(len(p) for p in self.prompts)
        budget = max(s.max_new_tokens for s in self.settings)
        cache_length = self.context if sliding else min(self.context, longest + budget)
        if self._step is not None:
            from scribelm.compiled_decode import static_cache_length

            cache_length = static_cache_length(cache_length, self.context)
        # a sliding-window model keeps only its window (RollingKVCache); the compiled step writes by position
        cache = self.cache = new_cache(self.model.config, len(self.rows), cache_length, device=self.device,
                                       dtype=_model_dtype(self.model),
                                       rolling=self._step is None and self.speculator is None)  # speculation sets rows back
        logits = prefill(self.model, cache, 0, self.prompts)
        stepped = None  # a speculative step's events (several tokens per row), else the step below
        while True:
            if stepped is None:
                room = [True] * len(self.rows)  # the common case, in one check: no row's cache is full
                if cache.length >= cache.max_length:
                    room = [cache.row_length(b) < cache.max_length or row.settings.context_overflow == "slide"
                            for b, row in enumerate(self.rows)]
                running = [b for b, row in enumerate(self.rows) if not row.done]
                stepped = decode_step([self.rows[b] for b in running],
                                      logits[running] if len(running) < len(self.rows) else logits,
                                      [room[b] for b in running])
            for row, event in stepped:
                if event.finished:
                    self._complete(row)
            yield [event for _, event in stepped]
            if all(row.done for row in self.rows):
                return
            if self.speculator is not None:
                stepped = self.speculator.step(self.model, cache, self.rows)
                continue
            stepped = None
            self._slide_full_rows()
            finished = [b for b, row in enumerate(self.rows) if row.done]
            for b in finished:  # a finished row is fed too (one batch), at a position that stays put
                cache.set_length(b, min(cache.row_length(b), cache.max_length - 1))
            last = [row.generated[-1] if row.generated else 0 for row in self.rows]
            logits = feed(self.model, cache, last) if self._step is None else self._step(cache, last)
            for b in finished:
                cache.set_length(b, cache.row_length(b) - 1)

    def _slide_full_rows(self) -> None:
        """A running row whose cache row is full keeps only its most recent tokens: they are run
        through the model again from position 0 (all but the last, which the next step feeds)."""
        if self.cache.length < self.cache.max_length:
            return  # no row is full
        for b, row in enumerate(self.rows):
            if row.done or self.cache.row_length(b) < self.cache.max_length:
                continue
            window = (row.prompt_ids + row.generated)[-self._window_keep():]
            self.cache.set_length(b, 0)
            if len(window) > 1:
                prefill(self.model, self.cache, b, [window[:-1]])

    def _complete(self, row: DecodeRow) -> None:
        self.completions[row.index] = Completion(
            text=row.text,
            token_ids=list(row.generated),
            finish_reason=row.finish_reason,
            stop_reason=row.stop_reason,
            prompt_tokens=len(row.prompt_ids),
            logprobs=row.logprobs,
            draft_tokens=row.draft_tokens if self.speculator is not None else None,
            accepted_draft_tokens=row.accepted_draft_tokens if self.speculator is not None else None,
        )


def _check_speculation(model, speculator, settings: Sequence[SamplingSettings], compile: bool) -> None:
    from scribelm.speculative import SpeculationError

    if compile:
        raise SpeculationError("speculative decoding runs eagerly; drop compile (--compile)")
    if any(s.context_overflow == "slide" for s in settings):
        raise SpeculationError("speculative decoding does not combine with a sliding context (--slide)")
    speculator.check(model)


def make_speculator(lm, speculative: str | None = None, draft=None, num_draft: int | None = None):
    """A `Speculator` for LM-level calls: speculative "prompt_lookup" | "draft" (a draft `LM`, or
    its model); draft alone means "draft"; None and no draft: no speculation."""
    from scribelm.speculative import SpeculationError, Speculator, method_name

    method = method_name(speculative)
    if method is None and draft is None:
        if num_draft is not None:
            raise SpeculationError("num_draft is for speculative decoding; say speculative='prompt_lookup' or give a draft")
        return None
    method = method or "draft"
    draft_model = getattr(draft, "model", draft)
    if draft is not None and lm.tokenizer is not None and getattr(draft, "tokenizer", None) is not None:
        if draft.tokenizer.vocab_size != lm.tokenizer.vocab_size:
            raise SpeculationError(f"the draft model's tokenizer has {draft.tokenizer.vocab_size} tokens, the model's "
                                   f"{lm.tokenizer.vocab_size}; a draft model must share the tokenizer")
    if draft_model is not None:
        draft_model.eval()
    return Speculator(method, num_draft if num_draft is not None else 5, draft_model=draft_model)


# ----------------------------------------------------------------------------- beam search


@torch.inference_mode()
def beam_search(
    model,
    tokenizer,
    prompt_ids: Sequence[int],
    settings: SamplingSettings,
    *,
    extra_stop_ids: Sequence[int] = (),
    skip_special_tokens: bool = True,
) -> list[Completion]:
    """Keep the `num_beams` best partial sequences at every step; return the best
    `num_return_sequences` finished ones, best first.

    Score of a finished sequence: sum of its tokens' log-probabilities divided by
    its length (generated tokens, the stop token included) ** length_penalty.
    At each step the 2·num_beams best extensions are considered: one that ends
    (stop token) becomes a finished hypothesis if it ranks among the top
    num_beams, the others continue. The search ends when every new token is
    spent, or when num_beams hypotheses are finished and either
    `early_stopping` is set or no running beam can still beat the worst of them
    (judged at the current length, as Hugging Face does). Penalties and
    logit_bias apply; temperature and truncation do not (beam search is
    deterministic)."""
    require_decoder(model.config)
    config = model.config
    K, V = settings.num_beams, config.vocab_size
    prompt = _check_prompt(prompt_ids, V, 0)
    if len(prompt) > config.context_length:
        raise ContextOverflowError(
            f"the prompt is {len(prompt)} tokens but the model's context is {config.context_length}; shorten it"
        )
    stop_ids = stop_ids_for(tokenizer, settings, extra_stop_ids)
    device = next(model.parameters()).device
    max_new = settings.max_new_tokens
    lp_exp = settings.length_penalty
    cache = new_cache(config, K, min(config.context_length, len(prompt) + max(max_new, 1)), device=device,
                      dtype=_model_dtype(model))
    # Every beam starts from the same prompt: prefill it once, then give each beam a copy of its keys and values.
    logits = prefill(model, cache, 0, [prompt]).expand(K, -1)  # (K, V)
    for k in range(1, K):
        cache.copy_row(0, k)
    samplers = [RowSampler(settings, V, prompt_ids=prompt, device=device) for _ in range(K)]
    beam_scores = torch.full((K,), float("-inf"), device=device)
    beam_scores[0] = 0.0  # all beams start identical: let only the first one expand
    beams: list[list[int]] = [[] for _ in range(K)]
    finished: list[tuple[float, list[int], str | None]] = []  # (score, tokens, finish_reason)

    def normalised(total: float, length: int) -> float:
        return total / (max(length, 1) ** lp_exp)

    def worst_kept() -> float:
        return sorted(s for s, _, _ in finished)[-K] if len(finished) >= K else float("-inf")

    done = False
    for step in range(max_new):
        processed = apply_penalties(logits.float().clone(), samplers)
        candidates = processed.log_softmax(-1) + beam_scores[:, None]  # (K, V)
        top = candidates.view(-1).topk(min(2 * K, K * V))
        next_beams: list[tuple[int, int, float]] = []  # (source beam, token, total log-prob)
        for rank, (total, flat) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            if total == float("-inf"):
                break
            source, token = divmod(flat, V)
            if token in stop_ids:
                if rank < K:
                    finished.append((normalised(total, step + 1), beams[source] + [token], "stop"))
                continue
            next_beams.append((source, token, total))
            if len(next_beams) == K:
                break
        length = step + 1
        if len(finished) >= K:
            best_running = max((normalised(t, length) for _, _, t in next_beams), default=float("-inf"))
            if settings.early_stopping or best_running <= worst_kept():
                done = True
        if not next_beams:
            done = True
        if done:
            break
        while len(next_beams) < K:  # fewer live candidates than beams: pad with dead copies
            next_beams.append((next_beams[0][0], next_beams[0][1], float("-inf")))
        cache.reorder(torch.tensor([s for s, _, _ in next_beams], device=device))
        old = [(s.seen.clone() if s.seen is not None else None, s.counts.clone() if s.counts is not None else None) for s in samplers]
        for k, (source, token, _) in enumerate(next_beams):
            if old[source][0] is not None:
                samplers[k].seen.copy_(old[source][0])
            if old[source][1] is not None:
                samplers[k].counts.copy_(old[source][1])
            samplers[k].observe(token)
        beams = [beams[s] + [t] for s, t, _ in next_beams]
        beam_scores = torch.tensor([t for _, _, t in next_beams], device=device)
        if step == max_new - 1 or cache.length >= cache.max_length:
            break
        logits = feed(model, cache, [t for _, t, _ in next_beams])  # (K, V)
    if not done:
        for k in range(K):
            if beam_scores[k].item() > float("-inf") and beams[k]:
                finished.append((normalised(beam_scores[k].item(), len(beams[k])), beams[k], "length"))
    finished.sort(key=lambda f: f[0], reverse=True)
    skip = tokenizer.special_ids if (tokenizer is not None and skip_special_tokens) else set()
    results = []
    for score, tokens, reason in finished[: settings.num_return_sequences]:
        stop_reason: str | int | None = tokens[-1] if reason == "stop" else None
        text = ""
        if tokenizer is not None:
            detok = IncrementalDetokenizer(tokenizer, stop=settings.stop, skip_ids=skip)
            for t in tokens:
                if t in stop_ids:
                    break
                detok.push(t)
                if detok.stopped:
                    reason, stop_reason = "stop", detok.stop_string
                    break
            detok.flush()
            text = detok.text
        results.append(Completion(text, tokens, reason, stop_reason, len(prompt), None, score))
    return results


# ----------------------------------------------------------------------------- LM-level API


def resolve_settings(lm, settings: SamplingSettings | None = None, **overrides: Any) -> SamplingSettings:
    """The checkpoint's generation.json defaults, then `settings`, then keyword overrides."""
    require_decoder(lm.config)
    reject_unknown_fields(overrides, SamplingSettings, "generation setting", SamplingError)
    if settings is not None:
        base = settings.to_dict()
    else:
        defaults = getattr(lm, "generation_config", None) or {}
        known = {f.name for f in fields(SamplingSettings)}  # generation.json may hold other keys too
        base = {k: v for k, v in defaults.items() if k in known} if isinstance(defaults, Mapping) else {}
    base.update({k: v for k, v in overrides.items() if v is not None or k in ("seed", "logit_bias")})
    return SamplingSettings(**base)


def encode_prompt(lm, prompt: str | Sequence[int], *, add_bos: bool | None = None) -> list[int]:
    """A prompt as ids: text is encoded (with BOS if asked or if the checkpoint says
    so); an empty prompt starts from BOS alone; a list of ids is used as given."""
    tokenizer = lm.tokenizer
    if not isinstance(prompt, str):
        ids = [int(i) for i in prompt]
    else:
        if tokenizer is None:
            raise ScribeError("this model has no tokenizer, so it cannot read text prompts; pass token ids instead")
        if add_bos is None:
            add_bos = bool((getattr(lm, "generation_config", None) or {}).get("add_bos_token", False))
        ids = tokenizer.encode(prompt)
        if add_bos and tokenizer.bos_id is not None:
            ids = [tokenizer.bos_id] + ids
    if not ids and tokenizer is not None and tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id]
    if not ids:
        raise ScribeError("the prompt is empty and the tokenizer has no BOS token to start from; give some text")
    return ids


def generate(
    lm,
    prompt_or_prompts: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]],
    *,
    return_details: bool = False,
    add_bos: bool | None = None,
    skip_special_tokens: bool = True,
    settings: SamplingSettings | None = None,
    extra_stop_ids: Sequence[int] = (),
    compile: bool = False,
    speculative: str | None = None,
    draft=None,
    num_draft: int | None = None,
    **overrides: Any,
):
    """Text in, text out; a list in, a list out (a list of ints is one prompt of token
    ids). With num_return_sequences > 1 each prompt gives a list. return_details=True
    gives `Completion`s instead of str. compile=True runs each decode step as one
    compiled graph (`scribelm.compiled_decode`; the first call compiles).
    speculative="prompt_lookup", or draft=a smaller LM with the same tokenizer: guess
    up to num_draft tokens per step and check them in one pass (`scribelm.speculative`);
    the same tokens (greedy) or the same distribution (sampling), sooner."""
    s = resolve_settings(lm, settings, **overrides)
    speculator = make_speculator(lm, speculative, draft, num_draft)
    if speculator is not None and (s.num_beams > 1 or getattr(lm.model, "is_encoder_decoder", False)):
        from scribelm.speculative import SpeculationError

        raise SpeculationError("speculative decoding is for sampling and greedy decoding with a decoder-only model, "
                               "not beam search or encoder-decoder models")
    single = isinstance(prompt_or_prompts, str) or (
        isinstance(prompt_or_prompts, Sequence) and len(prompt_or_prompts) > 0
        and all(isinstance(i, int) for i in prompt_or_prompts)
    )
    prompts = [prompt_or_prompts] if single else list(prompt_or_prompts)
    if not prompts:
        raise ScribeError("no prompts given; pass a string or a non-empty list of strings")
    ids = [prompt_token_ids(lm, p, add_bos) for p in prompts]
    n = s.num_return_sequences
    lm.model.eval()
    per_prompt: list[list[Completion]] = []
    if getattr(lm.model, "is_encoder_decoder", False) and s.num_beams > 1:  # T5: the prompt goes to the encoder
        per_prompt = [_seq2seq_beams(lm, p, s, extra_stop_ids, skip_special_tokens) for p in ids]
    elif getattr(lm.model, "is_encoder_decoder", False):
        per_prompt = [[seq2seq_generation(lm, p, s, extra_stop_ids, skip_special_tokens, seed_offset=i).run()[0]
                       for i in range(n)] for p in ids]
        for p, completions in zip(ids, per_prompt):
            for c in completions:
                c.prompt_tokens = len(p)  # the source the encoder read, not the decoder's start token
    elif s.num_beams > 1:
        for p in ids:
            per_prompt.append(beam_search(lm.model, lm.tokenizer, p, s, extra_stop_ids=extra_stop_ids,
                                          skip_special_tokens=skip_special_tokens))
    else:
        rows = [p for p in ids for _ in range(n)]
        offsets = [i for _ in ids for i in range(n)]
        done = BatchGeneration(lm.model, lm.tokenizer, rows, s, skip_special_tokens=skip_special_tokens,
                               extra_stop_ids=extra_stop_ids, seed_offsets=offsets, compile=compile,
                               speculator=speculator).run()
        per_prompt = [done[i * n:(i + 1) * n] for i in range(len(ids))]
    shaped = [c if return_details else [x.text for x in c] for c in per_prompt]
    out = [c[0] if n == 1 else c for c in shaped]
    return out[0] if single else out


def prompt_token_ids(lm, prompt: str | Sequence[int], add_bos: bool | None = None) -> list[int]:
    """A prompt as the model reads it: `encode_prompt`, except that an encoder-decoder's encoder
    reads text with its tokenizer's own special tokens."""
    if getattr(lm.model, "is_encoder_decoder", False) and lm.tokenizer is not None and isinstance(prompt, str):
        # the encoder reads text with the tokenizer's own special tokens (T5: a closing </s>), as transformers does
        return lm.tokenizer.backend.encode(_check_text_prompt(prompt), add_special_tokens=True).ids
    return encode_prompt(lm, prompt, add_bos=None if getattr(lm.model, "is_encoder_decoder", False) else add_bos)


def _check_text_prompt(prompt: str) -> str:
    from scribelm.tokenizer import _check_text

    return _check_text(prompt, "the prompt")


@torch.inference_mode()
def _seq2seq_beams(lm, prompt_ids: list[int], s: SamplingSettings, extra_stop_ids: Sequence[int],
                   skip_special_tokens: bool) -> list[Completion]:
    """Beam search over an encoder-decoder's decoder, the prompt encoded once (start token: 0)."""
    from scribelm.seq2seq import BoundDecoder

    _check_prompt(prompt_ids, lm.config.vocab_size, 0)
    memory = lm.model.encode(torch.tensor([prompt_ids], device=next(lm.model.parameters()).device))
    return beam_search(BoundDecoder(lm.model, memory), lm.tokenizer, [0], s, extra_stop_ids=extra_stop_ids,
                       skip_special_tokens=skip_special_tokens)


def seq2seq_generation(lm, prompt_ids: list[int], s: SamplingSettings, extra_stop_ids: Sequence[int],
                        skip_special_tokens: bool, seed_offset: int = 0) -> BatchGeneration:
    """One sequence from an encoder-decoder, greedy or sampled by the decode core like any
    other: the prompt is encoded once and the decoder, bound to it, starts from the start
    token (0). One row per generation: T5's relative position bias needs every cache row at
    one length, which rows that finish early would not keep."""
    from scribelm.seq2seq import BoundDecoder

    _check_prompt(prompt_ids, lm.config.vocab_size, 0)
    with torch.inference_mode():
        memory = lm.model.encode(torch.tensor([prompt_ids], device=next(lm.model.parameters()).device))
    return BatchGeneration(BoundDecoder(lm.model, memory), lm.tokenizer, [[0]], s, skip_special_tokens=skip_special_tokens,
                           extra_stop_ids=extra_stop_ids, seed_offsets=[seed_offset])


def stream(
    lm,
    prompt: str | Sequence[int],
    *,
    add_bos: bool | None = None,
    skip_special_tokens: bool = True,
    settings: SamplingSettings | None = None,
    extra_stop_ids: Sequence[int] = (),
    compile: bool = False,
    speculative: str | None = None,
    draft=None,
    num_draft: int | None = None,
    **overrides: Any,
) -> Iterator[str]:
    """Yield the text of one generation piece by piece; concatenated, it equals `generate`'s text.
    Bad settings or prompts raise here, before the first piece is asked for."""
    s = resolve_settings(lm, settings, **overrides)
    speculator = make_speculator(lm, speculative, draft, num_draft)
    if s.num_beams > 1 or s.num_return_sequences > 1:
        raise SamplingError("streaming gives one sequence; use generate() for beam search or several return sequences")
    ids = prompt_token_ids(lm, prompt, add_bos)
    lm.model.eval()
    if getattr(lm.model, "is_encoder_decoder", False):
        return _text_deltas(seq2seq_generation(lm, ids, s, extra_stop_ids, skip_special_tokens))
    gen = BatchGeneration(lm.model, lm.tokenizer, [ids], s, skip_special_tokens=skip_special_tokens,
                          extra_stop_ids=extra_stop_ids, compile=compile, speculator=speculator)
    return _text_deltas(gen)


def _text_deltas(gen: BatchGeneration) -> Iterator[str]:
    for events in gen:
        for e in events:
            if e.text:
                yield e.text


_stream = stream  # `chat` has a parameter of the same name


def chat_stop_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn for this tokenizer (besides EOS)."""
    if tokenizer is None:
        return []
    return [i for i in (tokenizer.token_to_id(t) for t in END_OF_TURN_TOKENS) if i is not None]


def chat(lm, messages: Sequence[dict[str, str]], *, stream: bool = False, **settings: Any):
    """Answer a conversation [{role, content}, ...] as the assistant (the tokenizer's
    chat template renders it). Returns the reply, or an iterator of deltas with stream=True."""
    if lm.tokenizer is None:
        raise ScribeError("this model has no tokenizer, so it cannot chat")
    ids = lm.tokenizer.encode_chat(messages, add_generation_prompt=True)
    stops = chat_stop_ids(lm.tokenizer)
    if stream:
        return _stream(lm, ids, extra_stop_ids=stops, **settings)
    return generate(lm, ids, extra_stop_ids=stops, **settings)
