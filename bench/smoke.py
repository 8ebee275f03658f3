"""What the benchmarks' ``--smoke`` runs share: a tiny model with a known answer, the ART check.

``--smoke`` runs a benchmark at tiny sizes (a couple of images, 1-3 steps, one timed repeat) so that
the tests can run every benchmark in seconds and notice when one no longer runs: the same functions
and library calls as the real run, only the sizes (and, where the model is not what is measured, the
model) shrink. Its numbers measure nothing.
"""

from __future__ import annotations

import importlib.util

import numpy as np

HELP = "tiny sizes (seconds; checks that the benchmark runs, measures nothing)"

# Logit scale of the nearest-centre model: -||x - mu_c||^2 / T; 3e4 px^2 keeps the logits O(10).
TEMPERATURE = 3e4


def nearest_centre_model(num_classes: int = 10, seed: int = 0):
    """The synthetic set's nearest-centre classifier: ``[N, 32, 32, 3]`` pixels -> logits.

    Logits ``-||x - mu_c||^2 / T`` up to a class-independent term (one ``Dense`` layer), with the
    centres of ``manifold_tf.data.synthetic_manifold(seed=seed)``: it classifies every synthetic
    point correctly and compiles in a blink, where a ResNet's tracing would dominate a smoke run.
    """
    # deferred: the ART check and the help text need no TensorFlow.
    import keras

    from manifold_tf.data import synthetic_manifold

    centres, _ = synthetic_manifold(num_classes=num_classes, seed=seed)
    flat = centres.reshape(num_classes, -1).astype(np.float64)
    model = keras.Sequential(
        [keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(num_classes)]
    )
    model.layers[-1].set_weights(
        [
            (2.0 * flat.T / TEMPERATURE).astype(np.float32),
            (-(flat**2).sum(1) / TEMPERATURE).astype(np.float32),
        ]
    )
    return model


def art_installed() -> bool:
    """Whether ART imports (adversarial-robustness-toolbox, ``bench/requirements-bench.txt``)."""
    return importlib.util.find_spec("art") is not None


def check_art(wanted: bool, smoke: bool, bench: str) -> bool:
    """Whether to run the ART comparison: ``wanted`` and ART installed.

    Without ART, a smoke run prints a note and goes on without it (CI does not install it); a real
    run stops before any work, naming the fix, rather than fail at the end of a long run.
    """
    if not wanted:
        return False
    if art_installed():
        return True
    if smoke:
        print(
            f"note: {bench}: ART (adversarial-robustness-toolbox) is not installed; the smoke run "
            "skips the ART comparison and runs everything else "
            "(pip install -r bench/requirements-bench.txt to include it)."
        )
        return False
    raise SystemExit(
        f"{bench}: the ART comparison needs adversarial-robustness-toolbox: "
        "pip install -r bench/requirements-bench.txt, or pass --no_art."
    )
