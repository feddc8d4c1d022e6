"""The load pipeline: merged, threaded, staged and O_DIRECT reads give the file's bytes exactly."""

from __future__ import annotations

import concurrent.futures
import errno
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from driver.config.args import EngineArgs
from parallel.errors import WeightLoadError
from parallel.state import TensorParallelGroup
from workers import load_pipeline, loader
from workers.load_pipeline import (
    ALIGN,
    AUTO_DIRECT_MIN_BYTES,
    CheckpointFile,
    HostCopier,
    LoadPipeline,
    Piece,
    StrategyChoice,
    cached_fraction,
    choose_strategy,
    merge_reads,
    supports_direct,
)
from workers.read_stats import ReadStats
from workers.safetensors_file import iter_safetensors

DIRECT = StrategyChoice("direct", "test")
PAGE_CACHE = StrategyChoice("page_cache", "test")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> tuple[Path, bytes]:
    """A file whose size is no multiple of any alignment, of random bytes."""
    path = tmp_path_factory.mktemp("pipeline") / "data.bin"
    data = os.urandom(3 * ALIGN * 5 + 1234)
    path.write_bytes(data)
    return path, data


SPANS = [
    [(0, 10)],
    [(7, 4103), (4103, 9000)],  # end to end: one read
    [(1, 2), (5000, 5001), (17, 4096 * 3 + 5)],  # scattered, out of order
    [(r * 1000 + 100, r * 1000 + 400) for r in range(40)],  # a column slice: gaps read along
    [(0, 3 * ALIGN * 5 + 1234)],  # the whole file, up to its unaligned end
    [(3 * ALIGN * 5 + 1000, 3 * ALIGN * 5 + 1234)],  # the tail only
]


def _expected(data: bytes, spans: list[tuple[int, int]]) -> torch.Tensor:
    return torch.frombuffer(bytearray(b"".join(data[a:b] for a, b in spans)), dtype=torch.uint8)


def _pipelines(**kwargs):
    for strategy in (PAGE_CACHE, DIRECT):
        for threads, chunk in ((1, None), (4, 4096 + 7)):
            yield LoadPipeline(torch.device("cpu"), threads=threads, strategy=strategy, chunk_bytes=chunk, **kwargs)


@pytest.mark.parametrize("spans", SPANS)
def test_reads_give_the_files_bytes_at_every_thread_count_and_strategy(data_file, spans) -> None:
    path, data = data_file
    file = CheckpointFile(str(path))
    for pipeline in _pipelines():
        immediate = torch.zeros(sum(b - a for a, b in spans), dtype=torch.uint8)
        deferred = torch.zeros_like(immediate)
        pipeline.read(file, spans, immediate)
        pipeline.submit(file, spans, deferred)
        stats = pipeline.finish()
        assert torch.equal(immediate, _expected(data, spans)), (pipeline.stats, spans)
        assert torch.equal(deferred, immediate)
        assert stats.bytes == 2 * immediate.numel()


def test_adjacent_pieces_merge_into_one_read_in_file_order(data_file) -> None:
    file = CheckpointFile(str(data_file[0]))
    dest = torch.zeros(100, dtype=torch.uint8)
    pieces = [
        Piece(file, 40, 10, dest, 0),
        Piece(file, 0, 20, dest, 10),
        Piece(file, 20, 20, dest, 30),
        Piece(file, 60, 5, dest, 50),
    ]
    reads = merge_reads(pieces, chunk=1000)
    assert [[(p.offset, p.length) for p in r] for r in reads] == [[(0, 20), (20, 20), (40, 10)], [(60, 5)]]
    capped = merge_reads(pieces, chunk=35)  # a read never passes the chunk size
    assert [[p.offset for p in r] for r in capped] == [[0], [20, 40], [60]]
    gapped = merge_reads(pieces, chunk=1000, max_gap=10)  # the 10 bytes at 50..60 are read along
    assert [[p.offset for p in r] for r in gapped] == [[0, 20, 40, 60]]
    split = merge_reads([Piece(file, 0, 100, dest, 0)], chunk=30)
    assert [(p.offset, p.length, p.dest_offset) for r in split for p in r] == [
        (0, 30, 0),
        (30, 30, 30),
        (60, 30, 60),
        (90, 10, 90),
    ]


