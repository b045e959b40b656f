"""The generic training loop: determinism, checkpoints, resume, early stopping, clipping."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from funnelrec.candidates import CandidateConfig, CandidateInputs, CandidateModel, synthetic_batch
from funnelrec.errors import ArtifactError, FunnelrecError
from funnelrec.features.batch import CandidateBatch
from funnelrec.training.loop import (
    TrainConfig,
    TrainingInterrupted,
    build_optimizers,
    clip_grad_norm,
    load_checkpoint,
    loader_epochs,
    seed_everything,
    train,
)
from funnelrec.training.sparse_adam import RowSparseAdam

torch.set_num_threads(1)

INPUTS = CandidateInputs(item_vocab=41, token_vocab=17, region_vocab=4, device_vocab=3, num_dense=2)
STEPS_PER_EPOCH = 6


def make_model(seed: int = 0, **kw: object) -> CandidateModel:
    seed_everything(seed)
    cfg = CandidateConfig(dim=8, depth=2, num_negatives=16, **kw)  # type: ignore[arg-type]
    counts = torch.arange(41, 0, -1).float()
    return CandidateModel(cfg, INPUTS, label_counts=counts)


def epochs(
    crash_at: tuple[int, int] | None = None, sigint_at: tuple[int, int] | None = None
) -> object:
    """Deterministic batches per epoch; optionally crash or send Ctrl-C at (epoch, batch)."""

    def gen(epoch: int, start: int) -> Iterator[CandidateBatch]:
        g = torch.Generator().manual_seed(1000 + epoch)
        for i in range(STEPS_PER_EPOCH):
            batch = synthetic_batch(INPUTS, 12, history_len=5, search_len=3, generator=g)
            if i < start:
                continue
            if crash_at == (epoch, i):
                raise RuntimeError("disk on fire")
            if sigint_at == (epoch, i):
                os.kill(os.getpid(), signal.SIGINT)  # handled: finishes this step first
            yield batch

    def batches(epoch: int, start: int) -> Iterator[CandidateBatch]:
        # like torch's DataLoader, draw from the global RNG when an epoch's iterator is made
        torch.randint(0, 100, (1,))
        return gen(epoch, start)

    return batches


def cfg(**kw: object) -> TrainConfig:
    base: dict[str, object] = {"lr": 0.01, "epochs": 3, "checkpoint_every": 0, "seed": 3}
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_training_lowers_the_loss_and_reports_progress() -> None:
    model = make_model()
    batch = next(iter(epochs()(0, 0)))  # a batch it trains on
    torch.manual_seed(0)
    before = model.compute_loss(batch).item()
    result = train(model, epochs(), cfg(epochs=4), steps_per_epoch=6, progress=False)
    torch.manual_seed(0)
    assert result.steps == 24 and result.epochs == 4 and result.examples == 24 * 12
    assert model.compute_loss(batch).item() < before


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    runs = []
    for seed in (3, 3, 4):
        model = make_model()
        train(model, epochs(), cfg(seed=seed), progress=False)
        runs.append(weights(model))
    assert_same(runs[0], runs[1])
    assert not torch.equal(runs[0]["tower.0.weight"], runs[2]["tower.0.weight"])


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")  # torch's Adagrad, sparse rows
@pytest.mark.parametrize(
    ("optimizer", "sparse"), [("adamw", False), ("adamw", True), ("adagrad", True)], ids=str
)
def test_resume_after_ctrl_c_equals_an_uninterrupted_run(
    tmp_path: Path, optimizer: str, sparse: bool
) -> None:
    full = make_model(sparse=sparse)
    train(full, epochs(), cfg(optimizer=optimizer), progress=False)

    ckpt = tmp_path / "run.pt"
    model = make_model(sparse=sparse)
    with pytest.raises(TrainingInterrupted, match="interrupted at step 10"):
        train(model, epochs(sigint_at=(1, 3)), cfg(optimizer=optimizer), checkpoint=ckpt,
              progress=False)  # fmt: skip
    assert load_checkpoint(ckpt)["position"]["step"] == 10
    resumed = make_model(seed=99, sparse=sparse)  # fresh weights: all state comes from disk
    result = train(
        resumed, epochs(), cfg(optimizer=optimizer), checkpoint=ckpt, resume=True, progress=False
    )
    assert result.steps == 18
    assert_same(weights(full), weights(resumed))


def test_resume_after_a_crash_continues_from_the_last_periodic_checkpoint(
    tmp_path: Path,
) -> None:
    full = make_model()
    train(full, epochs(), cfg(), progress=False)
    ckpt = tmp_path / "run.pt"
    with pytest.raises(RuntimeError, match="disk on fire"):
        train(make_model(), epochs(crash_at=(2, 2)), cfg(checkpoint_every=5), checkpoint=ckpt,
              progress=False)  # fmt: skip
    assert load_checkpoint(ckpt)["position"]["step"] == 10  # the last multiple of 5
    resumed = make_model(seed=7)
    train(resumed, epochs(), cfg(checkpoint_every=5), checkpoint=ckpt, resume=True,
          progress=False)  # fmt: skip
    assert_same(weights(full), weights(resumed))


def test_checkpoints_by_time_leave_a_killed_run_something_to_resume(tmp_path: Path) -> None:
    full = make_model()
    train(full, epochs(), cfg(), progress=False)
    ckpt = tmp_path / "run.pt"
    # no step-based checkpoint ever falls due; a tiny time interval makes every step due
    timed = cfg(checkpoint_every=0, checkpoint_every_s=1e-9)
    with pytest.raises(RuntimeError, match="disk on fire"):
        train(make_model(), epochs(crash_at=(2, 2)), timed, checkpoint=ckpt, progress=False)
    assert load_checkpoint(ckpt)["position"]["step"] == 2 * STEPS_PER_EPOCH + 2
    resumed = make_model(seed=7)
    train(resumed, epochs(), timed, checkpoint=ckpt, resume=True, progress=False)
    assert_same(weights(full), weights(resumed))
    # a long interval and no step interval: nothing written before the crash
    other = tmp_path / "other.pt"
    with pytest.raises(RuntimeError, match="disk on fire"):
        train(make_model(), epochs(crash_at=(1, 1)), cfg(checkpoint_every=0), checkpoint=other,
              progress=False)  # fmt: skip
    assert not other.exists()
    with pytest.raises(FunnelrecError, match="checkpoint_every_s"):
        cfg(checkpoint_every_s=-1.0)


def test_resume_refuses_another_config_or_a_missing_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "run.pt"
    train(make_model(), epochs(), cfg(max_steps=3), checkpoint=ckpt, meta={"m": 1},
          progress=False)  # fmt: skip
    with pytest.raises(ArtifactError, match=r"lr=0\.01"):
        train(make_model(), epochs(), cfg(lr=0.1), checkpoint=ckpt, resume=True,
              meta={"m": 1}, progress=False)  # fmt: skip
    with pytest.raises(ArtifactError, match="another model"):
        train(make_model(), epochs(), cfg(), checkpoint=ckpt, resume=True, meta={"m": 2},
              progress=False)  # fmt: skip
    # more steps is allowed: it extends the run
    r = train(make_model(), epochs(), cfg(max_steps=5), checkpoint=ckpt, resume=True,
              meta={"m": 1}, progress=False)  # fmt: skip
    assert r.steps == 5
    with pytest.raises(ArtifactError, match="no checkpoint"):
        train(make_model(), epochs(), cfg(), checkpoint=tmp_path / "x.pt", resume=True,
              progress=False)  # fmt: skip
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ArtifactError, match="unreadable"):
        load_checkpoint(tmp_path / "bad.pt")


def test_early_stopping_stops_after_patience_and_restores_the_best_weights() -> None:
    metrics = iter([0.5, 0.6, 0.4, 0.3, 0.9])
    snapshots: dict[float, dict[str, torch.Tensor]] = {}

    def evaluate(model: nn.Module) -> float:
        m = next(metrics)
        snapshots[m] = weights(model)
        assert not model.training
        return m

    model = make_model()
    result = train(model, epochs(), cfg(eval_every=2, patience=2), evaluate=evaluate,
                   progress=False)  # fmt: skip
    assert result.stopped_early and result.steps == 8
    assert result.history == [(2, 0.5), (4, 0.6), (6, 0.4), (8, 0.3)]
    assert (result.best_metric, result.best_step) == (0.6, 4)
    assert_same(weights(model), snapshots[0.6])


def test_evaluation_at_epoch_end_does_not_change_the_run() -> None:
    plain = make_model()
    train(plain, epochs(), cfg(), progress=False)
    evaluated = make_model()

    def evaluate(model: nn.Module) -> float:
        torch.rand(5)  # an evaluation that draws random numbers must not shift training's
        return 0.0

    result = train(evaluated, epochs(), cfg(restore_best=False), evaluate=evaluate,
                   progress=False)  # fmt: skip
    assert [s for s, _ in result.history] == [6, 12, 18]
    assert_same(weights(plain), weights(evaluated))


def test_sparse_tables_get_lazy_adam_and_dense_ones_adamw() -> None:
    model = make_model(sparse=True)
    opts = build_optimizers(model, TrainConfig())
    kinds = sorted(type(o).__name__ for o in opts)
    assert kinds == ["AdamW", "RowSparseAdam"]
    sparse = {id(p) for p in model.sparse_parameters()}
    (sparse_adam,) = [o for o in opts if isinstance(o, RowSparseAdam)]
    assert {id(p) for g in sparse_adam.param_groups for p in g["params"]} == sparse
    batch = synthetic_batch(INPUTS, 4, history_len=3)
    model.compute_loss(batch).backward()
    assert model.item_input.weight.grad is not None and model.item_input.weight.grad.is_sparse
    assert len(build_optimizers(make_model(sparse=False), TrainConfig())) == 1


def test_clip_grad_norm_counts_sparse_and_dense_gradients() -> None:
    dense = nn.Parameter(torch.zeros(2))
    dense.grad = torch.tensor([3.0, 0.0])
    table = nn.Parameter(torch.zeros(5, 2))
    # row 1 twice (uncoalesced): its gradient is (0, 2) + (0, 2) = (0, 4)
    table.grad = torch.sparse_coo_tensor(torch.tensor([[1, 1]]), torch.tensor([[0.0, 2.0]] * 2),
                                         (5, 2))  # fmt: skip
    norm = clip_grad_norm([dense, table], max_norm=1.0)
    assert norm == pytest.approx(5.0)
    assert dense.grad.tolist() == pytest.approx([0.6, 0.0], abs=1e-6)
    assert table.grad.to_dense()[1].tolist() == pytest.approx([0.0, 0.8], abs=1e-6)


def test_a_model_without_compute_loss_is_refused() -> None:
    with pytest.raises(FunnelrecError, match="compute_loss"):
        train(nn.Linear(2, 2), epochs(), cfg(), progress=False)


def test_loader_epochs_sets_the_epoch_and_skips() -> None:
    class Loader:
        def __init__(self) -> None:
            self.epoch = -1

        def set_epoch(self, e: int) -> None:
            self.epoch = e

        def __iter__(self) -> Iterator[int]:
            return iter(range(self.epoch * 10, self.epoch * 10 + 4))

    f = loader_epochs(Loader())
    assert list(f(2, 1)) == [21, 22, 23]
    assert list(loader_epochs([7, 8, 9])(0, 2)) == [9]


def test_checkpoints_record_one_process_and_the_device_is_checked(tmp_path: Path) -> None:
    ckpt = tmp_path / "run.pt"
    result = train(make_model(), epochs(), cfg(epochs=1), checkpoint=ckpt, progress=False)
    assert result.world_size == 1 and result.comm_bytes_per_step == 0
    saved = load_checkpoint(ckpt)
    assert saved["world_size"] == 1 and "rng_ranks" not in saved
    with pytest.raises(FunnelrecError, match="device must be cpu, cuda or cuda:N"):
        cfg(device="gpu0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_training_on_cuda_lowers_the_loss_and_resumes(tmp_path: Path, sparse: bool) -> None:
    batch = next(iter(epochs()(0, 0))).to("cuda")
    ckpt = tmp_path / "run.pt"
    model = make_model(sparse=sparse)
    with pytest.raises(TrainingInterrupted):
        train(model, epochs(sigint_at=(1, 3)), cfg(device="cuda"), checkpoint=ckpt,
              progress=False)  # fmt: skip
    resumed = make_model(seed=99, sparse=sparse)
    torch.manual_seed(0)
    before = resumed.to("cuda").compute_loss(batch).item()
    result = train(resumed, epochs(), cfg(device="cuda"), checkpoint=ckpt, resume=True,
                   progress=False)  # fmt: skip
    assert result.steps == 18
    assert all(p.device.type == "cuda" for p in resumed.parameters())
    torch.manual_seed(0)
    assert resumed.compute_loss(batch).item() < before


def test_freed_memory_is_reused_instead_of_faulted_in_again() -> None:
    import resource

    from funnelrec.training.loop import keep_freed_memory

    if not keep_freed_memory():
        pytest.skip("not glibc: malloc is left as it is")
    for _ in range(3):
        torch.ones(4 << 20)  # 16 MiB, freed at once: warms the heap
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.ones(4 << 20)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    # fresh pages each time would be 20 x 4,096; reuse leaves at most a growth or two of
    # the heap (in a long test session its layout varies)
    assert faults <= 2 * 4096


class _Tables(nn.Module):
    """A sparse table (lazy Adam) and a dense layer (AdamW)."""

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.table = nn.Embedding(rows, 3, sparse=True)
        self.out = nn.Linear(3, 1)

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.table.weight]

    def loss(self) -> torch.Tensor:
        return self.out(self.table(torch.tensor([0, 2, 2, 4]))).square().mean()


def test_optimizer_state_grows_with_the_tables_and_keeps_the_step_counts() -> None:
    from funnelrec.training.loop import (
        TrainConfig,
        build_optimizers,
        load_grown_optimizer_state,
        optimizer_tensors,
    )

    torch.manual_seed(0)
    small, config = _Tables(5), TrainConfig(lr=0.01)
    opts = build_optimizers(small, config)
    assert any(isinstance(o, RowSparseAdam) for o in opts)
    for _ in range(3):
        for o in opts:
            o.zero_grad()
        small.loss().backward()
        for o in opts:
            o.step()
    saved = optimizer_tensors(small, opts)
    assert saved["table.weight/exp_avg"].shape == (5, 3)

    big = _Tables(7)
    grown_opts = build_optimizers(big, config)
    names = load_grown_optimizer_state(big, grown_opts, saved)
    assert names == ["out.bias", "out.weight", "table.weight"]
    sparse = next(o for o in grown_opts if isinstance(o, RowSparseAdam))
    state = sparse.state[big.table.weight]
    assert state["step"] == 3 and isinstance(state["step"], int)
    assert torch.equal(state["exp_avg_sq"][:5], saved["table.weight/exp_avg_sq"])
    assert not state["exp_avg_sq"][5:].any()
    dense = next(o for o in grown_opts if not isinstance(o, RowSparseAdam))
    assert torch.equal(dense.state[big.out.weight]["exp_avg"], saved["out.weight/exp_avg"])
    # the grown optimizers step as usual
    for o in grown_opts:
        o.zero_grad()
    big.loss().backward()
    for o in grown_opts:
        o.step()
    assert state["step"] == 4 and torch.isfinite(big.table.weight).all()
    with pytest.raises(ArtifactError, match="lacks"):
        load_grown_optimizer_state(big, grown_opts, {"missing.weight/exp_avg": torch.zeros(2)})
