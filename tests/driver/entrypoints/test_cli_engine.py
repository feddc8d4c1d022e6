"""The `shardlm` commands against one shared engine: start-up progress bars, prompts from a file
and stdin, chat (one-shot, a conversation, Ctrl-C), quiet output, and the actors' log prefixes."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from safetensors import safe_open

from driver.entrypoints import cli
from driver.entrypoints.cli import main
from driver.entrypoints.llm import LLM
from tests.helpers import greedy_ids, with_byte_tokenizer
from workers.sampling_params import SamplingParams

TP = 2
SMALL = dict(max_num_batched_tokens=256, kv_cache_memory_bytes=4 * 2**20, device="cpu")
GREEDY_FLAGS = ["--temperature", "0", "--max-tokens", "5"]


@pytest.fixture(scope="module")
def engine(ray_cluster, tiny_checkpoint, tmp_path_factory):
    """(the LLM, the transformers model, what its start drew on stderr): one start, progress bars on."""
    checkpoint, hf = tiny_checkpoint("llama")
    folder = with_byte_tokenizer(checkpoint, tmp_path_factory.mktemp("tiny-text") / "model")
    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(stderr):
        mp.delenv("TQDM_DISABLE", raising=False)
        llm = LLM(str(folder), tensor_parallel_size=TP, show_progress=True, **SMALL)
    yield llm, hf, stderr.getvalue()
    llm.shutdown()


@pytest.fixture
def shared(engine, monkeypatch):
    """The commands use the shared engine (leaving it running) and may draw bars."""
    monkeypatch.setattr(cli, "open_llm", lambda ns: contextlib.nullcontext(engine[0]))
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    return engine


def test_start_draws_a_bar_per_phase_with_every_rank_counted(engine) -> None:
    llm, _, drawn = engine
    with safe_open(str(Path(llm.config.model.path) / "model.safetensors"), "pt") as f:
        per_rank = len(list(f.keys()))
    final = drawn.replace("\r", "\n").splitlines()
    weights = [line for line in final if line.startswith("Loading weights: 100%")]
    assert weights and f"{TP * per_rank}/{TP * per_rank} tensors" in weights[-1]
    assert all(f"rank {r} {per_rank}/{per_rank}" in weights[-1] for r in range(TP)) and "MiB read" in weights[-1]
    for desc in ("Profiling memory", "Allocating KV cache"):
        assert any(line.startswith(f"{desc}: 100%") and f"{TP}/{TP} ranks" in line for line in final), drawn


def test_generate_takes_prompts_from_a_file_and_stdin(shared, tmp_path, monkeypatch, capsys) -> None:
    llm, hf, _ = shared
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text('{"prompt": "Hello"}\n\n"Once upon"\n')
    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin\n"))
    assert main(["generate", "--json", *GREEDY_FLAGS, "first", "-", "--prompts-file", str(prompts_file)]) == 0
    captured = capsys.readouterr()
    outputs = json.loads(captured.out)["outputs"]
    assert [o["prompt"] for o in outputs] == ["first", "from stdin", "Hello", "Once upon"]
    tokenizer = llm.get_tokenizer()
    for out in outputs:
        expected = greedy_ids(hf, tokenizer(out["prompt"])["input_ids"], 5)
        assert out["token_ids"] == expected[: len(out["token_ids"])] and out["token_ids"]
    assert "Processed prompts: 100%" in captured.err and "output:" in captured.err


def test_quiet_prints_completions_only(shared, monkeypatch, capsys) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("piped prompt\n"))
    monkeypatch.setattr(cli, "stdin_is_piped", lambda: True)
    assert main(["generate", "--quiet", *GREEDY_FLAGS]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("'piped prompt' -> ") and len(captured.out.splitlines()) == 1
    assert captured.err == ""


def test_chat_one_shot_and_a_conversation_keep_the_history(shared, monkeypatch, capsys) -> None:
    llm, _, _ = shared
    params = SamplingParams(temperature=0, max_tokens=5)

    def reply(messages: list[dict]) -> str:
        return llm.chat(messages, params, use_tqdm=False)[0].outputs[0].text

    system = {"role": "system", "content": "Be brief."}
    assert main(["chat", "--quiet", *GREEDY_FLAGS, "--system", "Be brief.", "--message", "Hi"]) == 0
    assert capsys.readouterr().out == reply([system, {"role": "user", "content": "Hi"}]) + "\n"

    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n\nAnd then?\n/exit\nnever read\n"))
    assert main(["chat", "--quiet", *GREEDY_FLAGS]) == 0
    history = [{"role": "user", "content": "Hello"}]
    first = reply(history)
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    assert capsys.readouterr().out == f"{first}\n{reply(history)}\n"


class _InterruptedStdout(io.StringIO):
    """Ctrl-C arrives while the first piece of the reply is printed."""

    interrupted = False

    def write(self, text: str) -> int:
        if not self.interrupted:
            self.interrupted = True
            raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_ends_a_chat_cleanly_and_aborts_its_reply(shared, monkeypatch) -> None:
    llm, _, _ = shared
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nnever read\n"))
    monkeypatch.setattr("sys.stdout", _InterruptedStdout())
    assert main(["chat", "--quiet", "--temperature", "0", "--max-tokens", "50"]) == 0
    stats = llm.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0


def test_actor_log_lines_name_the_engine_and_each_rank(engine) -> None:
    import ray

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    names = set()
    for path in logs.glob("worker-*"):
        names.update(line.strip() for line in path.read_text(errors="replace").splitlines() if line.startswith(":actor_name:"))
    assert {":actor_name:shardlm-engine", *(f":actor_name:shardlm-rank{r}" for r in range(TP))} <= names
