"""Benchmarks of manifold_tf; run from the repository root as ``python -m bench.<script>``."""
