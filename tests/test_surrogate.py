"""Tests of the attacker's cheaper copy of a shell (``FactorShell.proxy``, issue 22's surrogate)
and of BPDA through it: the default is the shell itself, the label-restricted search agrees with
the full one label by label (rows are independent), a success is never the proxy's word alone,
and the costs add up."""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import pytest

from helpers import assert_results_equal, linear_model, small_conv, uniform_images
from manifold_tf import attacks
from manifold_tf.attacks.surrogate import proxy_slots, rank_labels
from manifold_tf.evaluation import adaptive_suites, estimate
from manifold_tf.evaluation.adaptive_config import SHELL_ATTACKS
from manifold_tf.evaluation.config import AdaptiveConfig
from manifold_tf.shells import (
    AntiAdversaryShell,
    CarliniWagnerShell,
    FactorShell,
    HedgeShell,
    MCNShell,
    NCNShell,
)

bpda_module = importlib.import_module("manifold_tf.attacks.bpda")
SHAPE = (8, 8, 3)
C = 5


@pytest.fixture(scope="module")
def setup():
    base = small_conv(classes=C)
    x = uniform_images(6, SHAPE, seed=3)
    mcn = MCNShell(base, 4.0, steps=4)
    ncn = NCNShell(base, 0.6, delta_max=4.0, steps=3, rounds=2)
    return base, x, mcn, ncn


class Declares(FactorShell):
    """A shell that declares nothing but what it must: the base at ``x``."""

    def _embed_graph(self, x):
        return self._at_point(x)

    def passes_per_prediction(self):
        return 0

    @property
    def search_radius(self):
        return 0.0


def test_a_shell_that_declares_nothing_is_its_own_proxy(setup):
    base, _, mcn, ncn = setup
    bare = Declares(base)
    assert bare.proxy() is bare and bare.proxy(steps=1, labels=1) is bare
    assert bare.proxy_labels is None
    # Asking for no change gives the shell itself; every wrong label is no restriction.
    for shell in (mcn, ncn):
        assert shell.proxy() is shell
        assert shell.proxy(steps=shell.steps, labels=C - 1) is shell
    # A real copy is cached (compiled once) and reports its own cost.
    p = mcn.proxy(steps=2, labels=2)
    assert p is mcn.proxy(steps=2, labels=2) and p is not mcn
    assert (p.steps, p.proxy_labels, p.passes_per_prediction()) == (2, 2, 3 * 2)
    assert p.step_size == pytest.approx(mcn.step_size * 2)  # steps * step_size kept
    assert mcn.passes_per_prediction() == C * 4  # the shell itself is untouched
    q = ncn.proxy(steps=1, labels=1)
    assert (q.steps, q.rounds, q.passes_per_prediction()) == (1, 2, 2 * 1 * 2)
    with pytest.raises(ValueError, match="steps"):
        mcn.proxy(steps=0)
    assert mcn.proxy(steps=40) is mcn  # never dearer than the shell: at most its own steps


def test_one_point_shells_proxy_fewer_steps():
    base = small_conv(classes=C)
    hedge = HedgeShell(base, 4.0, steps=6)
    anti = AntiAdversaryShell(base, steps=3, step_size=2.0)
    cw = CarliniWagnerShell(base, max_iterations=8)
    assert hedge.proxy(steps=2).passes_per_prediction() == 2
    assert hedge.proxy(steps=2).step_size == hedge.step_size
    a = anti.proxy(steps=1)
    assert a.passes_per_prediction() == 1 and a.search_radius == anti.search_radius == 6.0
    assert cw.proxy(steps=3).passes_per_prediction() == C * 2 * 3
    assert hedge.proxy(labels=2) is hedge  # labels mean nothing for one point per image


