"""A stand-in for the candidate training loader that presses Ctrl-C mid-epoch, for the
tests of interrupted and resumed training."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import funnelrec.features.loader


class _CtrlCAt:
    """The training loader, sending SIGINT while its batch `at` (0-based) is trained on."""

    def __init__(self, loader: Any, at: int) -> None:
        self.loader, self.at = loader, at

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        inner = iter(self.loader)  # now, as the real loader's iterator is made

        def gen() -> Iterator[Any]:
            for i, b in enumerate(inner):
                if i == self.at:
                    os.kill(os.getpid(), signal.SIGINT)
                yield b

        return gen()


def ctrl_c_at_batch(at: int) -> Callable[..., Any]:
    """A `candidate_loader` whose training loaders (shuffled; not validation's) press
    Ctrl-C at batch `at`: monkeypatch it over `funnelrec.features.loader.candidate_loader`."""
    real = funnelrec.features.loader.candidate_loader

    def loader(*args: Any, **kw: Any) -> Any:
        made = real(*args, **kw)
        return _CtrlCAt(made, at) if kw.get("shuffle") else made

    return loader
