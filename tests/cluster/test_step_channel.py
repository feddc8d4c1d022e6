"""The shared-memory step channel between a driver and ranks in real processes: two steps in
flight, every message to every rank, rank 0's results back in order; a rank that raises or whose
process ends is named; a rank's loop ends with the channel or with the driver's process. Payloads
over a slot go through Ray's object store: tests/cluster/test_step_dispatch.py runs that on Ray."""

from __future__ import annotations

import multiprocessing
import os
import time
from typing import Any

import pytest

from cluster.step_channel import Layout, StepChannel, StepReader
from parallel import shm
from parallel.errors import EngineDeadError

pytestmark = pytest.mark.skipif(not shm.supported(), reason="the step channel needs x86-64")

SMALL = dict(message_bytes=4096, result_bytes=4096)


def rank_main(rank: int, offer: tuple, fail_at: int, exit_at: int, answers: multiprocessing.Queue) -> None:
    """A rank: rank 0 answers each message reversed; at step `fail_at` it raises, at `exit_at` its process ends."""
    reader = StepReader.attach(rank, offer)
    seen: list[bytes] = []

    def run(message: bytes) -> bytes | None:
        seen.append(message)
        if len(seen) == fail_at:
            raise ValueError(f"rank {rank} cannot run step {fail_at}")
        if len(seen) == exit_at:
            os._exit(3)
        time.sleep(0.001 * (rank + 1))  # the ranks finish in a different order from step to step
        return message[::-1] if rank == 0 else None

    steps = reader.serve(bytes, run)
    answers.put((rank, steps, seen))


def start_ranks(channel: StepChannel, size: int, fail_at: int = 0, exit_at: int = 0, failing_rank: int = 1):
    ctx = multiprocessing.get_context("spawn")
    answers = ctx.Queue()
    procs = [
        ctx.Process(
            target=rank_main,
            args=(r, channel.offer(), fail_at if r == failing_rank else 0, exit_at if r == failing_rank else 0, answers),
        )
        for r in range(size)
    ]
    for p in procs:
        p.start()
    return procs, answers


def wait_attached(channel: StepChannel, size: int) -> None:
    deadline = time.monotonic() + 60
    while not all(channel.segment.get(r, "pid") for r in range(size)):
        assert time.monotonic() < deadline, "the ranks did not attach"
        time.sleep(0.01)
    channel.attached()


def run_steps(channel: StepChannel, procs: list, answers: Any, messages: list[bytes]) -> tuple[list[bytes], list]:
    """Send every message with two in flight (as async scheduling does), close the channel: rank
    0's results in order, and each rank's (rank, steps run, messages seen)."""
    results, in_flight = [], []
    for message in messages:
        in_flight.append(channel.send(message))
        if len(in_flight) == 2:
            results.append(channel.result(in_flight.pop(0), bytes))
    results.append(channel.result(in_flight.pop(0), bytes))
    channel.close()
    got = sorted(answers.get(timeout=30) for _ in procs)
    for p in procs:
        p.join(timeout=10)
    return results, got


def test_every_rank_runs_every_step_and_rank_0_answers_in_order() -> None:
    channel = StepChannel(3, timeout_s=30, layout=Layout(3, **SMALL))
    procs, answers = start_ranks(channel, 3)
    wait_attached(channel, 3)
    messages = [os.urandom(1 + i * 37 % 3000) for i in range(40)]
    results, got = run_steps(channel, procs, answers, messages)
    assert results == [m[::-1] for m in messages]
    assert [(rank, steps) for rank, steps, _ in got] == [(0, 40), (1, 40), (2, 40)]
    assert all(seen == messages for _, _, seen in got)


def test_a_rank_that_raises_is_named_with_its_error() -> None:
    channel = StepChannel(2, timeout_s=30, layout=Layout(2, **SMALL))
    procs, _ = start_ranks(channel, 2, fail_at=3)
    wait_attached(channel, 2)
    for step in (1, 2):
        assert channel.result(channel.send(b"step %d" % step), bytes) == (b"step %d" % step)[::-1]
    with pytest.raises(EngineDeadError, match=r"rank 1 failed in execute_model: ValueError: rank 1 cannot run step 3"):
        channel.result(channel.send(b"step 3"), bytes)
    channel.close()
    for p in procs:
        p.join(timeout=10)
        assert p.exitcode == 0


def test_a_rank_whose_process_ends_is_named_within_a_second() -> None:
    channel = StepChannel(2, timeout_s=60, layout=Layout(2, **SMALL))
    procs, _ = start_ranks(channel, 2, exit_at=2)
    wait_attached(channel, 2)
    channel.result(channel.send(b"one"), bytes)
    start = time.monotonic()
    with pytest.raises(EngineDeadError, match=r"rank 1 died during execute_model \(its process, pid \d+, ended"):
        channel.result(channel.send(b"two"), bytes)
    assert time.monotonic() - start < 2
    channel.close()
    for p in procs:
        p.join(timeout=10)


def test_a_rank_that_does_not_answer_times_out_naming_it() -> None:
    channel = StepChannel(2, timeout_s=0.3, layout=Layout(2, **SMALL))
    channel.segment.set(0, "done", 5)  # rank 0 is ahead; rank 1 never comes
    with pytest.raises(EngineDeadError, match=r"did not finish within 0 s on rank\(s\) \[1\]"):
        channel.result(1, bytes)
    channel.close()


def test_a_rank_loop_ends_with_the_channel_or_with_the_driver_process() -> None:
    channel = StepChannel(1, timeout_s=5, layout=Layout(1, **SMALL))
    reader = StepReader.attach(0, channel.offer())
    channel.close()
    assert reader.serve(bytes, lambda m: m) == 0
    reader.close()

    channel = StepChannel(1, timeout_s=5, layout=Layout(1, **SMALL))
    reader = StepReader.attach(0, channel.offer())
    gone = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    gone.start()
    gone.join()
    channel.segment.set(None, "pid", gone.pid)  # the driver's process, ended
    start = time.monotonic()
    assert reader.serve(bytes, lambda m: m) == 0
    assert time.monotonic() - start < 2
    reader.close()
    channel.close()


def test_a_process_that_cannot_map_the_segment_does_not_attach() -> None:
    channel = StepChannel(2, timeout_s=5, layout=Layout(2, **SMALL))
    path, token, shape = channel.offer()
    assert StepReader.attach(1, (path, b"another engine..", shape)) is None
    assert StepReader.attach(1, ("/dev/shm/not-there", token, shape)) is None
    reader = StepReader.attach(1, (path, token, shape))
    assert reader is not None
    reader.close()
    channel.attached()
    assert not os.path.exists(path)
    channel.close()


def test_payloads_over_a_slot_go_through_files_that_are_removed() -> None:
    channel = StepChannel(2, timeout_s=30, layout=Layout(2, message_bytes=256, result_bytes=256))
    procs, answers = start_ranks(channel, 2)
    wait_attached(channel, 2)
    folder = os.path.dirname(channel.path)
    before = {f for f in os.listdir(folder) if f.startswith("shardlm-spill")}
    messages = [os.urandom(n) for n in (10, 5000, 248, 249, 70000, 3, 4000)]
    results, got = run_steps(channel, procs, answers, messages)
    assert results == [m[::-1] for m in messages]
    assert all(seen == messages for _, _, seen in got)
    assert {f for f in os.listdir(folder) if f.startswith("shardlm-spill")} == before
