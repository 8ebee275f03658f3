"""``run_standing``: the "attack only the points still standing, first success wins" runner.

Hand-made numpy steps, no model: each step records the ``(x, y, idx)`` it was given and answers
from per-point tables indexed by ``idx`` (the points' indices in the whole batch).
"""

from __future__ import annotations

import numpy as np
import pytest

from manifold_tf.attacks import AttackResult, Step, Suite, run_standing
from manifold_tf.attacks.runner import targets_by_restarts, top_wrong_labels

N = 6
SHAPE = (2, 2, 1)


def images(n: int = N) -> np.ndarray:
    """``[n, 2, 2, 1]`` float32 pixels, point ``i`` filled with ``10 i``."""
    return np.repeat(10.0 * np.arange(n, dtype=np.float32), 4).reshape((n,) + SHAPE)


def labels(n: int = N) -> np.ndarray:
    return np.arange(n) % 3


class FakeStep:
    """A step that moves every point it sees by ``shift`` pixels and reports, per point of the whole
    batch, ``success``, ``score``, its costs and ``details`` (tables of ``N`` rows read at ``idx``).

    ``calls`` records ``(x, y, idx)`` of every call.
    """

    def __init__(
        self,
        name,
        shift,
        success=False,
        score=0.0,
        base_passes=0,
        shell_predictions=0,
        details=None,
        rows=None,
    ):
        self.name, self.shift = name, float(shift)
        self.table = dict(
            success=np.broadcast_to(np.asarray(success, bool), (N,)),
            score=np.broadcast_to(np.asarray(score, np.float32), (N,)),
            base_passes=np.broadcast_to(np.asarray(base_passes), (N,)),
            shell_predictions=np.broadcast_to(np.asarray(shell_predictions), (N,)),
        )
        self.details = details or {}
        self.rows = rows  # a wrong number of rows to return, to test the check
        self.calls = []

    def __call__(self, x, y, idx):
        self.calls.append((x.copy(), np.array(y), np.array(idx)))
        take = idx if self.rows is None else np.resize(idx, self.rows)
        return AttackResult(
            x[: len(take)] + self.shift
            if self.rows is None
            else np.zeros((len(take),) + SHAPE, np.float32),
            self.table["success"][take],
            self.table["base_passes"][take],
            self.table["shell_predictions"][take],
            self.table["score"][take],
            {k: np.asarray(v)[take] for k, v in self.details.items()},
        )

    @property
    def step(self) -> Step:
        return Step(self.name, self)


def run(fakes, x=None, y=None, **kwargs) -> Suite:
    x = images() if x is None else x
    y = labels(len(x)) if y is None else y
    return run_standing([f.step for f in fakes], x, y, **kwargs)


def mask(*points) -> np.ndarray:
    m = np.zeros(N, bool)
    m[list(points)] = True
    return m


# ------------------------------------------------------------------------------------------------


def test_the_first_success_wins_and_later_steps_see_only_the_points_standing():
    x = images()
    a = FakeStep("a", 1.0, success=mask(0, 3))
    b = FakeStep("b", 2.0, success=mask(1, 3, 4))  # 3 is already broken by "a"
    c = FakeStep("c", 3.0, success=True)
    suite = run([a, b, c], x)
    res = suite.result
    # Each step once, on the points standing, with their own x, y and indices in the batch.
    assert len(a.calls) == len(b.calls) == len(c.calls) == 1
    for fake, seen in ((a, [0, 1, 2, 3, 4, 5]), (b, [1, 2, 4, 5]), (c, [2, 5])):
        xs, ys, idx = fake.calls[0]
        np.testing.assert_array_equal(idx, seen)
        np.testing.assert_array_equal(xs, x[seen])  # the clean points, not an earlier x_adv
        np.testing.assert_array_equal(ys, labels()[seen])
    np.testing.assert_array_equal(suite.broken_by, ["a", "b", "c", "a", "b", "c"])
    assert not suite.standing.any() and res.success.all()
    # A broken point keeps the x_adv of the step that broke it.
    np.testing.assert_array_equal(
        res.x_adv, x + np.array([1, 2, 3, 1, 2, 3], np.float32).reshape(-1, 1, 1, 1)
    )
    np.testing.assert_array_equal(res.details["run"], [0, 1, 2, 0, 1, 2])
    assert suite.attempted == {"a": 6, "b": 4, "c": 2}
    assert set(suite.seconds) == {"a", "b", "c"} and all(s >= 0 for s in suite.seconds.values())
    np.testing.assert_array_equal(x, images())  # the caller's x is not written to


def test_a_step_with_no_point_left_is_not_called():
    a = FakeStep("a", 1.0, success=True)
    b = FakeStep("b", 2.0, success=True)
    suite = run([a, b])
    assert b.calls == [] and suite.attempted == {"a": N, "b": 0} and suite.seconds["b"] == 0.0
    np.testing.assert_array_equal(suite.result.details["run"], 0)


