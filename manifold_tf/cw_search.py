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

import sys
from typing import NamedTuple

import tensorflow as tf

from manifold_tf.projected import adam_step
from manifold_tf.validation import PIXEL_MAX

# The paper's settings (Carlini & Wagner's defaults), pixel units for the taus.
CW_PAPER = dict(
    max_iterations=1000,
    learning_rate=5e-3,
    initial_const=1e-5,
    const_factor=2.0,
    largest_const=20.0,
    initial_tau=PIXEL_MAX,  # 1.0 of the range
    decrease_factor=0.9,
    min_tau=PIXEL_MAX / 256.0,  # the original stops once tau <= 1/256 of the range
)

# A cheaper preset for CPUs: the same schedule with 100 Adam steps per constant instead of 1000.
# The cost is dominated by each image's last, failing round (every remaining constant up to
# largest_const, max_iterations steps each: up to 21 x max_iterations passes), so this is ~10x
# cheaper; reports must say which preset ran.
CW_CPU = dict(CW_PAPER, max_iterations=100)

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
    small_prev: (
        tf.Tensor
    )  # the previous step's loss was below 1e-4 * c ("works" if it met the goal)
    active: tf.Tensor  # still running
    iters: tf.Tensor  # forward+backward passes spent on the example
    x_last: tf.Tensor  # [N, ...] the last success of the schedule
    has_last: tf.Tensor  # there is one
    dist_last: tf.Tensor  # its L-inf distance (inf if none)
    x_within: tf.Tensor  # [N, ...] the last success within epsilon
    within: tf.Tensor  # there is one


