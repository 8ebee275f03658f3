"""The shell's known outputs (``attacks.known``): served only for images seen bit for bit, never
for a random shell, and an attack that reads its first prediction from them ends exactly as one
that pays for it, one shell prediction cheaper per point."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from helpers import small_conv, uniform_images
from manifold_tf import attacks
from manifold_tf.attacks.known import KnownOutputs, embed
from manifold_tf.evaluation.suite_batch import verified_labels
from manifold_tf.shells import MCNShell, answer

SHAPE = (8, 8, 3)


@pytest.fixture(scope="module")
def setup():
    base = small_conv(seed=1, classes=4, shape=SHAPE)
    x = uniform_images(6, SHAPE, seed=2)
    y = base(x).numpy().argmax(1).astype(np.int64)
    return base, x, y, MCNShell(base, 8.0, steps=3)


def test_only_rows_seen_bit_for_bit_are_served(setup):
    _, x, _, shell = setup
    known = KnownOutputs(shell)
    assert known.lookup(x) is None
    out, paid = embed(shell, x[:4], known)
    assert paid and len(known) == 4
    again, paid = embed(shell, x[2:4], known)
    assert not paid and known.served == 2
    for key in ("label", "probabilities", "z"):
        np.testing.assert_array_equal(again[key].numpy(), out[key].numpy()[2:4])
    moved = x[:1].copy()
    moved[0, 0, 0, 0] = np.nextafter(moved[0, 0, 0, 0], np.float32(300))
    assert known.lookup(moved) is None  # one float step away is another image
    assert known.lookup(x[3:5]) is None  # one row unknown: predict them all
    other = KnownOutputs(MCNShell(setup[0], 8.0, steps=3))
    _, paid = embed(shell, x[:1], other)  # another shell's memory is not this shell's
    assert paid and len(other) == 0


def test_a_random_shell_keeps_nothing(setup):
    base, x, _, _ = setup
    shell = MCNShell(base, 8.0, steps=3, random_start=True, seed=1)
    known = KnownOutputs(shell)
    known.add(x, shell.embed_function(tf.constant(x)))
    assert len(known) == 0 and known.lookup(x) is None


@pytest.mark.parametrize("attack", ["bpda_restarts", "bpda_targeted", "lift"])
def test_an_attack_reading_its_start_ends_as_one_that_predicts_it(setup, attack):
    _, x, y, shell = setup
    x_init = np.clip(x + 3.0 * np.sign(uniform_images(6, SHAPE, seed=9) - 127.5), 0, 255)
    x_init = x_init.astype(np.float32)
    known = KnownOutputs(shell)
    for images in (x, x_init):
        known.add(images, shell.embed_function(tf.constant(images)))

    def run(memory):
        if attack == "lift":
            return attacks.lift(
                shell,
                x,
                y,
                epsilon=4.0,
                settings=attacks.LiftSettings(num_targets=2, steps=2),
                known=memory,
            )
        fn = getattr(attacks, attack)
        settings = attacks.BPDASettings(steps=3, schedule="apgd")
        if attack == "bpda_targeted":
            settings = attacks.BPDASettings(steps=3, schedule="apgd", num_targets=2, from_x=False)
        return fn(shell, x, y, epsilon=4.0, settings=settings, x_init=x_init, seed=3, known=memory)

    paid, read = run(None), run(known)
    # Every point is the same; the first prediction of each run (and the ranking) was not paid.
    for name in ("x_adv", "success", "base_passes", "score"):
        np.testing.assert_array_equal(getattr(read, name), getattr(paid, name), err_msg=name)
    assert (read.shell_predictions <= paid.shell_predictions).all()
    assert read.shell_predictions.sum() < paid.shell_predictions.sum()
    assert known.served > 0
    # The memory now holds every image the first run asked the shell about: a second run is the
    # same run, and pays no shell prediction at all.
    again = run(known)
    for name in ("x_adv", "success", "base_passes", "score"):
        np.testing.assert_array_equal(getattr(again, name), getattr(read, name), err_msg=name)
    assert again.shell_predictions.sum() == 0


def test_labels_are_the_shells_answer_where_known_and_minus_one_elsewhere(setup):
    _, x, _, shell = setup
    known = KnownOutputs(shell)
    out = shell.embed_function(tf.constant(x[:3]))
    known.add(x[:3], out)
    got = known.labels(x[1:5])
    np.testing.assert_array_equal(got[:2], answer(out)[1:3])
    assert (got[2:] == -1).all()


def test_the_verdict_counts_a_success_only_from_a_fresh_prediction(setup):
    """verified_labels: a row known right is served, a row unknown or known wrong is predicted."""
    _, x, _, shell = setup
    truth = answer(shell.embed_function(tf.constant(x[:3])))
    y = truth.copy()  # the shell is right on all three rows
    known = KnownOutputs(shell)
    known.add(x[:1], shell.embed_function(tf.constant(x[:1])))  # row 0: known right
    # Row 1 known *wrong* (another image's output filed under its bytes): predicted again.
    wrong = np.flatnonzero(truth != truth[1])
    if not wrong.size:
        pytest.skip("the shell answers one label on these rows")
    known.add(x[1:2], shell.embed_function(tf.constant(x[wrong[:1]])))
    got, fresh = verified_labels(shell, x[:3], y, known)
    np.testing.assert_array_equal(fresh, [False, True, True])
    np.testing.assert_array_equal(got, truth)  # the fresh prediction decides row 1: right
