"""The engine's metrics, with vLLM's names and meanings under a `shardlm:` prefix.

`EngineMetrics` keeps every figure in this process (`snapshot` for `LLM.get_metrics()`,
`prometheus_text` for a replica's `GET /metrics`) and, where Ray is initialized, records them
through `ray.util.metrics`, so that each replica's figures reach Ray's Prometheus endpoint. Ray
refuses ':' in metric names, so there they are spelled with '_' (`shardlm_prompt_tokens`), as
vLLM's Ray metrics spell theirs, and Ray's exporter adds its own `ray_` prefix.

A step only adds to counters held here; what goes to Ray is sent at most every FLUSH_S seconds,
so that a step pays nothing for Ray's metric calls.

| name | kind | meaning |
| --- | --- | --- |
| shardlm:num_requests_running | gauge | requests with a completion in the running batch |
| shardlm:num_requests_waiting | gauge | requests waiting to be scheduled (or preempted) |
| shardlm:kv_cache_usage_perc | gauge | share of the KV-cache blocks in use, 0 to 1 |
| shardlm:prefix_cache_queries | counter | prompt tokens looked up in the prefix cache |
| shardlm:prefix_cache_hits | counter | of those, tokens found there |
| shardlm:prompt_tokens | counter | prompt tokens of requests that have begun generating |
| shardlm:generation_tokens | counter | tokens generated |
| shardlm:num_preemptions | counter | sequences preempted (their blocks freed, to be recomputed) |
| shardlm:request_success | counter | finished requests, by finished_reason (stop, length, abort, error) |
| shardlm:time_to_first_token_seconds | histogram | arrival to first token |
| shardlm:time_per_output_token_seconds | histogram | per request: (last token - first token) / (tokens - 1) |
| shardlm:e2e_request_latency_seconds | histogram | arrival to finish |

Counters are exported as `<name>_total` in the Prometheus text, as prometheus_client does.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec

from driver.engine.outputs import RequestOutput

logger = logging.getLogger(f"shardlm.{__name__}")

PREFIX = "shardlm:"
FLUSH_S = 1.0
"""How often, at most, the figures are sent to Ray's metrics."""

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0)
"""vLLM's bucket bounds, in seconds."""

GAUGES = {
    "num_requests_running": "Number of requests in model execution batches.",
    "num_requests_waiting": "Number of requests waiting to be processed.",
    "kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage.",
}
COUNTERS = {
    "prefix_cache_queries": "Prefix cache queries, in terms of number of queried tokens.",
    "prefix_cache_hits": "Prefix cache hits, in terms of number of cached tokens.",
    "prompt_tokens": "Number of prefill tokens processed.",
    "generation_tokens": "Number of generation tokens processed.",
    "num_preemptions": "Cumulative number of preemptions from the engine.",
}
SUCCESS = "request_success"
HISTOGRAMS = {
    "time_to_first_token_seconds": ("Histogram of time to first token in seconds.", TTFT_BUCKETS),
    "time_per_output_token_seconds": ("Histogram of time per output token in seconds.", TPOT_BUCKETS),
    "e2e_request_latency_seconds": ("Histogram of end to end request latency in seconds.", E2E_BUCKETS),
}


class Metric(msgspec.Struct, kw_only=True):
    """One figure, as `LLM.get_metrics()` gives it (vLLM's reader shapes)."""

    name: str
    labels: dict[str, str]


class Gauge(Metric, kw_only=True):
    value: float


class Counter(Metric, kw_only=True):
    value: float


class Histogram(Metric, kw_only=True):
    count: int
    sum: float
    buckets: dict[str, int]
    """Upper bound ("+Inf" last) -> observations at or below it (cumulative, as Prometheus counts)."""


class _Histogram:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds, self.counts = bounds, [0] * (len(bounds) + 1)
        self.count, self.sum = 0, 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> dict[str, int]:
        out, total = {}, 0
        for bound, count in zip([*map(repr, self.bounds), "+Inf"], self.counts):
            total += count
            out[bound] = total
        return out