@pytest.mark.parametrize("kind", ["mcn", "ncn"])
def test_all_labels_in_any_order_give_the_full_shells_answer(setup, kind):
    _, x, mcn, ncn = setup
    shell = mcn if kind == "mcn" else ncn
    full = shell.embed(x)
    rng = np.random.default_rng(0)
    slots = np.stack([rng.permutation(C) for _ in range(len(x))]).astype(np.int32)
    part = shell.embed_labels(x, slots)
    rows = np.arange(len(x))[:, None]
    np.testing.assert_allclose(
        part["log_odds"].numpy(), full["log_odds"].numpy()[rows, slots], rtol=1e-5, atol=1e-4
    )
    np.testing.assert_array_equal(part["label"].numpy(), full["label"].numpy())
    np.testing.assert_allclose(
        part["probabilities"].numpy(), full["probabilities"].numpy(), atol=1e-5
    )
    a, b = shell.scores(part), shell.scores(full)
    np.testing.assert_array_equal(a.pick, b.pick)
    np.testing.assert_array_equal(rank_labels(a, C), rank_labels(b, C))


@pytest.mark.parametrize("kind", ["mcn", "ncn"])
def test_fewer_labels_keep_y_and_the_best_wrong_ones(setup, kind):
    _, x, mcn, ncn = setup
    shell = mcn if kind == "mcn" else ncn
    full = shell.embed(x)
    sc = shell.scores(full)
    y = sc.pick.astype(np.int64)
    slots = proxy_slots(sc, y, 2, C)
    order = attacks.target_order(shell, x, y, full)  # wrong labels, best first
    np.testing.assert_array_equal(slots[:, 0], y)
    np.testing.assert_array_equal(slots[:, 1:], order[:, :2])
    # Each label's search is its own rows: the restricted search scores them as the full one.
    part = shell.proxy(labels=2).embed_labels(x, slots)
    rows = np.arange(len(x))[:, None]
    np.testing.assert_allclose(
        part["log_odds"].numpy(), full["log_odds"].numpy()[rows, slots], rtol=1e-5, atol=1e-4
    )
    # y is the full shell's answer and is kept, so the restricted shell answers it too.
    np.testing.assert_array_equal(shell.scores(part).pick, y)
    # Targeted: the target comes right after y, then the best others.
    target = order[:, 2]
    t_slots = proxy_slots(sc, y, 2, C, target)
    np.testing.assert_array_equal(t_slots[:, :2], np.stack([y, target], 1))
    assert not (t_slots[:, 2] == target).any() and not (t_slots[:, 2] == y).any()
    np.testing.assert_array_equal(t_slots[:, 2], order[:, 0])


def test_bpda_through_the_shell_itself_is_bpda(setup):
    _, x, mcn, _ = setup
    y = mcn.embed(x)["label"].numpy()
    plain = attacks.bpda(
        mcn, x, y, epsilon=3.0, settings=attacks.BPDASettings(steps=3, schedule="apgd")
    )
    same = attacks.bpda(
        mcn, x, y, epsilon=3.0, settings=attacks.BPDASettings(steps=3, schedule="apgd", proxy=mcn)
    )
    assert_results_equal(plain, same)


def test_an_exact_copy_changes_no_outcome_only_the_cost(setup):
    """A proxy that is the shell under another name: its claims are the shell's, so the attack
    breaks the same points at the same iterates; it pays the shell's checks on top."""
    _, x, mcn, _ = setup
    y = mcn.embed(x)["label"].numpy()
    copy = mcn._replace()
    plain = attacks.bpda(
        mcn, x, y, epsilon=3.0, settings=attacks.BPDASettings(steps=4, schedule="apgd")
    )
    through = attacks.bpda(
        mcn, x, y, epsilon=3.0, settings=attacks.BPDASettings(steps=4, schedule="apgd", proxy=copy)
    )
    assert plain.success.any() and not plain.success.all(), plain.success  # not vacuous
    np.testing.assert_array_equal(through.success, plain.success)
    np.testing.assert_array_equal(through.x_adv, plain.x_adv)
    np.testing.assert_array_equal(through.details["steps_used"], plain.details["steps_used"])


