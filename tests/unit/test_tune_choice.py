"""``svd-vllm tune``'s decisions, on made-up sweeps: when a scale may be applied, and when the
first-token score cannot be trusted (the server returned unsteered logprobs)."""

from __future__ import annotations

import pytest

from svd_vllm.offline.tasks import Item
from svd_vllm.tools.tune import Point, _score_first_tokens, _summarise, choose


def sweep(per_scale: dict[float, list[float]]) -> list[Point]:
    points = [
        Point(s, None, [str(c) for c in correct], correct) for s, correct in per_scale.items()
    ]
    _summarise(points)
    return points


def test_a_clear_win_is_applied_and_a_tie_or_loss_is_not() -> None:
    n = 60
    plain = [0.0] * n
    better = [1.0] * 15 + [0.0] * (n - 15)  # +25 points on a quarter of the items
    chosen = choose(sweep({0.0: plain, 1.0: better, 2.0: plain}))
    assert chosen["apply"] and chosen["scale"] == 1.0 and chosen["lo"] > 0
    noisy = [1.0, 0.0] + [0.0] * (n - 2)  # one item better: the CI includes 0
    chosen = choose(sweep({0.0: plain, 1.0: noisy}))
    assert not chosen["apply"] and "includes 0" in chosen["reason"]
    worse = choose(sweep({0.0: better, 1.0: plain, -0.5: plain}))
    assert not worse["apply"] and "no scale beats the plain adapter" in worse["reason"]
    assert not choose(sweep({0.0: plain}))["apply"]


def test_ties_prefer_the_smaller_scale() -> None:
    better = [1.0] * 20 + [0.0] * 20
    chosen = choose(sweep({0.0: [0.0] * 40, 2.0: better, 0.5: better, -1.0: better}))
    assert chosen["scale"] == 0.5


def test_the_answers_a_scale_changed_are_counted_against_scale_0() -> None:
    points = [
        Point(0.0, None, ["a", "b", "c"], [1.0, 0.0, 0.0]),
        Point(1.0, None, ["a", "x", "y"], [1.0, 0.0, 0.0]),
    ]
    _summarise(points)
    assert points[1].changed == 2 and points[1].vs_adapter["diff"] == 0.0


def _items(n: int) -> list[Item]:
    opts = [{"text": " a", "correct": True}, {"text": " b", "correct": False}]
    return [Item(str(i), "t", "q", " a", opts) for i in range(n)]


def test_unsteered_logprobs_are_detected_and_left_out() -> None:
    points = [Point(0.0, None, ["a"], [1.0]), Point(2.0, None, ["b"], [0.0])]
    same = [[[-0.1, -2.0]], [[-0.1, -2.0]]]  # the server ignored steering: raw logprobs
    note = _score_first_tokens(points, same, _items(1))
    assert "raw logprobs" in note and all(p.first_token is None for p in points)
    moved = [[[-0.1, -2.0]], [[-3.0, -0.2]]]
    note = _score_first_tokens(points, moved, _items(1))
    assert "processed_logprobs" in note
    assert points[0].first_token == [1.0] and points[1].first_token == [0.0]
    missing = [[None], [[-3.0, -0.2]]]
    assert "does not return" in _score_first_tokens(points, missing, _items(1))


@pytest.mark.parametrize("scales", [(1.0, 2.0), (0.0, float("nan"))])
def test_run_tune_refuses_bad_sweeps_before_any_request(scales: tuple[float, ...]) -> None:
    from svd_vllm.tools.tune import TuneError, run_tune

    if any(s != s for s in scales):
        with pytest.raises(TuneError, match="finite"):
            run_tune("http://127.0.0.1:9", "a", "a", _items(1), scales=scales)
    else:
        with pytest.raises(TuneError, match="not reachable"):  # 0 is added, then the stack
            run_tune("http://127.0.0.1:9", "a", "a", _items(1), scales=scales, progress=False)
    with pytest.raises(TuneError, match="empty"):
        run_tune("http://127.0.0.1:9", "a", "a", [], scales=scales)
