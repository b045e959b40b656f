"""One training loop for any model with `compute_loss(batch) -> scalar` (both stages).

    seed_everything(cfg.seed)                      # before building the model
    model = CandidateModel(...)
    result = train(model, loader_epochs(loader), cfg,
                   steps_per_epoch=len(loader), checkpoint=Path("ART.checkpoint.pt"),
                   evaluate=lambda m: recall_at_k(m))   # higher is better; optional

What it does, in order, every step: move the batch to the device, loss.backward(), clip
the global gradient norm, step the optimizers. AdamW (or Adagrad) for dense parameters;
parameters a model lists in `sparse_parameters()` (large embedding tables with sparse
gradients) get lazy Adam (`sparse_adam.RowSparseAdam`: SparseAdam's update, faster; see
docs/candidates.md), which only touches the rows a batch used.

Checkpoints (every `checkpoint_every` steps or `checkpoint_every_s` seconds, and on Ctrl-C
after the step in flight)
hold the model and optimizer state dicts, every RNG state, the position in the data
(epoch, batch) and the early-stopping state, written atomically with `torch.save` and
read with `weights_only=True`. `resume=True` restores all of it, so the run continues to
the same weights as an uninterrupted one (bit-exact on the CPU, tested), given that the
batches of an epoch depend only on the epoch (`loader_epochs` of a seeded loader).

Early stopping: `evaluate(model)` runs at the end of each epoch (or every `eval_every`
steps); after `patience` evaluations without improvement training stops, and the best
weights are restored.

Data-parallel (`dist=distributed.setup(device)` in each process torchrun starts): every
rank trains a replica on its own batches (`batch_size` / N examples each), gradients are
averaged over ranks before clipping (`distributed.sync_gradients`: dense ones all-reduced,
sparse tables' touched rows all-gathered), so all replicas take the same step. The loss
and the Ctrl-C request are agreed on in the same exchange; `evaluate` must return the same
number on every rank (reduce it, e.g. `Distributed.all_reduce_sums`). Only rank 0 writes
checkpoints; they hold every rank's RNG state, and resuming needs the same number of ranks.

    torchrun --standalone --nproc-per-node 2 -m funnelrec.cli.worker candidates -f FEAT -o ART
    python -m funnelrec.cli.worker candidates -f FEAT -o ART --device cuda    # one process
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import io
import itertools
import json
import math
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal, NoReturn

import numpy as np
import torch
from torch import Tensor, nn

from funnelrec.errors import ArtifactError, FunnelrecError
from funnelrec.progress import progress_bar
from funnelrec.training.distributed import Distributed, rank_seed, sync_gradients
from funnelrec.training.sparse_adam import RowSparseAdam

CHECKPOINT_FORMAT = 1

# Config fields that may change between an interrupted run and its resumption: they
# do not change what a step computes (more epochs or steps extend the same run).
RESUMABLE_CHANGES = frozenset(
    {
        "epochs",
        "max_steps",
        "checkpoint_every",
        "checkpoint_every_s",
        "threads",
        "num_workers",
        "progress_every",
    }
)


@dataclass(frozen=True)
class TrainConfig:
    """How to train (shared by both stages). Defaults in brackets where they are choices.

    optimizer:        "adamw" (dense) + lazy Adam (sparse tables), or "adagrad" (all)
    lr:               learning rate [1e-3]
    sparse_lr:        learning rate of the sparse tables; None = lr
    weight_decay:     decoupled weight decay of dense parameters (never embeddings' rows)
    grad_clip:        max global gradient norm; 0 = no clipping
    batch_size:       examples per step, over all processes of a data-parallel run
    epochs:           passes over the training examples
    max_steps:        stop after this many steps in total (None = epochs decide)
    seed:             seeds torch, numpy and random; with the loader's seed, the whole run
    threads:          torch intra-op threads (None = torch's default)
    device:           "cpu" or "cuda" (under torchrun: each process's own GPU)
    checkpoint_every: steps between checkpoints (0 = only on Ctrl-C)
    checkpoint_every_s: also checkpoint when this many seconds have passed since the last
                     one (0 = by steps only), so that a run killed after its first minutes
                     resumes whatever its epoch length; one process only (ranks of a
                     distributed run would have to agree on the moment: they go by steps)
    eval_every:       steps between evaluations (0 = at the end of each epoch)
    patience:         evaluations without improvement before stopping (0 = never stop)
    restore_best:     load the best evaluated weights at the end
    num_workers:      loader processes
    """

    optimizer: Literal["adamw", "adagrad"] = "adamw"
    lr: float = 1e-3
    sparse_lr: float | None = None
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 1024
    epochs: int = 1
    max_steps: int | None = None
    seed: int = 0
    threads: int | None = None
    device: str = "cpu"
    checkpoint_every: int = 1000
    checkpoint_every_s: float = 300.0
    eval_every: int = 0
    patience: int = 0
    restore_best: bool = True
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise FunnelrecError(f"train config: lr must be > 0, got {self.lr}")
        if self.batch_size < 1 or self.epochs < 1:
            raise FunnelrecError("train config: batch_size and epochs must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise FunnelrecError(f"train config: max_steps must be >= 1, got {self.max_steps}")
        if not self.checkpoint_every_s >= 0:
            raise FunnelrecError(
                f"train config: checkpoint_every_s must be >= 0, got {self.checkpoint_every_s}"
            )
        if self.grad_clip < 0 or self.checkpoint_every < 0 or self.eval_every < 0:
            raise FunnelrecError("train config: grad_clip, checkpoint_every, eval_every >= 0")
        if self.patience < 0:
            raise FunnelrecError(f"train config: patience must be >= 0, got {self.patience}")
        try:
            torch.device(self.device)
        except RuntimeError:
            raise FunnelrecError(
                f"train config: device must be cpu, cuda or cuda:N, got {self.device!r}"
            ) from None


class TrainingInterrupted(FunnelrecError):
    """Ctrl-C during training: the checkpoint (if any) holds the last completed step."""


@dataclass
class TrainResult:
    """What happened. history: (step, metric) of each evaluation. Counts are over all
    ranks; comm_*: this rank's gradient exchange in this call (0 on one process)."""

    steps: int
    epochs: int
    examples: int
    seconds: float  # of this call (a resumed run: since resuming)
    examples_per_s: float  # of this call
    loss: float
    best_metric: float | None = None
    best_step: int | None = None
    stopped_early: bool = False
    history: list[tuple[int, float]] = field(default_factory=list)
    world_size: int = 1
    comm_bytes_per_step: float = 0.0
    comm_seconds: float = 0.0
    # the optimizers' state after the last step (`optimizer_tensors`): what an artifact
    # keeps so that a warm start continues Adam's moments instead of restarting them
    optimizer_state: dict[str, Tensor] = field(default_factory=dict, repr=False)


EpochBatches = Callable[[int, int], Iterable[Any]]
"""(epoch, start) -> that epoch's batches from batch index `start` on."""


def loader_epochs(loader: Any) -> EpochBatches:
    """Adapt a loader with `set_epoch(epoch)` (e.g. `loader.candidate_loader`) or a plain
    re-iterable of batches to `EpochBatches`. Skipped batches are read and dropped."""

    def epoch_batches(epoch: int, start: int) -> Iterable[Any]:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        return itertools.islice(iter(loader), start, None)

    return epoch_batches


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and random (call before building the model)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense, sparse) trainable parameters: sparse ones are the model's
    `sparse_parameters()` (tables with sparse gradients), in a fixed order."""
    sparse_fn = getattr(model, "sparse_parameters", None)
    sparse: list[nn.Parameter] = list(sparse_fn()) if callable(sparse_fn) else []
    sparse_ids = {id(p) for p in sparse}
    dense = [p for p in model.parameters() if p.requires_grad and id(p) not in sparse_ids]
    return dense, sparse


def build_optimizers(model: nn.Module, config: TrainConfig) -> list[torch.optim.Optimizer]:
    """Optimizers for `model`'s parameters (see the module docstring)."""
    dense, sparse = split_parameters(model)
    sparse_lr = config.sparse_lr if config.sparse_lr is not None else config.lr
    if config.optimizer == "adagrad":
        groups: list[dict[str, Any]] = [
            {"params": dense, "weight_decay": config.weight_decay},
            {"params": sparse, "lr": sparse_lr, "weight_decay": 0.0},
        ]
        return [torch.optim.Adagrad([g for g in groups if g["params"]], lr=config.lr)]
    opts: list[torch.optim.Optimizer] = []
    if dense:
        # the fused kernel does one pass over each tensor instead of a dozen; it needs
        # floating-point parameters on CPU or CUDA
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in dense)
        opts.append(
            torch.optim.AdamW(
                dense, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None
            )
        )
    if sparse:
        opts.append(RowSparseAdam(sparse, lr=sparse_lr))
    if not opts:
        raise FunnelrecError("the model has no trainable parameters")
    return opts


def optimizer_tensors(
    model: nn.Module, optimizers: list[torch.optim.Optimizer]
) -> dict[str, Tensor]:
    """The optimizers' per-parameter state as flat tensors named `<parameter>/<key>`
    (Adam's moments and step count, Adagrad's sums): what an artifact saves (safetensors)
    and `load_grown_optimizer_state` reads back."""
    names = {id(p): name for name, p in model.named_parameters()}
    out: dict[str, Tensor] = {}
    for opt in optimizers:
        for p, state in opt.state.items():
            name = names.get(id(p))
            if name is None:
                continue
            for key, value in state.items():
                t = value if isinstance(value, Tensor) else torch.tensor(value)
                out[f"{name}/{key}"] = t.detach().cpu().contiguous()
    return out


# The optimizers' state after a run's last step, in its artifact: what a warm start
# continues from. Kept in training artifacts only (a package copies what serving needs).
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_FORMAT_VERSION = 1


def save_optimizer_state(art: Path, tensors: dict[str, Tensor]) -> None:
    """Write `optimizer_tensors` of a run into artifact directory `art` (safetensors)."""
    from safetensors.torch import save_file

    meta = {"format_version": str(OPTIMIZER_FORMAT_VERSION)}
    save_file(tensors, str(Path(art) / OPTIMIZER_FILE), metadata=meta)


def load_optimizer_state(art: Path | str) -> dict[str, Tensor]:
    """The optimizer state artifact `art` saved; {} for one without (made before it was
    kept). Refused: an unreadable file, another format version, non-finite values."""
    from safetensors import SafetensorError, safe_open

    path = Path(art) / OPTIMIZER_FILE
    if not path.exists():
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            version = (f.metadata() or {}).get("format_version")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path}: cannot read the optimizer state ({e})") from None
    if version != str(OPTIMIZER_FORMAT_VERSION):
        raise ArtifactError(
            f"{path}: optimizer state format {version}, this funnelrec reads "
            f"{OPTIMIZER_FORMAT_VERSION}"
        )
    bad = next((k for k, v in tensors.items() if not torch.isfinite(v).all()), None)
    if bad is not None:
        raise ArtifactError(f"{path}: non-finite values in '{bad}'")
    return tensors


