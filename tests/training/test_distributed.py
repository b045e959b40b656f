"""Data-parallel training: gradient exchange, the loop on 2 ranks, torchrun end to end, GPU."""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as td
import torch.multiprocessing as mp
from torch import nn

from funnelrec.candidates import (
    CandidateConfig,
    CandidateInputs,
    CandidateModel,
    fit_candidates,
    load_training_config,
    synthetic_batch,
)
from funnelrec.errors import ArtifactError, FunnelrecError
from funnelrec.features.batch import CandidateBatch
from funnelrec.training.distributed import (
    Distributed,
    backend_for,
    local_batch_size,
    rank_seed,
    setup,
    sync_gradients,
    teardown,
)
from funnelrec.training.loop import (
    TrainConfig,
    TrainingInterrupted,
    load_checkpoint,
    seed_everything,
    split_parameters,
    train,
)

torch.set_num_threads(1)
CUDA = torch.cuda.is_available()


def test_backend_batch_shares_and_seeds() -> None:
    assert backend_for("cpu") == "gloo" and backend_for("cuda") == "nccl"
    assert backend_for("cuda:1") == "nccl"
    shares = [local_batch_size(10, Distributed(rank=r, world_size=4)) for r in range(4)]
    assert shares == [3, 3, 2, 2]  # the step's batch, shared out
    assert local_batch_size(64, Distributed()) == 64
    with pytest.raises(FunnelrecError, match="smaller than the number of processes"):
        local_batch_size(2, Distributed(rank=0, world_size=3))
    assert rank_seed(5, 0) == 5  # rank 0 draws the 1-process stream
    assert len({rank_seed(5, r) for r in range(4)}) == 4
    assert rank_seed(5, 1) != rank_seed(6, 1)
    assert setup("cpu") == Distributed()  # outside torchrun: one process
    assert not Distributed().enabled and Distributed().is_main


# --------------------------------------------------------------------------- 2 ranks (gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(rank: int, world: int, port: int, job: str, out: str) -> None:
    """One rank of a spawned gloo group, set up as torchrun would (environment)."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    dist = setup("cpu")
    try:
        assert (dist.rank, dist.world_size, dist.enabled) == (rank, world, True)
        JOBS[job](dist, Path(out))
    finally:
        teardown(dist)


def spawn(job: str, out: Path, world: int = 2) -> None:
    mp.spawn(_run, args=(world, _free_port(), job, str(out)), nprocs=world, join=True)


class Toy(nn.Module):
    """A sparse table and a dense head; loss = mean over examples (decomposable)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(1000, 4, sparse=True)
        self.head = nn.Linear(4, 1)
        self.unused = nn.Linear(2, 2)  # never gets a gradient

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.table.weight]

    def compute_loss(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.head(self.table(ids)).squeeze(-1) - 1.0).pow(2).mean()


def _grads(model: Toy) -> dict[str, torch.Tensor | None]:
    out: dict[str, torch.Tensor | None] = {}
    for name, p in model.named_parameters():
        g = p.grad
        out[name] = None if g is None else (g.to_dense() if g.is_sparse else g).clone()
    return out


def _job_collectives(dist: Distributed, out: Path) -> None:
    batches = [torch.tensor([1, 5, 5, 7, 900, 3]), torch.tensor([5, 8, 2])]  # uneven
    ref = Toy()
    ref.compute_loss(torch.cat(batches)).backward()  # one process, the whole batch
    want = _grads(ref)

    model = Toy()
    mine = batches[dist.rank]
    loss = model.compute_loss(mine)
    loss.backward()
    dense, sparse = split_parameters(model)
    sync = sync_gradients(
        dense, sparse, dist, examples=len(mine), loss=loss.item(), stop=dist.rank == 1
    )
    assert sync.examples == 9 and sync.stop  # rank 1's Ctrl-C reaches rank 0
    whole = float(ref.compute_loss(torch.cat(batches)))
    assert sync.loss == pytest.approx(whole, rel=1e-5)
    got = _grads(model)
    assert got["unused.weight"] is None and want["unused.weight"] is None
    for name, g in want.items():
        if g is not None:
            torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-7)
    # communication grows with the rows touched, not with the table (1000 x 4 floats)
    touched = len(set(mine.tolist()))
    assert sync.bytes < 1000 * 4 * 4
    assert sync.bytes >= touched * (4 * 4 + 8)

    # a rank without a batch (its share of the epoch is over) still joins the step
    model = Toy()
    n = 0
    if dist.rank == 0:
        model.compute_loss(batches[0]).backward()
        n = len(batches[0])
    sync = sync_gradients(*split_parameters(model), dist, examples=n, loss=0.5, stop=False)
    alone = Toy()
    alone.compute_loss(batches[0]).backward()
    assert sync.examples == 6 and not sync.stop and sync.loss == 0.5
    for name, g in _grads(alone).items():
        if g is not None:
            torch.testing.assert_close(_grads(model)[name], g)
    # every rank done: nothing exchanged, the epoch ends everywhere
    model = Toy()
    sync = sync_gradients(*split_parameters(model), dist, examples=0, loss=0.0, stop=False)
    assert sync.examples == 0 and model.table.weight.grad is None

    # small helpers: objects and sums across ranks
    got_objects = dist.all_gather_objects({"rank": dist.rank, "t": torch.arange(dist.rank + 1)})
    assert [o["rank"] for o in got_objects] == [0, 1]
    assert got_objects[1]["t"].tolist() == [0, 1]
    assert dist.all_reduce_sums([1.0, dist.rank]) == [2.0, 1.0]


