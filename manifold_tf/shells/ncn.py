"""NCN_p (paper, Algorithm 2): for every label, the nearest point where the base is p-confident."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from manifold_tf.compiled import graph_function
from manifold_tf.projected import adam_step
from manifold_tf.shells.base import DEFAULT_JIT_COMPILE, FactorShell, Scores, jit_kwargs, log_odds
from manifold_tf.shells.registry import register
from manifold_tf.validation import (
    PIXEL_MAX,
    check_int,
    check_positive,
    check_real,
    validate_radius,
)

# The rank key of a label meeting p is MET_KEY - distance: above every log-odds (those are clipped
# to +-MET_KEY / 2), and nearer ranks higher.
MET_KEY = 1e12


@register("ncn")
@keras.saving.register_keras_serializable(package="manifold_tf")
class NCNShell(FactorShell):
    """NCN_p (Algorithm 2): for every label, the nearest point where ``F`` is ``p``-confident in it.

    Problem per label ``t``: ``min ||z - x||_inf`` subject to ``F(z)_t >= p``, searched within the
    box ``N(x, delta_max)``. Solved by the quadratic penalty method: minimise
    ``Q = r + alpha * max(logit(p) - o_t(z), 0)^2`` for ``alpha = alpha0 * alpha_factor^k``,
    ``k = 0 .. rounds - 1``, ``steps`` Adam steps per round, warm-started. Two choices, both for the
    optimiser's sake (the feasible set and the objective are unchanged):
      * the L-inf norm is written in epigraph form, ``z = clip(x + r * tanh(w), 0, 255)`` with
        ``r = delta_max * s``, ``s in [0, 1]``, so ``||z - x||_inf <= r`` and the distance has a
        dense gradient (the gradient of ``max_i |z_i - x_i|`` touches one pixel);
      * the constraint is ``o_t(z) >= logit(p)`` with ``o_t`` the log-odds of :func:`log_odds`
        (the same set as ``F(z)_t >= p``), whose violation keeps a gradient where the softmax
        saturates.
    Every iterate is checked; per label the nearest feasible iterate (distance measured as
    ``||z - x||_inf``) is kept, and ``x`` itself when ``F(x)_t >= p``. ``t*`` is the label with the
    smallest distance among those meeting ``p`` (ties: the smaller label). When no label meets
    ``p``, the shell falls back to the most confident ``z_t`` seen (largest ``F(z_t)_t``) and
    flags the point in ``unmet``.

    Args:
      base: Keras model, images -> logits.
      p: the confidence threshold, in (0, 1).
      delta_max: radius of the search box in pixels.
      steps: Adam steps per penalty round; rounds: number of ``alpha`` values.
      alpha: the first penalty weight (pixels per squared unit of log-odds); alpha_factor: its
        growth per round.
      learning_rate: Adam's, for ``s`` (fraction of ``delta_max``) and ``w`` (tanh space).
      jit_compile: compile the embedding with XLA (once per batch size; see DEFAULT_JIT_COMPILE).

    ``embed(x)`` returns ``z`` ``[N, C, H, W, 3]``, ``label`` ``[N]``, ``distances`` ``[N, C]``
    (pixels, L-inf), ``met`` bool ``[N, C]`` (``F(z_t)_t >= p``), ``confidences`` ``[N, C]``
    (``F(z_t)_t``) and ``log_odds`` (the same, as log-odds), ``unmet`` bool ``[N]`` (no label met
    ``p``: the fallback was used) and ``probabilities``. Cost: ``C * steps * rounds``
    forward+backward passes per image and ``2 C + 1`` forward passes.
    """

    def __init__(
        self,
        base: keras.Model,
        p: float = 0.9,
        *,
        delta_max: float = 16.0,
        steps: int = 10,
        rounds: int = 3,
        alpha: float = 1.0,
        alpha_factor: float = 10.0,
        learning_rate: float = 0.05,
        jit_compile: bool = DEFAULT_JIT_COMPILE,
        **kwargs,
    ):
        p = check_real(p, "p")
        if not 0.0 < p < 1.0:
            raise ValueError(f"p must lie in (0, 1) (a confidence); got {p}.")
        self.p = p
        self.delta_max = validate_radius(delta_max, "delta_max")
        self.steps = check_int(steps, "steps", 0)
        self.rounds = check_int(rounds, "rounds", 1)
        self.alpha = check_positive(alpha, "alpha")
        self.alpha_factor = check_positive(alpha_factor, "alpha_factor")
        self.learning_rate = check_positive(learning_rate, "learning_rate")
        super().__init__(base, jit_compile=jit_compile, **kwargs)

    @classmethod
    def from_settings(
        cls, base: keras.Model, settings, *, delta: float, p: float, seed: int = 0
    ) -> NCNShell:
        """NCN_p from the evaluation's settings (``ncn_delta_max``, ``steps``, ``ncn_rounds``,
        ``ncn_alpha``, ``ncn_alpha_factor``, ``ncn_learning_rate``, ``jit_compile``); ``delta``
        and ``seed`` are unused (its radius is ``ncn_delta_max``; it is deterministic)."""
        del delta, seed
        return cls(
            base,
            p,
            delta_max=settings.ncn_delta_max,
            steps=settings.steps,
            rounds=settings.ncn_rounds,
            alpha=settings.ncn_alpha,
            alpha_factor=settings.ncn_alpha_factor,
            learning_rate=settings.ncn_learning_rate,
            **jit_kwargs(settings),
        )

    def _shell_config(self) -> dict:
        return dict(
            p=self.p,
            delta_max=self.delta_max,
            steps=self.steps,
            rounds=self.rounds,
            alpha=self.alpha,
            alpha_factor=self.alpha_factor,
            learning_rate=self.learning_rate,
        )

    def passes_per_prediction(self) -> int:
        """``C * steps * rounds``: every label, ``steps`` Adam steps per penalty round (a proxy
        searching ``y`` and ``m`` wrong labels, :meth:`proxy`: ``(m + 1) * steps * rounds``)."""
        labels = self.num_classes if self.proxy_labels is None else self.proxy_labels + 1
        return labels * self.steps * self.rounds

    def proxy(self, *, steps: int | None = None, labels: int | None = None) -> NCNShell:
        """NCN with ``steps`` Adam steps per penalty round (the same rounds and learning rate)
        on ``y`` and ``labels`` wrong labels per point (see the base class); ``self`` when
        neither changes anything."""
        steps = self.steps if steps is None else min(check_int(steps, "steps", 1), self.steps)
        if labels is not None and check_int(labels, "labels", 1) >= self.num_classes - 1:
            labels = None
        if steps == self.steps and labels is None:
            return self

        def build():
            copy = self._replace(steps=steps)
            copy.proxy_labels = labels
            return copy

        return self._cached_proxy((steps, labels), build)

    def embed_labels(self, x, labels) -> dict:
        """The search for the given labels only (see the base class): ``labels`` ``[M, S]``."""
        fn = self.__dict__.get("_labels_function")
        if fn is None:
            spec = tf.TensorSpec((None,) + self.image_shape, tf.float32)
            fn = graph_function(
                self._solve, input_signature=[spec, tf.TensorSpec((None, None), tf.int32)]
            )
            self.__dict__["_labels_function"] = fn
        return fn(tf.convert_to_tensor(x, tf.float32), tf.convert_to_tensor(labels, tf.int32))

    @property
    def search_radius(self) -> float:
        """``delta_max``, pixels (the box the nearest confident point is searched in)."""
        return self.delta_max

    @property
    def logit_p(self) -> float:
        """``log(p / (1 - p))``: ``F_t >= p`` iff the log-odds of ``t`` are ``>= logit_p``."""
        return float(np.log(self.p) - np.log1p(-self.p))

    def scores(self, out: dict) -> Scores:
        """NCN's rule: a label meeting ``p`` outranks every label that does not, met labels ranked
        by distance (nearer first, key ``MET_KEY - d``), the others by log-odds (the fallback)."""
        sc = super().scores(out)
        met = np.asarray(out["met"]).astype(bool)
        dist = np.asarray(out["distances"]).astype(np.float64)
        key = np.where(met, MET_KEY - dist, np.clip(sc.lo, -MET_KEY / 2, MET_KEY / 2))
        return sc._replace(key=key, met=met, dist=dist, logit_p=self.logit_p)

    def _embed_graph(self, x: tf.Tensor) -> dict:
        return self._solve(x)

    def _solve(self, x: tf.Tensor, slots: tf.Tensor | None = None) -> dict:
        """The search of every label of every image; with ``slots`` ``[N, S]``, of those only."""
        if slots is None:
            xt, labels = self._tile(x)
            width = self.num_classes
        else:
            width = tf.shape(slots)[1]
            xt, labels = tf.repeat(x, width, axis=0), tf.reshape(slots, [-1])
        search = _PenaltySearch(self, xt, labels)
        return self._choose(search, search.run(), width, slots)

    def _choose(self, search: _PenaltySearch, best: tuple, width, slots: tf.Tensor | None) -> dict:
        """``embed``'s output from the search's per-row ``best`` (:meth:`_PenaltySearch.keep`):
        per label its nearest feasible point, else its most confident one; ``t*`` the nearest
        label meeting ``p``, else the most confident (``width`` labels per image)."""

        def per_slot(v):
            return tf.reshape(v, tf.concat([tf.stack([-1, width]), tf.shape(v)[1:]], axis=0))

        xt, axes, expand = search.xt, search.axes, search.expand
        bz, bd, bf, cz, cf = best
        found = tf.math.is_finite(bd)
        z_rows = tf.where(tf.reshape(found, expand), bz, cz)
        distances = per_slot(tf.reduce_max(tf.abs(z_rows - xt), axis=axes))
        met = per_slot(found)
        z = per_slot(z_rows)
        any_met = tf.reduce_any(met, axis=1)
        nearest = tf.argmin(
            tf.where(met, distances, np.float32(np.inf)), axis=1, output_type=tf.int32
        )
        surest = tf.argmax(per_slot(cf), axis=1, output_type=tf.int32)
        best = tf.where(any_met, nearest, surest)
        odds = per_slot(tf.where(found, bf, cf))
        out = dict(
            z=z,
            label=best if slots is None else tf.gather(slots, best, batch_dims=1),
            distances=distances,
            met=met,
            confidences=tf.sigmoid(odds),
            log_odds=odds,
            unmet=~any_met,
            probabilities=self._output(z, best),
        )
        if slots is not None:
            out["slot_labels"] = slots
        return out


class _PenaltySearch:
    """One graph trace of NCN's quadratic-penalty search (:class:`NCNShell`) on rows ``xt``
    ``[R, H, W, 3]`` (pixels), each for its target label ``labels`` ``[R]``."""

    def __init__(self, shell: NCNShell, xt: tf.Tensor, labels: tf.Tensor):
        self.shell, self.xt, self.labels = shell, xt, labels
        self.rows = tf.shape(xt)[0]
        self.axes = list(range(1, len(xt.shape)))
        self.expand = [-1] + [1] * len(self.axes)
        self.logit_p = shell.logit_p  # F_t >= p  <=>  log-odds >= logit(p)

    def point(self, s, w):
        """``z = clip(x + delta_max * s * tanh(w), 0, 255)``."""
        return tf.clip_by_value(
            self.xt + tf.reshape(self.shell.delta_max * s, self.expand) * tf.tanh(w),
            0.0,
            PIXEL_MAX,
        )

    def target_odds(self, z):
        return log_odds(self.shell._logits(z), self.labels)

    def keep(self, z, odds, best):
        """Nearest feasible point so far (and its log-odds), and most confident point so far."""
        bz, bd, bf, cz, cf = best
        d = tf.reduce_max(tf.abs(z - self.xt), axis=self.axes)
        nearer = (odds >= self.logit_p) & (d < bd)
        bz = tf.where(tf.reshape(nearer, self.expand), z, bz)
        bd = tf.where(nearer, d, bd)
        bf = tf.where(nearer, odds, bf)
        surer = odds > cf
        cz = tf.where(tf.reshape(surer, self.expand), z, cz)
        return bz, bd, bf, cz, tf.where(surer, odds, cf)

    def body(self, i, s, w, ms, vs, mw, vw, best):
        """One Adam step on ``Q = r + alpha * max(logit(p) - o_t(z), 0)^2`` (``alpha`` of the
        round of step ``i``), keeping the current iterate first."""
        shell = self.shell
        round_ = tf.cast(i // max(shell.steps, 1), tf.float32)
        alpha = shell.alpha * tf.pow(shell.alpha_factor, round_)
        with tf.GradientTape() as tape:
            tape.watch([s, w])
            z = self.point(s, w)
            odds = self.target_odds(z)
            q = shell.delta_max * s + alpha * tf.square(tf.nn.relu(self.logit_p - odds))
            total_q = tf.reduce_sum(q)  # rows are independent: the sum's gradient is per row
        gs, gw = tape.gradient(total_q, [s, w], unconnected_gradients=tf.UnconnectedGradients.ZERO)
        best = self.keep(z, odds, best)
        ds, ms, vs = adam_step(gs, ms, vs, i + 1, shell.learning_rate)
        dw, mw, vw = adam_step(gw, mw, vw, i + 1, shell.learning_rate)
        s = tf.clip_by_value(s - ds, 0.0, 1.0)
        w = w - dw
        return i + 1, s, w, ms, vs, mw, vw, best

    def run(self) -> tuple:
        """``best`` after every iterate (``x`` first, the last iterate last): ``(bz, bd, bf, cz,
        cf)``, the nearest feasible point, its distance (pixels; inf: none) and log-odds, the
        most confident point and its log-odds."""
        xt, rows = self.xt, self.rows
        odds0 = self.target_odds(xt)
        inf = tf.fill([rows], np.float32(np.inf))
        best = self.keep(xt, odds0, (xt, inf, -inf, xt, -inf))
        # Start at x (w = 0) with the whole box available (s = 1): dz/dw = r is then non-zero.
        s0 = tf.ones([rows])
        w0 = tf.zeros_like(xt)
        total = self.shell.steps * self.shell.rounds
        state = (tf.constant(0), s0, w0, tf.zeros_like(s0), tf.zeros_like(s0), w0, w0, best)
        _, s, w, *_, best = tf.while_loop(
            lambda i, *_: i < total, self.body, state, maximum_iterations=total
        )
        z_last = self.point(s, w)
        return self.keep(z_last, self.target_odds(z_last), best)