def load_grown_optimizer_state(
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    tensors: dict[str, Tensor],
    *,
    where: object = "warm start",
) -> list[str]:
    """Give `optimizers` the state `optimizer_tensors` saved for a smaller model, the
    optimizer side of `load_grown_state`: a table that gained rows keeps its old rows'
    moments and its new rows start at zero, as a fresh optimizer's would; step counts
    carry over. Parameters with no saved state start fresh. Returns the parameters
    given a state."""
    saved: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        name, _, field_name = key.rpartition("/")
        saved.setdefault(name, {})[field_name] = value
    params = dict(model.named_parameters())
    unknown = sorted(set(saved) - set(params))
    if unknown:
        raise ArtifactError(f"{where}: optimizer state of '{unknown[0]}', which the model lacks")
    loaded: list[str] = []
    for opt in optimizers:
        position = {
            id(p): i for i, p in enumerate(q for g in opt.param_groups for q in g["params"])
        }
        state: dict[int, dict[str, Any]] = {}
        for name, fields in saved.items():
            p = params[name]
            if id(p) not in position:
                continue
            entry: dict[str, Any] = {}
            for field_name, value in fields.items():
                if value.dim() == 0:  # a step count
                    entry[field_name] = (
                        int(value) if isinstance(opt, RowSparseAdam) else value.clone()
                    )
                    continue
                grows = value.shape[1:] == p.shape[1:] and value.shape[0] <= p.shape[0]
                if value.dim() != p.dim() or not grows:
                    raise ArtifactError(
                        f"{where}: optimizer state '{name}/{field_name}' has shape "
                        f"{tuple(value.shape)}, the parameter {tuple(p.shape)}"
                    )
                full = torch.zeros_like(p, memory_format=torch.contiguous_format)
                full[: value.shape[0]].copy_(value.to(full.dtype))
                entry[field_name] = full
            state[position[id(p)]] = entry
            loaded.append(name)
        if state:
            opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    return sorted(loaded)


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> float:
    """Scale all gradients, dense and sparse, so their global L2 norm is <= max_norm.

    Returns the norm before clipping. Sparse gradients are coalesced first (duplicate
    rows summed) so that their norm is the true one."""
    grads: list[Tensor] = []
    # last parameter first: the optimizers then start on the gradients read last, still in
    # cache (the gain, timed: docs/candidates.md)
    for p in reversed(list(params)):
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            grads.append(p.grad._values())
        else:
            grads.append(p.grad)
    if not grads:
        return 0.0
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coef = max_norm / (float(total) + 1e-6)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return float(total)