INPUTS = CandidateInputs(item_vocab=41, token_vocab=17, region_vocab=4, device_vocab=3, num_dense=2)
SHARE = (5, 3)  # batches per epoch of rank 0 and rank 1: uneven shares


def _toy_candidates(seed: int = 0) -> CandidateModel:
    seed_everything(seed)
    cfg = CandidateConfig(dim=8, depth=2, num_negatives=16, sparse=True)
    return CandidateModel(cfg, INPUTS, label_counts=torch.arange(41, 0, -1).float())


def _rank_epochs(
    rank: int, sigint_at: tuple[int, int] | None = None
) -> Callable[[int, int], Iterator[CandidateBatch]]:
    def batches(epoch: int, start: int) -> Iterator[CandidateBatch]:
        g = torch.Generator().manual_seed(1000 * rank + epoch)
        for i in range(SHARE[rank]):
            batch = synthetic_batch(INPUTS, 6, history_len=5, search_len=3, generator=g)
            if i < start:
                continue
            if sigint_at == (epoch, i):
                os.kill(os.getpid(), signal.SIGINT)  # this rank only
            yield batch

    return batches


def _cfg() -> TrainConfig:
    return TrainConfig(lr=0.01, epochs=3, checkpoint_every=0, seed=3, batch_size=12)


def _job_train(dist: Distributed, out: Path) -> None:
    # uninterrupted; each rank given its own checkpoint path: only rank 0's is written
    full = _toy_candidates()
    result = train(full, _rank_epochs(dist.rank), _cfg(), checkpoint=out / f"own-{dist.rank}.pt",
                   progress=False, dist=dist)  # fmt: skip
    assert result.steps == 3 * max(SHARE) and result.examples == 3 * sum(SHARE) * 6
    assert result.world_size == 2 and result.comm_bytes_per_step > 0
    state = {k: v.clone() for k, v in full.state_dict().items()}
    replicas = dist.all_gather_objects(state)
    for k in state:  # the replicas never drift apart
        assert torch.equal(replicas[0][k], replicas[1][k]), k
    dist.barrier()
    assert (out / "own-0.pt").exists() and not (out / "own-1.pt").exists()

    # Ctrl-C on rank 1 only, in epoch 1: both ranks stop after the same step
    ckpt = out / "shared.pt"
    with pytest.raises(TrainingInterrupted, match="interrupted at step 8"):
        train(_toy_candidates(), _rank_epochs(dist.rank, sigint_at=(1, 2) if dist.rank else None),
              _cfg(), checkpoint=ckpt, progress=False, dist=dist)  # fmt: skip
    saved = load_checkpoint(ckpt)
    assert saved["position"]["step"] == 8 and saved["world_size"] == 2
    assert len(saved["rng_ranks"]) == 2
    resumed = _toy_candidates(seed=99)  # all state comes from the checkpoint
    train(resumed, _rank_epochs(dist.rank), _cfg(), checkpoint=ckpt, resume=True,
          progress=False, dist=dist)  # fmt: skip
    for k, v in resumed.state_dict().items():  # bit-exact, as on one process
        assert torch.equal(v, state[k]), k


def _job_both(dist: Distributed, out: Path) -> None:
    _job_collectives(dist, out)  # one spawn for both: starting 2 processes costs seconds
    _job_train(dist, out)


