"""From logits to the next token: the settings, the processors, the draw.

At every step the model gives one row of logits per sequence, (B, V). This
module turns each row into one token id. The settings of each row may differ
(a serving engine batches requests with different temperatures), so every
function here takes one `SamplingSettings` per row.

    settings = SamplingSettings(temperature=0.8, top_p=0.95, seed=1)
    rows = [RowSampler(settings, vocab_size, prompt_ids=ids)]     # one per sequence
    logits = model(...)[:, -1]                                     # (B, V)
    next_ids = choose_tokens(logits, rows)                         # (B,)  processes, then draws
    for row, token in zip(rows, next_ids.tolist()): row.observe(token)

The processors run in this order (`process_logits`), each on every row whose
settings ask for it:

    1. repetition_penalty   (CTRL / Hugging Face) logits of tokens seen in the prompt
                            or the output: divided by the penalty if positive,
                            multiplied by it if negative
    2. presence_penalty,    (OpenAI) over the tokens generated so far:
       frequency_penalty    logit -= presence * [count > 0] + frequency * count
    3. logit_bias           (OpenAI) {token_id: bias} added to the logits
    4. temperature          logits / T; T = 0 means greedy (argmax after steps 1-3)
    5. top_k                keep the k most likely tokens (0: off)
    6. top_p                keep the smallest set of most likely tokens whose
                            probability mass reaches p (1: off)
    7. min_p                keep tokens whose probability is at least
                            min_p x the top token's probability (0: off)

then `sample` draws from softmax of what is left, and `greedy` takes the
argmax. Removed tokens get -inf. The draw is one batched inverse-CDF lookup:

    u_b    the next number of row b's own stream of uniforms in [0, 1)
    token  the first id whose cumulative probability exceeds u_b · total

Each row's uniforms come from its own seeded `torch.Generator`, drawn a block
at a time (`RowSampler.uniform`), so a seed reproduces a generation whatever
else is in the batch, while the whole batch is sampled by a few tensor calls
instead of one `multinomial` per row per token.

Log-probabilities (`token_logprobs`) report the model's own distribution,
log_softmax of the raw logits, before any processor: what the model thinks,
independent of how it was asked to sample.

`IncrementalDetokenizer` turns the chosen ids back into text one token at a
time for streaming: it never splits a multi-byte UTF-8 character across two
deltas, holds back text that may be the start of a stop string, and stops
at the first stop string (which is not part of the output).
"""

from __future__ import annotations

import codecs
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from scribelm.errors import ScribeError, reject_unknown_fields


class SamplingError(ScribeError, ValueError):
    """Generation settings that cannot work."""


CONTEXT_OVERFLOW = ("error", "slide")
GREEDY_BELOW = 1e-6  # temperatures below this are greedy (logits / 1e-300 is +-inf, 1e-300 in float32 is 0)
UNIFORM_BLOCK = 64  # uniforms a row draws from its generator at once
SEED_LIMIT = 1 << 64  # torch generators take 64-bit seeds; choice i of a request draws with (seed + i) mod 2**64