# --------------------------------------------------------------------------- checkpoints


def _rng_state(device: torch.device) -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    # only the training GPU's generator (dropout): asking for every GPU's would start a
    # CUDA context on each of them, in every process of a multi-GPU run
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if device.type == "cuda" and isinstance(state.get("cuda"), Tensor):
        torch.cuda.set_rng_state(state["cuda"], device)


def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    buf = io.BytesIO()
    torch.save(obj, buf)
    try:
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a second Ctrl-C while saving: leave no partial file
        tmp.unlink(missing_ok=True)
        raise


def check_finite(model: nn.Module, where: Path) -> None:
    """Refuse weights read from `where` that a damaged file made non-finite: every parameter
    finite, no buffer NaN (buffers may hold -inf: the log of a zero probability)."""
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise ArtifactError(f"{where}: parameter '{name}' holds NaN or infinite values")
    for name, b in model.named_buffers():
        if b.is_floating_point() and bool(torch.isnan(b).any()):
            raise ArtifactError(f"{where}: buffer '{name}' holds NaN values")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by `train`, read with weights_only=True (no pickle code)."""
    try:
        ckpt: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no checkpoint to resume from") from None
    except Exception as e:  # torch raises several types for a damaged file
        raise ArtifactError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    if ckpt.get("format_version") != CHECKPOINT_FORMAT:
        raise ArtifactError(
            f"{path}: checkpoint format {ckpt.get('format_version')}, this funnelrec reads "
            f"{CHECKPOINT_FORMAT}"
        )
    return ckpt


def load_grown_state(
    model: nn.Module,
    state: dict[str, Tensor],
    *,
    skip: Callable[[str], bool] = lambda name: False,
    where: object = "warm start",
) -> dict[str, tuple[int, int]]:
    """Copy a smaller model's `state` into `model`, whose tables may have more rows.

    The warm start of a model whose vocabularies grew: a tensor of the same shape is
    copied whole; one that has more rows in `model` (an embedding table, a per-id buffer)
    gets the old rows copied into its first rows, and its new rows keep the values the
    model's own init gave them. Every other difference of shape is refused, as is a
    tensor that only one side has. `skip(name)`: entries left as the model built them
    (e.g. what is recomputed from the new data). Returns {name: (old rows, new rows)} of
    the grown tensors. Optimizer state is not part of it: a warm start begins with fresh
    optimizers (the loop's checkpoints then hold the grown model's own).
    """
    own = model.state_dict()
    names = {k for k in own if not skip(k)}
    missing = sorted(names - set(state))
    extra = sorted(k for k in state if k not in own and not skip(k))
    if missing or extra:
        which = f"lacks '{missing[0]}'" if missing else f"has '{extra[0]}', the model does not"
        raise ArtifactError(f"{where}: the previous model {which}")
    grown: dict[str, tuple[int, int]] = {}
    with torch.no_grad():
        for name in sorted(names):
            new, old = own[name], state[name]
            same_rest = old.dim() == new.dim() and old.shape[1:] == new.shape[1:]
            if old.shape != new.shape and not (same_rest and old.shape[0] <= new.shape[0]):
                raise ArtifactError(
                    f"{where}: '{name}' has shape {tuple(old.shape)} in the previous model and "
                    f"{tuple(new.shape)} now; only tables that gain rows can grow"
                )
            new[: old.shape[0]].copy_(old.to(new.dtype))
            if old.shape != new.shape:
                grown[name] = (int(old.shape[0]), int(new.shape[0]))
    return grown


def _state_copy(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- the loop


class _StopOnSigint:
    """First Ctrl-C: finish the step in flight, then checkpoint and stop. Second: abort."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopOnSigint:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)


