"""`shardlm bench latency` and the mixed `bench throughput`: the arithmetic, the padded batch and
its token count, and one whole latency run on the tiny Llama."""

from __future__ import annotations

import argparse
import json

import pytest

from driver.entrypoints.bench import throughput as bench
from driver.entrypoints.bench.latency import (
    TINY_LLAMA,
    batch_sizes,
    ms_per_step,
    ratios,
    roofline,
    roofline_fraction,
    roofline_ms,
)
from driver.entrypoints.cli import main

SMALL = ["--kv-cache-memory-bytes", str(4 * 2**20), "--max-num-batched-tokens", "256", "--device", "cpu"]


def test_ms_per_step_leaves_the_prefill_run_out() -> None:
    assert ms_per_step(full_s=0.50, prefill_s=0.10, decode_steps=100) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="decode_steps=0"):
        ms_per_step(0.1, 0.1, 0)


def test_ratio_is_shardlm_over_transformers_per_batch() -> None:
    assert ratios({1: 1.0, 64: 6.0}, {1: 2.0, 64: 3.0, 8: 1.0}) == {1: 0.5, 64: 2.0}


def test_roofline_is_the_largest_rank_read_once_at_the_copy_bandwidth() -> None:
    assert roofline_ms(2 * 10**9, 4000.0) == pytest.approx(0.5)
    assert roofline_fraction(0.5, 0.8) == pytest.approx(0.625)
    row = roofline([10**9, 2 * 10**9], 4000.0, batch1_ms=1.0)
    assert row["weight_bytes"] == 2 * 10**9 and row["roofline_ms"] == pytest.approx(0.5)
    assert row["fraction_at_batch_1"] == pytest.approx(0.5)
    assert "fraction_at_batch_1" not in roofline([10**9], 1000.0, batch1_ms=None)


def test_batch_sizes_flag() -> None:
    assert batch_sizes("1,8,64") == [1, 8, 64]
    for bad in ("", "1,x", "0,8"):
        with pytest.raises(argparse.ArgumentTypeError):
            batch_sizes(bad)


def test_mixed_lengths_are_drawn_in_range_and_reproducibly() -> None:
    lens = bench.random_lengths(200, (8, 64), seed=1)
    assert min(lens) >= 8 and max(lens) <= 64 and len(set(lens)) > 10
    assert lens == bench.random_lengths(200, (8, 64), seed=1)
    assert bench.random_lengths(5, (16, 16), seed=0) == [16] * 5
    assert bench.span((16, 128)) == "16-128" and bench.span((32, 32)) == "32"


def test_left_padding_and_mask() -> None:
    ids, mask = bench.left_padded([[5, 6, 7], [8]], pad=0)
    assert ids == [[5, 6, 7], [0, 0, 8]]
    assert mask == [[1, 1, 1], [0, 0, 1]]


def test_transformers_counts_only_the_requested_tokens_of_its_padded_batch(tiny_checkpoint, monkeypatch) -> None:
    folder, _ = tiny_checkpoint("llama")
    monkeypatch.setattr("driver.entrypoints.llm.LLM", FakeLLM)
    _, result = bench.interleaved_throughput({}, str(folder), "float32", [4, 9, 6], [2, 5, 3], vocab=200, seed=0, repeat=1)
    assert result["output_tokens"] == 10 and result["computed_tokens"] == 15
    assert result["tokens_per_s"] == pytest.approx(10 / result["seconds"])


class FakeLLM:
    """`LLM` as `shardlm_seconds` uses it: each request gets its own max_tokens."""

    seen: list[list[list[int]]] = []
    """The prompts of every `generate` call, across instances."""

    def __init__(self, **engine_args) -> None:
        self.engine_args = engine_args

    def __enter__(self) -> FakeLLM:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def generate(self, prompts, params, use_tqdm=None):
        from driver.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput

        assert len(prompts) == len(params) and all(p.ignore_eos and p.temperature == 0 for p in params)
        FakeLLM.seen.append([p["prompt_token_ids"] for p in prompts])
        return [
            RequestOutput(
                request_id=str(i),
                prompt=None,
                prompt_token_ids=p["prompt_token_ids"],
                finished=True,
                outputs=[CompletionOutput(index=0, text="", token_ids=[7] * sp.max_tokens)],
                metrics=RequestMetrics(arrival_time=0.0),
            )
            for i, (p, sp) in enumerate(zip(prompts, params))
        ]


def test_shardlm_asks_each_request_for_its_own_output_length() -> None:
    prompts = bench.random_prompts(4, (3, 20), TINY_LLAMA["vocab_size"], seed=0)
    result = bench.tokens_per_s([1, 7, 3, 12], bench.shardlm_seconds(FakeLLM(), prompts, [1, 7, 3, 12]))
    assert result["output_tokens"] == 23 and result["tokens_per_s"] == pytest.approx(23 / result["seconds"])


def test_interleaved_rounds_give_both_libraries_the_same_fresh_prompts(monkeypatch, tiny_checkpoint) -> None:
    """Each round: new token ids of the same lengths (no prefix-cache hit across rounds), the same
    prompts for transformers as for shardlm; the best round of each counts only requested tokens."""
    folder, _ = tiny_checkpoint("llama")
    monkeypatch.setattr("driver.entrypoints.llm.LLM", FakeLLM)
    theirs_seen = []
    real = bench.transformers_seconds
    monkeypatch.setattr(bench, "transformers_seconds", lambda hf, p, o: theirs_seen.append(p) or real(hf, p, o))
    FakeLLM.seen = []
    ours, theirs = bench.interleaved_throughput({}, str(folder), "float32", [3, 6], [2, 4], vocab=200, seed=0, repeat=2)
    assert FakeLLM.seen == theirs_seen and len(theirs_seen) == 2
    first, second = theirs_seen
    assert [len(p) for p in first] == [len(p) for p in second] == [3, 6] and first != second
    assert ours["output_tokens"] == theirs["output_tokens"] == 6 and theirs["computed_tokens"] == 8


def test_bench_latency_tiny_reports_both_sides_and_their_ratio(ray_cluster, capsys) -> None:
    # 31 decode steps, best of 2: a tiny step is a few tenths of a millisecond, and 7 of them were
    # within the noise of one generate call (a run's own cost, which the prefill run subtracts)
    argv = ["bench", "latency", "--tiny", "--batch-sizes", "1", "--output-len", "32", "--repeat", "2", "--json", "-q"]
    assert main(argv + SMALL) == 0
    result = json.loads(capsys.readouterr().out)
    ours, theirs = result["shardlm"]["1"], result["transformers"]["1"]
    assert ours["decode_steps"] == 31 and theirs["decode_steps"] == 31
    assert ours["ms_per_step"] > 0 and theirs["ms_per_step"] > 0
    assert result["ratio"]["1"] == pytest.approx(ours["ms_per_step"] / theirs["ms_per_step"])
    assert result["setup"]["load_format"] == "dummy" and "roofline" not in result