class EngineMetrics:
    """Every figure of one engine (labelled with its model's name)."""

    def __init__(
        self, model_name: str, counts: Callable[[], dict[str, float]] | None = None, export_to_ray: bool | None = None
    ) -> None:
        self.labels = {"model_name": model_name}
        self.counts = counts
        """The engine's running totals (counters) and present values (gauges), by metric name:
        read when the figures are flushed or read, never in a step."""
        self.gauges = dict.fromkeys(GAUGES, 0.0)
        self.counters = dict.fromkeys(COUNTERS, 0.0)
        self.successes: dict[str, float] = {}
        self.histograms = {name: _Histogram(bounds) for name, (_, bounds) in HISTOGRAMS.items()}
        self._observed: dict[str, list[float]] = {name: [] for name in HISTOGRAMS}
        self._sent_counters = dict.fromkeys(COUNTERS, 0.0)
        self._sent_successes: dict[str, float] = {}
        self._ray: dict[str, Any] | None = None
        self._last_flush = 0.0
        if export_to_ray is None:
            export_to_ray = _ray_initialized()
        if export_to_ray:
            self._ray = _ray_metrics()

    # -- what the engine reports ----------------------------------------------------------------

    def refresh(self) -> None:
        """Read the engine's counts (`counts`)."""
        if self.counts is not None:
            self.set_counts(self.counts())

    def set_counts(self, counts: dict[str, float]) -> None:
        """Running totals (counters) and present values (gauges), by metric name."""
        for name, value in counts.items():
            if name in self.counters:
                self.counters[name] = value
            else:
                self.gauges[name] = value

    def finished(self, out: RequestOutput) -> None:
        """A request that has finished: its latencies and its finish reason."""
        reason = next((c.finish_reason for c in out.outputs if c.finish_reason == "error"), None)
        reason = reason or (out.outputs[0].finish_reason if out.outputs else None) or "abort"
        self.successes[reason] = self.successes.get(reason, 0.0) + 1
        m = out.metrics
        if m.first_token_time is not None:
            self._observe("time_to_first_token_seconds", m.first_token_time - m.arrival_time)
            tokens = max((len(c.token_ids) for c in out.outputs), default=0)
            if tokens > 1 and m.last_token_time is not None:
                self._observe("time_per_output_token_seconds", (m.last_token_time - m.first_token_time) / (tokens - 1))
        if m.finished_time is not None:
            self._observe("e2e_request_latency_seconds", m.finished_time - m.arrival_time)

    def aborted(self, count: int = 1) -> None:
        """Requests aborted before they finished (a dropped client, a closed stream)."""
        if count:
            self.successes["abort"] = self.successes.get("abort", 0.0) + count

    def _observe(self, name: str, value: float) -> None:
        value = max(0.0, value)
        self.histograms[name].observe(value)
        if self._ray is not None:
            self._observed[name].append(value)

    def maybe_flush(self, now: float | None = None) -> None:
        """Send what changed to Ray's metrics, at most every FLUSH_S seconds."""
        if self._ray is None:
            return
        now = time.monotonic() if now is None else now
        if now - self._last_flush < FLUSH_S:
            return
        self._last_flush = now
        try:
            self.refresh()
            self._flush()
        except Exception as exc:  # metrics must never end the engine
            logger.warning("could not record metrics through Ray: %s", exc)
            self._ray = None

    def _flush(self) -> None:
        ray_metrics = self._ray
        for name, value in self.gauges.items():
            ray_metrics[name].set(value, tags=self.labels)
        for name, value in self.counters.items():
            delta = value - self._sent_counters[name]
            if delta > 0:
                ray_metrics[name].inc(delta, tags=self.labels)
                self._sent_counters[name] = value
        for reason, value in self.successes.items():
            delta = value - self._sent_successes.get(reason, 0.0)
            if delta > 0:
                ray_metrics[SUCCESS].inc(delta, tags={**self.labels, "finished_reason": reason})
                self._sent_successes[reason] = value
        for name, values in self._observed.items():
            for value in values:
                ray_metrics[name].observe(value, tags=self.labels)
            values.clear()

    # -- what readers get -----------------------------------------------------------------------

    def snapshot(self) -> list[Metric]:
        """Every figure now, with its `shardlm:` name."""
        self.refresh()
        out: list[Metric] = [Gauge(name=PREFIX + n, labels=dict(self.labels), value=v) for n, v in self.gauges.items()]
        out += [Counter(name=PREFIX + n, labels=dict(self.labels), value=v) for n, v in self.counters.items()]
        out += [
            Counter(name=PREFIX + SUCCESS, labels={**self.labels, "finished_reason": r}, value=v)
            for r, v in sorted(self.successes.items())
        ]
        out += [
            Histogram(name=PREFIX + n, labels=dict(self.labels), count=h.count, sum=h.sum, buckets=h.cumulative())
            for n, h in self.histograms.items()
        ]
        return out


def prometheus_text(metrics: list[Metric]) -> str:
    """Metrics in Prometheus' text format (version 0.0.4)."""
    lines: list[str] = []
    declared: set[str] = set()
    for metric in metrics:
        kind = {Gauge: "gauge", Counter: "counter", Histogram: "histogram"}[type(metric)]
        base = metric.name
        if base not in declared:
            declared.add(base)
            lines += [f"# HELP {base} {_help(base)}", f"# TYPE {base} {kind}"]
        if isinstance(metric, Histogram):
            for bound, count in metric.buckets.items():
                lines.append(f"{base}_bucket{_labels({**metric.labels, 'le': bound})} {count}")
            lines.append(f"{base}_count{_labels(metric.labels)} {metric.count}")
            lines.append(f"{base}_sum{_labels(metric.labels)} {metric.sum!r}")
        else:
            suffix = "_total" if isinstance(metric, Counter) else ""
            lines.append(f"{base}{suffix}{_labels(metric.labels)} {float(metric.value)!r}")
    return "\n".join(lines) + "\n"


def _help(name: str) -> str:
    short = name.removeprefix(PREFIX)
    if short == SUCCESS:
        return "Count of successfully processed requests."
    return GAUGES.get(short) or COUNTERS.get(short) or HISTOGRAMS[short][0]


def _labels(labels: dict[str, str]) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def ray_name(name: str) -> str:
    """A metric's name as Ray takes it (no ':')."""
    return (PREFIX + name).replace(":", "_")


def _ray_initialized() -> bool:
    try:
        import ray

        return ray.is_initialized()
    except Exception:
        return False


def _ray_metrics() -> dict[str, Any] | None:
    """Ray's metric objects for every figure (None where Ray's metrics cannot be made)."""
    try:
        from ray.util import metrics
    except Exception:
        return None
    keys = ("model_name",)
    made: dict[str, Any] = {}
    for name, doc in GAUGES.items():
        made[name] = metrics.Gauge(ray_name(name), description=doc, tag_keys=keys)
    for name, doc in COUNTERS.items():
        made[name] = metrics.Counter(ray_name(name), description=doc, tag_keys=keys)
    made[SUCCESS] = metrics.Counter(ray_name(SUCCESS), description=_help(SUCCESS), tag_keys=(*keys, "finished_reason"))
    for name, (doc, bounds) in HISTOGRAMS.items():
        made[name] = metrics.Histogram(ray_name(name), description=doc, boundaries=list(bounds), tag_keys=keys)
    return made
