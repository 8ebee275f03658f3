"""The search of Carlini & Wagner's L-inf attack (``li_attack.py``), batched, as a traceable core.

Below both users: :mod:`manifold_tf.attacks.carlini_wagner` (the attack) and
:mod:`manifold_tf.shells.cw_shell` (the paper's CarliniWagnerShell, which runs the same search at
prediction time).

The original attacks one image at a time: for a threshold ``tau`` (start: the whole range) and a
constant ``c`` (start 1e-5) it runs Adam (learning rate 5e-3) on ``w``, the image in tanh space
``x' = (tanh(w) + 1) / 2 * 255``, minimising

    c * loss1(x') + sum(max(|x' - x| - tau, 0))          (the sum in range units: pixels / 255)

with ``loss1 = max(0, Z_y - max_{j != y} Z_j)`` (untargeted) or ``max(0, max_{j != t} Z_j - Z_t)``
(targeted), for up to ``max_iterations`` steps. A step "works" when the loss before it is below
``1e-4 * c`` and the point after it meets the goal (argmax != y, or == t); that point is the
round's answer. If no step works, ``c *= const_factor`` and Adam goes on (same ``w`` and moments)
while ``c < largest_const``; otherwise the attack stops and returns the last success. After a
success ``tau = min(tau, L-inf distance) * 0.9``, ``w`` restarts from the success (fresh Adam), and
``c`` carries over, until ``tau <= 1/256`` of the range.

Here every image keeps its own ``(tau, c, Adam state)`` and the whole schedule is one
``tf.while_loop`` with one forward+backward pass of the batch per iteration; an image that has
finished stops changing (its row is still computed under XLA, whose batches are static; otherwise
only the running rows go through the model: a robust point's failing last rounds are most of the
schedule, and the points CW breaks early would pay for them too). The result per
image is the original's, up to float rounding: the checks happen in the same order.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import NamedTuple

import tensorflow as tf

from manifold_tf.projected import adam_step
from manifold_tf.validation import PIXEL_MAX, check_int, check_positive, check_real, validate_radius


@dataclasses.dataclass(frozen=True)
class CWSettings:
    """Every knob of the attack, validated; the defaults are the paper's (:data:`CW_PAPER`).

    Taus are in pixels. ``targeted``: ``y`` are targets. ``max_iterations``: Adam steps per
    constant; ``learning_rate``: Adam's. ``initial_const`` grows by ``const_factor`` while below
    ``largest_const``; ``initial_tau`` shrinks by ``decrease_factor`` after each success until
    ``<= min_tau``. ``stop_within_epsilon``: stop an example at its first success within the budget
    (not in the original). ``max_total_iterations``: a cap on the batched loop (``None``: none).
    Hashable: the attack compiles once per settings.
    """

    targeted: bool = False
    max_iterations: int = 1000
    learning_rate: float = 5e-3
    initial_const: float = 1e-5
    const_factor: float = 2.0
    largest_const: float = 20.0
    initial_tau: float = PIXEL_MAX  # 1.0 of the range
    decrease_factor: float = 0.9
    min_tau: float = PIXEL_MAX / 256.0  # the original stops once tau <= 1/256 of the range
    stop_within_epsilon: bool = False
    max_total_iterations: int | None = None

    def __post_init__(self):
        total = self.max_total_iterations
        checked = dict(
            targeted=bool(self.targeted),
            max_iterations=check_int(self.max_iterations, "max_iterations", 1),
            learning_rate=check_positive(self.learning_rate, "learning_rate"),
            initial_const=check_real(self.initial_const, "initial_const"),
            const_factor=check_real(self.const_factor, "const_factor"),
            largest_const=check_real(self.largest_const, "largest_const"),
            initial_tau=validate_radius(self.initial_tau, "initial_tau"),
            decrease_factor=check_real(self.decrease_factor, "decrease_factor"),
            min_tau=validate_radius(self.min_tau, "min_tau"),
            stop_within_epsilon=bool(self.stop_within_epsilon),
            max_total_iterations=None
            if total is None
            else check_int(total, "max_total_iterations", 1),
        )
        for name, value in checked.items():  # plain Python values: equal settings, equal keys
            object.__setattr__(self, name, value)
        if not 0.0 < self.decrease_factor < 1.0:
            raise ValueError(f"decrease_factor must be in (0, 1); got {self.decrease_factor}.")
        if not self.const_factor > 1.0:  # NaN too
            raise ValueError(f"const_factor must be > 1; got {self.const_factor}.")
        if not 0.0 < self.initial_const < self.largest_const:
            raise ValueError(
                f"need 0 < initial_const < largest_const; got {self.initial_const} and "
                f"{self.largest_const}."
            )

    def replace(self, **changes) -> CWSettings:
        """A copy with ``changes`` (field names), validated again."""
        return dataclasses.replace(self, **changes)

    def recorded(self) -> dict:
        """The knobs an evaluation sets (``BaseAttackConfig``), as its reports and run stores
        record them: that form is part of a run's bound settings (a resume compares it), so it
        stays these five whatever this class holds."""
        return dict(
            max_iterations=self.max_iterations,
            stop_within_epsilon=self.stop_within_epsilon,
            learning_rate=self.learning_rate,
            initial_const=self.initial_const,
            largest_const=self.largest_const,
        )


# The paper's settings (Carlini & Wagner's defaults).
CW_PAPER = CWSettings()

# A cheaper preset for CPUs: the same schedule with 100 Adam steps per constant instead of 1000.
# The cost is dominated by each image's last, failing round (every remaining constant up to
# largest_const, max_iterations steps each: up to 21 x max_iterations passes), so this is ~10x
# cheaper; reports must say which preset ran.
CW_CPU = CW_PAPER.replace(max_iterations=100)

PROGRESS_EVERY = 250  # iterations between progress lines of the full schedule
_TANH_SHRINK = 0.999999  # the original's arctanh(x * 1.999999) on [-0.5, 0.5] images


def to_tanh_space(x: tf.Tensor) -> tf.Tensor:
    """Pixels (0..255) -> ``w`` with ``from_tanh_space(w) ~= x`` (shrunk by 1e-6, as the
    original)."""
    return tf.atanh((x / (PIXEL_MAX / 2.0) - 1.0) * _TANH_SHRINK)


def from_tanh_space(w: tf.Tensor) -> tf.Tensor:
    """``(tanh(w) + 1) / 2 * 255``: always strictly inside the pixel box."""
    return (tf.tanh(w) + 1.0) * (PIXEL_MAX / 2.0)


class CWState(NamedTuple):
    """The batched loop's state, one entry per example unless noted (pixels for distances)."""

    step: tf.Tensor  # scalar: iterations of the batched loop so far
    w: tf.Tensor  # [N, ...] the iterate in tanh space
    m: tf.Tensor  # [N, ...] Adam's first moment
    v: tf.Tensor  # [N, ...] Adam's second moment
    t: tf.Tensor  # Adam's step count (reset by a warm start)
    it: tf.Tensor  # steps at the current constant
    tau: tf.Tensor  # the penalty threshold
    const: tf.Tensor  # the constant c
    small_prev: tf.Tensor  # the last step's loss was below 1e-4 * c ("works" if at the goal)
    active: tf.Tensor  # still running
    iters: tf.Tensor  # forward+backward passes spent on the example
    x_last: tf.Tensor  # [N, ...] the last success of the schedule
    has_last: tf.Tensor  # there is one
    dist_last: tf.Tensor  # its L-inf distance (inf if none)
    x_within: tf.Tensor  # [N, ...] the last success within epsilon
    within: tf.Tensor  # there is one


