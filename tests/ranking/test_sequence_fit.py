"""The sequence funnel fitted on a dataset of watches: its cut, its artifact (verified when
loaded), its evaluation and its command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from funnelrec.candidates import load_training_config
from funnelrec.cli import app
from funnelrec.data.dataset import Dataset, DatasetWriter
from funnelrec.errors import ArtifactError, FunnelrecError
from funnelrec.ranking.sequence import SequenceFunnelConfig
from funnelrec.ranking.sequence_fit import (
    SequenceFitConfig,
    evaluate_sequence_funnel,
    fit_sequence_funnel,
    is_sequence_funnel,
    load_sequence_funnel,
    read_sequence_split,
)
from funnelrec.simulate import generate, preset_config

DEEP = ["dim=16", "loss=full", "epochs=2", "batch_size=128", "lr=0.01"]
FUNNEL = SequenceFunnelConfig(deep_k=20, cowatch_k=20, popular_k=10, tower=(16,), max_epochs=3)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seqfit")
    generate(
        preset_config("tiny", ["n_users=150", "n_items=120", "days=6"]),
        seed=3,
        out=root / "sim",
        progress=False,
    )
    # watches only, as a MovieLens or Amazon import
    sim = Dataset.open(root / "sim")
    with DatasetWriter(root / "data", source="test") as w:
        for name in ("users", "items", "watches"):
            w.write(name, sim.table(name))
        for space in sim.manifest.id_maps:
            w.add_id_map(space, sim.id_map(space).sort_by("id").column("raw_id"))
    split = read_sequence_split(root / "data")
    fit_sequence_funnel(split, root / "art", funnel=FUNNEL, deep=load_training_config(None, DEEP))
    return {"data": root / "data", "art": root / "art"}


def test_split_is_leave_last_out_in_time_order(fitted: dict[str, Path]) -> None:
    split = read_sequence_split(fitted["data"])
    seen = split.seen
    # per user: training items, then validation, then the test, and nothing else
    for q in range(0, len(split.users), 17):
        u = split.users[q]
        mine = split.train.item[split.train.user == u]
        hist = split.history["+val"].values[seen.offsets[q] : seen.offsets[q + 1]]
        assert list(hist[:-1]) == list(mine)
        assert hist[-1] == split.valid_target[q]
    assert (split.target_ts >= split.valid_ts).all()
    assert split.stats["train_interactions"] == len(split.train)


def test_artifact_is_complete_and_loads_verified(fitted: dict[str, Path]) -> None:
    art = fitted["art"]
    assert is_sequence_funnel(art)
    meta = json.loads((art / "funnel.json").read_text())
    for rel in ("ranker.safetensors", "sources.safetensors", "cowatch/baseline.json"):
        assert rel in meta["sha256"]
    assert any(r.startswith("deep/") for r in meta["sha256"])
    assert any(r.startswith("deep-features/") for r in meta["sha256"])
    assert not any("checkpoint" in r for r in meta["sha256"])
    t = meta["summary"]["timings"]
    assert {"features_s", "deep_s", "pages_s", "ranker_s", "total_s"} <= set(t)
    # nothing of the work directory is left beside the artifact
    assert sorted(p.name for p in art.parent.iterdir() if p.name.startswith(".")) == []


def test_loaded_funnel_serves_what_validation_measured(fitted: dict[str, Path]) -> None:
    f = load_sequence_funnel(fitted["art"])
    split = read_sequence_split(fitted["data"])
    rep = evaluate_sequence_funnel(f, split, which="valid", ks=(10,))
    # the epoch was chosen on the same requests, scored on the same pools
    assert rep.metrics["ndcg@10"] == pytest.approx(f.describe()["best_valid_ndcg@10"], abs=1e-9)
    test = evaluate_sequence_funnel(f, split, ks=(5, 10))
    assert test.users == len(split.users)
    assert 0 <= test.metrics["hr@5"] <= test.metrics["hr@10"] <= 1
    assert test.metrics["ndcg@10"] <= test.metrics["hr@10"]
    ids, _ = f.recommend(split.requests("+val", split.target_ts), 10)
    # never an item of the history
    h = split.history["+val"]
    for q in range(0, len(split.users), 11):
        assert not set(ids[q][ids[q] > 0]) & set(h.values[h.offsets[q] : h.offsets[q + 1]])


def test_a_changed_file_is_refused(fitted: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "art"
    shutil.copytree(fitted["art"], copy)
    ranker = copy / "ranker.safetensors"
    raw = bytearray(ranker.read_bytes())
    raw[-4:] = b"\x00\x00\xc0\x7f"  # the last weight becomes NaN, the size unchanged
    ranker.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="sha256"):
        load_sequence_funnel(copy)
    shutil.copytree(fitted["art"], tmp_path / "art2")
    (tmp_path / "art2" / "sources.safetensors").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_sequence_funnel(tmp_path / "art2")
    with pytest.raises(ArtifactError, match="not a sequence funnel"):
        load_sequence_funnel(tmp_path)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(FunnelrecError, match="page_moments"):
        SequenceFitConfig(page_moments=1)


def test_command_line_trains_and_evaluates(fitted: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    cfg = tmp_path / "deep.toml"
    cfg.write_text('[model]\ndim = 16\nloss = "full"\n[train]\nepochs = 1\nbatch_size = 128\n')
    res = runner.invoke(
        app,
        ["train", "funnel", "--data", str(fitted["data"]), "--out", str(tmp_path / "a"),
         "--deep-config", str(cfg), "deep_k=10", "cowatch_k=10", "popular_k=5",
         "tower=8", "max_epochs=1"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output
    res = runner.invoke(app, ["evaluate", "funnel", str(tmp_path / "a"), "--k", "5,10"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "a-funnel_metrics.json").read_text())
    assert set(report["metrics"]) == {"hr@5", "ndcg@5", "hr@10", "ndcg@10"}
    # a second run does not overwrite the artifact unless asked
    res = runner.invoke(
        app, ["train", "funnel", "--data", str(fitted["data"]), "--out", str(tmp_path / "a")]
    )
    assert res.exit_code == 1 and isinstance(res.exception, FunnelrecError)
    assert "already exists" in str(res.exception)


def test_without_the_deep_source_no_candidate_model_is_trained(
    fitted: dict[str, Path], tmp_path: Path
) -> None:
    split = read_sequence_split(fitted["data"])
    cfg = SequenceFunnelConfig(deep_k=0, cowatch_k=20, popular_k=10, tower=(8,), max_epochs=2)
    f = fit_sequence_funnel(split, tmp_path / "a", funnel=cfg)
    assert not (tmp_path / "a" / "deep").exists()
    assert "deep_s" not in f.describe()["timings"]
    assert f.sources.deep_users is None
    rep = evaluate_sequence_funnel(f, split, ks=(10,))
    assert 0 <= rep.metrics["hr@10"] <= 1


def test_the_deep_model_is_retrained_where_the_pages_took_a_good_share(
    fitted: dict[str, Path], tmp_path: Path
) -> None:
    split = read_sequence_split(fitted["data"])
    share = json.loads((fitted["art"] / "funnel.json").read_text())["summary"]
    # a few watches per user: the pages' two moments are a good part of them
    assert share["page_moment_share"] > 0.1 and share["deep_retrained"] is True
    deep = load_training_config(None, DEEP)
    f = fit_sequence_funnel(
        split, tmp_path / "a", funnel=FUNNEL, deep=deep, fit=SequenceFitConfig(refit_share=0.9)
    )
    assert f.describe()["deep_retrained"] is False
    assert "deep_refit_s" not in f.describe()["timings"]
    with pytest.raises(FunnelrecError, match="refit_share"):
        SequenceFitConfig(refit_share=1.5)