@dataclass
class _Position:
    """Where training stands: what a checkpoint holds to resume from."""

    epoch: int = 0
    batch: int = 0  # batches of `epoch` already trained on
    step: int = 0
    examples: int = 0
    loss: float = math.nan  # running mean of recent losses
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)
    stopped_early: bool = False


# glibc hands allocations above a (dynamic) threshold to mmap and returns freed memory
# at the heap's top to the system, so every training step's fresh gradient buffers
# (tens of MB for embedding tables) come back as new pages, each zeroed by the kernel on
# first touch (the cost in a step, measured: docs/candidates.md). Keeping allocations up
# to KEEP_FREED_BYTES on the heap and not trimming it reuses the pages instead (PyTorch's
# CPU tuning guide suggests a caching allocator for the same reason).
KEEP_FREED_BYTES = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def keep_freed_memory() -> bool:
    """Tune glibc's malloc to reuse freed memory (see KEEP_FREED_BYTES); for the whole
    process, once (finding the C library runs ldconfig, so later calls reuse the answer).
    False where the C library is not glibc (nothing is changed)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, KEEP_FREED_BYTES)
        and mallopt(_M_TRIM_THRESHOLD, 2 * KEEP_FREED_BYTES)
    )


def train(
    model: nn.Module,
    batches: EpochBatches,
    config: TrainConfig,
    *,
    steps_per_epoch: int | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    evaluate: Callable[[nn.Module], float] | None = None,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    description: str = "training",
    dist: Distributed | None = None,
    optimizer_state: dict[str, Tensor] | None = None,
) -> TrainResult:
    """Train `model` in place (see the module docstring).

    batches:         (epoch, start) -> batches; `loader_epochs(loader)` makes one. Under
                     `dist`, this rank's share of the epoch (its loader's rank/world_size)
    steps_per_epoch: steps per epoch, for the progress bar's total and ETA
    checkpoint:      file to checkpoint to (and resume from)
    evaluate:        validation metric of the model, higher is better (e.g. Recall@K);
                     under `dist`, called on every rank and must agree across ranks
    meta:            JSON-able description of what is trained (model and data config); a
                     resumed checkpoint must carry the same
    dist:            this process's place in a data-parallel run (None: one process)
    optimizer_state: a warm start's optimizer state (`optimizer_tensors` of the previous
                     model), given to the fresh optimizers (`load_grown_optimizer_state`);
                     a resumed run takes its checkpoint's instead
    """
    run = _setup(model, config, checkpoint, resume, evaluate, meta, dist or Distributed())
    if optimizer_state and not resume:
        load_grown_optimizer_state(model, run.optimizers, optimizer_state)
    pos = run.pos
    model.train()
    t0 = time.perf_counter()
    examples_before, steps_before = pos.examples, pos.step
    done = pos.stopped_early or run.at_max_steps()
    total = _total_steps(config, steps_per_epoch)
    show = progress and run.dist.is_main
    with _StopOnSigint() as stop, _Progress(show, description, total, pos.step, t0) as bar:
        while not done and pos.epoch < config.epochs:
            end = _train_epoch(run, batches, stop, bar)
            # one process reads the request itself; several act only on the agreed one
            if end == "stop" or (not run.dist.enabled and stop.requested):
                _checkpoint_and_stop(run)
            if end == "done":
                break
            if not config.eval_every and _evaluate(run):
                pos.stopped_early = done = True
            pos.epoch += 1
            pos.batch = 0
    if checkpoint is not None:
        _save(run)  # the final state: resuming a finished run is a no-op
    if config.restore_best and run.best_state is not None:
        model.load_state_dict(run.best_state)
    return _result(run, time.perf_counter() - t0, examples_before, steps_before)


@dataclass
class _Run:
    """What the pieces of `train` share: the model, its optimizers and where training
    stands, and this rank's gradient exchange so far."""

    model: nn.Module
    config: TrainConfig
    device: torch.device
    dist: Distributed
    optimizers: list[torch.optim.Optimizer]
    dense: list[nn.Parameter]  # split_parameters(model), in the order every rank shares
    sparse: list[nn.Parameter]
    params: list[nn.Parameter]  # every trainable parameter, for clipping
    checkpoint: Path | None
    meta_json: str
    evaluate: Callable[[nn.Module], float] | None
    pos: _Position = field(default_factory=_Position)
    best_state: dict[str, Tensor] | None = None
    comm_bytes: int = 0
    comm_s: float = 0.0
    saved_at: float = field(default_factory=time.monotonic)  # the last checkpoint (or start)

    def at_max_steps(self) -> bool:
        return self.config.max_steps is not None and self.pos.step >= self.config.max_steps