class _Step(NamedTuple):
    """What one iteration's forward+backward pass found, per example ``[N]`` (``xn``, ``g``:
    ``[N, ...]``)."""

    xn: tf.Tensor  # the iterate in pixels
    g: tf.Tensor  # the gradient of the loss in tanh space
    loss: tf.Tensor  # const * loss1 + loss2 at xn
    const: tf.Tensor  # the constant after this iteration's growth (schedule)
    succ: tf.Tensor  # the previous step worked and xn meets the goal
    exhausted: tf.Tensor  # max_iterations steps at this constant without success
    failed: tf.Tensor  # exhausted for good: the example stops


def _rows_mask(mask: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """A per-example ``[N]`` mask reshaped to broadcast against ``x`` ``[N, ...]``."""
    return tf.reshape(mask, [-1] + [1] * (len(x.shape) - 1))


def _per_example(v, n: tf.Tensor) -> tf.Tensor:
    return tf.broadcast_to(tf.cast(v, tf.float32), tf.reshape(n, [1]))


class _Loop:
    """The phases of one iteration of the shared loop, for a batch ``x`` ``[N, ...]`` (pixels).

    ``schedule`` False: fixed (tau, c), one round; True: the whole schedule of ``settings``.
    ``compact``: the model sees only the rows still running (a dynamic batch: not under XLA);
    the others' logits are never read.
    """

    def __init__(self, model, x, labels, settings: CWSettings, *, schedule, epsilon, compact):
        self.model, self.x, self.labels, self.settings = model, x, labels, settings
        self.schedule, self.epsilon, self.compact = schedule, epsilon, compact
        self.n = tf.shape(x)[0]
        self.bshape = [-1] + [1] * (len(x.shape) - 1)
        self.axes = list(range(1, len(x.shape)))

    def b(self, mask):
        return tf.reshape(mask, self.bshape)

    def logits(self, xn, active):
        if self.compact:  # a finished row costs nothing: the schedule's last rounds are long
            rows = tf.cast(tf.where(active), tf.int32)
            part = self.model(tf.gather_nd(xn, rows), training=False)
            logits = tf.scatter_nd(rows, part, tf.stack([self.n, tf.shape(part)[-1]]))
            return tf.ensure_shape(logits, [self.x.shape[0], part.shape[-1]])
        return self.model(xn, training=False)

    def forward(self, state: CWState) -> _Step:
        """The loss at the iterate, the checks of the previous step, and the gradient."""
        s, x, labels, active, const = self.settings, self.x, self.labels, state.active, state.const
        with tf.GradientTape() as tape:
            tape.watch(state.w)
            xn = from_tanh_space(state.w)
            logits = self.logits(xn, active)
            onehot = tf.one_hot(labels, tf.shape(logits)[-1], dtype=logits.dtype)
            real = tf.reduce_sum(onehot * logits, axis=-1)
            other = tf.reduce_max(logits - onehot * 1e4 - onehot * logits, axis=-1)
            loss1 = tf.nn.relu(other - real) if s.targeted else tf.nn.relu(real - other)
            penalty = tf.nn.relu(tf.abs(xn - x) - self.b(state.tau))
            loss2 = tf.reduce_sum(penalty, axis=self.axes) / PIXEL_MAX
            pred = tf.argmax(logits, axis=-1, output_type=tf.int32)
            goal = tf.equal(pred, labels) if s.targeted else tf.not_equal(pred, labels)
            # The previous step's check passed ("works") and its result meets the goal.
            succ = active & state.small_prev & goal
            exhausted = active & ~succ & (state.it >= s.max_iterations)
            if not self.schedule:
                failed = exhausted
            else:
                const = tf.where(exhausted, const * s.const_factor, const)
                failed = exhausted & (const >= s.largest_const)
            loss = const * loss1 + loss2
            total = tf.reduce_sum(tf.where(active, loss, 0.0))
        g = tape.gradient(total, state.w, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        g = tf.ensure_shape(tf.convert_to_tensor(g), state.w.shape)  # static batches stay static
        return _Step(xn, g, loss, const, succ, exhausted, failed)

    def adam(self, state: CWState, found: _Step) -> CWState:
        """One Adam step of the examples still stepping (not succeeded, not failed)."""
        b = self.b
        stepping = state.active & ~found.succ & ~found.failed
        it = tf.where(found.exhausted, 0, state.it)
        # Adam exactly as tf.compat.v1.train.AdamOptimizer, per example (its own step count t).
        t = tf.where(stepping, state.t + 1.0, state.t)
        lr = self.settings.learning_rate
        delta, m_new, v_new = adam_step(found.g, state.m, state.v, b(tf.maximum(t, 1.0)), lr)
        w_new = state.w - delta
        return state._replace(
            w=tf.where(b(stepping), w_new, state.w),
            m=tf.where(b(stepping), m_new, state.m),
            v=tf.where(b(stepping), v_new, state.v),
            t=t,
            it=tf.where(stepping, it + 1, it),
            const=found.const,
            small_prev=tf.where(stepping, found.loss < 1e-4 * found.const, state.small_prev),
            iters=state.iters + tf.cast(state.active, tf.int32),
        )

    def record(self, state: CWState, found: _Step) -> CWState:
        """Keeps the successes; the schedule's next round (:meth:`next_round`); who stops."""
        xn, succ = found.xn, found.succ
        dist = tf.reduce_max(tf.abs(xn - self.x), axis=self.axes)
        state = state._replace(
            x_last=tf.where(self.b(succ), xn, state.x_last),
            has_last=state.has_last | succ,
            dist_last=tf.where(succ, dist, state.dist_last),
        )
        finished = succ
        if self.schedule:
            state, finished = self.next_round(state, xn, succ, dist)
        return state._replace(active=state.active & ~found.failed & ~finished)

    def next_round(self, state: CWState, xn, succ, dist) -> tuple[CWState, tf.Tensor]:
        """After a success: the within-epsilon record, the smaller tau and the warm start;
        ``(state, finished [N])``."""
        s, b = self.settings, self.b
        ok_eps = succ & (dist <= self.epsilon)
        x_within = tf.where(b(ok_eps), xn, state.x_within)
        within = state.within | ok_eps
        tau = tf.where(succ, tf.minimum(state.tau, dist) * s.decrease_factor, state.tau)
        finished = succ & (tau <= s.min_tau)
        if s.stop_within_epsilon:
            finished = finished | ok_eps
        # Warm start from the success, with fresh Adam moments, as a new call of the original.
        state = state._replace(
            w=tf.where(b(succ), to_tanh_space(xn), state.w),
            m=tf.where(b(succ), 0.0, state.m),
            v=tf.where(b(succ), 0.0, state.v),
            t=tf.where(succ, 0.0, state.t),
            it=tf.where(succ, 0, state.it),
            small_prev=state.small_prev & ~succ,
            tau=tau,
            x_within=x_within,
            within=within,
        )
        return state, finished

    def progress(self, state: CWState) -> None:
        """The schedule runs as one compiled loop: report from inside it, every 250 iterations."""
        step, active = state.step, state.active
        tf.cond(
            tf.equal((step + 1) % PROGRESS_EVERY, 0),
            lambda: tf.print(
                "CW L-inf: iteration",
                step + 1,
                "-",
                tf.reduce_sum(tf.cast(active, tf.int32)),
                "of",
                tf.size(active),
                "points still running, mean constant",
                tf.reduce_mean(tf.boolean_mask(state.const, active)),
                output_stream=sys.stderr,
            ),
            lambda: tf.no_op(),
        )

    def body(self, state: CWState) -> tuple[CWState]:
        found = self.forward(state)
        state = self.record(self.adam(state, found), found)
        if self.schedule:
            self.progress(state)
        return (state._replace(step=state.step + 1),)

    def cond(self, state: CWState):
        keep = tf.reduce_any(state.active)
        if self.settings.max_total_iterations is not None:
            keep = keep & (state.step < self.settings.max_total_iterations)
        return keep


def _loop(
    model,
    x,
    labels,
    w0,
    tau,
    const,
    *,
    settings: CWSettings,
    schedule: bool,
    epsilon=None,
    compact: bool = False,
) -> CWState:
    """The shared loop from ``w0`` (tanh space) at ``(tau, const)`` (scalars or ``[N]``): one
    round (``schedule`` False) or the whole schedule (see :class:`_Loop`)."""
    loop = _Loop(model, x, labels, settings, schedule=schedule, epsilon=epsilon, compact=compact)
    n = loop.n
    tau = _per_example(tau, n)
    const = _per_example(const, n)
    false = tf.zeros([n], tf.bool)
    zeros_n = tf.zeros([n], tf.float32)
    zeros_x = tf.zeros_like(x)
    state = CWState(
        step=tf.constant(0),
        w=w0,
        m=zeros_x,
        v=zeros_x,
        t=zeros_n,
        it=tf.zeros([n], tf.int32),
        tau=tau,
        const=const,
        small_prev=false,
        active=tf.ones([n], tf.bool),
        iters=tf.zeros([n], tf.int32),
        x_last=x,
        has_last=false,
        dist_last=tf.fill([n], float("inf")),
        x_within=x,
        within=false,
    )
    limit = settings.max_iterations + 1 if not schedule else settings.max_total_iterations
    (final,) = tf.while_loop(loop.cond, loop.body, (state,), maximum_iterations=limit)
    return final


def cw_inner(
    model,
    x,
    labels,
    w0,
    *,
    tau,
    const,
    max_iterations: int,
    learning_rate: float = CW_PAPER.learning_rate,
    targeted: bool,
):
    """One round of the attack at fixed ``(tau, const)`` per example (traceable, any batch size).

    Args:
      model: images -> logits ``[N, K]``.
      x: original images ``[N, H, W, C]`` (pixels). labels: int32 ``[N]`` (targets if ``targeted``).
      w0: starting point in tanh space ``[N, H, W, C]`` (``to_tanh_space(x)``, or a warm start).
      tau: penalty threshold in pixels, scalar or ``[N]``. const: the constant ``c``, scalar or
        ``[N]``.
      max_iterations: Adam steps at most; learning_rate: Adam's.

    Returns:
      ``(x_new [N, H, W, C], success bool [N])``: per example the first point that works (see
      the module docstring), else the last iterate. Warm-start another round from
      ``to_tanh_space(x_new)``. Cost: at most ``max_iterations + 1`` forward+backward passes.
    """
    settings = CWSettings(
        targeted=targeted, max_iterations=max_iterations, learning_rate=learning_rate
    )
    out = _loop(
        model, x, tf.cast(labels, tf.int32), w0, tau, const, settings=settings, schedule=False
    )
    x_new = tf.where(_rows_mask(out.has_last, x), out.x_last, from_tanh_space(out.w))
    return x_new, out.has_last


def cw_schedule(model, x, labels, *, epsilon, settings: CWSettings, compact: bool = False) -> dict:
    """The whole tau/const schedule of ``settings`` for a batch (traceable). Units: pixels.
    ``compact``: only the rows still running go through the model (not under XLA, which needs
    static shapes).

    Returns a dict of tensors: ``x_last``/``has_last``/``distance`` (the last success of the
    schedule, Carlini & Wagner's answer, and its L-inf distance, ``inf`` if none),
    ``x_within``/``within`` (the last success with distance ``<= epsilon``), ``iterations``
    (forward+backward passes per example) and ``total_steps`` (iterations of the batched loop).
    """
    out = _loop(
        model,
        x,
        tf.cast(labels, tf.int32),
        to_tanh_space(x),
        settings.initial_tau,
        settings.initial_const,
        settings=settings,
        schedule=True,
        epsilon=epsilon,
        compact=compact,
    )
    return dict(
        total_steps=out.step,
        iterations=out.iters,
        x_last=out.x_last,
        has_last=out.has_last,
        distance=out.dist_last,
        x_within=out.x_within,
        within=out.within,
    )