@dataclass
class SamplingSettings:
    """How to pick tokens and when to stop; names follow Hugging Face and OpenAI.

    max_new_tokens       most tokens to generate
    temperature          0 = greedy; higher = more random (default 1.0, sampled)
    top_k                keep the k most likely tokens (0 = off)
    top_p                nucleus: smallest set with mass >= p (1.0 = off)
    min_p                keep tokens with p >= min_p * p_max (0 = off)
    repetition_penalty   > 1 discourages tokens already seen (1.0 = off)
    presence_penalty     OpenAI, in [-2, 2]: flat penalty for any generated token
    frequency_penalty    OpenAI, in [-2, 2]: penalty per occurrence
    logit_bias           {token_id: bias in [-100, 100]} added to logits
    seed                 makes a sampled generation reproducible
    stop                 a string or list of strings that end generation (not returned)
    stop_token_ids       ids that end generation (the tokenizer's EOS always does)
    logprobs             return the log-probability of each chosen token
    top_logprobs         also return the N most likely alternatives at each step
    num_beams            > 1: beam search (deterministic; sampling settings 4-7 do not apply)
    length_penalty       beam score = sum(logprob) / length ** length_penalty
    early_stopping       beam search stops as soon as num_beams hypotheses finished
    num_return_sequences how many outputs per prompt (<= num_beams for beam search)
    context_overflow     "error": a prompt that does not fit is an error and generation
                         stops at the context length; "slide": keep the most recent
                         tokens (a sliding window) and go on
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False
    num_return_sequences: int = 1
    context_overflow: str = "error"

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias is not None:
            self.logit_bias = _normalise_bias(self.logit_bias)
        if self.top_logprobs and not self.logprobs:
            self.logprobs = True
        self.validate()

    # -- checks -------------------------------------------------------------------
    def validate(self) -> None:
        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SamplingError(f"{name} must be a number, got {type(value).__name__} {value!r}")
            if math.isnan(value):
                raise SamplingError(f"{name} is NaN; give a number")
            return float(value)

        def integer(name: str, low: int) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise SamplingError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
            if value < low:
                raise SamplingError(f"{name} must be >= {low}, got {value}")
            return value

        integer("max_new_tokens", 0)
        t = number("temperature")
        if t < 0 or math.isinf(t):
            raise SamplingError(f"temperature must be >= 0 and finite (0 means greedy), got {t}")
        integer("top_k", 0)
        p = number("top_p")
        if not 0.0 < p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1] (1 turns it off), got {p}")
        m = number("min_p")
        if not 0.0 <= m <= 1.0:
            raise SamplingError(f"min_p must be in [0, 1] (0 turns it off), got {m}")
        r = number("repetition_penalty")
        if r <= 0 or math.isinf(r):
            raise SamplingError(f"repetition_penalty must be positive and finite (1 turns it off), got {r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = number(name)
            if not -2.0 <= v <= 2.0:
                raise SamplingError(f"{name} must be in [-2, 2] (OpenAI's range), got {v}")
        if self.seed is not None:
            integer("seed", 0)
            if self.seed >= SEED_LIMIT:
                raise SamplingError(f"seed must be below 2**64, got {self.seed}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise SamplingError(f"stop strings must be non-empty strings, got {s!r}")
        for i in self.stop_token_ids:
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise SamplingError(f"stop_token_ids must be non-negative integers, got {i!r}")
        integer("top_logprobs", 0)
        integer("num_beams", 1)
        number("length_penalty")
        integer("num_return_sequences", 1)
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise SamplingError(
                f"num_return_sequences={self.num_return_sequences} exceeds num_beams={self.num_beams}; "
                "beam search can return at most one sequence per beam"
            )
        if self.context_overflow not in CONTEXT_OVERFLOW:
            raise SamplingError(f"context_overflow must be one of {', '.join(CONTEXT_OVERFLOW)}, got {self.context_overflow!r}")

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids named in the settings must exist in the model's vocabulary."""
        for i in list(self.logit_bias or {}) + list(self.stop_token_ids):
            if not 0 <= i < vocab_size:
                raise SamplingError(f"token id {i} in the settings is outside the vocabulary (0..{vocab_size - 1})")
        if self.top_logprobs > vocab_size:
            raise SamplingError(f"top_logprobs={self.top_logprobs} exceeds the vocabulary size {vocab_size}")

    # -- facts ----------------------------------------------------------------------
    @property
    def is_greedy(self) -> bool:
        """Temperature 0, or one so small that dividing float32 logits by it overflows: the argmax either way."""
        return self.temperature < GREEDY_BELOW

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def replace(self, **changes: Any) -> "SamplingSettings":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SamplingSettings":
        reject_unknown_fields(data, cls, "generation setting", SamplingError)
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _normalise_bias(bias: Any) -> dict[int, float]:
    if not isinstance(bias, Mapping):
        raise SamplingError(f"logit_bias must be a mapping of token id to bias, got {type(bias).__name__}")
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token = int(key)  # JSON keys arrive as strings
        except (TypeError, ValueError):
            raise SamplingError(f"logit_bias keys must be token ids, got {key!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise SamplingError(f"logit_bias for token {token} must be a number, got {value!r}")
        if not -100.0 <= value <= 100.0:
            raise SamplingError(f"logit_bias for token {token} must be in [-100, 100] (OpenAI's range), got {value}")
        out[token] = float(value)
    return out


# ----------------------------------------------------------------------------- per-row state


class RowSampler:
    """One sequence's sampling state: its settings, its random generator, and the
    token counts the penalties need (kept only when a penalty is set)."""

    def __init__(
        self,
        settings: SamplingSettings,
        vocab_size: int,
        *,
        prompt_ids: Sequence[int] = (),
        device: torch.device | str = "cpu",
        seed_offset: int = 0,
    ) -> None:
        settings.check_vocab(vocab_size)
        self.settings = settings
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        # Without a seed, draw one from torch's global generator so torch.manual_seed still reproduces.
        seed = settings.seed if settings.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed((seed + seed_offset) % SEED_LIMIT)
        self._uniforms: list[float] = []  # the rest of the last block drawn, next one last
        self.seen: torch.Tensor | None = None  # (V,) bool: in prompt or output, for repetition_penalty
        self.counts: torch.Tensor | None = None  # (V,) float: occurrences in the output, for OpenAI penalties
        if settings.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=self.device)
            if len(prompt_ids):
                self.seen[torch.tensor(list(prompt_ids), device=self.device)] = True
        if settings.presence_penalty != 0.0 or settings.frequency_penalty != 0.0:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=self.device)
        self.bias: torch.Tensor | None = None  # (V,) dense logit bias
        if settings.logit_bias:
            self.bias = torch.zeros(vocab_size, dtype=torch.float32, device=self.device)
            ids = torch.tensor(list(settings.logit_bias), device=self.device)
            self.bias[ids] = torch.tensor(list(settings.logit_bias.values()), device=self.device)

    def uniform(self) -> float:
        """The next number in [0, 1) of this row's own stream (float64, from its generator,
        `UNIFORM_BLOCK` at a time: one generator call per block, not per token)."""
        if not self._uniforms:
            block = torch.rand(UNIFORM_BLOCK, dtype=_wide(self.device.type), generator=self.generator, device=self.device)
            self._uniforms = block.tolist()[::-1]
        return self._uniforms.pop()

    def observe(self, token_id: int) -> None:
        """Record a generated token (call once per step, after choosing it)."""
        if self.seen is not None:
            self.seen[token_id] = True
        if self.counts is not None:
            self.counts[token_id] += 1

    def copy_state_from(self, other: "RowSampler") -> None:
        """Take over another row's token history (beam search reorders beams)."""
        if self.seen is not None:
            self.seen.copy_(other.seen)
        if self.counts is not None:
            self.counts.copy_(other.counts)


