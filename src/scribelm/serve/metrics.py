"""Prometheus metrics of the server, in the text exposition format (version 0.0.4).

    scribe_requests_total{route="/v1/models/{model}",status="401"}   by route template, never by raw path
    scribe_prompt_tokens_total{model=...}, scribe_generated_tokens_total{model=...}
    scribe_time_to_first_token_seconds (histogram), queue depth, active sequences, tokens/s

Label values come from a fixed set wherever a client could choose them: a
request is counted under its route's template (`/v1/models/{model}`, not
`/v1/models/anything-a-client-sends`), an unknown path under `other`, and a
status code is a number. Model labels are the served names, fixed at start.
Every label value is still escaped as the format requires (backslash, quote,
newline), so no value can end a sample early or forge another one.
"""

from __future__ import annotations

import re
import threading
from collections import defaultdict

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: The routes of the API, as (pattern, template); anything else is counted as "other".
ROUTES = (
    (re.compile(r"^/v1/chat/completions$"), "/v1/chat/completions"),
    (re.compile(r"^/v1/completions$"), "/v1/completions"),
    (re.compile(r"^/v1/models$"), "/v1/models"),
    (re.compile(r"^/v1/models/.+$", re.DOTALL), "/v1/models/{model}"),
    (re.compile(r"^/health$"), "/health"),
    (re.compile(r"^/metrics$"), "/metrics"),
    (re.compile(r"^/openapi\.json$"), "/openapi.json"),
    (re.compile(r"^/$"), "/"),
)
OTHER_ROUTE = "other"


def route_template(path: str) -> str:
    """The route a request path belongs to, from a fixed set: the only path label metrics use."""
    for pattern, template in ROUTES:
        if pattern.match(path):
            return template
    return OTHER_ROUTE


def escape_label(value: str) -> str:
    r"""A label value as the exposition format writes it: \ -> \\, " -> \", newline -> \n."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{key}="{escape_label(str(value))}"' for key, value in labels.items()) + "}"


class Metrics:
    """Counters and a histogram, rendered in Prometheus' text format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)  # (route template, status) -> count
        self.prompt_tokens: dict[str, int] = defaultdict(int)
        self.completion_tokens: dict[str, int] = defaultdict(int)
        self.ttft_counts: dict[str, list[int]] = {}
        self.ttft_sum: dict[str, float] = defaultdict(float)
        self.ttft_n: dict[str, int] = defaultdict(int)

    def count_request(self, path: str, status: int) -> None:
        """Count one answered request under its route template (`path` may be anything a client sent)."""
        status = int(status) if 100 <= int(status) <= 599 else 0
        with self._lock:
            self.requests[(route_template(path), status)] += 1

    def count_tokens(self, model: str, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens[model] += prompt
            self.completion_tokens[model] += completion

    def observe_ttft(self, model: str, seconds: float) -> None:
        with self._lock:
            counts = self.ttft_counts.setdefault(model, [0] * len(TTFT_BUCKETS))
            for i, bound in enumerate(TTFT_BUCKETS):
                if seconds <= bound:
                    counts[i] += 1
            self.ttft_sum[model] += seconds
            self.ttft_n[model] += 1

    def render(self, pool) -> str:
        lines: list[str] = []

        def family(name: str, kind: str, help: str) -> None:
            lines.append(f"# HELP {name} {help}")
            lines.append(f"# TYPE {name} {kind}")

        with self._lock:
            family("scribe_requests_total", "counter", "HTTP requests by route and status code")
            for (route, status), n in sorted(self.requests.items()):
                lines.append(f"scribe_requests_total{_labels(route=route, status=str(status))} {n}")
            family("scribe_prompt_tokens_total", "counter", "prompt tokens processed")
            for model, n in sorted(self.prompt_tokens.items()):
                lines.append(f"scribe_prompt_tokens_total{_labels(model=model)} {n}")
            family("scribe_generated_tokens_total", "counter", "tokens generated")
            for model, n in sorted(self.completion_tokens.items()):
                lines.append(f"scribe_generated_tokens_total{_labels(model=model)} {n}")
            family("scribe_time_to_first_token_seconds", "histogram", "time from request to first generated token")
            for model, counts in sorted(self.ttft_counts.items()):
                for bound, n in zip(TTFT_BUCKETS, counts):
                    lines.append(f"scribe_time_to_first_token_seconds_bucket{_labels(model=model, le=str(bound))} {n}")
                lines.append(f"scribe_time_to_first_token_seconds_bucket{_labels(model=model, le='+Inf')} {self.ttft_n[model]}")
                lines.append(f"scribe_time_to_first_token_seconds_sum{_labels(model=model)} {self.ttft_sum[model]:.6f}")
                lines.append(f"scribe_time_to_first_token_seconds_count{_labels(model=model)} {self.ttft_n[model]}")
        engines = dict(pool.engines)
        family("scribe_model_loaded", "gauge", "1 if the model is loaded")
        for name in pool.names():
            lines.append(f"scribe_model_loaded{_labels(model=name)} {int(name in engines)}")
        family("scribe_queue_depth", "gauge", "requests waiting for a batch slot")
        for name, engine in engines.items():
            lines.append(f"scribe_queue_depth{_labels(model=name)} {engine.queue_depth}")
        family("scribe_active_sequences", "gauge", "sequences holding a batch slot")
        for name, engine in engines.items():
            lines.append(f"scribe_active_sequences{_labels(model=name)} {engine.active_count}")
        family("scribe_tokens_per_second", "gauge", "generated tokens per second over the last 10 seconds")
        for name, engine in engines.items():
            lines.append(f"scribe_tokens_per_second{_labels(model=name)} {engine.tokens_per_second():.3f}")
        return "\n".join(lines) + "\n"
