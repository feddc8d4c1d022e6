"""The engine loop's stop-string search, on its own (the whole loop runs in tests/e2e)."""

from __future__ import annotations

from types import SimpleNamespace

from driver.engine_loop import EngineLoop
from workers.sampling_params import SamplingParams


def sequence(text: str, stop: list[str], include: bool = False) -> SimpleNamespace:
    params = SamplingParams(stop=stop, include_stop_str_in_output=include)
    return SimpleNamespace(text=text, request=SimpleNamespace(params=params))


def test_a_stop_string_anywhere_in_a_long_new_piece_is_found() -> None:
    """One token may add many characters (a newline and 20 spaces): the search covers all it
    added, plus the stop strings' length less one before it, and nothing earlier."""
    seq = sequence("def f():" + "\n" + " " * 20 + "return 1", stop=["\n"])
    assert EngineLoop._match_stop_string(None, seq, searched=len("def f():")) == "\n"
    assert seq.text == "def f():"
    early = sequence("a\nbcdef", stop=["\n"])
    assert EngineLoop._match_stop_string(None, early, searched=4) is None  # ended before the new text
    across = sequence("abc END", stop=["END"], include=True)
    assert EngineLoop._match_stop_string(None, across, searched=len("abc EN")) == "END"  # began before it
    assert across.text == "abc END"