# ----------------------------------------------------------------------------- processors


def apply_penalties(logits: torch.Tensor, rows: Sequence[RowSampler]) -> torch.Tensor:
    """Steps 1-3 (repetition, presence/frequency, logit bias), in place on float logits (B, V)."""
    for b, row in enumerate(rows):
        s = row.settings
        if row.seen is not None:
            x = logits[b]
            penalised = torch.where(x > 0, x / s.repetition_penalty, x * s.repetition_penalty)
            logits[b] = torch.where(row.seen, penalised, x)
        if row.counts is not None:
            logits[b] -= s.frequency_penalty * row.counts + s.presence_penalty * (row.counts > 0).float()
        if row.bias is not None:
            logits[b] += row.bias
    return logits


def apply_temperature(logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """logits (B, V) / T (B,); rows with T = 0 (greedy) are left as they are."""
    t = torch.where(temperatures > 0, temperatures, torch.ones_like(temperatures))
    return logits / t[:, None]


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's k largest logits (ties at the k-th value are kept); k = 0 keeps all. top_k (B,)."""
    V = logits.shape[-1]
    k = torch.where((top_k <= 0) | (top_k > V), torch.full_like(top_k, V), top_k)  # (B,)
    sorted_logits = logits.sort(dim=-1, descending=True).values  # (B, V)
    kth = sorted_logits.gather(-1, (k - 1)[:, None])  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p. top_p (B,).

    A token stays if the mass of the tokens ranked above it is still below p, so
    the most likely token always stays and the last one kept is the one whose
    mass crosses p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.float().softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # (B, V): mass of strictly better-ranked tokens
    remove_sorted = mass_before >= top_p[:, None]
    remove_sorted[:, 0] = False
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Keep tokens with probability >= min_p x the top probability. min_p (B,)."""
    probs = logits.float().softmax(-1)  # (B, V)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(logits: torch.Tensor, rows: Sequence[RowSampler]) -> torch.Tensor:
    """Apply steps 1-7 to logits (B, V), each row with its own settings; returns float32 (B, V).

    Greedy rows (temperature 0) get steps 1-3 only: truncation cannot change an argmax."""
    if len(rows) != logits.shape[0]:
        raise SamplingError(f"{logits.shape[0]} rows of logits but {len(rows)} row settings")
    logits = logits.float().clone()
    if any(r.seen is not None or r.counts is not None or r.bias is not None for r in rows):
        apply_penalties(logits, rows)
        logits = finite_logits(logits)  # an extreme repetition_penalty divides or multiplies into +-inf
    settings = [r.settings for r in rows]
    sampled = [not s.is_greedy for s in settings]
    if not any(sampled):
        return logits
    device = logits.device
    if any(s.temperature not in (0.0, 1.0) for s in settings):
        temperatures = [s.temperature if samp else 0.0 for s, samp in zip(settings, sampled)]
        logits = apply_temperature(logits, torch.tensor(temperatures, device=device))
        logits = finite_logits(logits)  # a tiny temperature turns logits into +-inf
    if any(s.top_k > 0 and samp for s, samp in zip(settings, sampled)):
        V = logits.shape[-1]  # a k beyond the vocabulary keeps everything (and would overflow a tensor)
        logits = apply_top_k(logits, torch.tensor([min(s.top_k, V) if samp else 0 for s, samp in zip(settings, sampled)], device=device))
    if any(s.top_p < 1.0 and samp for s, samp in zip(settings, sampled)):
        logits = apply_top_p(logits, torch.tensor([s.top_p if samp else 1.0 for s, samp in zip(settings, sampled)], device=device))
    if any(s.min_p > 0.0 and samp for s, samp in zip(settings, sampled)):
        logits = apply_min_p(logits, torch.tensor([s.min_p if samp else 0.0 for s, samp in zip(settings, sampled)], device=device))
    return logits


def finite_logits(logits: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf (never chosen), +inf -> the largest float (chosen, and softmax stays defined);
    -inf stays -inf (a removed token). Softmax of the result is NaN-free unless a whole row is -inf."""
    return torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max, neginf=float("-inf"))