def _setup(
    model: nn.Module,
    config: TrainConfig,
    checkpoint: Path | None,
    resume: bool,
    evaluate: Callable[[nn.Module], float] | None,
    meta: dict[str, Any] | None,
    dist: Distributed,
) -> _Run:
    """The model on its device, its optimizers, and the state the first step starts from:
    the checkpoint's (resume) or a fresh RNG stream with the replicas made equal."""
    if not callable(getattr(model, "compute_loss", None)):
        raise FunnelrecError(f"{type(model).__name__} has no compute_loss(batch)")
    if resume and checkpoint is None:
        raise FunnelrecError("resume needs a checkpoint path")
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FunnelrecError(f"device {config.device!r}: no CUDA GPU is available here")
    if config.threads:
        torch.set_num_threads(config.threads)
    model.to(device)
    if device.type == "cpu":
        keep_freed_memory()
    optimizers = build_optimizers(model, config)
    dense, sparse = split_parameters(model)
    run = _Run(
        model=model,
        config=config,
        device=device,
        dist=dist,
        optimizers=optimizers,
        dense=dense,
        sparse=sparse,
        params=[p for p in model.parameters() if p.requires_grad],
        checkpoint=checkpoint,
        meta_json=json.dumps(meta or {}, sort_keys=True, default=str),
        evaluate=evaluate,
    )
    if resume:
        assert checkpoint is not None
        _resume(run, checkpoint)
    else:
        seed_rng_for_training(config.seed, dist.rank)
        # replicas must start equal; after a resume they already are (one checkpoint)
        dist.broadcast_module(model)
    return run