def deceiving_proxy(shell_like):
    """An MCN 'copy' around a base that answers label 0 everywhere: it claims every point with
    y != 0 is broken, at every step."""
    kernel = np.zeros((int(np.prod(SHAPE)), C))
    bias = np.array([20.0] + [0.0] * (C - 1))
    return MCNShell(linear_model(SHAPE, kernel, bias), shell_like.delta, steps=2)


def counted(monkeypatch, shell, name):
    """Counts the rows (images) of every call of ``shell.<name>`` (a predict of the search)."""
    calls = []
    if name == "embed_function":
        fn = shell.embed_function
        monkeypatch.setattr(shell, "_embed_function", lambda x: calls.append(len(x)) or fn(x))
    else:
        fn = getattr(shell, name)
        monkeypatch.setattr(shell, name, lambda x, s: calls.append(len(x)) or fn(x, s))
    return calls


def test_bpda_never_reports_a_success_the_shell_does_not_confirm(setup, monkeypatch):
    base, x, _, _ = setup
    shell = MCNShell(base, 4.0, steps=3)
    y = shell.embed(x)["label"].numpy()
    keep = y != 0
    x, y = x[keep], y[keep]
    assert len(y) >= 3
    liar = deceiving_proxy(shell)
    assert (liar.embed(x)["label"].numpy() == 0).all()  # it claims every point, at every step
    full_rows = counted(monkeypatch, shell, "embed_function")
    steps = 4
    out = attacks.bpda(
        shell, x, y, epsilon=0.5, settings=attacks.BPDASettings(steps=steps, proxy=liar)
    )
    assert sum(full_rows) == out.shell_predictions.sum()  # counted as the shell's, all of them
    again = shell.embed(out.x_adv)["label"].numpy()
    np.testing.assert_array_equal(out.success, again != y)  # the shell's word, not the liar's
    np.testing.assert_array_equal(out.details["shell_label"], again)
    # Every claim was checked: a point never broken had the shell at all steps + 1 iterates.
    standing = ~out.success
    assert standing.any()
    np.testing.assert_array_equal(out.shell_predictions[standing], steps + 1)
    np.testing.assert_array_equal(
        out.base_passes[standing], (steps - 1) * liar.passes_per_prediction() + 2 * steps
    )


@pytest.mark.parametrize("targeted", [False, True])
def test_costs_add_up_through_a_label_restricted_proxy(setup, monkeypatch, targeted):
    """passes reported = proxy predictions x proxy cost + shell predictions x shell cost +
    gradient passes (two rows per point and step), counted at the calls themselves."""
    base, x, mcn, _ = setup
    y = mcn.embed(x)["label"].numpy()
    proxy = mcn.proxy(steps=2, labels=1)
    target = attacks.target_order(mcn, x, y)[:, 1] if targeted else None
    full_rows = counted(monkeypatch, mcn, "embed_function")
    proxy_rows = counted(monkeypatch, proxy, "embed_labels")
    grad_rows = []
    real_grad = bpda_module._grad_function

    def counting_grad(*args):
        fn = real_grad(*args)
        return lambda z, *rest: grad_rows.append(len(z)) or fn(z, *rest)

    monkeypatch.setattr(bpda_module, "_grad_function", counting_grad)
    out = attacks.bpda(
        mcn,
        x,
        y,
        epsilon=3.0,
        settings=attacks.BPDASettings(steps=5, schedule="apgd", proxy=proxy),
        target=target,
    )
    assert out.success.any()
    assert sum(proxy_rows) > 0 and sum(full_rows) > len(x)
    assert out.shell_predictions.sum() == sum(full_rows)  # only the shell's own predictions
    assert out.base_passes.sum() == sum(proxy_rows) * proxy.passes_per_prediction() + 2 * sum(
        grad_rows
    )
    assert proxy.passes_per_prediction() == 2 * 2 < mcn.passes_per_prediction() == C * 4
    again = mcn.embed(out.x_adv)["label"].numpy()
    np.testing.assert_array_equal(out.success, again != y)


