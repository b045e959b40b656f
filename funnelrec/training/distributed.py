"""Data-parallel training with torch.distributed: gloo on CPU, nccl on CUDA, torchrun launches.

    # one machine, 2 processes (torchrun's own launcher, or the same spawned for you)
    torchrun --standalone --nproc-per-node 2 -m funnelrec.cli.worker candidates -f FEAT -o ART
    funnelrec train candidates -f FEAT -o ART --nproc 2
    funnelrec train ranker -f FEAT -o ART --nproc 2     # the ranker alike
    # 2 machines x 8 GPUs: run this on both (HOST0 = the first machine's address)
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST0:29400 \\
        --rdzv-id run1 -m funnelrec.cli.worker candidates -f FEAT -o ART --device cuda

Every process (rank) holds a full replica of the model and reads its own share of the
training row groups (`loader.ShardDataset(rank=, world_size=)`); `batch_size` is the batch
of one step over all ranks, so N processes train the same run shape as one. A step:

    each rank: loss_r = model.compute_loss(its batch of n_r examples); loss_r.backward()
    dense gradients:  all-reduce of sum_r n_r * g_r (one flat buffer, also carrying the
                      losses, n_r and the Ctrl-C flags), divided by sum_r n_r
    sparse gradients: all-gather of each rank's coalesced (row ids, rows) of every sparse
                      table, weighted by n_r / sum n_r, summed by coalescing
    then every rank clips and steps identically, so the replicas never drift apart.

Sparse tables (`model.sparse_parameters()`, large embedding tables) send only the rows a
batch touched, so communication grows with the batch, not the vocabulary: see
docs/scale.md for measurements. A rank whose share of an epoch has run out keeps joining
the collectives with n_r = 0 until every rank has, so uneven shares need no padding and
every example is seen once per epoch. Only rank 0 writes checkpoints (with every rank's
RNG state) and artifacts.
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as td
from torch import Tensor, nn

from funnelrec.errors import FunnelrecError


def backend_for(device: str | torch.device) -> str:
    """The process-group backend for a device: nccl on CUDA, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def under_torchrun() -> bool:
    """True inside a process started by torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel run; `Distributed()` is a single process.

    rank:        0..world_size-1 (rank 0 writes checkpoints and artifacts)
    world_size:  processes in the run
    local_rank:  index on this machine (the GPU it uses)
    device:      where collective tensors live: "cpu" for gloo, this rank's GPU for nccl
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def enabled(self) -> bool:
        """More than one process: the collectives below do something."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            td.barrier()

    def all_reduce_sums(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over ranks of a few float64 numbers (metric sums, counts)."""
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        td.all_reduce(t)
        return [float(v) for v in t.cpu()]

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """`obj` of every rank, in rank order. Serialised with `torch.save` and read back
        with `weights_only=True` (tensors, numbers, strings, lists, dicts; no pickle code)."""
        if not self.enabled:
            return [obj]
        buf = io.BytesIO()
        torch.save(obj, buf)
        data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        chunks = _all_gather_padded(data.to(self.device), self.world_size)
        return [
            torch.load(io.BytesIO(c.cpu().numpy().tobytes()), weights_only=True) for c in chunks
        ]

    def broadcast_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank (replicas start identical)."""
        if not self.enabled:
            return
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                td.broadcast(t.data, src=0)


def setup(device: str = "cpu") -> Distributed:
    """Join the run torchrun started (from its environment variables) and return this
    process's place in it; a single process outside torchrun (or with 1 process).

    Uses nccl with one GPU per local rank on "cuda", gloo otherwise."""
    if not under_torchrun():
        return Distributed()
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1:
        return Distributed()
    comm_device = "cpu"
    if torch.device(device).type == "cuda":
        if torch.device(device).index is not None:
            raise FunnelrecError(
                f"device {device!r}: under torchrun use 'cuda', each process takes the GPU "
                "of its local rank"
            )
        if not torch.cuda.is_available():
            raise FunnelrecError(f"device {device!r}: no CUDA GPU is available on this machine")
        if local >= torch.cuda.device_count():
            raise FunnelrecError(
                f"local rank {local} has no GPU ({torch.cuda.device_count()} on this machine): "
                "use --nproc-per-node <= the number of GPUs"
            )
        torch.cuda.set_device(local)  # "cuda" now means this rank's GPU
        comm_device = f"cuda:{local}"
    if not td.is_initialized():
        _import_group_defaults()
        td.init_process_group(backend=backend_for(device))
    return Distributed(rank=rank, world_size=world, local_rank=local, device=comm_device)


def _import_group_defaults() -> None:
    """Import, before the default process group exists, the torch modules whose functions
    take `group=group.WORLD` as a default argument.

    Such a default is evaluated once, at import, and torch imports these modules lazily
    (`torch.distributed.nn`, with torch._dynamo, when the first optimizer is built). Imported
    after `init_process_group`, their defaults would hold the group for the rest of the
    process: `destroy_process_group` could not free it, and gloo's worker and transport
    threads would outlive `teardown` into interpreter shutdown, where they can abort the
    process ("terminate called without an active exception") after a run that succeeded.
    Imported first, the defaults are None (the default group, looked up at each call)."""
    import torch.distributed.nn  # noqa: F401


def teardown(dist: Distributed) -> None:
    """Leave the process group `setup` joined (after the last collective). Nothing else
    holds the group (see `_import_group_defaults`), so this frees it: the backend's threads
    are joined here, while the interpreter is fully alive, not at process exit."""
    if dist.enabled and td.is_initialized():
        td.destroy_process_group()


def local_batch_size(batch_size: int, dist: Distributed) -> int:
    """This rank's share of a step's `batch_size` examples (shares differ by at most 1)."""
    if batch_size < dist.world_size:
        raise FunnelrecError(
            f"batch_size {batch_size} is smaller than the number of processes {dist.world_size}"
        )
    base, extra = divmod(batch_size, dist.world_size)
    return base + (1 if dist.rank < extra else 0)


def rank_seed(seed: int, rank: int) -> int:
    """A seed for rank `rank`'s random stream (negatives, dropout): rank 0 keeps `seed`
    itself, so a 1-process run is unchanged; other ranks get independent streams."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint32)[0])


# --------------------------------------------------------------------------- gradients


@dataclass(frozen=True)
class StepSync:
    """What the ranks agreed on in one step's gradient exchange.

    examples: sum of n_r (0: every rank's epoch is over, nothing was exchanged)
    loss:     example-weighted mean of the ranks' losses
    stop:     some rank was asked to stop (Ctrl-C)
    bytes:    payload this rank put into the collectives (dense buffer + sparse rows)
    """

    examples: int
    loss: float
    stop: bool
    bytes: int


def _all_gather_fixed(t: Tensor, world: int) -> list[Tensor]:
    """A tensor of the same shape from every rank, in rank order."""
    out = [torch.empty_like(t) for _ in range(world)]
    td.all_gather(out, t.contiguous())
    return out


def _all_gather_padded(t: Tensor, world: int, sizes: Sequence[int] | None = None) -> list[Tensor]:
    """1-D tensors of different lengths from every rank (sent padded to the longest).

    sizes: every rank's length when the caller knows them (saves a collective)."""
    if sizes is None:
        size = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
        sizes = [int(x) for x in _all_gather_fixed(size, world)]
    longest = max(sizes)
    if longest == 0:
        return [t[:0].clone() for _ in range(world)]
    padded = torch.zeros(longest, dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    return [o[:n] for o, n in zip(_all_gather_fixed(padded, world), sizes, strict=True)]


def sync_gradients(
    dense: Sequence[nn.Parameter],
    sparse: Sequence[nn.Parameter],
    dist: Distributed,
    *,
    examples: int,
    loss: float,
    stop: bool,
) -> StepSync:
    """Replace every rank's gradients by the example-weighted mean over ranks.

    dense:  parameters with dense gradients (all-reduced as one flat buffer)
    sparse: parameters with sparse COO gradients, the model's `sparse_parameters()`
            (all-gathered as coalesced row ids + rows)
    Call after `backward()` on every rank, also on one with no batch left (examples=0, no
    gradients), with the parameters in the same order on every rank. A gradient that no
    rank has stays None (the optimizer skips it, as on one process)."""
    n = float(examples)
    grads: list[Tensor | None] = [p.grad if n > 0 else None for p in dense]
    for p, g in zip(dense, grads, strict=True):
        if g is not None and g.is_sparse:
            raise FunnelrecError(
                f"a parameter of shape {tuple(p.shape)} has a sparse gradient but is not "
                "among the model's sparse_parameters()"
            )
    dev = dist.device
    parts = [
        g.detach().reshape(-1).to(dev, torch.float32) * n
        if g is not None
        else torch.zeros(p.numel(), device=dev)
        for p, g in zip(dense, grads, strict=True)
    ]
    flags = [0.0 if g is None else 1.0 for g in grads]
    control = torch.tensor([*flags, loss * n if n > 0 else 0.0, n, float(stop)], device=dev)
    buf = torch.cat([*parts, control])
    sent = buf.numel() * buf.element_size()
    td.all_reduce(buf)
    total, stopping = float(buf[-2]), float(buf[-1]) > 0
    if total == 0:  # every rank's epoch is over: nothing to step on
        return StepSync(examples=0, loss=math.nan, stop=stopping, bytes=sent)
    have = buf[-3 - len(dense) : -3].cpu()
    offset = 0
    for i, p in enumerate(dense):
        k = p.numel()
        p.grad = (
            (buf[offset : offset + k] / total).view_as(p).to(p.device, p.dtype)
            if float(have[i]) > 0
            else None
        )
        offset += k
    sent += _sync_sparse(sparse, dist, weight=n / total)
    return StepSync(examples=round(total), loss=float(buf[-3]) / total, stop=stopping, bytes=sent)


def _sync_sparse(params: Sequence[nn.Parameter], dist: Distributed, weight: float) -> int:
    """All-gather the coalesced sparse gradients (rows scaled by `weight`) and set each
    parameter's gradient to their sum over ranks. Returns the bytes this rank sent."""
    if not params:
        return 0
    dev = dist.device
    rows: list[Tensor] = []
    values: list[Tensor] = []
    counts = torch.zeros(len(params), dtype=torch.int64)
    for i, p in enumerate(params):
        g = p.grad
        if g is None or weight == 0:
            continue
        if not g.is_sparse:
            raise FunnelrecError(
                f"a sparse_parameters() entry of shape {tuple(p.shape)} got a dense gradient"
            )
        g = g.coalesce()  # duplicate rows summed: each row id is sent once
        counts[i] = g._nnz()
        rows.append(g._indices()[0].to(dev))
        values.append((g._values() * weight).reshape(-1).to(dev, torch.float32))
    ids = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64, device=dev)
    vals = torch.cat(values) if values else torch.zeros(0, device=dev)
    world = dist.world_size
    # [world, params]: every rank's row count per table fixes the buffer sizes below
    all_counts = torch.stack([c.cpu() for c in _all_gather_fixed(counts.to(dev), world)])
    widths = torch.tensor([p[0].numel() for p in params])
    all_ids = _all_gather_padded(ids, world, all_counts.sum(1).tolist())
    all_vals = _all_gather_padded(vals, world, (all_counts * widths).sum(1).tolist())
    ids_of = [all_ids[r].split(all_counts[r].tolist()) for r in range(world)]
    vals_of = [all_vals[r].split((all_counts[r] * widths).tolist()) for r in range(world)]
    for i, p in enumerate(params):
        if int(all_counts[:, i].sum()) == 0:
            p.grad = None  # no rank touched this table
            continue
        idx = torch.cat([ids_of[r][i] for r in range(world)]).to(p.device)
        val = torch.cat([vals_of[r][i] for r in range(world)]).to(p.device, p.dtype)
        # the row ids are gradients' own (in range): skip torch's invariant checks
        grad = torch.sparse_coo_tensor(
            idx[None], val.reshape(-1, *p.shape[1:]), p.shape, check_invariants=False
        )
        p.grad = grad.coalesce()  # rows several ranks touched: summed
    return int(counts.numel() * 8 + ids.numel() * 8 + vals.numel() * 4)


# --------------------------------------------------------------------------- launching


def launch(args: Sequence[str], nproc: int, *, module: str = "funnelrec.cli.worker") -> int:
    """Run `python -m <module> <args>` in `nproc` processes on this machine with torchrun
    (`--standalone`: a free local rendezvous port). Returns torchrun's exit status.

    Ctrl-C reaches torchrun too, which passes it to the workers: they finish the step in
    flight and rank 0 checkpoints, so this waits for them instead of leaving at once."""
    if nproc < 1:
        raise FunnelrecError(f"--nproc must be >= 1, got {nproc}")
    env = dict(os.environ)
    # torchrun would set 1 thread per process and warn; share the cores out instead
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", "-m", module, *args,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue  # torchrun got the same Ctrl-C; wait for the checkpoint


R = TypeVar("R")


def train_here_or_launch(
    command: str,
    fit: Callable[[Distributed], R],
    *,
    device: str,
    features: Path | str,
    out: Path,
    config: Path | None,
    overrides: Sequence[str],
    nproc: int,
    resume: bool = False,
    force: bool = False,
    warm_start: Path | None = None,
) -> R | None:
    """The body of `funnelrec train COMMAND`: with nproc > 1, the same command in nproc
    processes under torchrun (`launch`; SystemExit with its status when it fails);
    otherwise `fit(dist)` in this process (one rank of torchrun's when it started us).
    Returns fit's result on the process that reports, None on the others. Every option
    of the command that `fit` reads is forwarded, `--warm-start` included (each rank
    loads the previous artifact and grows its tables; the loop then broadcasts rank 0's
    weights, as for any run, so the replicas start equal)."""
    if nproc != 1:
        if under_torchrun():
            raise FunnelrecError("--nproc starts torchrun; under torchrun leave it out")
        args = [command, "--features", str(features), "--out", str(out)]
        args += ["--config", str(config)] if config is not None else []
        args += ["--resume"] if resume else []
        args += ["--force"] if force else []
        args += ["--warm-start", str(warm_start)] if warm_start is not None else []
        code = launch([*args, *overrides], nproc)
        if code != 0:
            raise SystemExit(code)  # the processes printed their errors
        return None
    dist = setup(device)
    try:
        result = fit(dist)
    finally:
        teardown(dist)
    return result if dist.is_main else None
