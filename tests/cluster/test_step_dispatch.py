"""Steps through a Ray Compiled Graph and through plain actor calls give the same tokens, at one
and two ranks; a rank that fails or dies mid-step is named either way (tests/cluster/
test_engine_lifecycle.py kills one under the default, the compiled graph)."""

from __future__ import annotations

from cluster.worker_group import COMPILED_GRAPH_ENV, compiled_graph_wanted
from driver import LLM, SamplingParams

SMALL = dict(max_num_batched_tokens=256, kv_cache_memory_bytes=4 * 2**20, device="cpu", skip_tokenizer_init=True)
PROMPTS = [[1, 2, 3], [7, 8, 9, 10, 11], [5] * 20]


def tokens(llm: LLM) -> list[list[int]]:
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, seed=11, ignore_eos=True)
    outs = llm.generate(PROMPTS, greedy, use_tqdm=False) + llm.generate(PROMPTS, seeded, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_compiled_graph_and_plain_calls_give_the_same_tokens(ray_cluster, tiny_checkpoint, monkeypatch) -> None:
    folder, _ = tiny_checkpoint("llama_8h4kv")
    runs = {}
    for tp, compiled in ((1, "0"), (1, "1"), (2, "1")):
        monkeypatch.setenv(COMPILED_GRAPH_ENV, compiled)
        with LLM(str(folder), tensor_parallel_size=tp, **SMALL) as llm:
            assert llm.load_report.step_dispatch == ("compiled graph" if compiled == "1" else "plain calls")
            runs[tp, compiled] = tokens(llm)
    assert runs[1, "0"] == runs[1, "1"] == runs[2, "1"]


def test_the_default_dispatch(monkeypatch) -> None:
    monkeypatch.delenv(COMPILED_GRAPH_ENV, raising=False)
    assert compiled_graph_wanted("cpu")[0] is True
    assert compiled_graph_wanted("cuda")[0] is False  # until it has run on a GPU
    monkeypatch.setenv(COMPILED_GRAPH_ENV, "1")
    assert compiled_graph_wanted("cuda") == (True, f"{COMPILED_GRAPH_ENV}=1")


def test_rank_errors_carry_no_colour_codes() -> None:
    from cluster.worker_group import worker_error

    error = worker_error(1, "load_model", ValueError("\x1b[36mray::WorkerActor.execute()\x1b[39m failed"))
    assert str(error).startswith("rank 1 failed in load_model: ValueError: ray::WorkerActor.execute() failed")
    assert "\x1b" not in str(error)
