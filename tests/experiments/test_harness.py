"""The harness's convergence rule: one rule for every arm, run by the product's loop."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from funnelrec.candidates import load_training_config
from funnelrec.experiments.harness import BUDGETS, ExperimentOptions, Harness
from funnelrec.ranking.training import load_ranker_train_config
from funnelrec.training.loop import TrainConfig, train


class Toy(nn.Module):
    """One weight, moved by each step; the loss does not matter here."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def compute_loss(self, batch: torch.Tensor) -> torch.Tensor:
        return ((self.w - batch) ** 2).sum()


def _batches(epoch: int, start: int) -> Iterator[torch.Tensor]:
    for i in range(start, 1000):
        yield torch.tensor([float(epoch * 1000 + i)])


def _harness(tmp_path: Path, *budget: str) -> Harness:
    return Harness(ExperimentOptions(preset="tiny-v2", out=tmp_path, budget=budget))


def test_training_stops_when_validation_stops_improving(tmp_path: Path) -> None:
    h = _harness(tmp_path, "patience=2", "cand_eval_every=5", "cand_max_steps=1000")
    cfg = load_training_config(None, h.candidate_overrides([], seed=0)).train
    assert isinstance(cfg, TrainConfig)
    # validation improves for 3 evaluations, then not for 2: the rule stops at the 5th
    scores = iter([0.1, 0.2, 0.3, 0.25, 0.3, 0.9, 0.9])
    weights: list[float] = []

    def evaluate(m: nn.Module) -> float:
        weights.append(float(m.w.detach()))  # type: ignore[operator]
        return next(scores)

    model = Toy()
    result = train(model, _batches, replace(cfg, batch_size=1), evaluate=evaluate, progress=False)
    assert result.stopped_early
    assert [s for s, _ in result.history] == [5, 10, 15, 20, 25]
    assert result.best_step == 15 and result.steps == 25
    assert float(model.w.detach()) == weights[2]  # the best evaluated weights are kept


def test_training_stops_at_the_maximum_while_it_keeps_improving(tmp_path: Path) -> None:
    h = _harness(tmp_path, "patience=2", "cand_eval_every=5", "cand_max_steps=20")
    cfg = load_training_config(None, h.candidate_overrides([], seed=0)).train
    assert isinstance(cfg, TrainConfig)
    scores = iter([0.1, 0.2, 0.3, 0.4])
    result = train(
        Toy(), _batches, replace(cfg, batch_size=1), evaluate=lambda m: next(scores),
        progress=False,
    )  # fmt: skip
    assert not result.stopped_early and result.steps == 20 and result.best_step == 20


def test_every_arm_of_every_experiment_gets_the_same_rule(tmp_path: Path) -> None:
    h = _harness(tmp_path)
    b = h.budget
    arms = [[], ["depth=4"], ["loss=full"], ["use_search=false"], ["num_negatives=16"]]
    rules = set()
    for overrides in arms:
        for seed in (0, 1, 2):
            c = load_training_config(None, h.candidate_overrides(overrides, seed))
            t = c.train
            rules.add((t.patience, t.eval_every, t.max_steps, t.restore_best, c.valid_examples))
    assert rules == {(b.patience, b.cand_eval_every, b.cand_max_steps, True, b.valid_examples)}
    # the ranker: the same patience, its own evaluation interval and metric
    for tower in ("none", "1024,512,256"):
        r = load_ranker_train_config(None, [*h.convergence("ranker"), f"model.tower={tower}"])
        assert r.validate and r.train.restore_best
        assert (r.train.patience, r.train.eval_every, r.train.max_steps) == (
            b.patience,
            b.rank_eval_every,
            b.rank_max_steps,
        )
    # a budget override changes the rule for every arm at once
    h2 = _harness(tmp_path, "patience=5")
    assert load_training_config(None, h2.candidate_overrides(["depth=4"], 0)).train.patience == 5


def _square(h: Harness, i: int, items: list[int]) -> None:
    h.cached("square", {"i": i}, lambda: {"v": i * i + sum(items), "pid": os.getpid()})


def test_parallel_jobs_run_in_worker_processes_and_leave_their_results(tmp_path: Path) -> None:
    h = _harness(tmp_path, "workers=2")
    jobs = [(_square, (i, [1, 2])) for i in range(4)]
    h.parallel([*jobs, jobs[0]])  # a repeated job runs once
    done = [h.cached("square", {"i": i}, lambda: {"v": -1}) for i in range(4)]
    assert [d["v"] for d in done] == [3, 4, 7, 12]
    assert os.getpid() not in {d["pid"] for d in done}
    # one worker: in this process, in order
    h1 = _harness(tmp_path / "one", "workers=1")
    h1.parallel([(_square, (5, []))])
    assert h1.cached("square", {"i": 5}, lambda: {"v": -1})["pid"] == os.getpid()


def test_budgets_of_the_v2_worlds_are_their_twins() -> None:
    assert BUDGETS["small-v2"] == BUDGETS["small"] and BUDGETS["tiny-v2"] == BUDGETS["tiny"]
    with pytest.raises(Exception, match="workers"):
        replace(BUDGETS["tiny"], workers=0)
