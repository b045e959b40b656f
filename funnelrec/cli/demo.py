"""`funnelrec demo`: the main job on the embedded default (the simulated world)."""

from __future__ import annotations


def demo() -> None:
    """Run the funnel end to end on a small simulated world."""
    raise NotImplementedError
