"""The item content tower of the candidate model (`funnelrec/candidates/content.py`): the
vectors it adds, the losses that score them, the id-only model left exactly as it was,
never-watched items retrieved, and artifacts, checkpoints and warm starts with it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from funnelrec.ann.index import ItemIndex
from funnelrec.candidates import (
    CandidateConfig,
    CandidateInputs,
    CandidateModel,
    ContentInputs,
    checkpoint_path,
    fit_candidates,
    load_candidate_model,
    load_item_embeddings,
    load_training_config,
    synthetic_batch,
)
from funnelrec.candidates.content import AGE_BUCKETS
from funnelrec.candidates.metrics import IndexRetriever, ModelScorer, evaluate_split
from funnelrec.errors import FunnelrecError
from funnelrec.features import Features
from funnelrec.features.batch import CandidateBatch, ItemContent
from funnelrec.features.build import build_features
from funnelrec.features.update import FeaturesUpdate
from funnelrec.kernels.softmax import full_softmax_loss
from funnelrec.training.loop import TrainingInterrupted
from tests.candidates.interrupt import ctrl_c_at_batch
from tests.features.content_world import (
    NEW_ITEMS,
    TOPICS,
    content_world_features,
    topic_of_user,
    write_content_world,
)

torch.set_num_threads(1)

INPUTS = CandidateInputs(
    item_vocab=31, token_vocab=13, region_vocab=5, device_vocab=4, num_dense=3,
    region_dim=4, device_dim=4,
)  # fmt: skip
CONTENT = ContentInputs(
    channel_vocab=5, topic_vocab=4, title_vocab=9, num_dense=4,
    channel_dim=4, topic_dim=4, title_dim=6,
)  # fmt: skip


def random_content(n: int, seed: int = 0, *, empty_first: bool = True) -> ItemContent:
    """n items of random content (row 0 empty: the padding id's)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (n,), generator=g)
    if empty_first:
        lengths[0] = 0
    channel = torch.randint(0, CONTENT.channel_vocab, (n,), generator=g)
    topic = torch.randint(0, CONTENT.topic_vocab, (n,), generator=g)
    dense = torch.randn(n, CONTENT.num_dense, generator=g)
    if empty_first:
        channel[0] = topic[0] = 0
        dense[0] = 0.0
    return ItemContent(
        channel=channel,
        topic=topic,
        title=torch.randint(1, CONTENT.title_vocab, (int(lengths.sum()),), generator=g),
        title_offsets=torch.cumsum(lengths, 0) - lengths,
        dense=dense,
        upload_ts=torch.full((n,), float("-inf"), dtype=torch.float64),
    )


def model_of(item_content: bool = True, **kw: object) -> CandidateModel:
    torch.manual_seed(0)
    base: dict[str, object] = {"dim": 8, "depth": 2, "num_negatives": 20}
    base.update(kw)
    config = CandidateConfig(item_content=item_content, **base)  # type: ignore[arg-type]
    if not item_content:
        return CandidateModel(config, INPUTS)
    rows = random_content(INPUTS.item_vocab)
    return CandidateModel(config, INPUTS, content_inputs=CONTENT, content_rows=rows)


def batch(b: int = 6, seed: int = 0) -> CandidateBatch:
    g = torch.Generator().manual_seed(seed)
    return synthetic_batch(INPUTS, b, history_len=4, search_len=3, generator=g)


def test_the_id_only_model_has_no_content_and_the_content_model_the_same_id_weights() -> None:
    plain, content = model_of(item_content=False), model_of()
    assert plain.content is None and plain.content_rows is None
    assert not [k for k in plain.state_dict() if "content" in k]
    own = content.state_dict()
    for name, value in plain.state_dict().items():  # built first, from the same draws
        assert torch.equal(own[name], value), name
    assert {k.split(".")[0] for k in own} - set(plain.state_dict()) >= {"content", "content_rows"}


def test_an_items_vector_is_its_id_row_plus_its_content_vector() -> None:
    m = model_of(item_age=False)
    assert m.content is not None and m.item_output is not None
    rows = random_content(INPUTS.item_vocab)
    with torch.no_grad():
        want = m.item_output.weight + m.content(rows)
        got = m.item_embeddings()
        torch.testing.assert_close(got[1:], want[1:])
        assert got[0].abs().sum() == 0  # padding
        # items outside the vocabulary: their content alone
        other = random_content(5, seed=3, empty_first=False)
        torch.testing.assert_close(m.content_embeddings(other), m.content(other))
    cosine = model_of(normalize=True, item_age=False)
    with torch.no_grad():
        norms = cosine.content_embeddings(other).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(5))