class SlowCopier(HostCopier):
    """A stand-in for CUDA's asynchronous copies: each copy runs later, on another thread. A
    staging buffer handed out again before its copy ran would corrupt the destination."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = concurrent.futures.ThreadPoolExecutor(1)
        self.copies = 0

    def copy(self, pieces):
        def later():
            time.sleep(0.002)
            for src, dst in pieces:
                dst.copy_(src)
            self.copies += 1

        return self.pool.submit(later)

    def wait(self, handle) -> None:
        handle.result()

    def finish(self) -> None:
        self.pool.submit(lambda: None).result()


@pytest.mark.parametrize("strategy", [PAGE_CACHE, DIRECT])
def test_staging_buffers_are_reused_only_after_their_copies(data_file, strategy) -> None:
    path, data = data_file
    copier = SlowCopier()
    pipeline = LoadPipeline(torch.device("cpu"), threads=2, strategy=strategy, chunk_bytes=1000, copier=copier, staging_buffers=2)
    spans = [(0, len(data))]
    dest = torch.zeros(len(data), dtype=torch.uint8)
    pipeline.submit(CheckpointFile(str(path)), spans, dest)
    pipeline.finish()
    assert copier.copies == -(-len(data) // 1000)
    assert torch.equal(dest, _expected(data, spans))


@pytest.mark.parametrize("strategy", [PAGE_CACHE, DIRECT])
def test_a_file_that_shrinks_mid_load_names_the_file_and_offset(tmp_path, strategy) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(64, 64), "b": torch.randn(64, 64)}, path)
    pipeline = LoadPipeline(torch.device("cpu"), threads=2, strategy=strategy)
    sources = {s.name: s for s in iter_safetensors(str(path), ReadStats(), pipeline)}
    os.truncate(path, path.stat().st_size - 100)
    with pytest.raises(WeightLoadError, match=rf"{path.name} ends early: reading \d+ bytes at offset \d+"):
        sources["b"].read((slice(None), slice(None)))
    pipeline.close()


def test_a_vanished_file_is_named(tmp_path) -> None:
    with pytest.raises(WeightLoadError, match="cannot open checkpoint file .*gone.bin"):
        CheckpointFile(str(tmp_path / "gone.bin"))


def _refuse_direct_opens(monkeypatch) -> None:
    real_open = os.open

    def fake_open(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", fake_open)


def _refuse_direct_reads(monkeypatch) -> None:
    def fake_read(fd, buffer, offset):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(load_pipeline, "_pread_direct", fake_read)


@pytest.mark.parametrize("refuse", [_refuse_direct_opens, _refuse_direct_reads])
def test_direct_on_a_filesystem_without_it_falls_back_with_one_warning(data_file, monkeypatch, caplog, refuse) -> None:
    """Filesystems without O_DIRECT refuse it at open (older tmpfs, some FUSE) or at the first read."""
    path, data = data_file
    refuse(monkeypatch)
    pipeline = LoadPipeline(torch.device("cpu"), threads=2, strategy=DIRECT, chunk_bytes=4096)
    dest = torch.zeros(len(data), dtype=torch.uint8)
    with caplog.at_level(logging.WARNING, logger="shardlm"):
        pipeline.submit(CheckpointFile(str(path)), [(0, len(data))], dest)
        stats = pipeline.finish()
    assert torch.equal(dest, _expected(data, [(0, len(data))]))
    assert stats.direct_fallbacks == [str(path)]
    assert len([r for r in caplog.records if "O_DIRECT" in r.getMessage()]) == 1
    if refuse is _refuse_direct_opens:
        assert not supports_direct(str(path))


def test_safetensors_through_the_pipeline_equal_safe_open(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    torch.manual_seed(0)
    save_file({"f32": torch.randn(33, 47), "bf16": torch.randn(33, 47).to(torch.bfloat16), "v": torch.randn(5)}, path)
    for pipeline in _pipelines():
        sources = {s.name: s for s in iter_safetensors(str(path), ReadStats(), pipeline)}
        finals = []
        with safe_open(path, framework="pt") as f:
            for index in [(slice(None), slice(None)), (slice(3, 30), slice(None)), (slice(2, 9), slice(5, 40))]:
                for name in ("f32", "bf16"):
                    expected = f.get_slice(name)[index]
                    assert torch.equal(sources[name].read(index), expected)
                    assert torch.equal(sources[name].read(index, out=torch.empty(expected.shape)), expected.float())
                    finals.append((torch.empty_like(expected), expected))
                    sources[name].read_final(index, finals[-1][0])
            pipeline.finish()
        assert all(torch.equal(got, expected) for got, expected in finals)


def test_cached_fraction_sees_the_page_cache(tmp_path) -> None:
    path = tmp_path / "cold.bin"
    path.write_bytes(os.urandom(64 * 4096))
    with open(path, "rb") as f:
        f.read()
    assert cached_fraction(str(path)) == 1.0
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    if supports_direct(str(path)):  # a real disk filesystem drops the pages; tmpfs keeps them
        assert cached_fraction(str(path)) < 0.5


def test_auto_chooses_direct_only_for_large_cold_files_that_take_it() -> None:
    big = 4 * AUTO_DIRECT_MIN_BYTES
    assert choose_strategy("auto", cached=0.1, direct_ok=True, total_bytes=big).strategy == "direct"
    assert choose_strategy("auto", cached=0.9, direct_ok=True, total_bytes=big).strategy == "page_cache"
    assert choose_strategy("auto", cached=0.0, direct_ok=True, total_bytes=1000).strategy == "page_cache"
    assert choose_strategy("auto", cached=0.0, direct_ok=False, total_bytes=big).strategy == "page_cache"
    assert choose_strategy("direct", cached=1.0, direct_ok=True, total_bytes=0).strategy == "direct"
    fallback = choose_strategy("direct", cached=1.0, direct_ok=False, total_bytes=0)
    assert fallback.strategy == "page_cache" and "refuses O_DIRECT" in fallback.reason
    assert choose_strategy("page_cache", cached=0.0, direct_ok=True, total_bytes=big).strategy == "page_cache"
    assert "90%" in choose_strategy("auto", cached=0.9, direct_ok=True, total_bytes=big).reason
    with pytest.raises(ValueError, match="mmap"):
        choose_strategy("mmap", 1.0, True, 0)


@pytest.mark.parametrize("fmt", ["safetensors", "sharded"])
def test_models_loaded_through_the_pipeline_equal_the_plain_path_at_tp_1_2_3(tiny_checkpoint, monkeypatch, fmt) -> None:
    """Every rank's parameters, byte for byte: row slices, column slices, fused shards, vocab rows."""
    folder = tiny_checkpoint("llama_6h", fmt)[0]
    config = EngineArgs(model=str(folder), device="cpu").create_engine_config()
    settings = [(PAGE_CACHE, 1, None), (DIRECT, 3, 4096 + 64), (PAGE_CACHE, 3, 1000)]
    for tp_size in (1, 2, 3):
        for rank in range(tp_size):
            tp = TensorParallelGroup(rank=rank, size=tp_size)
            monkeypatch.setattr(loader, "make_pipeline", lambda config, device: None)
            plain = _state(loader.load_model(config, tp, torch.device("cpu"))[0])
            for strategy, threads, chunk in settings:
                monkeypatch.setattr(
                    loader,
                    "make_pipeline",
                    lambda config, device: LoadPipeline(
                        device, threads=threads, strategy=strategy, chunk_bytes=chunk, window_bytes=20_000
                    ),
                )
                model, report = loader.load_model(config, tp, torch.device("cpu"))
                piped = _state(model)
                assert piped.keys() == plain.keys()
                assert all(torch.equal(piped[k], plain[k]) for k in plain), (tp_size, rank, strategy, threads)
                assert report.load_strategy == strategy.strategy and report.load_threads == threads


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().reshape(-1).view(torch.uint8).clone() for k, v in model.named_parameters()}