def test_failures_keep_the_highest_score_the_first_step_on_ties():
    x = images()
    a = FakeStep("a", 1.0, score=[0.0, 5.0, 1.0, 1.0, -np.inf, 2.0])
    b = FakeStep("b", 2.0, score=[1.0, 4.0, 1.0, 3.0, -np.inf, 2.0])
    c = FakeStep("c", 3.0, score=[0.5, 4.5, 1.0, 9.0, -np.inf, 2.5])
    suite = run([a, b, c], x)
    res = suite.result
    keep = np.array([1, 0, 0, 2, 0, 2])  # the step whose x_adv each point keeps
    np.testing.assert_array_equal(res.details["run"], keep)
    np.testing.assert_array_equal(
        res.x_adv, x + (keep + 1.0).astype(np.float32).reshape(-1, 1, 1, 1)
    )
    np.testing.assert_array_equal(res.score, [1.0, 5.0, 1.0, 9.0, -np.inf, 2.5])
    assert not res.success.any() and suite.standing.all()
    np.testing.assert_array_equal(suite.broken_by, "")
    assert suite.attempted == {"a": N, "b": N, "c": N}


def test_a_success_replaces_a_failure_with_a_higher_score():
    a = FakeStep("a", 1.0, score=10.0)
    b = FakeStep("b", 2.0, success=mask(0), score=-10.0)
    res = run([a, b]).result
    np.testing.assert_array_equal(res.details["run"], [1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(res.score, [-10.0] + [10.0] * 5)
    np.testing.assert_array_equal(res.success, mask(0))


def test_costs_add_up_over_the_steps_each_point_took_part_in():
    a = FakeStep("a", 1.0, success=mask(0, 1), base_passes=[3, 3, 3, 3, 3, 0], shell_predictions=1)
    b = FakeStep("b", 2.0, success=mask(2), base_passes=5, shell_predictions=[0, 0, 2, 2, 2, 2])
    c = FakeStep("c", 3.0, base_passes=7)
    res = run([a, b, c]).result
    np.testing.assert_array_equal(res.base_passes, [3, 3, 8, 15, 15, 12])
    np.testing.assert_array_equal(res.shell_predictions, [1, 1, 3, 3, 3, 3])
    assert res.base_passes.dtype == np.int64 and res.shell_predictions.dtype == np.int64
    assert res.cost == {"base_passes": 56, "shell_predictions": 14}


def test_verify_overrides_the_success_each_step_reports():
    x = images()
    checked = []

    def verify(x_adv, idx):  # a fresh "prediction": points with an even index are broken
        checked.append((x_adv.copy(), np.array(idx)))
        return idx % 2 == 0

    a = FakeStep("a", 1.0, success=mask(1, 2), score=1.0)  # 1: a false success; 2: a true one
    b = FakeStep("b", 2.0, success=False, score=0.0)  # 0 and 4: missed by the step, not by verify
    suite = run([a, b], x, verify=verify)
    res = suite.result
    np.testing.assert_array_equal(checked[0][1], np.arange(N))
    np.testing.assert_array_equal(checked[0][0], x + 1.0)  # verify sees the step's x_adv
    np.testing.assert_array_equal(checked[1][1], [1, 3, 5])
    np.testing.assert_array_equal(checked[1][0], x[[1, 3, 5]] + 2.0)
    np.testing.assert_array_equal(suite.broken_by, ["a", "", "a", "", "a", ""])
    np.testing.assert_array_equal(res.success, mask(0, 2, 4))
    # Point 1 was not broken: it keeps the higher-scoring failure (a's), not "a success".
    np.testing.assert_array_equal(res.details["run"], [0, 0, 0, 0, 0, 0])


def test_a_verified_success_wins_over_a_higher_score():
    a = FakeStep("a", 1.0, success=True, score=5.0)
    b = FakeStep("b", 2.0, success=False, score=-5.0)
    calls = iter([np.zeros(N, bool), mask(0, 1, 2, 3, 4, 5)])
    res = run([a, b], verify=lambda x_adv, idx: next(calls)[idx]).result
    np.testing.assert_array_equal(res.details["run"], 1)  # b broke every point, at a lower score
    assert res.success.all()


def test_points_broken_before_the_first_step_bool():
    x = images()
    before = mask(1, 4)
    a = FakeStep("a", 1.0, success=mask(0), base_passes=2, shell_predictions=1)
    suite = run([a], x, broken=before)
    res = suite.result
    np.testing.assert_array_equal(a.calls[0][2], [0, 2, 3, 5])
    np.testing.assert_array_equal(suite.broken_by, ["a", "clean", "", "", "clean", ""])
    np.testing.assert_array_equal(res.success, mask(0, 1, 4))
    # Not attacked: x itself, at no cost, by no step.
    np.testing.assert_array_equal(res.x_adv[before], x[before])
    np.testing.assert_array_equal(res.base_passes, [2, 0, 2, 2, 0, 2])
    np.testing.assert_array_equal(res.shell_predictions, [1, 0, 1, 1, 0, 1])
    np.testing.assert_array_equal(res.details["run"], [0, -1, 0, 0, -1, 0])
    assert res.score[before].tolist() == [-np.inf, -np.inf]
    assert suite.attempted == {"a": 4}
    np.testing.assert_array_equal(suite.standing, mask(2, 3, 5))


def test_points_broken_before_the_first_step_by_name():
    broken = np.array(["", "pgd", "", "", "", "fab"])
    a = FakeStep("a", 1.0, success=mask(2))
    suite = run([a], broken=broken)
    np.testing.assert_array_equal(a.calls[0][2], [0, 2, 3, 4])
    np.testing.assert_array_equal(suite.broken_by, ["", "pgd", "a", "", "", "fab"])
    np.testing.assert_array_equal(suite.result.success, mask(1, 2, 5))
    np.testing.assert_array_equal(suite.result.details["run"], [0, -1, 0, 0, 0, -1])
    # Everything broken before: no step runs, the result is x at no cost.
    everything = run([FakeStep("z", 1.0)], broken=np.ones(N, bool))
    np.testing.assert_array_equal(everything.result.x_adv, images())
    assert everything.result.success.all() and everything.result.cost == {
        "base_passes": 0,
        "shell_predictions": 0,
    }
    assert everything.attempted == {"z": 0}


def test_details_are_merged_per_point_where_every_step_reports_them():
    target_a = np.array([10, 11, 12, 13, 14, 15], np.int32)
    target_b = np.array([20, 21, 22, 23, 24, 25], np.int32)
    a = FakeStep(
        "a",
        1.0,
        success=mask(0),
        score=[0, 0, 5, 0, 0, 0],
        details=dict(target=target_a, only_a=np.ones(N), vec=np.ones((N, 2))),
    )
    b = FakeStep(
        "b",
        2.0,
        success=mask(1),
        score=1.0,
        details=dict(target=target_b, only_b=np.ones(N), vec=2 * np.ones((N, 2))),
    )
    res = run([a, b]).result
    # Each point: the detail of the step whose x_adv it keeps (point 2 keeps a's failure).
    np.testing.assert_array_equal(res.details["run"], [0, 1, 0, 1, 1, 1])
    np.testing.assert_array_equal(res.details["target"], [10, 21, 12, 23, 24, 25])
    np.testing.assert_array_equal(res.details["vec"], [[1, 1], [2, 2], [1, 1]] + [[2, 2]] * 3)
    assert res.details["target"].dtype == np.int32 and res.details["vec"].shape == (N, 2)
    # A detail only some steps report cannot be merged: it is left out.
    assert set(res.details) == {"target", "vec", "run"}
    assert res.details["run"].dtype == np.int32


def test_details_of_a_step_that_ran_on_no_point_do_not_matter():
    a = FakeStep("a", 1.0, success=True, details=dict(target=np.full(N, 7)))
    b = FakeStep("b", 2.0, details=dict(other=np.zeros(N)))  # runs on nothing
    res = run([a, b]).result
    assert set(res.details) == {"target", "run"}
    np.testing.assert_array_equal(res.details["target"], 7)


def test_on_step_reports_each_step():
    seen = []
    a = FakeStep("a", 1.0, success=mask(0, 1))
    b = FakeStep("b", 2.0, success=mask(5))
    run([a, b], on_step=lambda *args: seen.append(args))
    assert [s[:3] for s in seen] == [("a", 6, 2), ("b", 4, 1)]
    assert all(isinstance(s[3], float) and s[3] >= 0 for s in seen)


@pytest.mark.parametrize("rows", [0, 5, 7])
def test_a_step_returning_the_wrong_number_of_rows_raises(rows):
    bad = FakeStep("bad", 1.0, rows=rows)
    with pytest.raises(ValueError, match=rf"'bad' returned {rows} rows for 6 points"):
        run([bad])


def test_an_empty_batch_runs_no_step():
    a = FakeStep("a", 1.0)
    suite = run([a], images(0), labels(0))
    assert a.calls == [] and suite.attempted == {"a": 0}
    res = suite.result
    assert len(res) == 0 and res.x_adv.shape == (0,) + SHAPE and res.success.shape == (0,)
    assert res.details["run"].shape == (0,) and suite.broken_by.shape == (0,)
    assert res.cost == {"base_passes": 0, "shell_predictions": 0}


def test_no_steps_returns_x_standing():
    suite = run([])
    np.testing.assert_array_equal(suite.result.x_adv, images())
    assert suite.standing.all() and not suite.result.success.any()
    np.testing.assert_array_equal(suite.result.details["run"], -1)


def test_top_wrong_labels_and_the_order_of_targeted_runs():
    logits = np.array([[0.0, 3.0, 1.0, 2.0], [5.0, 5.0, 0.0, 1.0]])
    # Point 0 (label 1): 3, 2, 0 by score; point 1 (label 0): the tie 5 = 5 gives label 1 first.
    np.testing.assert_array_equal(top_wrong_labels(logits, np.array([1, 0]), 2), [[3, 2], [1, 3]])
    made = targets_by_restarts(lambda j, r, run: Step(f"{j}{r}{run}", None), 2, 3)
    assert [s.name for s in made] == ["000", "011", "022", "103", "114", "125"]
