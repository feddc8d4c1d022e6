"""The output processor (driver/engine/output_processor.py) on its own: stop strings, held-back text,
and what it tells the core (the whole engine runs in tests/e2e)."""

from __future__ import annotations

from types import SimpleNamespace

from driver.engine.core import CoreOutput, SeqDelta
from driver.engine.output_processor import CompletionState, OutputProcessor
from driver.engine.outputs import RequestMetrics
from workers.batch import SampledToken
from workers.sampling_params import SamplingParams


def test_a_stop_string_anywhere_in_a_long_new_piece_is_found() -> None:
    """One token may add many characters (a newline and 20 spaces): the search covers all it
    added, plus the stop strings' length less one before it, and nothing earlier."""
    match = OutputProcessor._match_stop_string
    seq = CompletionState(0, None, text="def f():" + "\n" + " " * 20 + "return 1")
    assert match(seq, SamplingParams(stop=["\n"]), searched=len("def f():")) == "\n"
    assert seq.text == "def f():"
    early = CompletionState(0, None, text="a\nbcdef")
    assert match(early, SamplingParams(stop=["\n"]), searched=4) is None  # ended before the new text
    across = CompletionState(0, None, text="abc END")
    assert match(across, SamplingParams(stop=["END"], include_stop_str_in_output=True), searched=len("abc EN")) == "END"
    assert across.text == "abc END"


class LetterTokenizer:
    """Token i is the letter chr(97 + i); enough for the incremental detokenizer's windowed path."""

    eos_token_id = None
    all_special_ids: list[int] = []

    def decode(self, ids: list[int], **kwargs: object) -> str:
        return "".join(chr(97 + i) for i in ids)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [chr(97 + i) for i in ids]


def step(request_id: str, token: int, index: int = 0, reason: str | None = None) -> CoreOutput:
    delta = SeqDelta(index, SampledToken(seq_id=index, token_id=token), finish_reason=reason)
    return CoreOutput(request_id, seqs=[delta], metrics=RequestMetrics(arrival_time=0.0))


def test_stop_strings_end_a_completion_and_are_reported_for_the_core() -> None:
    outputs = OutputProcessor(LetterTokenizer())
    params = SamplingParams(stop=["cd"], n=2, max_tokens=10)
    outputs.add("r", "prompt", [0], params, 0.0)
    outputs.process([step("r", 1)])
    results, hits, _ = outputs.process([step("r", 2)])
    assert hits == [] and results[0].outputs[0].text == "b"  # "bc": "c" held back, it may begin "cd"
    results, hits, _ = outputs.process([step("r", 3)])
    assert hits == [("r", 0, "cd")]
    first = results[0].outputs[0]
    assert (first.text, first.finish_reason, first.stop_reason) == ("b", "stop", "cd") and not results[0].finished
    results, hits, _ = outputs.process([step("r", 5, index=1, reason="length")])
    assert hits == [] and results[0].finished and results[0].outputs[1].text == "f"
    assert "r" not in outputs.requests


def test_a_stop_string_wins_over_length_but_not_over_a_stop_token() -> None:
    outputs = OutputProcessor(LetterTokenizer())
    outputs.add("len", None, [0], SamplingParams(stop=["b"], max_tokens=1), 0.0)
    outputs.add("eos", None, [0], SamplingParams(stop=["b"], max_tokens=5), 0.0)
    results, hits, _ = outputs.process([step("len", 1, reason="length"), step("eos", 1, reason="stop")])
    assert hits == [("len", 0, "b")]
    assert [(o.outputs[0].finish_reason, o.outputs[0].stop_reason, o.outputs[0].text) for o in results] == [
        ("stop", "b", ""),
        ("stop", None, "b"),
    ]


def test_finished_only_leaves_out_running_requests() -> None:
    outputs = OutputProcessor(None)
    outputs.add("a", None, [0], SamplingParams(max_tokens=2), 0.0)
    outputs.add("b", None, [0], SamplingParams(max_tokens=1), 0.0)
    results, _, _ = outputs.process([step("a", 1), step("b", 1, reason="length")], finished_only=True)
    assert [r.request_id for r in results] == ["b"] and results[0].metrics.finished_time is not None
    assert SimpleNamespace(ids=list(outputs.requests)).ids == ["a"]
