"""The one cache of compiled functions: ``tf.function``s built per (model, static settings).

Attacks, the adaptive attacks on shells and the evaluation's batched inference all compile through
:func:`cached`, so a model has one place where its traces live (:func:`tracing_counts` shows them,
tests assert that repeated same-shape calls do not retrace).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import tensorflow as tf

# model -> {static settings: tf.function}. Weak keys: a cache entry dies with its model.
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cached(
    model,
    key: tuple,
    build: Callable,
    *,
    jit_compile: bool = False,
    input_signature=None,
    reduce_retracing: bool = False,
):
    """The cached ``tf.function`` of ``build(net)`` for ``(model, key)``.

    ``net(z, training=False)`` calls ``model`` through a weak reference: a strong one inside the
    cached function would keep the model (the cache's key) alive forever.
    """
    per_model = _CACHE.setdefault(model, {})
    key = tuple(key) + (("jit_compile", bool(jit_compile)),)
    if key not in per_model:
        ref = weakref.ref(model)

        def net(z, training=False):
            return ref()(z, training=training)

        per_model[key] = graph_function(
            build(net),
            jit_compile=bool(jit_compile),
            input_signature=input_signature,
            reduce_retracing=reduce_retracing,
        )
    return per_model[key]


def graph_function(fn, **kwargs):
    """``tf.function(fn, autograph=False, **kwargs)``, how the package compiles.

    The package writes its loops and branches as ``tf.while_loop`` / ``tf.cond``, so AutoGraph's
    rewriting of Python source buys nothing here and costs seconds per process (it parses and
    transforms every function a trace reaches: about 12 s of a tiny ``evaluate.py`` run's 28 s).
    A Python ``if`` on a tensor then fails at trace time instead of being rewritten.
    """
    return tf.function(fn, autograph=False, **kwargs)


def tracing_counts(model, kind: str | None = None) -> dict:
    """``{static settings: number of traces}`` of every function compiled for ``model``.

    ``kind`` keeps only the keys whose first element is ``kind`` (e.g. ``"pgd"``, ``"bpda"``).
    """
    return {
        k: f.experimental_get_tracing_count()
        for k, f in _CACHE.get(model, {}).items()
        if kind is None or k[0] == kind
    }