def _resume(run: _Run, path: Path) -> None:
    """Restore everything the checkpoint at `path` holds, once it is known to be this
    run's: weights, optimizer states, position, best weights and this rank's RNG."""
    ckpt = load_checkpoint(path)
    _check_resumable(ckpt, run.config, run.meta_json, path)
    saved_world = int(ckpt.get("world_size", 1))
    if saved_world != run.dist.world_size:
        raise ArtifactError(
            f"{path}: checkpoint was made by {saved_world} process(es), this run has "
            f"{run.dist.world_size}; resume with the same number (--nproc)"
        )
    run.model.load_state_dict(ckpt["model"])
    for opt, state in zip(run.optimizers, ckpt["optimizers"], strict=True):
        opt.load_state_dict(state)
    saved = ckpt["position"]
    run.pos = _Position(**{**saved, "history": [(int(s), float(m)) for s, m in saved["history"]]})
    run.best_state = ckpt.get("best_model")
    rng = ckpt["rng_ranks"][run.dist.rank] if run.dist.enabled else ckpt["rng"]
    _set_rng_state(rng, run.device)


class _Progress:
    """The progress bar: steps, the rate of examples over about the last second (a step's
    batch size varies at an epoch's end) and the running loss."""

    FIELDS = "steps  {task.fields[rate]} ex/s  loss {task.fields[loss]}"

    def __init__(
        self, enabled: bool, description: str, total: int | None, step: int, t0: float
    ) -> None:
        self.bar = progress_bar(None, enabled=enabled, fields=self.FIELDS)
        self.description, self.total, self.step = description, total, step
        self.rate_t, self.rate_n, self.rate = t0, 0, 0.0

    def __enter__(self) -> _Progress:
        self.bar.__enter__()
        self.task = self.bar.add_task(
            self.description, total=self.total, completed=self.step, rate="-", loss="-"
        )
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def update(self, pos: _Position, examples: int) -> None:
        self.rate_n += examples
        now = time.perf_counter()
        if now - self.rate_t >= 1.0:
            self.rate, self.rate_t, self.rate_n = self.rate_n / (now - self.rate_t), now, 0
        self.bar.update(
            self.task, completed=pos.step, rate=f"{self.rate:,.0f}", loss=f"{pos.loss:.4f}"
        )