def test_restarts_through_a_proxy_attack_only_the_points_left(setup, monkeypatch):
    base, x, mcn, _ = setup
    y = mcn.embed(x)["label"].numpy()
    proxy = mcn.proxy(steps=2, labels=2)
    seen = []
    real = bpda_module.bpda

    def spy(shell, xs, ys, **kw):
        seen.append(len(ys))
        assert kw["settings"].proxy is proxy
        return real(shell, xs, ys, **kw)

    monkeypatch.setattr(importlib.import_module("manifold_tf.attacks.bpda_suite"), "bpda", spy)
    out = attacks.bpda_restarts(
        mcn,
        x,
        y,
        epsilon=2.0,
        settings=attacks.BPDASettings(schedule="apgd", steps=3, random_restarts=2, proxy=proxy),
        seed=1,
    )
    one_run = attacks.BPDASettings(steps=3, schedule="apgd", proxy=proxy)
    first = real(mcn, x, y, epsilon=2.0, settings=one_run, seed=1)
    assert seen[0] == len(x) and seen[1] == len(x) - first.success.sum()
    assert all(b <= a for a, b in zip(seen, seen[1:], strict=False))
    assert (mcn.embed(out.x_adv)["label"].numpy() != y)[out.success].all()


def test_eot_through_a_proxy_checks_on_the_random_shell(setup):
    base, x, _, _ = setup
    shell = MCNShell(base, 4.0, steps=3, random_start=True, seed=5)
    y = shell.embed(x)["label"].numpy()
    proxy = shell.proxy(steps=1, labels=2)
    assert proxy.is_random and proxy.with_seed(9).proxy_labels == 2  # EOT copies stay proxies
    out = attacks.bpda(
        shell,
        x,
        y,
        epsilon=3.0,
        settings=attacks.BPDASettings(steps=3, eot_samples=2, proxy=proxy),
        seed=2,
    )
    assert (shell.embed(out.x_adv)["label"].numpy() != y)[out.success].all()


def test_bad_proxies_are_refused(setup):
    base, x, mcn, _ = setup
    y = mcn.embed(x)["label"].numpy()
    with pytest.raises(ValueError, match="proxy must be a copy of the shell"):
        attacks.bpda(mcn, x, y, epsilon=1.0, settings=attacks.BPDASettings(steps=1, proxy=base))
    other = MCNShell(small_conv(classes=3), 4.0, steps=1)
    with pytest.raises(ValueError, match="3 classes"):
        attacks.bpda(mcn, x, y, epsilon=1.0, settings=attacks.BPDASettings(steps=1, proxy=other))
    with pytest.raises(ValueError, match="not both"):
        attacks.bpda(
            mcn,
            x,
            y,
            epsilon=1.0,
            settings=attacks.BPDASettings(steps=1, proxy=mcn.proxy(steps=1), warm_steps=1),
        )


