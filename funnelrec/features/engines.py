"""Where the feature build's per-block work runs: moved to `funnelrec.engines`, which the
import of your own logs uses too (`funnelrec.data` sits below `funnelrec.features` and
cannot import from it). The names stay importable from here for existing callers."""

from funnelrec.engines import (
    SCHEDULER_ENV,
    WORKER_WAIT_S,
    DaskEngine,
    Engine,
    LocalEngine,
    check_visible,
    local_path,
    scheduler_address,
)

__all__ = [
    "SCHEDULER_ENV",
    "WORKER_WAIT_S",
    "DaskEngine",
    "Engine",
    "LocalEngine",
    "check_visible",
    "local_path",
    "scheduler_address",
]