def _total_steps(config: TrainConfig, steps_per_epoch: int | None) -> int | None:
    """The steps the run will take, for the progress bar's total (None: not known)."""
    total = None
    if steps_per_epoch is not None:
        total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps) if total is not None else config.max_steps
    return total


class _BatchStream:
    """The rest of one epoch's batches, then None (also once a loader worker has died of
    the Ctrl-C being handled)."""

    def __init__(self, batches: EpochBatches, pos: _Position, stop: _StopOnSigint) -> None:
        # torch's DataLoader draws a seed from the global RNG when an iterator is made;
        # a resumed run makes one mid-epoch, so keep that draw off the training stream
        with torch.random.fork_rng(devices=[]):
            self._it: Iterator[Any] = iter(batches(pos.epoch, pos.batch))
        self._stop = stop
        self.exhausted = False

    def next(self) -> Any:
        if self.exhausted:
            return None
        try:
            return next(self._it)
        except StopIteration:
            self.exhausted = True
        except Exception:
            if not self._stop.requested:
                raise
            self.exhausted = True
        return None


_EpochEnd = Literal["end", "done", "stop"]


def _train_epoch(
    run: _Run, batches: EpochBatches, stop: _StopOnSigint, bar: _Progress
) -> _EpochEnd:
    """Train on the rest of the current epoch. Returns "end" (its batches are done),
    "done" (max_steps reached or early stopping), or "stop" (a Ctrl-C, agreed by all
    ranks), with the evaluations and checkpoints that fall due on the way."""
    pos, config = run.pos, run.config
    epoch = _BatchStream(batches, pos, stop)
    while True:
        if run.at_max_steps():
            return "done"
        batch = epoch.next()
        # one process: the epoch ends with its batches; several: when every
        # rank's have (a rank without a batch still joins the exchange)
        if batch is None and not run.dist.enabled:
            return "end"
        examples, stopping = _step(run, batch, stop)
        if run.dist.enabled and examples == 0:
            return "stop" if stopping else "end"
        bar.update(pos, examples)
        if stopping:
            return "stop"
        # evaluate before checkpointing, so a checkpoint holds its step's evaluation
        if config.eval_every and pos.step % config.eval_every == 0 and _evaluate(run):
            pos.stopped_early = True
            return "done"
        by_steps = config.checkpoint_every and pos.step % config.checkpoint_every == 0
        by_time = (
            config.checkpoint_every_s > 0
            and not run.dist.enabled
            and run.checkpoint is not None
            and time.monotonic() - run.saved_at >= config.checkpoint_every_s
        )
        if by_steps or by_time:
            _save(run)


def _step(run: _Run, batch: Any, stop: _StopOnSigint) -> tuple[int, bool]:
    """One step on `batch` (None: this rank has none left, but joins the exchange).

    Returns (examples, stop) as all ranks agreed on them; examples == 0 under `dist`:
    no rank had a batch left, and nothing was updated."""
    pos, config = run.pos, run.config
    n = 0 if batch is None else len(batch) if hasattr(batch, "__len__") else 1
    for opt in run.optimizers:
        opt.zero_grad(set_to_none=True)
    value = math.nan
    if batch is not None:
        if hasattr(batch, "to"):
            batch = batch.to(run.device)
        loss = run.model.compute_loss(batch)  # type: ignore[operator]
        loss.backward()
        value = float(loss.detach())
    stopping = stop.requested
    if run.dist.enabled:
        tc = time.perf_counter()
        sync = sync_gradients(
            run.dense, run.sparse, run.dist, examples=n, loss=value, stop=stopping
        )
        run.comm_s += time.perf_counter() - tc
        run.comm_bytes += sync.bytes
        # every rank takes the same decisions from here on: the agreed values
        n, value, stopping = sync.examples, sync.loss, sync.stop
        if n == 0:
            return n, stopping
    if config.grad_clip > 0:
        clip_grad_norm(run.params, config.grad_clip)
    for opt in run.optimizers:
        opt.step()
    if not math.isfinite(value):
        raise FunnelrecError(
            f"training diverged: loss {value} at step {pos.step + 1} "
            "(lower lr or keep grad_clip on)"
        )
    pos.batch += 1
    pos.step += 1
    pos.examples += n
    pos.loss = value if math.isnan(pos.loss) else 0.98 * pos.loss + 0.02 * value
    return n, stopping


