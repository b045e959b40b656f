"""What torchrun runs in each process: `python -m funnelrec.cli.worker <command> ...`.

    torchrun --standalone --nproc-per-node 2 -m funnelrec.cli.worker candidates -f FEAT -o ART
    torchrun --standalone --nproc-per-node 2 -m funnelrec.cli.worker ranker -f FEAT -o ART

The `funnelrec train` commands, one line per error, prefixed by the rank under torchrun.
`funnelrec train ... --nproc N` starts torchrun on this module (`training.distributed.launch`
names it as a string); nothing imports it, so `python -m` runs it once.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from funnelrec.cli.train import app
from funnelrec.errors import FunnelrecError
from funnelrec.training import distributed

# The training commands whose run is data-parallel-aware (loader shards, reduced metrics,
# rank-0-only writes); the others are refused under torchrun.
DISTRIBUTED_COMMANDS = frozenset({"candidates", "ranker"})


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m funnelrec.cli.worker <command> ...` (what torchrun runs in each process):
    the `funnelrec train` commands, one line per error, prefixed by the rank under torchrun."""
    args = list(sys.argv[1:] if argv is None else argv)
    rank_id = os.environ.get("RANK") if distributed.under_torchrun() else None
    try:
        if rank_id is not None and int(os.environ["WORLD_SIZE"]) > 1:
            command = next((a for a in args if not a.startswith("-")), None)
            if command is not None and command not in DISTRIBUTED_COMMANDS:
                raise FunnelrecError(
                    f"'{command}' does not train data-parallel yet; under torchrun use one of "
                    f"{sorted(DISTRIBUTED_COMMANDS)}"
                )
        app(args=args, prog_name="python -m funnelrec.cli.worker")
    except FunnelrecError as e:
        where = f"[rank {rank_id}] " if rank_id is not None else ""
        print(f"error: {where}{e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