def test_the_suite_steers_by_the_configured_proxy_and_counts_it(setup, monkeypatch):
    base, x, mcn, _ = setup
    y = mcn.embed(x)["label"].numpy()
    cfg = AdaptiveConfig(
        proxy_steps=1,
        proxy_labels=2,
        square_proxy_steps=None,  # Square: proxy_steps
        square_queries=4,
        steps=2,
        targets=1,
        restarts=0,
    )
    seen = {}
    suite_module = importlib.import_module("manifold_tf.evaluation.adaptive_suites")
    for name in ("bpda_restarts", "bpda_targeted"):
        real = getattr(attacks, name)

        def spy(*a, _real=real, _name=name, **kw):
            seen[_name] = kw["settings"].proxy
            return _real(*a, **kw)

        monkeypatch.setattr(suite_module.attacks, name, spy)
    steps = adaptive_suites.shell_suite(mcn, base, cfg, x, epsilon=2.0, seed=0)
    outs = {s.name: s.run(x, y, np.arange(len(x))) for s in steps if s.name != "lift"}
    assert seen["bpda_restarts"] is seen["bpda_targeted"] is mcn.proxy(steps=1, labels=2)
    # Square queries the same copy, on y and the shell's 2 best wrong labels at x; its queries
    # are base passes at the copy's cost, and the shell at x (not known here) one prediction.
    sq, copy = outs["square"], mcn.proxy(steps=1, labels=2)
    np.testing.assert_array_equal(sq.shell_predictions, 1)
    np.testing.assert_array_equal(
        sq.base_passes, (sq.details["queries"] + 1) * copy.passes_per_prediction()
    )
    # The shell itself when told so: Square's queries are shell predictions.
    (plain,) = adaptive_suites.shell_suite(
        mcn,
        base,
        AdaptiveConfig(square_proxy_steps=0, square_queries=4, shell_attacks=("square",)),
        x,
        epsilon=2.0,
        seed=0,
    )
    out = plain.run(x, y, np.arange(len(x)))
    np.testing.assert_array_equal(out.shell_predictions, out.details["queries"])
    np.testing.assert_array_equal(out.base_passes, 0)


def test_the_plan_counts_the_proxy_at_its_cost(setup):
    _, _, mcn, _ = setup
    cw = attacks.CWSettings(
        max_iterations=10, initial_const=1e-2, largest_const=1.0, stop_within_epsilon=True
    )

    def plan(**changes):
        settings = {**dict(proxy_steps=0, proxy_labels=0, square_proxy_steps=0), **changes}
        suite = AdaptiveConfig(steps=10, restarts=0, targets=2, square_queries=6, **settings)
        return estimate.defence_passes(
            table2_points=1,
            num_points=1,
            shell=mcn,
            per_prediction=mcn.passes_per_prediction(),
            cw=cw,
            suite=suite,
        )

    full, cheap = plan(), plan(proxy_steps=1, proxy_labels=1, square_proxy_steps=1)
    pp, qq = mcn.passes_per_prediction(), mcn.proxy(steps=1, labels=1).passes_per_prediction()
    # Two runs (from x and from CW's x'), whose starts the suite already knows (attacks.known).
    assert full["adaptive: bpda on the shell"] == 2 * 10 * pp + 2 * 2 * 10
    # Each run: the shell at its last and best iterate, the proxy in between.
    assert cheap["adaptive: bpda on the shell"] == pytest.approx(2 * (2 * pp + 9 * qq) + 40)
    square_copy = mcn.proxy(steps=1, labels=1)
    assert cheap["adaptive: square on the shell"] == 7 * square_copy.passes_per_prediction()
    assert sum(cheap.values()) < sum(full.values())


def test_the_declared_defaults(setup):
    base, _, mcn, ncn = setup
    default = AdaptiveConfig()
    # MCN with 4 steps: BPDA through 2 steps on y + 1 label, targeted BPDA through its own 4 steps
    # on y + the target, Square through 2 steps on y + 1 label.
    assert default.attack_proxy(mcn) is mcn.default_proxy() is mcn.proxy(steps=2, labels=1)
    assert default.attack_proxy(mcn, attack="bpda_targeted") is mcn.proxy(labels=1)
    assert default.attack_proxy(mcn, attack="square") is mcn.proxy(steps=2, labels=1)
    with pytest.raises(ValueError, match="attack"):
        default.attack_proxy(mcn, attack="apgd")
    for shell in (ncn, Declares(base)):  # nothing measured
        assert default.attack_proxy(shell) is shell
        assert default.attack_proxy(shell, attack="square") is shell
    hedge = HedgeShell(base, 4.0, steps=6)  # BPDA's copies: 5 steps (Croce et al.), Square: itself
    assert default.attack_proxy(hedge) is hedge.proxy(steps=5)
    assert default.attack_proxy(hedge, attack="bpda_targeted") is hedge.proxy(steps=5)
    assert default.attack_proxy(hedge, attack="square") is hedge
    off = AdaptiveConfig(proxy_steps=0, proxy_labels=0, square_proxy_steps=0)
    assert off.attack_proxy(mcn) is mcn and off.attack_proxy(mcn, attack="square") is mcn
    only_steps = AdaptiveConfig(proxy_steps=1)  # labels unset: every label
    assert only_steps.attack_proxy(mcn) is mcn.proxy(steps=1)
    assert only_steps.attack_proxy(mcn, attack="square") is mcn.proxy(steps=1)
    with pytest.raises(ValueError, match="proxy_labels"):
        AdaptiveConfig(proxy_labels=-1)