def _rows_mask(mask: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """A per-example ``[N]`` mask reshaped to broadcast against ``x`` ``[N, ...]``."""
    return tf.reshape(mask, [-1] + [1] * (len(x.shape) - 1))


def _per_example(v, n: tf.Tensor) -> tf.Tensor:
    return tf.broadcast_to(tf.cast(v, tf.float32), tf.reshape(n, [1]))


def _loop(
    model,
    x,
    labels,
    w0,
    tau,
    const,
    *,
    targeted,
    max_iterations,
    learning_rate,
    schedule=None,
    epsilon=None,
    max_total_iterations=None,
    compact=False,
):
    """The shared loop. ``schedule=None``: fixed (tau, c), one round. Else a dict of the
    schedule. ``compact``: the model sees only the rows still running (a dynamic batch: not
    under XLA); the others' logits are never read."""
    n = tf.shape(x)[0]
    bshape = [-1] + [1] * (len(x.shape) - 1)
    axes = list(range(1, len(x.shape)))
    tau = _per_example(tau, n)
    const = _per_example(const, n)
    false = tf.zeros([n], tf.bool)
    zeros_n = tf.zeros([n], tf.float32)

    def b(mask):
        return tf.reshape(mask, bshape)

    def body(state: CWState) -> tuple[CWState]:
        (
            step,
            w,
            m,
            v,
            t,
            it,
            tau,
            const,
            small_prev,
            active,
            iters,
            x_last,
            has_last,
            dist_last,
            x_within,
            within,
        ) = state
        with tf.GradientTape() as tape:
            tape.watch(w)
            xn = from_tanh_space(w)
            if compact:  # a finished row costs nothing: the schedule's last rounds are long
                rows = tf.cast(tf.where(active), tf.int32)
                part = model(tf.gather_nd(xn, rows), training=False)
                logits = tf.scatter_nd(rows, part, tf.stack([n, tf.shape(part)[-1]]))
                logits = tf.ensure_shape(logits, [x.shape[0], part.shape[-1]])
            else:
                logits = model(xn, training=False)
            onehot = tf.one_hot(labels, tf.shape(logits)[-1], dtype=logits.dtype)
            real = tf.reduce_sum(onehot * logits, axis=-1)
            other = tf.reduce_max(logits - onehot * 1e4 - onehot * logits, axis=-1)
            loss1 = tf.nn.relu(other - real) if targeted else tf.nn.relu(real - other)
            loss2 = tf.reduce_sum(tf.nn.relu(tf.abs(xn - x) - b(tau)), axis=axes) / PIXEL_MAX
            pred = tf.argmax(logits, axis=-1, output_type=tf.int32)
            goal = tf.equal(pred, labels) if targeted else tf.not_equal(pred, labels)
            # The previous step's check passed ("works") and its result meets the goal.
            succ = active & small_prev & goal
            exhausted = active & ~succ & (it >= max_iterations)
            if schedule is None:
                failed = exhausted
            else:
                const = tf.where(exhausted, const * schedule["const_factor"], const)
                failed = exhausted & (const >= schedule["largest_const"])
            loss = const * loss1 + loss2
            total = tf.reduce_sum(tf.where(active, loss, 0.0))
        g = tape.gradient(total, w, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        g = tf.ensure_shape(tf.convert_to_tensor(g), w.shape)  # static batches stay static
        stepping = active & ~succ & ~failed
        it = tf.where(exhausted, 0, it)
        # Adam exactly as tf.compat.v1.train.AdamOptimizer, per example (its own step count t).
        t = tf.where(stepping, t + 1.0, t)
        delta, m_new, v_new = adam_step(g, m, v, b(tf.maximum(t, 1.0)), learning_rate)
        w_new = w - delta
        w = tf.where(b(stepping), w_new, w)
        m = tf.where(b(stepping), m_new, m)
        v = tf.where(b(stepping), v_new, v)
        it = tf.where(stepping, it + 1, it)
        small_prev = tf.where(stepping, loss < 1e-4 * const, small_prev)
        iters = iters + tf.cast(active, tf.int32)

        dist = tf.reduce_max(tf.abs(xn - x), axis=axes)
        x_last = tf.where(b(succ), xn, x_last)
        has_last = has_last | succ
        dist_last = tf.where(succ, dist, dist_last)
        if schedule is None:
            finished = succ
        else:
            ok_eps = succ & (dist <= epsilon)
            x_within = tf.where(b(ok_eps), xn, x_within)
            within = within | ok_eps
            tau = tf.where(succ, tf.minimum(tau, dist) * schedule["decrease_factor"], tau)
            finished = succ & (tau <= schedule["min_tau"])
            if schedule["stop_within_epsilon"]:
                finished = finished | ok_eps
            # Warm start from the success, with fresh Adam moments, as a new call of the original.
            w = tf.where(b(succ), to_tanh_space(xn), w)
            m = tf.where(b(succ), 0.0, m)
            v = tf.where(b(succ), 0.0, v)
            t = tf.where(succ, 0.0, t)
            it = tf.where(succ, 0, it)
            small_prev = small_prev & ~succ
        active = active & ~failed & ~finished
        if schedule is not None:
            # The schedule runs as one compiled loop: report from inside it, every 250 iterations.
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
                    tf.reduce_mean(tf.boolean_mask(const, active)),
                    output_stream=sys.stderr,
                ),
                lambda: tf.no_op(),
            )
        return (
            CWState(
                step + 1,
                w,
                m,
                v,
                t,
                it,
                tau,
                const,
                small_prev,
                active,
                iters,
                x_last,
                has_last,
                dist_last,
                x_within,
                within,
            ),
        )

    def cond(state: CWState):
        keep = tf.reduce_any(state.active)
        if max_total_iterations is not None:
            keep = keep & (state.step < max_total_iterations)
        return keep

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
    limit = max_iterations + 1 if schedule is None else max_total_iterations
    (final,) = tf.while_loop(cond, body, (state,), maximum_iterations=limit)
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
    learning_rate: float = CW_PAPER["learning_rate"],
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
    out = _loop(
        model,
        x,
        tf.cast(labels, tf.int32),
        w0,
        tau,
        const,
        targeted=targeted,
        max_iterations=int(max_iterations),
        learning_rate=float(learning_rate),
    )
    x_new = tf.where(_rows_mask(out.has_last, x), out.x_last, from_tanh_space(out.w))
    return x_new, out.has_last


def cw_schedule(
    model,
    x,
    labels,
    *,
    epsilon,
    targeted: bool,
    max_iterations: int,
    learning_rate: float,
    initial_const: float,
    const_factor: float,
    largest_const: float,
    initial_tau: float,
    decrease_factor: float,
    min_tau: float,
    stop_within_epsilon: bool = False,
    max_total_iterations: int | None = None,
    compact: bool = False,
) -> dict:
    """The whole tau/const schedule for a batch (traceable). Units: pixels. ``compact``: only
    the rows still running go through the model (not under XLA, which needs static shapes).

    Returns a dict of tensors: ``x_last``/``has_last``/``distance`` (the last success of the
    schedule, Carlini & Wagner's answer, and its L-inf distance, ``inf`` if none),
    ``x_within``/``within`` (the last success with distance ``<= epsilon``), ``iterations``
    (forward+backward passes per example) and ``total_steps`` (iterations of the batched loop).
    """
    schedule = dict(
        const_factor=const_factor,
        largest_const=largest_const,
        decrease_factor=decrease_factor,
        min_tau=min_tau,
        stop_within_epsilon=stop_within_epsilon,
    )
    out = _loop(
        model,
        x,
        tf.cast(labels, tf.int32),
        to_tanh_space(x),
        initial_tau,
        initial_const,
        targeted=targeted,
        max_iterations=int(max_iterations),
        learning_rate=float(learning_rate),
        schedule=schedule,
        epsilon=epsilon,
        max_total_iterations=max_total_iterations,
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
