"""The shared-memory step channel between a driver and ranks in real processes: two steps in
flight, every message to every rank, rank 0's results back in order, payloads over a slot through
files that are removed; a rank that raises (while another waits in a collective, or failing
again in the step already sent) or whose process ends is named; a rank's loop ends with the
channel or with the driver's process."""

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
    """A rank: rank 0 answers each message reversed; from step `fail_at` on it raises (a negative
    `fail_at`: it blocks there, as in a collective whose peer failed), at `exit_at` its process ends."""
    reader = StepReader.attach(rank, offer)
    seen: list[bytes] = []

    def run(message: bytes) -> bytes | None:
        seen.append(message)
        if fail_at < 0 and len(seen) == -fail_at:
            time.sleep(60)
        if 0 < fail_at <= len(seen):
            raise ValueError(f"rank {rank} cannot run step {len(seen)}")
        if len(seen) == exit_at:
            os._exit(3)
        time.sleep(0.001 * (rank + 1))  # the ranks finish in a different order from step to step
        return message[::-1] if rank == 0 else None

    steps = reader.serve(bytes, run)
    reader.close()
    answers.put((rank, steps, seen))


def start_ranks(channel: StepChannel, size: int, fail_at: int = 0, exit_at: int = 0, block_at: int = 0):
    """Rank 1 fails at `fail_at` or exits at `exit_at`; rank 0 blocks at `block_at`."""
    ctx = multiprocessing.get_context("spawn")
    answers = ctx.Queue()
    plans = {0: (-block_at, 0), 1: (fail_at, exit_at)}
    procs = [ctx.Process(target=rank_main, args=(r, channel.offer(), *plans.get(r, (0, 0)), answers)) for r in range(size)]
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


@pytest.mark.parametrize("spin_ahead", [True, False])
def test_spinning_ahead_finds_steady_results_awake(spin_ahead: bool) -> None:
    """Steps of a steady 1 ms, two in flight: with spin_ahead the driver is awake (spinning) when
    most results come, so the rank's wake finds nobody asleep; without it, it sleeps through every
    one (1 ms is far past SPIN_S). The results are the same either way."""
    channel = StepChannel(1, timeout_s=30, layout=Layout(1, **SMALL), spin_ahead=spin_ahead)
    procs, answers = start_ranks(channel, 1)
    wait_attached(channel, 1)
    messages = [b"%d" % i for i in range(60)]
    results, _ = run_steps(channel, procs, answers, messages)
    assert results == [m[::-1] for m in messages]
    if spin_ahead:
        assert channel.awake_results >= 20 and channel.period_s >= 1e-3  # each step sleeps 1 ms
    else:
        assert channel.awake_results <= 2


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


def test_a_rank_that_raises_is_named_at_once_while_another_waits_for_it() -> None:
    channel = StepChannel(2, timeout_s=60, layout=Layout(2, **SMALL))
    procs, _ = start_ranks(channel, 2, fail_at=1, block_at=1)
    wait_attached(channel, 2)
    start = time.monotonic()
    with pytest.raises(EngineDeadError, match=r"rank 1 failed in execute_model: ValueError: rank 1 cannot run step 1"):
        channel.result(channel.send(b"step 1"), bytes)
    assert time.monotonic() - start < 5
    for p in procs:
        p.kill()
    channel.close()


def test_a_failure_is_not_lost_when_the_step_already_sent_fails_too() -> None:
    channel = StepChannel(2, timeout_s=30, layout=Layout(2, **SMALL))
    procs, _ = start_ranks(channel, 2, fail_at=1)
    wait_attached(channel, 2)
    first, second = channel.send(b"one"), channel.send(b"two")  # async scheduling: both sent
    time.sleep(0.2)  # rank 1 has failed both by now, had it run the second
    for step in (first, second):
        with pytest.raises(EngineDeadError, match=r"rank 1 failed in execute_model: ValueError: rank 1 cannot run step 1"):
            channel.result(step, bytes)
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
