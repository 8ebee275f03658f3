"""Command-line entry points: ``manifold-tf-evaluate`` and ``manifold-tf-train`` (and the
top-level scripts)."""
