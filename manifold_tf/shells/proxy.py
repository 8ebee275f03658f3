"""The cheaper copy of a defence an attack steers by (issue 22's "surrogate"): :class:`ProxyMixin`.

Part of every :class:`~manifold_tf.shells.FactorShell`. An attack through a proxy (BPDA, Square)
takes its gradients and intermediate decisions from :meth:`ProxyMixin.proxy`'s copy and confirms
every success it claims, and its last iterates, on the shell itself; its cost is the copy's own
``passes_per_prediction`` (per image, as the attack queries it). Croce et al. (2022) attack Hedge
so: through 5 inner steps instead of 20, scored on the full defence.
"""

from __future__ import annotations


class ProxyMixin:
    """What a shell says about its cheaper copy; the defaults declare none (the shell is its own
    proxy)."""

    # Wrong labels per point a proxy copy searches beside ``y`` (None: every label, through
    # ``embed_function``). Set only on the copies :meth:`proxy` returns; see :meth:`embed_labels`.
    proxy_labels: int | None = None

    def proxy(self, *, steps: int | None = None, labels: int | None = None) -> ProxyMixin:
        """A cheaper copy of this defence for an attack to steer by (issue 22's "surrogate").

        An attack takes its gradients and its intermediate decisions from the proxy, and confirms
        every success it claims, and its last iterates, on the shell itself: a proxy only changes
        where an attack looks, never what it reports. Its cost is its own
        :meth:`passes_per_prediction` (per image, as an attack queries it).

        Args:
          steps: the copy's inner search steps, at most the shell's own (``None`` or more: the
            shell's own). What a step is belongs to the shell (MCN's ascent steps, NCN's Adam
            steps per round, Hedge's and the anti-adversary's signed steps, the CW shell's
            iterations per constant).
          labels: for a shell that searches every label (MCN, NCN): the copy searches, per point,
            ``y`` and this many wrong labels, which the attack picks (the full shell's best at its
            start, :meth:`embed_labels`); ``None``: every label. Ignored by other shells.

        Returns:
          A shell of the same class sharing ``base``. The default (a defence that declares
          nothing) is the shell itself, as is any shell asked for no change. Copies are cached
          per ``(steps, labels)``: each is compiled once.
        """
        del steps, labels
        return self

    def default_proxy(self, *, attack: str = "bpda") -> ProxyMixin:
        """The copy the verdict's ``attack`` (``"bpda"``, ``"bpda_targeted"`` or ``"square"``,
        which searches every label) steers by unless told otherwise: one measured to break every
        point that attack through the shell itself breaks (``bench/bench_surrogate.py``,
        BUILD.md). The default: the shell itself (nothing measured)."""
        del attack
        return self

    def _cached_proxy(self, key: tuple, build) -> ProxyMixin:
        """The proxy of ``key``, built once (``build() -> shell``) and kept on the shell."""
        cache = self.__dict__.setdefault("_proxies", {})
        if key not in cache:
            cache[key] = build()
        return cache[key]

    def embed_labels(self, x, labels) -> dict:
        """The search on the given labels of each point only (a proxy's, see :meth:`proxy`).

        Args:
          x: images ``[M, H, W, C]``, float32 pixels 0..255.
          labels: int32 ``[M, S]``, the labels searched for each point (``S`` slots).

        Returns:
          :meth:`embed`'s dict with ``S`` slots instead of ``C``: ``z`` ``[M, S, H, W, C]``,
          ``log_odds`` ``[M, S]`` (of slot ``s``'s label at its point), ``slot_labels``
          ``[M, S]`` (= ``labels``; :meth:`scores` ranks by them), ``label`` ``[M]`` (the label
          chosen) and ``probabilities`` ``[M, num_classes]``. Cost per image: ``S / C`` of
          :meth:`passes_per_prediction`'s search for a shell that searches labels one by one.
        """
        del x, labels
        raise NotImplementedError(
            f"{type(self).__name__} does not search labels one by one: it has no embed_labels "
            f"(its proxy searches every label)."
        )