def _evaluate(run: _Run) -> bool:
    """Evaluate and keep the best weights; True if training should stop early."""
    pos, config = run.pos, run.config
    if run.evaluate is None:
        return False
    run.model.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # RNG-neutral
        metric = float(run.evaluate(run.model))
    run.model.train()
    pos.history.append((pos.step, metric))
    if pos.best is None or metric > pos.best:
        pos.best, pos.best_step, pos.bad_evals = metric, pos.step, 0
        if config.restore_best:
            run.best_state = _state_copy(run.model)
    else:
        pos.bad_evals += 1
    return config.patience > 0 and pos.bad_evals >= config.patience


def _save(run: _Run) -> None:
    """Checkpoint, called on every rank at the same step: rank 0 writes, the others wait
    for it."""
    if run.checkpoint is None:
        return
    rng = _rng_state(run.device)
    every_rng = run.dist.all_gather_objects(rng)
    if run.dist.is_main:
        state = {
            "format_version": CHECKPOINT_FORMAT,
            "config": asdict(run.config),
            "meta": run.meta_json,
            "model": run.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in run.optimizers],
            "rng": rng,
            "position": asdict(run.pos),
            "best_model": run.best_state,
            "world_size": run.dist.world_size,
        }
        if run.dist.enabled:
            state["rng_ranks"] = every_rng
        _save_atomic(state, run.checkpoint)
    # a rank that left early (an exception after Ctrl-C) would make torchrun kill
    # rank 0 mid-write
    run.dist.barrier()
    run.saved_at = time.monotonic()


def _checkpoint_and_stop(run: _Run) -> NoReturn:
    """Ctrl-C: checkpoint the last completed step and stop."""
    _save(run)
    where = f"; checkpoint saved to {run.checkpoint} (continue with --resume)"
    raise TrainingInterrupted(
        f"interrupted at step {run.pos.step}" + (where if run.checkpoint else "")
    )


def _result(run: _Run, seconds: float, examples_before: int, steps_before: int) -> TrainResult:
    """What this call did; `*_before`: where it started (a resumed run's checkpoint)."""
    pos = run.pos
    steps = pos.step - steps_before
    return TrainResult(
        steps=pos.step,
        epochs=pos.epoch,
        examples=pos.examples,
        seconds=seconds,
        examples_per_s=(pos.examples - examples_before) / seconds if seconds > 0 else math.nan,
        loss=pos.loss,
        best_metric=pos.best,
        best_step=pos.best_step,
        stopped_early=pos.stopped_early,
        history=list(pos.history),
        world_size=run.dist.world_size,
        comm_bytes_per_step=run.comm_bytes / steps if steps else 0.0,
        comm_seconds=run.comm_s,
        optimizer_state=optimizer_tensors(run.model, run.optimizers),
    )


def seed_rng_for_training(seed: int, rank: int = 0) -> None:
    """The RNG state a fresh run starts its first step from (negatives, dropout); each
    rank of a data-parallel run draws its own stream (rank 0's is the 1-process one)."""
    seed_everything(rank_seed(seed, rank) + 1)  # +1: not the stream the model's init drew from


def _check_resumable(ckpt: dict[str, Any], config: TrainConfig, meta: str, path: Path) -> None:
    saved = ckpt.get("config", {})
    now = asdict(config)
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k])
    if changed:
        k = changed[0]
        raise ArtifactError(
            f"{path}: checkpoint was made with {k}={saved.get(k)!r}, now {k}={now[k]!r}; "
            "resume with the same training config"
        )
    if ckpt.get("meta") != meta:
        raise ArtifactError(f"{path}: checkpoint was made for another model or data configuration")