@pytest.mark.parametrize("sparse", [False, True])
def test_the_full_loss_is_the_exact_softmax_over_ids_plus_content(sparse: bool) -> None:
    m = model_of(loss="full", id_dropout=0.0, sparse=sparse, item_age=False)
    b = batch()
    loss = m.compute_loss(b)
    with torch.no_grad():
        u = m.user_vector(b, b.example_age)
        want = full_softmax_loss(u, m.item_embeddings(), b.label)
    torch.testing.assert_close(loss.detach(), want)
    loss.backward()
    assert m.content is not None
    for table in m.content.tables():
        assert table.grad is not None and table.grad.is_sparse == sparse
    assert m.content.out.weight.grad is not None
    assert set(m.sparse_parameters()) >= ({*m.content.tables()} if sparse else set())


def test_the_sampled_loss_scores_the_drawn_rows_with_their_content() -> None:
    m = model_of(id_dropout=0.0, item_age=False)
    b = batch(8)
    torch.manual_seed(5)
    loss = m.compute_loss(b)
    torch.manual_seed(5)
    with torch.no_grad():
        u = m.user_vector(b, b.example_age)
        negatives = m.softmax.sample(m.softmax.num_negatives)
        table = m.item_embeddings()  # ids + content, every row
        want = m.softmax.sampled_loss(u, table, b.label, negatives)
    torch.testing.assert_close(loss.detach(), want)


def test_id_dropout_scores_rows_by_their_content_alone_in_training_only() -> None:
    with_dropout, without = model_of(id_dropout=0.5), model_of(id_dropout=0.0)
    b = batch(8)
    torch.manual_seed(1)
    a = with_dropout.compute_loss(b)
    torch.manual_seed(1)
    assert not torch.allclose(a, without.compute_loss(b))
    torch.manual_seed(1)
    torch.testing.assert_close(with_dropout.compute_loss(b), a)  # seeded: repeatable
    with torch.no_grad():  # serving and the export: every id row
        torch.testing.assert_close(with_dropout.item_embeddings(), without.item_embeddings())
    with pytest.raises(FunnelrecError, match="id_dropout"):
        CandidateConfig(id_dropout=1.0)


def test_with_tied_tables_the_history_stays_the_id_table() -> None:
    tied = model_of(tie_embeddings=True, item_age=False)
    plain = model_of(item_content=False, tie_embeddings=True)
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(tied(b), plain(b))
        assert not torch.allclose(tied.item_embeddings(), plain.item_embeddings())


# --------------------------------------------------------------- a world of items with content

TRAIN = ["depth=1", "loss=full", "lr=0.01", "epochs=20", "batch_size=64", "threads=1",
         "patience=0", "restore_best=false"]  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return content_world_features(tmp_path_factory.mktemp("content"))


def _watch_histories(feats: Features, users: list[int]) -> list[list[int]]:
    from funnelrec.data.dataset import Dataset

    w = Dataset.open(feats.manifest["data"]["path"]).table("watches", ["user_id", "item_id"])
    user, item = (np.asarray(w.column(c).to_numpy()) for c in ("user_id", "item_id"))
    return [item[user == u].tolist() for u in users]


def test_a_never_watched_item_like_a_users_taste_is_retrieved_for_that_user(
    world: Path,
) -> None:
    """Items 41 (cats) and 42 (cars) were never watched: outside the item vocabulary. With
    the content tower each is in the top 10 (of 42) of every user of its topic, and ranks
    worse for most other users; the id-only model cannot retrieve them at all."""
    feats = Features.open(world / "f")
    users = list(range(1, 10 * len(TOPICS) + 1))
    histories = _watch_histories(feats, users)
    for content in (True, False):
        art = world / f"art-{content}"
        cfg = load_training_config(None, [*TRAIN, "dim=32", f"item_content={content}".lower()])
        fit_candidates(feats, art, cfg, progress=False)
        emb, ids = load_item_embeddings(art)
        if not content:
            assert not {item for item, _, _ in NEW_ITEMS} & set(ids.tolist())
            continue
        with torch.no_grad():
            scores = load_candidate_model(art)(feats.candidate_batch(histories)) @ emb.T
        for item, topic, _ in NEW_ITEMS:
            col = ids.tolist().index(item)
            rank = (scores > scores[:, col : col + 1]).sum(1) + 1
            own = torch.tensor([topic_of_user(u) == topic for u in users])
            assert int(rank[own].max()) <= 10, (item, rank[own].tolist())
            assert float(rank[~own].median()) > int(rank[own].max()), (item, rank.tolist())


