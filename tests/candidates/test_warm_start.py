"""Warm starts of the candidate model: a model of day 1 continued on features updated
for day 2 (data written by the tests: `tests/features/periods.py`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from funnelrec.candidates import checkpoint_path, fit_candidates, load_training_config
from funnelrec.errors import ArtifactError, FunnelrecError
from funnelrec.features import Features, FeaturesConfig
from funnelrec.features.build import build_features
from funnelrec.features.update import FeaturesUpdate
from funnelrec.training.loop import TrainingInterrupted
from tests.candidates.interrupt import ctrl_c_at_batch
from tests.features.periods import append_day_2, write_periods

OVERRIDES = ["dim=8", "num_negatives=16", "batch_size=16", "threads=1", "epochs=2", "patience=0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Features of day 1 and a model trained on them; day 2 appended, features updated;
    also a fresh build of days 1-2 (whose vocabularies do not extend day 1's)."""
    root = tmp_path_factory.mktemp("warm")
    ds, day2 = write_periods(root)
    cfg = FeaturesConfig(history_n=5, n_quantiles=20)
    build_features(ds, root / "f1", split="time", config=cfg, progress=False)
    fit_candidates(root / "f1", root / "a1", load_training_config(None, OVERRIDES), progress=False)
    append_day_2(root, day2)
    build_features(
        ds, root / "f2", split="time", progress=False, update=FeaturesUpdate(root / "f1")
    )
    build_features(ds, root / "fresh", split="time", config=cfg, progress=False)
    return {k: root / k for k in ("f1", "a1", "f2", "fresh")}


