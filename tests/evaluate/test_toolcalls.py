"""Tool-call scores: parsing generated calls and comparing them with the reference calls."""

from __future__ import annotations

import pytest

from ftpipe.evaluate.evaluate import answer_text, per_source_scores
from ftpipe.evaluate.toolcalls import parse_tool_calls, score_tool_calls

pytestmark = pytest.mark.timeout(30)
REF = [{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]


@pytest.mark.parametrize(
    ("text", "calls", "ok"),
    [
        (
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>',
            REF,
            True,
        ),
        (
            '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\", \\"days\\": 2.0}"}',
            REF,
            True,
        ),
        ('{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}', REF, True),  # Llama 3.1 style
        (
            '[{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]',
            REF,
            True,
        ),
        (
            "<think>\nweather tool\n</think>\n\n<tool_call>\n"
            + '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>',
            REF,
            True,
        ),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>', [], False),
        ("It is sunny in Paris.", [], False),
        ('<tool_call>{"arguments": {}}</tool_call>', [], False),
    ],
)
def test_parse_tool_calls(text, calls, ok):
    parsed, valid = parse_tool_calls(text)
    assert valid == ok
    assert [(c["name"], c["arguments"]) for c in parsed] == [
        (c["name"], {"city": "Paris", "days": 2}) for c in calls
    ]


def test_scores_count_only_tool_call_references_and_need_equal_json():
    predictions = [
        '<tool_call>{"name": "get_weather", "arguments": {"days": 2, "city": "Paris"}}</tool_call>',  # exact
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Lyon", "days": 2}}</tool_call>',  # name only
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>',  # parses, wrong function
        "no call at all",
        "a plain answer",  # reference is text: not scored
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": true}}</tool_call>',  # true != 2
    ]
    references = [
        REF,
        REF,
        REF,
        REF,
        None,
        [{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}],
    ]
    scores = score_tool_calls(predictions, references)
    assert scores["num_samples"] == 5 and scores["indices"] == [0, 1, 2, 3, 5]
    assert scores["per_sample"]["tool_call_parsed"] == [1, 1, 1, 0, 1]
    assert scores["per_sample"]["tool_call_name"] == [1, 1, 0, 0, 1]
    assert scores["per_sample"]["tool_call_exact"] == [1, 0, 0, 0, 0]
    assert scores["mean"]["tool_call_exact"] == pytest.approx(0.2)


def test_parallel_calls_match_in_any_order_and_count_matters():
    ref = [{"name": "f", "arguments": {"x": 1}}, {"name": "f", "arguments": {"x": 2}}]
    both = '<tool_call>{"name": "f", "arguments": {"x": 2}}</tool_call>\n<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'
    one = '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'
    scores = score_tool_calls([both, one], [ref, ref])
    assert scores["per_sample"]["tool_call_exact"] == [1, 0]
    assert scores["per_sample"]["tool_call_name"] == [1, 0]


def test_answers_are_compared_without_their_trace_and_scores_split_by_source():
    assert answer_text("<think>\nhmm\n</think>\n\nParis.") == "Paris."
    assert answer_text("<think>never closed") == ""
    assert answer_text("Paris.") == "Paris."
    call = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    assert answer_text(f"Checking.\n{call}") == 'Checking.\n{"name": "f", "arguments": {"x": 1}}'
    assert answer_text(call) == '{"name": "f", "arguments": {"x": 1}}'  # what reference_output writes
    per = per_source_scores(
        ["a", "b", "a"], {"exact_match": [1.0, 0.0, 0.0], "tool_call_exact": [None, 1.0, None]}
    )
    assert per == {
        "a": {"num_samples": 2, "exact_match": 0.5},
        "b": {"num_samples": 1, "exact_match": 0.0, "tool_call_exact": 1.0},
    }