def test_the_id_only_model_trains_exactly_as_before_the_content_table(
    world: Path, tmp_path: Path
) -> None:
    """The default (id-only) model trained on features with the item content table and on
    the same features without it (as built before the table existed): the same weights,
    exports and metrics, bit for bit."""
    old = tmp_path / "old"
    shutil.copytree(world / "f", old)
    manifest = json.loads((old / "features.json").read_text())
    del manifest["item_content"]
    (old / "features.json").write_text(json.dumps(manifest))
    cfg = load_training_config(None, ["dim=8", "num_negatives=16", "batch_size=32", "threads=1",
                                      "epochs=2", "patience=0"])  # fmt: skip
    assert not cfg.model.item_content  # the paper's model is the default
    reports = []
    for feat, art in ((world / "f", tmp_path / "a"), (old, tmp_path / "b")):
        fit_candidates(feat, art, cfg, progress=False)
        scorer = ModelScorer(load_candidate_model(art))
        reports.append(evaluate_split({"model": scorer}, Features.open(feat), "valid").metrics)
    for name in ("model.safetensors", "item_embeddings.safetensors"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert reports[0] == reports[1]
    meta = json.loads((tmp_path / "a" / "config.json").read_text())
    assert "content_inputs" not in meta and "exported_items" not in meta


def test_item_content_artifacts_checkpoints_and_the_index(
    world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import funnelrec.features.loader

    feats = Features.open(world / "f")
    cfg = load_training_config(None, ["dim=8", "num_negatives=16", "batch_size=32", "threads=1",
                                      "epochs=2", "patience=0", "item_content=true"])  # fmt: skip
    plain = tmp_path / "plain"
    fit_candidates(feats, plain, cfg, progress=False)
    art = tmp_path / "art"
    with monkeypatch.context() as m:
        m.setattr(funnelrec.features.loader, "candidate_loader", ctrl_c_at_batch(5))
        with pytest.raises(TrainingInterrupted):
            fit_candidates(feats, art, cfg, progress=False)
    assert checkpoint_path(art).exists()
    fit_candidates(feats, art, cfg, resume=True, progress=False)
    a, b = load_file(str(plain / "model.safetensors")), load_file(str(art / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {"content_rows.title", "content.title.weight", "content.out.weight"} <= set(a)

    meta = json.loads((art / "config.json").read_text())
    n = len(feats.vocab("item")) - 1
    outside_content, outside_ids = feats.item_content().outside_vocab()
    assert meta["exported_items"] == {"vocabulary": n, "content_only": len(outside_ids)}
    model = load_candidate_model(art)
    emb, ids = load_item_embeddings(art)
    assert sorted(ids.tolist()) == list(range(1, 43))  # every catalogue item
    with torch.no_grad():
        torch.testing.assert_close(emb[:n], model.item_embeddings()[1:])
        torch.testing.assert_close(emb[n:], model.content_embeddings(outside_content))
    assert ids[n:].tolist() == outside_ids.tolist()

    # the ANN metrics: items outside the vocabulary are retrieved, never a target
    index = ItemIndex.build(emb.numpy(), ids.numpy(), "exact")
    retriever = IndexRetriever(ModelScorer(model), index, ids.numpy())
    assert model.config.out_dim == 8 + AGE_BUCKETS  # the item-age term, by default
    got = retriever.retrieve(torch.eye(model.config.out_dim)[:2], 42, None)
    assert got.shape == (2, 42) and int((got == 0).sum(1).min()) == len(outside_ids)
    assert got.max() <= n


def test_a_warm_start_grows_the_content_tables_and_takes_the_new_content(
    world: Path, tmp_path: Path
) -> None:
    write_content_world(tmp_path / "early", until=60_000)
    build_features(tmp_path / "early", tmp_path / "f1", split="last", progress=False)
    build_features(world / "d", tmp_path / "f2", split="last", progress=False,
                   update=FeaturesUpdate(tmp_path / "f1"))  # fmt: skip
    cfg = load_training_config(None, ["dim=8", "num_negatives=16", "batch_size=32", "threads=1",
                                      "epochs=1", "patience=0", "item_content=true"])  # fmt: skip
    fit_candidates(tmp_path / "f1", tmp_path / "a1", cfg, progress=False)
    fit_candidates(tmp_path / "f2", tmp_path / "a2", cfg, progress=False,
                   warm_start=tmp_path / "a1")  # fmt: skip
    meta = json.loads((tmp_path / "a2" / "config.json").read_text())
    assert "content.title.weight" in meta["warm_start"]["grown"]
    f2 = Features.open(tmp_path / "f2")
    model = load_candidate_model(tmp_path / "a2")
    assert model.content_rows is not None
    want = f2.item_content().vocab_rows(len(f2.vocab("item")))
    assert torch.equal(model.content_rows.title, want.title)
    assert model.content_inputs == ContentInputs.from_features(f2)
