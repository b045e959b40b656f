"""The candidate-generation network: inputs, tower, serving vector, loss, artifact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from funnelrec.candidates import (
    CandidateConfig,
    CandidateInputs,
    CandidateModel,
    bag_mean,
    checkpoint_path,
    fit_candidates,
    load_candidate_model,
    load_item_embeddings,
    load_training_config,
    save_candidate_artifact,
    split_user_vectors,
    synthetic_batch,
    user_vectors,
)
from funnelrec.candidates.metrics import ModelScorer, evaluate_retrieval
from funnelrec.errors import ArtifactError, FunnelrecError
from funnelrec.features.batch import CandidateBatch
from funnelrec.kernels.softmax import full_softmax_loss
from tests.candidates.interrupt import ctrl_c_at_batch

torch.set_num_threads(1)

INPUTS = CandidateInputs(
    item_vocab=31, token_vocab=13, region_vocab=5, device_vocab=4, num_dense=3,
    region_dim=4, device_dim=4,
)  # fmt: skip


def model_of(**kw: object) -> CandidateModel:
    torch.manual_seed(0)
    base: dict[str, object] = {"dim": 8, "depth": 2, "num_negatives": 20}
    base.update(kw)
    return CandidateModel(CandidateConfig(**base), INPUTS)  # type: ignore[arg-type]


def batch(b: int = 6, seed: int = 0) -> CandidateBatch:
    g = torch.Generator().manual_seed(seed)
    return synthetic_batch(INPUTS, b, history_len=4, search_len=3, generator=g)


@pytest.mark.parametrize(
    ("depth", "widths"), [(0, [8]), (1, [8]), (2, [16, 8]), (3, [32, 16, 8]), (4, [64, 32, 16, 8])]
)
def test_tower_depths_follow_the_paper(depth: int, widths: list[int]) -> None:
    m = model_of(depth=depth)
    linears = [layer for layer in m.tower if isinstance(layer, torch.nn.Linear)]
    assert [layer.out_features for layer in linears] == widths
    # input: history 8 + search 8 + region 4 + device 4 + dense 3 + example age 1
    assert linears[0].in_features == 28
    relus = sum(isinstance(layer, torch.nn.ReLU) for layer in m.tower)
    assert relus == (0 if depth == 0 else depth)
    assert m(batch()).shape == (6, 8)


def test_feature_groups_can_be_left_out() -> None:
    m = model_of(use_search=False, use_demographics=False, use_example_age=False)
    assert m.tower[0].in_features == 8
    assert m.token_input is None and m.region is None
    assert m(batch()).shape == (6, 8)


def test_history_is_a_mean_with_padding_left_out_and_empty_bags_as_zero() -> None:
    m = model_of()
    w = m.item_input.weight.detach()
    ids, offsets = torch.tensor([3, 0, 5, 0, 7]), torch.tensor([0, 3, 4, 4])
    bag = bag_mean(m.item_input, ids, offsets)
    torch.testing.assert_close(bag[0], (w[3] + w[5]) / 2)  # padding not in the count
    torch.testing.assert_close(bag[1], torch.zeros(8))  # only padding
    torch.testing.assert_close(bag[2], torch.zeros(8))  # empty bag
    torch.testing.assert_close(bag[3], w[7])
    want = torch.nn.functional.embedding_bag(ids, w, offsets, mode="mean", padding_idx=0)
    torch.testing.assert_close(bag, want)
    empty = torch.zeros(0, dtype=torch.long)
    assert bag_mean(m.item_input, empty, torch.zeros(4, dtype=torch.long)).abs().sum() == 0
    bag.sum().backward()
    assert m.item_input.weight.grad is not None
    assert m.item_input.weight.grad[0].abs().sum() == 0  # padding row never learns


def test_history_decay_weighs_recent_watches_more() -> None:
    m = model_of(history_decay=0.5)
    w = m.item_input.weight.detach()
    ids, offsets = torch.tensor([3, 4, 5, 0, 7, 8]), torch.tensor([0, 3, 4, 4])
    bag = bag_mean(m.item_input, ids, offsets, decay=0.5)
    # oldest first: 5 is the latest (weight 1), then 4 (0.5), then 3 (0.25)
    torch.testing.assert_close(bag[0], (w[5] + 0.5 * w[4] + 0.25 * w[3]) / 1.75)
    torch.testing.assert_close(bag[1], torch.zeros(8))  # only padding
    torch.testing.assert_close(bag[2], torch.zeros(8))  # empty bag
    torch.testing.assert_close(bag[3], (w[8] + 0.5 * w[7]) / 1.5)
    torch.testing.assert_close(
        bag_mean(m.item_input, ids, offsets, decay=1.0), bag_mean(m.item_input, ids, offsets)
    )
    with pytest.raises(FunnelrecError, match="history_decay"):
        CandidateConfig(history_decay=0.0)


def test_serving_forces_example_age_to_zero_and_training_uses_it() -> None:
    m = model_of()
    b = batch()
    old = CandidateBatch(**{**b.__dict__, "example_age": torch.ones(6)})
    torch.testing.assert_close(m(b), m(old))
    torch.testing.assert_close(m(b), m.user_vector(b, torch.zeros(6)))
    assert not torch.allclose(m.user_vector(b, b.example_age), m.user_vector(old, old.example_age))
    shifted = model_of(serving_example_age=-0.1)
    torch.testing.assert_close(shifted(b), shifted.user_vector(b, torch.full((6,), -0.1)))


def test_output_table_is_separate_by_default_and_shared_when_tied() -> None:
    m = model_of()
    assert m.item_embeddings() is m.item_output.weight  # type: ignore[union-attr]
    assert m.item_embeddings() is not m.item_input.weight
    tied = model_of(tie_embeddings=True)
    assert tied.item_output is None and tied.item_embeddings() is tied.item_input.weight
    with pytest.raises(FunnelrecError, match="tie_embeddings"):
        CandidateConfig(dim=8, item_dim=4, tie_embeddings=True)
    with pytest.raises(FunnelrecError, match="depth"):
        CandidateConfig(depth=5)


@pytest.mark.parametrize("sparse", [False, True])
def test_full_loss_option_is_the_exact_softmax(sparse: bool) -> None:
    m = model_of(loss="full", sparse=sparse)
    b = batch()
    want = full_softmax_loss(m.user_vector(b, b.example_age), m.item_embeddings(), b.label)
    loss = m.compute_loss(b)
    assert loss.item() == pytest.approx(want.item())
    loss.backward()
    grad = m.item_embeddings().grad
    assert grad is not None and grad.is_sparse == sparse


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_normalize_scores_by_cosine_over_temperature(loss: str) -> None:
    m = model_of(loss=loss, normalize=True, temperature=0.25)
    b = batch()
    u = m(b)
    torch.testing.assert_close(u.norm(dim=1), torch.full((6,), 4.0))  # unit / 0.25
    v = m.item_embeddings()
    torch.testing.assert_close(v[1:].norm(dim=1), torch.ones(v.shape[0] - 1))
    assert v[0].abs().sum() == 0  # padding stays the zero vector
    if loss == "full":
        want = full_softmax_loss(m.user_vector(b, b.example_age), v, b.label)
        assert m.compute_loss(b).item() == pytest.approx(want.item(), rel=1e-5)
    raw = model_of(loss=loss)
    raw.load_state_dict(m.state_dict())
    assert not torch.allclose(raw(b), u)  # the option changes the scores
    with pytest.raises(FunnelrecError, match="temperature"):
        CandidateConfig(normalize=True, temperature=0.0)


def test_out_of_vocabulary_labels_are_left_out_of_the_loss() -> None:
    m = model_of(loss="full")
    b = batch()
    label = b.label.clone()
    label[:3] = 0
    part = CandidateBatch(**{**b.__dict__, "label": label})
    u = m.user_vector(b, b.example_age)[3:]
    want = full_softmax_loss(u, m.item_embeddings(), b.label[3:])
    assert m.compute_loss(part).item() == pytest.approx(want.item(), rel=1e-5)
    none = CandidateBatch(**{**b.__dict__, "label": torch.zeros(6, dtype=torch.long)})
    loss = m.compute_loss(none)
    assert loss.item() == 0.0
    loss.backward()  # still differentiable


def test_dense_width_mismatch_is_a_clear_error() -> None:
    b = batch()
    wrong = CandidateBatch(**{**b.__dict__, "dense": torch.zeros(6, 5)})
    with pytest.raises(FunnelrecError, match="3 dense features, the batch has 5"):
        model_of()(wrong)


def test_artifact_round_trip_and_export_layout(tmp_path: Path) -> None:
    m = model_of(sparse=True)
    m.eval()
    item_ids = torch.arange(101, 131).numpy()  # dataset ids of vocabulary ids 1..30
    save_candidate_artifact(m, tmp_path, item_ids=item_ids, meta={"data": {"fingerprint": "x"}})
    loaded = load_candidate_model(tmp_path)
    assert not loaded.training
    b = batch()
    torch.testing.assert_close(loaded(b), m(b))
    emb, ids = load_item_embeddings(tmp_path)
    assert emb.dtype == torch.float32 and emb.shape == (30, 8)
    assert ids.dtype == torch.int64 and ids.tolist() == list(range(101, 131))
    torch.testing.assert_close(emb, m.item_embeddings().detach()[1:])
    raw = load_file(str(tmp_path / "item_embeddings.safetensors"))
    assert set(raw) == {"embeddings", "item_ids"}
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["format_version"] == 1 and meta["kind"] == "candidates"
    assert meta["model"]["dim"] == 8 and meta["inputs"]["item_vocab"] == 31
    assert meta["data"]["fingerprint"] == "x"
    # the sampler's proposal is saved with the weights
    torch.testing.assert_close(loaded.softmax.log_q, m.softmax.log_q)


def test_loading_a_wrong_or_damaged_artifact_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"no config\.json"):
        load_candidate_model(tmp_path)
    m = model_of()
    save_candidate_artifact(m, tmp_path, item_ids=torch.arange(30).numpy(), meta={})
    meta = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ArtifactError, match="format version 99"):
        load_candidate_model(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({**meta, "model": {**meta["model"], "dim": 4}})
    )
    with pytest.raises(ArtifactError, match="do not fit"):
        load_candidate_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(meta))
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="cannot read weights"):
        load_candidate_model(tmp_path)
    with pytest.raises(FunnelrecError, match="item_ids"):
        save_candidate_artifact(m, tmp_path, item_ids=torch.arange(3).numpy(), meta={})


def test_user_vectors_and_model_scorer_agree_with_the_model() -> None:
    m = model_of()
    batches = [batch(5, seed=1), batch(3, seed=2)]
    uv = user_vectors(m, batches)
    assert uv.vectors.shape == (8, 8)
    torch.testing.assert_close(uv.vectors[:5], m(batches[0]).detach())
    assert uv.label.tolist() == batches[0].label.tolist() + batches[1].label.tolist()
    report = evaluate_retrieval(
        {"model": ModelScorer(m)}, batches, num_items=30, ks=(10,), seen=None
    )
    scores = uv.vectors @ m.item_embeddings().detach()[1:].T
    target = scores.gather(1, (uv.label - 1)[:, None])
    ranks = (scores > target).sum(1) + 1
    assert report.metrics["model_seen_included"]["mrr"] == pytest.approx(
        (1.0 / ranks.double()).mean().item()
    )


# --------------------------------------------------------------------------- tiny world


@pytest.fixture(scope="module")
def tiny_features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from funnelrec.features.build import build_features
    from funnelrec.simulate import generate, preset_config

    root = tmp_path_factory.mktemp("tiny")
    generate(preset_config("tiny"), seed=0, out=root / "data", progress=False)
    build_features(root / "data", root / "feat", split="last", progress=False)
    return root / "feat"


def test_training_config_from_toml_and_overrides(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("valid_k = 20\nlr = 0.5\n[model]\ndim = 12\n[train]\nepochs = 7\n")
    cfg = load_training_config(toml, ["depth=3", "train.batch_size=64", "model.loss=full"])
    assert (cfg.valid_k, cfg.model.dim, cfg.model.depth, cfg.model.loss) == (20, 12, 3, "full")
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.batch_size) == (0.5, 7, 64)
    with pytest.raises(FunnelrecError, match=r"unknown config key 'model\.dimm'"):
        load_training_config(None, ["model.dimm=3"])
    with pytest.raises(FunnelrecError, match="must be an integer"):
        load_training_config(None, ["depth=deep"])
    for path in sorted(Path(__file__).parents[2].glob("configs/candidates-*.toml")):
        assert path.read_text().startswith("# funnelrec train candidates"), path
        load_training_config(path)


def test_training_beats_popularity_on_the_tiny_worlds_next_watches(
    tiny_features: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from funnelrec.cli import evaluate as evaluate_cli
    from funnelrec.cli import train as train_cli

    art = tmp_path / "cand"
    runner = CliRunner()
    args = ["candidates", "--features", str(tiny_features), "--out", str(art)]
    config = Path(__file__).parents[2] / "configs" / "candidates-tiny.toml"
    res = runner.invoke(
        train_cli.app, [*args, "--config", str(config), "dim=16", "max_steps=200", "patience=0"]
    )
    assert res.exit_code == 0, res.output
    assert {p.name for p in art.iterdir()} == {
        "config.json", "model.safetensors", "item_embeddings.safetensors",
        "optimizer.safetensors",
    }  # fmt: skip
    assert not (tmp_path / "cand.checkpoint.pt").exists()
    meta = json.loads((art / "config.json").read_text())
    assert meta["training"]["steps"] == 200 and meta["model"]["dim"] == 16

    res = runner.invoke(evaluate_cli.app, ["candidates", str(art), "--k", "10,100"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((art / "metrics.json").read_text())
    model, pop = metrics["model"], metrics["popularity"]
    assert metrics["protocol"]["split"] == "test" and metrics["protocol"]["queries"] > 300
    # a broken model (no learning, wrong correction, shuffled ids) falls to or below this
    assert model["recall@10"] > 1.3 * pop["recall@10"]
    assert model["ndcg@10"] > 1.3 * pop["ndcg@10"]
    assert model["recall@100"] > pop["recall@100"]
    assert (
        metrics["model_seen_included"]["recall@10"]
        > metrics["popularity_seen_included"]["recall@10"]
    )

    # --device: the same numbers on the CPU when named; a missing GPU or a bad name is refused
    out = tmp_path / "m_cpu.json"
    args_eval = ["candidates", str(art), "--k", "10,100", "--device", "cpu", "--out", str(out)]
    res = runner.invoke(evaluate_cli.app, args_eval)
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["model"] == model
    for bad in ("tpu", "banana", *([] if torch.cuda.is_available() else ["cuda"])):
        res = runner.invoke(evaluate_cli.app, ["candidates", str(art), "--device", bad])
        assert res.exit_code != 0 and "--device" in str(res.exception)

    # validation-split user vectors: the ANN index's tuning queries
    uv = split_user_vectors(art, tiny_features, "valid")
    assert uv.vectors.shape == (len(uv.label), 16) and len(uv.label) > 300
    first = split_user_vectors(art, tiny_features, "valid", batch_size=64, limit=100)
    assert len(first.label) == 100 and torch.equal(first.user_id, uv.user_id[:100])
    torch.testing.assert_close(first.vectors, uv.vectors[:100])
    emb, ids = load_item_embeddings(art)
    assert emb.shape[0] == ids.shape[0] == meta["num_items"]

    # the artifact exists: training again needs --force
    res = runner.invoke(train_cli.app, [*args, "max_steps=1"])
    assert res.exit_code != 0 and "already exists" in str(res.exception)


def test_the_default_config_trains_until_validation_stops_improving_and_beats_popularity(
    tiny_features: Path, tmp_path: Path
) -> None:
    """A first run with no config: the batch size is chosen from the data, training stops
    on validation Recall@100, and the model beats popularity there (validation only)."""
    from funnelrec.candidates.metrics import PopularityScorer, evaluate_split
    from funnelrec.candidates.training import auto_batch_size
    from funnelrec.features import Features

    cfg = load_training_config(None, ["threads=1"])
    assert cfg.train.batch_size is None and cfg.train.patience > 0
    result = fit_candidates(tiny_features, tmp_path / "art", cfg, progress=False)
    feats = Features.open(tiny_features)
    meta = json.loads((tmp_path / "art" / "config.json").read_text())
    chosen = auto_batch_size(feats.num_examples("candidates", "train"))
    assert meta["train"]["batch_size"] == chosen < 1024  # recorded as the value used
    assert result.stopped_early and result.epochs < cfg.train.epochs
    report = evaluate_split(
        {
            "model": ModelScorer(load_candidate_model(tmp_path / "art")),
            "popularity": PopularityScorer(feats.item_counts()),
        },
        feats,
        "valid",
        ks=(100,),
    )
    model, pop = report.metrics["model"]["recall@100"], report.metrics["popularity"]["recall@100"]
    assert model > 1.1 * pop


def test_auto_batch_size_suits_the_number_of_examples() -> None:
    from funnelrec.candidates.training import auto_batch_size

    assert [auto_batch_size(n) for n in (0, 500, 8_000, 30_000, 10**7)] == [64, 64, 256, 1024, 1024]
    cfg = load_training_config(None, ["batch_size=96"])
    assert cfg.train.resolved(8_000).batch_size == 96  # a value given is kept
    with pytest.raises(FunnelrecError, match="batch_size"):
        load_training_config(None, ["batch_size=0"])


def test_interrupted_training_resumes_to_the_same_artifact(
    tiny_features: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    import funnelrec.features.loader
    from funnelrec.training.loop import TrainingInterrupted

    cfg = load_training_config(
        None, ["dim=8", "num_negatives=32", "batch_size=512", "threads=1", "epochs=2"]
    )
    plain = tmp_path / "plain"
    fit_candidates(tiny_features, plain, cfg, progress=False)

    art = tmp_path / "cand"
    with monkeypatch.context() as m:
        m.setattr(funnelrec.features.loader, "candidate_loader", ctrl_c_at_batch(5))
        with pytest.raises(TrainingInterrupted, match="--resume"):
            fit_candidates(tiny_features, art, cfg, progress=False)
    assert checkpoint_path(art).exists() and not art.exists()
    with pytest.raises(FunnelrecError, match="--resume to continue"):
        fit_candidates(tiny_features, art, cfg, progress=False)
    with pytest.raises(ArtifactError, match="another model"):
        other = load_training_config(None, ["dim=4", "num_negatives=32", "batch_size=512",
                                            "threads=1", "epochs=2"])  # fmt: skip
        fit_candidates(tiny_features, art, other, resume=True, progress=False)
    fit_candidates(tiny_features, art, cfg, resume=True, progress=False)
    assert not checkpoint_path(art).exists()  # a finished run cleans up
    a, b = load_file(str(plain / "model.safetensors")), load_file(str(art / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_model_scorer_can_feed_the_age_of_each_targets_time() -> None:
    m = model_of()
    b = CandidateBatch(**{**batch(4).__dict__, "ts": torch.tensor([100, 75, 0, 150])})
    got = ModelScorer(m, time_range=(0, 100)).queries(b)
    age = torch.tensor([0.0, 0.25, 1.0, 0.0])  # after the window: clamped to 0
    torch.testing.assert_close(got, m.user_vector(b, age).detach())
    torch.testing.assert_close(ModelScorer(m).queries(b), m(b).detach())


def test_history_dropout_leaves_watches_out_in_training_only() -> None:
    m, plain = model_of(history_dropout=0.5), model_of()
    b = batch(64)
    m.eval()
    torch.testing.assert_close(m.user_vector(b, b.example_age), plain.user_vector(b, b.example_age))
    m.train()
    torch.manual_seed(1)
    dropped = m.user_vector(b, b.example_age)
    assert not torch.allclose(dropped, plain.user_vector(b, b.example_age))
    torch.manual_seed(1)
    torch.testing.assert_close(m.user_vector(b, b.example_age), dropped)  # seeded: repeatable
    for bad in (-0.1, 1.0):
        with pytest.raises(FunnelrecError, match="history_dropout"):
            CandidateConfig(history_dropout=bad)


def test_validation_in_small_query_batches_scores_whole_batches(
    tiny_features: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A million-item corpus is scored a few hundred queries at a time; the last batch
    may run past valid_examples, and its seen items must be there (a bug once)."""
    import funnelrec.candidates.metrics
    from funnelrec.candidates import fit_candidates, load_candidate_model
    from funnelrec.candidates.metrics import ModelScorer, evaluate_split
    from funnelrec.features import Features

    monkeypatch.setattr(funnelrec.candidates.metrics, "SCORE_BYTES", 1)  # 16 queries at a time
    cfg = load_training_config(
        None, ["dim=8", "num_negatives=32", "max_steps=2", "valid_examples=150", "threads=1"]
    )
    fit_candidates(tiny_features, tmp_path / "art", cfg, progress=False)
    report = evaluate_split(
        {"model": ModelScorer(load_candidate_model(tmp_path / "art"))},
        Features.open(tiny_features),
        "valid",
        limit=150,
    )
    assert report.queries == 160  # ten whole batches of 16