def test_a_warm_start_grows_the_tables_and_keeps_the_old_rows(
    trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import funnelrec.candidates.training as training

    old = load_file(str(trained["a1"] / "model.safetensors"))
    initial: dict[str, torch.Tensor] = {}
    real_train = training.train

    def keep_initial_state(model: torch.nn.Module, *args: Any, **kw: Any) -> Any:
        initial.update({k: v.clone() for k, v in model.state_dict().items()})
        return real_train(model, *args, **kw)

    monkeypatch.setattr(training, "train", keep_initial_state)
    cfg = load_training_config(None, OVERRIDES)
    result = fit_candidates(
        trained["f2"], tmp_path / "a2", cfg, progress=False, warm_start=trained["a1"]
    )
    f1, f2 = Features.open(trained["f1"]), Features.open(trained["f2"])
    n_old, n_new = len(f1.vocab("item")), len(f2.vocab("item"))
    assert n_new > n_old
    for name in ("item_input.weight", "item_output.weight", "token_input.weight"):
        rows = old[name].shape[0]
        assert initial[name].shape[0] > rows, name
        assert torch.equal(initial[name][:rows], old[name]), name  # exactly, before training
        new_rows = initial[name][rows:]
        assert new_rows.abs().sum() > 0 and torch.isfinite(new_rows).all()  # initialised
    for name in ("tower.0.weight", "tower.0.bias", "region.weight"):
        assert torch.equal(initial[name], old[name]), name
    # the proposal is recounted from the new features' training labels
    counts = torch.tensor(f2.item_label_counts().tolist(), dtype=torch.float64).clamp(min=1.0)
    counts[0] = 0.0
    want = torch.log(counts / counts.sum()).to(torch.float32)
    assert torch.allclose(initial["softmax.log_p_label"][1:], want[1:])
    assert result.steps > 0 and torch.isfinite(torch.tensor(result.loss))
    new = load_file(str(tmp_path / "a2" / "model.safetensors"))
    assert new["item_input.weight"].shape[0] == n_new
    assert all(torch.isfinite(v).all() for k, v in new.items() if not k.startswith("softmax."))
    assert not torch.equal(new["tower.0.weight"], old["tower.0.weight"])  # it trained


def test_an_interrupted_warm_start_resumes_to_the_same_artifact(
    trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import funnelrec.features.loader

    cfg = load_training_config(None, OVERRIDES)
    plain = tmp_path / "plain"
    fit_candidates(trained["f2"], plain, cfg, progress=False, warm_start=trained["a1"])

    art = tmp_path / "cand"
    with monkeypatch.context() as m:
        m.setattr(funnelrec.features.loader, "candidate_loader", ctrl_c_at_batch(3))
        with pytest.raises(TrainingInterrupted, match="--resume"):
            fit_candidates(trained["f2"], art, cfg, progress=False, warm_start=trained["a1"])
    assert checkpoint_path(art).exists()
    with pytest.raises(ArtifactError, match="another model"):
        fit_candidates(trained["f2"], art, cfg, resume=True, progress=False)  # not warm
    fit_candidates(trained["f2"], art, cfg, resume=True, progress=False, warm_start=trained["a1"])
    a, b = load_file(str(plain / "model.safetensors")), load_file(str(art / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_warm_start_on_features_that_do_not_extend_the_model_is_refused(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    cfg = load_training_config(None, OVERRIDES)
    with pytest.raises(ArtifactError, match=r"does not extend|update-from"):
        fit_candidates(
            trained["fresh"], tmp_path / "x", cfg, progress=False, warm_start=trained["a1"]
        )
    other = load_training_config(None, [*OVERRIDES, "depth=1"])
    with pytest.raises(FunnelrecError, match="keeps the model config"):
        fit_candidates(
            trained["f2"], tmp_path / "y", other, progress=False, warm_start=trained["a1"]
        )
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_proposal_memory_mixes_in_the_previous_label_frequencies(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    cfg = load_training_config(None, [*OVERRIDES, "proposal_memory=0.5", "max_steps=1"])
    fit_candidates(trained["f2"], tmp_path / "m", cfg, progress=False, warm_start=trained["a1"])
    recount = load_training_config(None, [*OVERRIDES, "max_steps=1"])
    fit_candidates(trained["f2"], tmp_path / "r", recount, progress=False, warm_start=trained["a1"])
    mixed = load_file(str(tmp_path / "m" / "model.safetensors"))["softmax.log_q"]
    plain = load_file(str(tmp_path / "r" / "model.safetensors"))["softmax.log_q"]
    assert mixed.shape == plain.shape and not torch.allclose(mixed, plain)
    assert torch.isfinite(mixed[1:]).all()


def test_a_warm_start_continues_the_optimizer_state_of_the_old_rows(
    trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from funnelrec.training import loop

    saved = load_file(str(trained["a1"] / "optimizer.safetensors"))
    assert saved and all(torch.isfinite(v).all() for v in saved.values())
    at_start: dict[str, dict[str, torch.Tensor]] = {}
    real = loop.load_grown_optimizer_state

    def keep(model: torch.nn.Module, optimizers: Any, tensors: Any, **kw: Any) -> Any:
        names = real(model, optimizers, tensors, **kw)
        params = dict(model.named_parameters())
        for opt in optimizers:
            for name in names:
                state = opt.state.get(params[name])
                if state:
                    at_start[name] = {k: v.clone() if torch.is_tensor(v) else v
                                      for k, v in state.items()}  # fmt: skip
        return names

    monkeypatch.setattr(loop, "load_grown_optimizer_state", keep)
    cfg = load_training_config(None, OVERRIDES)
    fit_candidates(trained["f2"], tmp_path / "a2", cfg, progress=False, warm_start=trained["a1"])
    # a grown table: its old rows' moments as saved, its new rows' zero; a dense
    # parameter's moments and step count as saved
    table = at_start["item_output.weight"]
    old = saved["item_output.weight/exp_avg_sq"]
    assert table["exp_avg_sq"].shape[0] > old.shape[0]
    assert torch.equal(table["exp_avg_sq"][: old.shape[0]], old)
    assert not table["exp_avg_sq"][old.shape[0] :].any()
    tower = at_start["tower.0.weight"]
    assert torch.equal(tower["exp_avg"], saved["tower.0.weight/exp_avg"])
    assert float(tower["step"]) == float(saved["tower.0.weight/step"]) > 0
    meta = json.loads((tmp_path / "a2" / "config.json").read_text())
    assert meta["warm_start"]["optimizer_state"] == "continued"
    # the new artifact keeps its own state for the next day
    assert (tmp_path / "a2" / "optimizer.safetensors").exists()