def _job_teardown(dist: Distributed, out: Path) -> None:
    group = td.group.WORLD
    assert group is not None
    freed = weakref.ref(group)
    del group
    # what training does once the group exists: build an optimizer (torch then imports
    # torch._dynamo, and with it modules whose default arguments are the default group)
    torch.optim.AdamW(Toy().parameters())
    assert dist.all_gather_objects(dist.rank) == [0, 1]
    teardown(dist)
    gc.collect()
    # a group something still held would keep gloo's threads running into interpreter
    # shutdown, where they can abort a process whose run succeeded
    assert freed() is None, "the process group outlived teardown"


JOBS: dict[str, Callable[[Distributed, Path], None]] = {
    "collectives": _job_collectives,
    "train": _job_train,
    "both": _job_both,
    "teardown": _job_teardown,
}


def test_two_ranks_step_as_one_process_keep_equal_replicas_and_resume_exactly(
    tmp_path: Path,
) -> None:
    """In 2 spawned gloo processes: gradients averaged as one process would (dense and
    sparse, uneven batches, a rank without a batch), Ctrl-C agreed on, replicas equal,
    only rank 0 checkpoints, and an interrupted run resumes bit-exactly."""
    spawn("both", tmp_path)
    # a 2-process checkpoint resumes only with 2 processes
    with pytest.raises(ArtifactError, match="2 process"):
        train(_toy_candidates(), _rank_epochs(0), _cfg(), checkpoint=tmp_path / "shared.pt",
              resume=True, progress=False)  # fmt: skip


def test_teardown_frees_the_process_group_once_training_has_run(tmp_path: Path) -> None:
    """In 2 spawned gloo processes: after an optimizer was built (as training does),
    `teardown` still frees the group, so no gloo thread of it runs at process exit."""
    spawn("teardown", tmp_path)


# --------------------------------------------------------------------------- torchrun, tiny world


@pytest.fixture(scope="module")
def tiny_features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from funnelrec.features.build import build_features
    from funnelrec.simulate import generate, preset_config

    root = tmp_path_factory.mktemp("tiny")
    generate(preset_config("tiny"), seed=0, out=root / "data", progress=False)
    build_features(root / "data", root / "feat", split="last", progress=False)
    return root / "feat"


TINY = ["dim=16", "epochs=3", "patience=0", "threads=1"]
CONFIG = Path(__file__).parents[2] / "configs" / "candidates-tiny.toml"


def test_two_processes_with_torchrun_reach_the_quality_of_one(
    tiny_features: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from funnelrec.cli import train as train_cli

    one = fit_candidates(
        tiny_features, tmp_path / "one", load_training_config(CONFIG, TINY), progress=False
    )
    art = tmp_path / "two"
    args = ["candidates", "-f", str(tiny_features), "-o", str(art), "--config", str(CONFIG)]
    res = CliRunner().invoke(train_cli.app, [*args, "--nproc", "2", *TINY])
    assert res.exit_code == 0, res.output
    meta = json.loads((art / "config.json").read_text())
    training = meta["training"]
    assert training["processes"] == 2 and training["comm_bytes_per_step"] > 0
    # the same run shape: the step's batch of 128 is shared by the 2 processes, and every
    # training example is read once per epoch
    assert training["steps"] == one.steps and training["examples"] == one.examples
    two_recall = training["best_valid_recall@50"]
    assert one.best_metric is not None and one.best_metric > 0.3
    # seeds of one process vary by ~0.02 here (431 validation targets)
    assert abs(two_recall - one.best_metric) < 0.05
    # rank 0 alone wrote: one artifact, no checkpoint, no temporary directories left
    assert {p.name for p in art.iterdir()} == {
        "config.json", "model.safetensors", "item_embeddings.safetensors",
        "optimizer.safetensors",
    }  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]


# --------------------------------------------------------------------------- GPU


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path: Path) -> None:
    if CUDA:
        pytest.skip("a GPU is present")
    with pytest.raises(FunnelrecError, match="no CUDA GPU"):
        train(_toy_candidates(), _rank_epochs(0), TrainConfig(device="cuda"), progress=False)
    with pytest.raises(FunnelrecError, match="device must be"):
        TrainConfig(device="tpu")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_training_and_validation_match_the_cpu(tiny_features: Path, tmp_path: Path) -> None:
    cpu = fit_candidates(
        tiny_features, tmp_path / "cpu", load_training_config(CONFIG, TINY), progress=False
    )
    gpu = fit_candidates(
        tiny_features,
        tmp_path / "gpu",
        load_training_config(CONFIG, [*TINY, "device=cuda"]),
        progress=False,
    )
    assert cpu.best_metric is not None and gpu.best_metric is not None
    assert abs(gpu.best_metric - cpu.best_metric) < 0.05
    meta = json.loads((tmp_path / "gpu" / "config.json").read_text())
    assert meta["train"]["device"] == "cuda"


