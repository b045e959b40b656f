"""What the forkserver of `funnelrec serve --workers N` imports before it forks a worker.

    PRELOAD = ("funnelrec.serving.preload",)       # serving.workers

The serving code and its libraries (torch, FAISS, Arrow, NumPy, SciPy, FastAPI, uvicorn)
are most of a worker's memory before it loads an artifact. Imported once in the
forkserver, their pages are shared by every worker it forks, until one writes to them.
A garbage collection writes to every object it looks at, so the objects alive here are
then moved out of its sight (`gc.freeze`): a collection in a worker leaves them, and
their pages, alone.

Nothing imported here may read the environment when imported: the forkserver's is that of
the process that started it, not necessarily the server's. (prometheus_client picks its
multiprocess mode so: each worker imports it itself, with `serving.http`.)
"""

from __future__ import annotations

import gc

import fastapi  # noqa: F401
import uvicorn  # noqa: F401

import funnelrec.serving.recommender  # noqa: F401

gc.collect()
gc.freeze()