def test_the_copies_a_verdict_steers_by_are_recorded_with_its_settings(setup):
    # A default copy that changes between sessions must not be resumed into silently: the
    # resolved copies are part of the settings a run store binds (and compares on --resume).
    base, x, mcn, ncn = setup
    from manifold_tf.evaluation import adaptive

    default = AdaptiveConfig()
    got = default.proxies(mcn)
    assert set(got) == {"bpda", "bpda_targeted", "square"}
    assert got["bpda"] == dict(
        passes_per_prediction=mcn.proxy(steps=2, labels=1).passes_per_prediction(), labels=1
    )
    assert got["bpda_targeted"]["labels"] == 1
    assert AdaptiveConfig(proxy_steps=0, proxy_labels=0, square_proxy_steps=0).proxies(mcn) == {}
    assert default.proxies(ncn) == {}  # nothing declared: the shell itself, nothing recorded
    settings = adaptive.shell_settings(mcn, default)
    assert settings["proxies"] == got and settings["shell"] == "mcn"
    assert "proxies" not in adaptive.shell_settings(ncn, default)


def test_the_suite_builds_each_attacks_settings_once_from_the_config(setup):
    """``AdaptiveConfig.bpda_settings`` and the suite's table: BPDA's and targeted BPDA's knobs
    (APGD steps, EOT on a random shell only, the proxies), lift's and Square's, in the suite's
    order; the suite follows ``shell_attacks``' order."""
    base, x, mcn, _ = setup
    rnd = MCNShell(base, 4.0, steps=3, random_start=True, seed=5)
    cfg = AdaptiveConfig(
        steps=3, restarts=2, targets=0, eot_samples=4, lift_steps=7, square_queries=9
    )
    assert cfg.bpda_settings(mcn) == attacks.BPDASettings(
        steps=3, schedule="apgd", proxy=cfg.attack_proxy(mcn), from_x=True, random_restarts=2
    )
    targeted = cfg.bpda_settings(rnd, attack="bpda_targeted")
    assert targeted == attacks.BPDASettings(
        steps=3,
        schedule="apgd",
        eot_samples=4,
        proxy=cfg.attack_proxy(rnd, attack="bpda_targeted"),
        from_x=False,
        num_targets="all",
    )
    with pytest.raises(ValueError, match="attack"):
        cfg.bpda_settings(mcn, attack="square")
    table = adaptive_suites.shell_table(cfg, mcn)
    assert [name for name, _, _ in table] == list(SHELL_ATTACKS)
    settings = {name: s for name, _, s in table}
    assert settings["transfer_confident"] == 3
    assert settings["lift"] == attacks.LiftSettings(num_targets="all", steps=7)
    assert settings["bpda"] == cfg.bpda_settings(mcn)
    assert settings["square"].settings == attacks.SquareSettings(queries=9, output="probabilities")
    assert settings["square"].model is cfg.attack_proxy(mcn, attack="square")
    some = dataclasses.replace(cfg, shell_attacks=("square", "transfer_cw", "lift"))
    steps = adaptive_suites.shell_suite(mcn, base, some, x, epsilon=1.0, seed=0)
    assert [s.name for s in steps] == ["square", "transfer_cw", "lift"]
    np.testing.assert_array_equal(steps[1].run(x, np.zeros(6), np.arange(2, 4)).x_adv, x[2:4])