@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_with_nccl(tiny_features: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from funnelrec.cli import train as train_cli

    art = tmp_path / "two"
    args = ["candidates", "-f", str(tiny_features), "-o", str(art), "--config", str(CONFIG)]
    res = CliRunner().invoke(train_cli.app, [*args, "--nproc", "2", "--device", "cuda", *TINY])
    assert res.exit_code == 0, res.output
    assert json.loads((art / "config.json").read_text())["training"]["processes"] == 2


# --------------------------------------------------------------------------- ranker, torchrun


@pytest.fixture(scope="module")
def rank_features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 200-user world's features with a time split (its validation pages have clicks)."""
    from funnelrec.features import FeaturesConfig
    from funnelrec.features.build import build_features
    from funnelrec.simulate import generate, preset_config

    root = tmp_path_factory.mktemp("rank")
    world = preset_config("tiny", ["n_users=200", "n_items=300", "days=10"])
    generate(world, seed=0, out=root / "data", progress=False)
    build_features(
        root / "data",
        root / "feat",
        split="time",
        config=FeaturesConfig(n_quantiles=100, history_n=20),
        progress=False,
    )
    return root / "feat"


RANKER = ["model.tower=32", "train.batch_size=256", "train.epochs=2", "train.threads=1"]


def test_two_processes_train_the_ranker_like_one(rank_features: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from funnelrec.cli import train as train_cli
    from funnelrec.ranking import training as rank

    cfg = rank.load_ranker_train_config(None, RANKER)
    one = rank.train_ranker(rank_features, tmp_path / "one", cfg, progress=False)
    art = tmp_path / "two"
    args = ["ranker", "-f", str(rank_features), "-o", str(art), "--nproc", "2", *RANKER]
    res = CliRunner().invoke(train_cli.app, args)
    assert res.exit_code == 0, res.output
    two = json.loads((art / "config.json").read_text())["training"]
    assert two["processes"] == 2 and one["processes"] == 1
    # the same run shape: each step's 256 impressions shared by the 2 processes, every
    # training impression read once per epoch
    assert two["examples"] == one["examples"] and two["steps"] == one["steps"]
    assert two["validation_metric"] == one["validation_metric"] == "weighted_per_user_loss"
    assert one["valid"] < 0.4 and abs(two["valid"] - one["valid"]) < 0.05
    assert two["calibration_factor"] > 0  # rank 0 fitted it on the validation split
    aucs = [
        rank.evaluate_ranker(a, rank_features, show=False)["model"]["auc"]
        for a in (tmp_path / "one", art)
    ]
    assert aucs[0] > 0.6 and abs(aucs[1] - aucs[0]) < 0.05
    # rank 0 alone wrote: one artifact, no checkpoint, no temporary directories left
    assert {p.name for p in art.iterdir()} >= {"config.json", "model.safetensors"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]


def test_a_warm_start_trains_in_two_processes_with_torchrun(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from funnelrec.cli import train as train_cli
    from funnelrec.features import FeaturesConfig
    from funnelrec.features.build import build_features
    from funnelrec.features.update import FeaturesUpdate
    from tests.features.periods import append_day_2, write_periods

    ds, day2 = write_periods(tmp_path)
    build_features(
        ds, tmp_path / "f1", split="time", config=FeaturesConfig(history_n=5), progress=False
    )
    small = ["dim=8", "num_negatives=16", "batch_size=16", "threads=1", "epochs=1", "patience=0"]
    fit_candidates(tmp_path / "f1", tmp_path / "a1", load_training_config(None, small),
                   progress=False)  # fmt: skip
    append_day_2(tmp_path, day2)
    build_features(ds, tmp_path / "f2", split="time", progress=False,
                   update=FeaturesUpdate(tmp_path / "f1"))  # fmt: skip
    art = tmp_path / "a2"
    args = ["candidates", "-f", str(tmp_path / "f2"), "-o", str(art), "--nproc", "2"]
    res = CliRunner().invoke(train_cli.app, [*args, "--warm-start", str(tmp_path / "a1"), *small])
    assert res.exit_code == 0, res.output
    meta = json.loads((art / "config.json").read_text())
    assert meta["training"]["processes"] == 2
    warm = meta["warm_start"]
    assert Path(warm["artifact"]).resolve() == (tmp_path / "a1").resolve()
    assert warm["grown"]["item_input.weight"][1] > warm["grown"]["item_input.weight"][0]
