"""L-inf projected gradient descent (Madry et al. 2018), untargeted or targeted, on the shared
core."""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from manifold_tf import compiled, projected, seeds
from manifold_tf.attacks.common import DEFAULT_JIT_COMPILE, goal, margin, prepare
from manifold_tf.attacks.result import AttackResult
from manifold_tf.validation import check_choice, check_int, validate_radius

LOSSES = ("xent", "cw")


@dataclasses.dataclass(frozen=True)
class PGDSettings:
    """PGD's knobs besides its budget (:func:`pgd`); a ValueError names a bad field.

    Attributes:
      loss: ``"xent"`` ascends the cross-entropy of ``y`` (targeted: ascends ``log F(x)_y``);
        ``"cw"`` ascends ``max_{j != y} Z_j - Z_y`` (targeted: ``Z_y - max_{j != y} Z_j``).
      random_start: start each run at a uniform point of ``N(x, epsilon)`` (else at ``x``).
      restarts: independent runs, >= 1; per example the best is kept: a successful point
        (misclassified, or classified as the target) before an unsuccessful one, then the highest
        loss.
      targeted: ``y`` are targets to reach instead of labels to leave.
    """

    loss: str = "xent"
    random_start: bool = True
    restarts: int = 1
    targeted: bool = False

    def __post_init__(self) -> None:
        checked = dict(
            loss=check_choice(self.loss, "loss", LOSSES),
            random_start=bool(self.random_start),
            restarts=check_int(self.restarts, "restarts", 1),
            targeted=bool(self.targeted),
        )
        for name, value in checked.items():  # plain Python values: equal settings, equal keys
            object.__setattr__(self, name, value)


_DEFAULTS = PGDSettings()


def pgd(
    model,
    x,
    y,
    *,
    epsilon: float,
    steps: int,
    step_size: float,
    settings: PGDSettings = _DEFAULTS,
    seed: int = 0,
    jit_compile: bool = DEFAULT_JIT_COMPILE,
) -> AttackResult:
    """L-inf PGD: ``settings.restarts`` runs of ``steps`` signed-gradient steps of ``step_size``
    pixels.

    Args:
      model: Keras model, images ``[N, H, W, C]`` (0..255) -> logits ``[N, K]``.
      x: images ``[N, H, W, C]`` float, pixels 0..255.
      y: int labels ``[N]``: the true labels (untargeted: move away from them) or the targets.
      epsilon: L-inf budget in pixels (8 means 8/255 of the range).
      steps, step_size: signed-gradient steps per run and their size in pixels.
      settings: :class:`PGDSettings` (loss, random start, restarts, targeted); default: untargeted
        cross-entropy from a random start, one run.
      seed: seeds the random starts (deterministic for a given seed): an int, or an int array
        ``[N]`` of per-point seeds (a point's starts then depend on its own seed only, not on the
        batch: :func:`manifold_tf.seeds.row_keys`).
      jit_compile: compile the loop with XLA.

    Returns:
      :class:`AttackResult`: ``x_adv`` ``[N, H, W, C]`` float32 inside ``N(x, epsilon)`` and
      [0, 255]; ``success`` (misclassified, or classified as the target, at ``x_adv``); ``score``
      the loss there. Cost: ``restarts * steps`` forward+backward passes and ``restarts * 2``
      forward passes of the model (``base_passes`` counts the former).
    """
    if not isinstance(settings, PGDSettings):
        raise TypeError(f"settings must be a PGDSettings; got {type(settings).__name__}.")
    loss, random_start = settings.loss, settings.random_start
    restarts, targeted = settings.restarts, settings.targeted
    steps = check_int(steps, "steps", 0)
    step_size = validate_radius(step_size, "step_size")
    x, y, _, epsilon = prepare(model, x, y, epsilon, "epsilon")
    point_seed = seeds.per_point(seed, int(x.shape[0]))
    if x.shape[0] == 0:
        return AttackResult.unattacked(x.numpy())
    key = ("pgd", steps, loss, random_start, restarts, targeted)

    def build(net):
        def loss_of(logits, labels):
            if loss == "cw":
                m = margin(logits, labels)
                return m if targeted else -m
            logp = tf.gather(tf.nn.log_softmax(logits), labels, batch_dims=1)
            return logp if targeted else -logp

        def objective_fn(labels):
            return lambda z: loss_of(net(z, training=False), labels)

        def run(x, labels, eps, step, keys):
            objective = objective_fn(labels)
            expand = [-1] + [1] * (len(x.shape) - 1)

            def one_restart(r, best_z, best_f, best_ok):
                z0 = x
                if random_start:
                    z0 = projected.random_start_rows(x, eps, tf.gather(keys, r))
                z, f = projected.projected_ascent(
                    objective, x, z0, radius=eps, steps=steps, step_size=step
                )
                if restarts == 1:  # nothing to choose between: skip the forward pass
                    return r + 1, z, f, best_ok
                ok = goal(net(z, training=False), labels, targeted)
                # A success beats a failure; among equals, the higher loss wins.
                better = (ok & ~best_ok) | ((ok == best_ok) & (f > best_f))
                best_z = tf.where(tf.reshape(better, expand), z, best_z)
                return r + 1, best_z, tf.where(better, f, best_f), best_ok | ok

            n = tf.shape(x)[:1]
            init = (tf.constant(0), x, tf.fill(n, -np.inf), tf.zeros(n, tf.bool))
            _, z, _, _ = tf.while_loop(
                lambda r, *_: r < restarts, one_restart, init, maximum_iterations=restarts
            )
            z = projected.project(z, x, eps)
            logits = net(z, training=False)
            return z, goal(logits, labels, targeted), loss_of(logits, labels)

        return run

    fn = compiled.cached(model, key, build, jit_compile=jit_compile)
    z, ok, f = fn(
        x,
        y,
        tf.constant(epsilon, tf.float32),
        tf.constant(step_size, tf.float32),
        tf.constant(np.stack([seeds.fold(point_seed, "pgd", r) for r in range(restarts)])),
    )
    return AttackResult(z.numpy(), ok.numpy(), base_passes=restarts * steps, score=f.numpy())
