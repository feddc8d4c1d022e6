"""ms per `Sampler.sample` call, the persistent-batch sampler against the old per-row one.

    .venv/bin/python -m tests.workers.bench_sampler [--vocab 49152] [--batches 1 64 256] [--steps 10]

Two batches: all greedy, and mixed (temperature 0.8, top-p 0.9, repetition penalty 1.1, 128-token
prompts). Each figure is the median over `steps` calls after three warm-up calls.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tests.workers.test_sampler import OldSampler
from workers.batch import NewSequence
from workers.sampler import Sampler
from workers.sampling_params import SamplingParams

KINDS = {
    "greedy": SamplingParams(temperature=0),
    "mixed": SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.1),
}


def ms_per_call(make, params: SamplingParams, batch: int, vocab: int, steps: int) -> float:
    sampler = make(torch.device("cpu"), 0)
    gen = torch.Generator().manual_seed(0)
    for i in range(batch):
        prompt = torch.randint(0, vocab, (128,), generator=gen).tolist()
        sampler.add(NewSequence(seq_id=i, prompt_token_ids=prompt, params=params, seed=None, stop_ids=[0]))
    logits = torch.randn(batch, vocab, generator=gen)
    ids = list(range(batch))
    times = []
    for step in range(steps + 3):
        start = time.perf_counter()
        sampler.sample(logits, ids)
        if step >= 3:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print(f"vocab {args.vocab}, {torch.get_num_threads()} threads; ms per sample() call")
    print(f"{'batch':>5} {'kind':>7} {'old':>9} {'new':>9} {'speed-up':>9}")
    for batch in args.batches:
        for kind, params in KINDS.items():
            old = ms_per_call(OldSampler, params, batch, args.vocab, args.steps)
            new = ms_per_call(Sampler, params, batch, args.vocab, args.steps)
            print(f"{batch:>5} {kind:>7} {old:>9.3f} {new:>9.3f} {old / new:>8.2f}x")


if __name__ == "__main__":
    main()