def _wide(device_type: str) -> torch.dtype:
    """float64 for the draw's uniforms and cumulative sums, where the device has it (MPS has not)."""
    return torch.float32 if device_type == "mps" else torch.float64


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token of each row: (B, V) -> (B,)."""
    return logits.argmax(dim=-1)


def sample(processed: torch.Tensor, raw: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row from softmax(processed) (B, V) -> (B,), by inverse CDF: row b takes the
    first id whose cumulative probability exceeds uniforms[b] (B,) x its total. A row that is no
    distribution (every token removed, NaN from a broken model) takes the most likely token of
    its raw logits instead: never an error."""
    probs = finite_logits(processed.float()).softmax(-1)  # (B, V)
    cdf = probs.to(uniforms.dtype).cumsum(-1)  # (B, V) float64: a token of tiny mass keeps its own interval
    total = cdf[:, -1]  # (B,) 1 up to rounding; NaN or 0 when there is no distribution
    # the first id whose CDF exceeds the target: a zero-mass token has an empty interval, so it is
    # never chosen; the target stays below the total (u·total may round up to it), so neither is the end
    target = torch.minimum(uniforms * total, torch.nextafter(total, torch.zeros_like(total)))  # (B,)
    chosen = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]  # (B,)
    valid = torch.isfinite(total) & (total > 0)
    if bool(valid.all()):
        return chosen
    return torch.where(valid, chosen.clamp(max=processed.shape[-1] - 1), finite_logits(raw.float()).argmax(-1))


def _untouched(settings: SamplingSettings) -> bool:
    """Sampled from the model's own distribution: temperature 1, no truncation, penalty or bias."""
    return (settings.temperature == 1.0 and settings.top_k == 0 and settings.top_p >= 1.0 and settings.min_p == 0.0
            and not settings.uses_penalties and not settings.logit_bias)


