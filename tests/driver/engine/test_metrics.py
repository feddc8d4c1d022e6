"""The engine's metrics (driver/engine/metrics.py): what a finished request adds, the snapshot
`LLM.get_metrics()` returns, the Prometheus text of GET /metrics, and what goes to Ray."""

from __future__ import annotations

import re

from driver.engine.metrics import (
    COUNTERS,
    GAUGES,
    HISTOGRAMS,
    PREFIX,
    Counter,
    EngineMetrics,
    Gauge,
    Histogram,
    prometheus_text,
    ray_name,
)
from driver.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput


def finished(reason: str, tokens: int, arrival: float, first: float, last: float, done: float) -> RequestOutput:
    return RequestOutput(
        request_id="r",
        prompt=None,
        prompt_token_ids=[1, 2],
        outputs=[CompletionOutput(index=0, text="", token_ids=list(range(tokens)), finish_reason=reason)],
        finished=True,
        metrics=RequestMetrics(
            arrival_time=arrival, first_scheduled_time=arrival, first_token_time=first, last_token_time=last, finished_time=done
        ),
    )


def by_name(metrics: list) -> dict[tuple[str, str], object]:
    return {(m.name, m.labels.get("finished_reason", "")): m for m in metrics}


def test_finished_requests_fill_the_histograms_and_the_success_counter() -> None:
    counts = {"prompt_tokens": 7, "generation_tokens": 11, "num_requests_running": 1, "kv_cache_usage_perc": 0.25}
    metrics = EngineMetrics("m", lambda: counts, export_to_ray=False)
    metrics.finished(finished("length", 5, arrival=10.0, first=10.03, last=10.43, done=10.5))
    metrics.finished(finished("stop", 1, arrival=0.0, first=2.0, last=2.0, done=2.0))
    metrics.aborted()
    got = by_name(metrics.snapshot())
    assert {name for name, _ in got} == {PREFIX + n for n in [*GAUGES, *COUNTERS, *HISTOGRAMS, "request_success"]}
    assert got[PREFIX + "prompt_tokens", ""] == Counter(name=PREFIX + "prompt_tokens", labels={"model_name": "m"}, value=7)
    assert isinstance(got[PREFIX + "kv_cache_usage_perc", ""], Gauge) and got[PREFIX + "kv_cache_usage_perc", ""].value == 0.25
    assert [got[PREFIX + "request_success", r].value for r in ("abort", "length", "stop")] == [1, 1, 1]
    ttft = got[PREFIX + "time_to_first_token_seconds", ""]
    assert isinstance(ttft, Histogram) and ttft.count == 2 and abs(ttft.sum - 2.03) < 1e-9
    assert ttft.buckets["0.04"] == 1 and ttft.buckets["2.5"] == 2 and ttft.buckets["+Inf"] == 2  # cumulative
    tpot = got[PREFIX + "time_per_output_token_seconds", ""]
    assert tpot.count == 1 and abs(tpot.sum - 0.1) < 1e-9  # (10.43 - 10.03) / (5 - 1); one token has none
    assert got[PREFIX + "e2e_request_latency_seconds", ""].count == 2


def test_prometheus_text_declares_each_family_once() -> None:
    metrics = EngineMetrics('m"x', lambda: {"generation_tokens": 3}, export_to_ray=False)
    metrics.finished(finished("stop", 2, 0.0, 0.1, 0.2, 0.3))
    metrics.finished(finished("error", 2, 0.0, 0.1, 0.2, 0.3))
    text = prometheus_text(metrics.snapshot())
    assert text.count("# TYPE shardlm:request_success counter") == 1
    assert 'shardlm:generation_tokens_total{model_name="m\\"x"} 3.0' in text
    assert 'shardlm:request_success_total{model_name="m\\"x",finished_reason="error"} 1.0' in text
    assert 'shardlm:e2e_request_latency_seconds_bucket{model_name="m\\"x",le="+Inf"} 2' in text
    assert "# TYPE shardlm:time_to_first_token_seconds histogram" in text
    for line in text.splitlines():  # the exposition format: comments, or `name{labels} number`
        assert line.startswith("# ") or re.fullmatch(r"[a-z0-9_:]+\{.*\} [0-9.e+-]+", line), line


class FakeRayMetric:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def set(self, value: float, tags: dict) -> None:
        self.calls.append(("set", value, tags))

    def inc(self, value: float, tags: dict) -> None:
        self.calls.append(("inc", value, tags))

    def observe(self, value: float, tags: dict) -> None:
        self.calls.append(("observe", value, tags))


def test_ray_gets_deltas_at_most_every_flush_period() -> None:
    counts = {"generation_tokens": 5.0}
    metrics = EngineMetrics("m", lambda: counts, export_to_ray=False)
    names = [*GAUGES, *COUNTERS, *HISTOGRAMS, "request_success"]
    metrics._ray = {name: FakeRayMetric() for name in names}
    metrics.finished(finished("stop", 3, 0.0, 0.5, 1.0, 1.0))
    metrics.maybe_flush(now=100.0)
    counts["generation_tokens"] = 8.0
    metrics.maybe_flush(now=100.5)  # within FLUSH_S: nothing sent
    assert metrics._ray["generation_tokens"].calls == [("inc", 5.0, {"model_name": "m"})]
    metrics.maybe_flush(now=101.5)
    assert metrics._ray["generation_tokens"].calls[-1] == ("inc", 3.0, {"model_name": "m"})  # the delta
    assert metrics._ray["request_success"].calls == [("inc", 1.0, {"model_name": "m", "finished_reason": "stop"})]
    assert metrics._ray["time_to_first_token_seconds"].calls == [("observe", 0.5, {"model_name": "m"})]
    assert ray_name("prompt_tokens") == "shardlm_prompt_tokens"


def test_ray_metrics_are_made_where_ray_runs(ray_cluster) -> None:
    metrics = EngineMetrics("m", lambda: {"prompt_tokens": 2.0})
    assert metrics._ray is not None and set(metrics._ray) == {*GAUGES, *COUNTERS, *HISTOGRAMS, "request_success"}
    metrics.maybe_flush(now=1e9)
    assert metrics._ray is not None  # recorded without an error