def test_a_real_start_reports_its_strategy(tiny_checkpoint) -> None:
    config = EngineArgs(model=str(tiny_checkpoint("llama")[0]), device="cpu", load_threads=2).create_engine_config()
    report = loader.load_model(config, TensorParallelGroup.single(), torch.device("cpu"))[1]
    assert report.load_strategy == "page_cache" and "auto" in report.load_strategy_reason
    assert report.load_threads == 2 and 0 < report.reads < report.tensors_read


def test_the_default_gguf_model_through_the_pipeline_equals_the_plain_path(smollm2_gguf, monkeypatch) -> None:
    """SmolLM2's Q4_1/Q8_0 blocks read through the pipeline and dequantized in torch, at tp 3 (rank 1)."""
    config = EngineArgs(model=str(smollm2_gguf), device="cpu", tensor_parallel_size=3).create_engine_config()
    tp = TensorParallelGroup(rank=1, size=3)
    monkeypatch.setattr(loader, "make_pipeline", lambda config, device: None)
    plain = _state(loader.load_model(config, tp, torch.device("cpu"))[0])
    monkeypatch.setattr(loader, "make_pipeline", lambda config, device: LoadPipeline(device, threads=3, strategy=DIRECT))
    piped = _state(loader.load_model(config, tp, torch.device("cpu"))[0])
    assert piped.keys() == plain.keys() and all(torch.equal(piped[k], plain[k]) for k in plain)


def test_loading_imports_no_sympy(tiny_checkpoint) -> None:
    """torch imports sympy (half a second) for `empty_like` of meta tensors; the loader must not need it."""
    script = (
        "import sys; from driver.config.args import EngineArgs; from workers.worker import Worker; "
        f"Worker(EngineArgs(model={str(tiny_checkpoint('llama')[0])!r}, device='cpu').create_engine_config()).load_model(); "
        "print('sympy' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("strategy", [PAGE_CACHE, DIRECT])
def test_cuda_loads_through_the_pinned_ring_equal_the_plain_path(tiny_checkpoint, monkeypatch, strategy) -> None:
    folder = tiny_checkpoint("llama_6h", "sharded")[0]
    config = EngineArgs(model=str(folder), device="cuda", dtype="float32", tensor_parallel_size=2).create_engine_config()
    tp, cuda = TensorParallelGroup(rank=1, size=2), torch.device("cuda")
    monkeypatch.setattr(loader, "make_pipeline", lambda config, device: None)
    plain = _state(loader.load_model(config, tp, cuda)[0])
    monkeypatch.setattr(
        loader,
        "make_pipeline",
        lambda config, device: LoadPipeline(
            device, threads=3, strategy=strategy, chunk_bytes=4096 + 64, window_bytes=20_000, staging_buffers=2
        ),
    )
    piped = _state(loader.load_model(config, tp, cuda)[0])
    assert all(torch.equal(piped[k], plain[k]) for k in plain)