def choose_tokens(logits: torch.Tensor, rows: Sequence[RowSampler]) -> torch.Tensor:
    """Process logits (B, V) with each row's settings and pick each row's next token (B,)."""
    distinct = {id(r.settings): r.settings for r in rows}.values()  # rows of one request share theirs
    if all(_untouched(s) for s in distinct):  # nothing to process (`sample` copies what it changes)
        uniforms = torch.tensor([r.uniform() for r in rows], dtype=_wide(logits.device.type), device=logits.device)
        return sample(logits, logits, uniforms)
    if all(r.settings.is_greedy and r.seen is None and r.counts is None and r.bias is None for r in rows):
        return greedy(logits)  # plain greedy: nothing to process, no copy
    processed = process_logits(logits, rows)
    sampled = [not r.settings.is_greedy for r in rows]
    if not any(sampled):
        return greedy(processed)
    uniforms = torch.tensor([r.uniform() if s else 0.0 for r, s in zip(rows, sampled)],
                            dtype=_wide(logits.device.type), device=logits.device)  # (B,) only sampled rows advance
    drawn = sample(processed, logits, uniforms)
    if all(sampled):
        return drawn
    return torch.where(torch.tensor(sampled, device=logits.device), drawn, greedy(processed))


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor, top_n: int = 0):
    """The model's log-probabilities (raw logits, no processors) of the chosen tokens (B,),
    and if top_n > 0 the top_n most likely ids and their log-probabilities, each (B, top_n)."""
    logprobs = logits.float().log_softmax(-1)  # (B, V)
    chosen_lp = logprobs.gather(-1, chosen[:, None]).squeeze(-1)  # (B,)
    if top_n <= 0:
        return chosen_lp, None, None
    top = logprobs.topk(top_n, dim=-1)
    return chosen_lp, top.indices, top.values


# ----------------------------------------------------------------------------- streaming text


class IncrementalDetokenizer:
    """Ids to text one token at a time, for streaming.

        detok = IncrementalDetokenizer(tokenizer, stop=["\\n\\n"])
        for token in ids:
            delta = detok.push(token)       # text that is safe to show now ('' if none)
            if detok.stopped: break          # a stop string appeared (it is not in the text)
        delta = detok.flush()                # whatever was held back, at the end

    Bytes that do not yet form a complete UTF-8 character wait for the next
    token; text that could be the beginning of a stop string waits until it
    either completes the stop string (and is dropped) or cannot any more.
    `skip_ids` (e.g. special tokens) contribute no text. The concatenation of
    all deltas equals `text`.
    """

    def __init__(self, tokenizer, *, stop: Sequence[str] = (), skip_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.skip_ids = set(skip_ids)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # decoded but not yet emitted (may start a stop string)
        self.text = ""  # everything emitted so far
        self.stopped = False
        self.stop_string: str | None = None

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        if token_id not in self.skip_ids:
            self._pending += self._decoder.decode(self.tokenizer.token_bytes(int(token_id)))
        return self._emit(final=False)

    def push_many(self, token_ids: Sequence[int]) -> str:
        """Several tokens at once: the same text as pushing them one by one (the UTF-8 decoder
        does not care where the bytes were cut), for a caller that streams nothing."""
        if self.stopped:
            return ""
        data = b"".join(self.tokenizer.token_bytes(int(t)) for t in token_ids if t not in self.skip_ids)
        self._pending += self._decoder.decode(data)
        return self._emit(final=False)

    def flush(self) -> str:
        """End of generation: emit what was held back (an incomplete character becomes U+FFFD)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(b"", final=True)
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        pending = self._pending
        if self.stop:
            hits = [(pending.find(s), s) for s in self.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                index, string = min(hits)
                self.stopped, self.stop_string = True, string
                self._pending = ""
                return self._commit(pending[:index])
            if not final:
                hold = _longest_stop_prefix_suffix(pending, self.stop)
                if hold:
                    self._pending = pending[-hold:]
                    return self._commit(pending[:-hold])
        self._pending = ""
        return self._commit(pending)

    def _commit(self, delta: str) -> str:
        self.text += delta
        return delta


def _longest_stop_prefix_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the beginning of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
