"""The artifact of a trained candidate model (config.json, model.safetensors,
item_embeddings.safetensors; layout in the package docstring), what it records about its
features, the user vectors it gives a split's examples, and `synthetic_batch` (random
batches for benchmarks and tests)."""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from funnelrec import __version__
from funnelrec.candidates.content import ContentInputs
from funnelrec.candidates.model import CandidateConfig, CandidateInputs, CandidateModel
from funnelrec.data.dataset import read_artifact_meta, write_json_atomic
from funnelrec.errors import ArtifactError, FunnelrecError
from funnelrec.features.batch import CandidateBatch, ItemContent
from funnelrec.training.loop import check_finite, save_optimizer_state

if TYPE_CHECKING:
    from funnelrec.features import Features

FORMAT_VERSION = 1
KIND = "candidates"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ITEM_EMBEDDINGS_FILE = "item_embeddings.safetensors"
# The ANN index over the item embeddings lives inside the artifact (`funnelrec index build`).
INDEX_DIR = "index"


def vocab_digest(values: np.ndarray) -> str:
    """A short hash of a vocabulary's values (which dataset id each vocabulary id is)."""
    arr = np.asarray(values)
    data = (
        arr.astype(np.int64).tobytes()
        if arr.dtype.kind in "iu"
        else "\n".join(map(str, arr.tolist())).encode()
    )
    return hashlib.sha256(data).hexdigest()[:16]


def save_candidate_artifact(
    model: CandidateModel,
    out: Path,
    *,
    item_ids: np.ndarray,
    meta: dict[str, Any],
    features: Features | None = None,
    optimizer_state: dict[str, Tensor] | None = None,
) -> None:
    """Write weights, exported item embeddings and config.json into directory `out`
    (and `optimizer_state`, `loop.optimizer_tensors` of the run, when given).

    item_ids: [N] dataset item id of vocabulary ids 1..N. meta: extra JSON (training config
    and summary, data fingerprint, vocabulary info). features: with `item_content`, the
    features the model was trained on: the catalogue items outside the vocabulary are
    exported too, after the vocabulary's, from their content alone (the id-only model
    exports its vocabulary). `out` should be a temporary directory that the caller
    renames into place (`dataset.AtomicDirectory`).
    """
    out = Path(out)
    item_ids = np.asarray(item_ids, dtype=np.int64)
    n = model.inputs.num_items
    if item_ids.shape != (n,):
        raise FunnelrecError(f"item_ids has shape {item_ids.shape}, the model has {n} items")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
    if optimizer_state:
        save_optimizer_state(out, optimizer_state)
    with torch.no_grad():
        emb = model.item_embeddings().detach()[1:].to(torch.float32).cpu().contiguous()
        extra: dict[str, Any] = {}
        if model.content is not None:
            if features is None:
                raise FunnelrecError("an item-content model's export needs its features")
            content, outside = features.item_content().outside_vocab()
            cold = _in_chunks(model.content_embeddings, content)
            emb = torch.cat([emb, cold.to(torch.float32).cpu()]).contiguous()
            item_ids = np.concatenate([item_ids, outside])
            extra = {
                "content_inputs": asdict(model.content_inputs) if model.content_inputs else None,
                "exported_items": {"vocabulary": n, "content_only": len(outside)},
            }
    save_file(
        {"embeddings": emb, "item_ids": torch.from_numpy(item_ids.copy())},
        str(out / ITEM_EMBEDDINGS_FILE),
        metadata={"format_version": str(FORMAT_VERSION)},
    )
    config = {
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "created_by": f"funnelrec {__version__}",
        "model": asdict(model.config),
        "inputs": asdict(model.inputs),
        "dim": model.config.out_dim,
        "num_items": n,
        **extra,
        **meta,
    }
    write_json_atomic(out / CONFIG_FILE, config)


# Items whose content vectors are computed at once in an export (bounds the memory).
EXPORT_CHUNK = 65_536


def _in_chunks(encode: Callable[[ItemContent], Tensor], content: ItemContent) -> Tensor:
    parts = [
        encode(content.take(torch.arange(lo, min(lo + EXPORT_CHUNK, len(content)))))
        for lo in range(0, len(content), EXPORT_CHUNK)
    ]
    return torch.cat(parts) if parts else encode(content)


def read_candidate_config(art: Path | str) -> dict[str, Any]:
    """config.json of a candidate model artifact, checked for kind and format version."""
    return read_artifact_meta(art, CONFIG_FILE, KIND, FORMAT_VERSION, "candidate model")


def _from_dict(cls: Any, values: dict[str, Any]) -> Any:
    known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
    return cls(**known)


def load_candidate_model(art: Path | str, device: str | torch.device = "cpu") -> CandidateModel:
    """The trained model of artifact `art`, in eval mode on `device`."""
    art = Path(art)
    meta = read_candidate_config(art)
    # saved before the item-age term existed: a content model without it
    config = _from_dict(CandidateConfig, {"item_age": False, **meta["model"]})
    inputs = _from_dict(CandidateInputs, meta["inputs"])
    content = meta.get("content_inputs")
    if config.item_content and not content:
        raise ArtifactError(f"{art / CONFIG_FILE}: an item-content model without content_inputs")
    model = CandidateModel(
        config, inputs, content_inputs=_from_dict(ContentInputs, content) if content else None
    )
    try:
        state = load_file(str(art / WEIGHTS_FILE))
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise ArtifactError(f"{art / WEIGHTS_FILE}: cannot read weights ({e})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise ArtifactError(
            f"{art / WEIGHTS_FILE}: weights do not fit the config ({first})"
        ) from None
    check_finite(model, art / WEIGHTS_FILE)
    return model.to(device).eval()


def load_item_embeddings(art: Path | str) -> tuple[Tensor, Tensor]:
    """The exported item embeddings of `art`, what an index is built from: (embeddings
    [M, d] float32, item_ids [M] int64 dataset ids). The first N rows are the vocabulary's
    (ids 1..N); an item-content model's export adds every other catalogue item after
    them (M = N otherwise)."""
    art = Path(art)
    read_candidate_config(art)
    try:
        t = load_file(str(art / ITEM_EMBEDDINGS_FILE))
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise ArtifactError(f"{art / ITEM_EMBEDDINGS_FILE}: cannot read ({e})") from None
    if not t["embeddings"].isfinite().all():
        raise ArtifactError(f"{art / ITEM_EMBEDDINGS_FILE}: embeddings hold NaN or infinite values")
    return t["embeddings"], t["item_ids"]


@dataclass
class UserVectors:
    """Serving-time user vectors of a split's examples, in loader order.

    vectors [E, d] float32; label [E] item vocabulary ids of the targets (0 = OOV);
    user_id, ts [E] dataset user id and target time.
    """

    vectors: Tensor
    label: Tensor
    user_id: Tensor
    ts: Tensor


def user_vectors(
    model: CandidateModel,
    batches: Iterable[CandidateBatch],
    progress: Callable[[int], None] | None = None,
) -> UserVectors:
    """u (example age 0) for every example of `batches`, e.g. a validation split's
    `loader.candidate_loader(FEAT, "valid")`: the queries an ANN index is tuned on."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    vecs, labels, users, ts = [], [], [], []
    with torch.no_grad():
        for batch in batches:
            vecs.append(model(batch.to(device)).float().cpu())
            labels.append(batch.label)
            users.append(batch.user_id)
            ts.append(batch.ts)
            if progress is not None:
                progress(len(batch))
    model.train(was_training)
    if not vecs:
        d = model.config.out_dim
        empty = torch.zeros(0, dtype=torch.int64)
        return UserVectors(torch.zeros(0, d), empty, empty.clone(), empty.clone())
    return UserVectors(torch.cat(vecs), torch.cat(labels), torch.cat(users), torch.cat(ts))


def split_user_vectors(
    art: Path | str,
    feat: Path | str,
    split: str = "valid",
    batch_size: int = 4096,
    *,
    limit: int | None = None,
) -> UserVectors:
    """User vectors of a features split with the model of artifact `art`; with `limit`,
    of its first `limit` examples only (in shard order: users by id, then time)."""
    from funnelrec.features import Features
    from funnelrec.features.loader import candidate_loader

    feats = Features.open(feat)
    check_features(read_candidate_config(art), feats, art)
    model = load_candidate_model(art)
    batches: Iterable[CandidateBatch] = candidate_loader(feats, split, batch_size=batch_size)
    if limit is not None:
        batches = itertools.islice(batches, math.ceil(limit / batch_size))
    vectors = user_vectors(model, batches)
    if limit is not None and len(vectors.vectors) > limit:
        vectors = UserVectors(
            vectors.vectors[:limit],
            vectors.label[:limit],
            vectors.user_id[:limit],
            vectors.ts[:limit],
        )
    return vectors


def features_meta(feats: Features, item_content: bool = False) -> dict[str, Any]:
    """What an artifact records about the features it was trained on (with
    `item_content`, the content vocabularies too)."""
    item = feats.vocab("item")
    names = ["token", "region", "device"]
    if item_content:
        names += list(ContentInputs.vocabularies(feats).values())
    return {
        "data": {"fingerprint": feats.fingerprint, "features": str(feats.path)},
        "split": feats.split,
        "vocab": {
            "item": {"size": len(item), "digest": vocab_digest(item.values)},
            **{name: _vocab_meta(feats, name) for name in names},
        },
    }


def _vocab_meta(feats: Features, name: str) -> dict[str, Any]:
    v = feats.vocab(name)
    return {"size": len(v), "digest": vocab_digest(v.values)}


def check_extends(meta: dict[str, Any], feats: Features, art: Path | str) -> None:
    """Raise ArtifactError unless every vocabulary of `feats` extends the one `art` was
    trained on: at least as many ids, and its first ones naming the same values (by the
    digests `features_meta` records; a vocabulary recorded without one is checked by
    size only). What a warm start needs to keep the old rows where they are."""
    for name, old in (meta.get("vocab") or {}).items():
        size = int(old["size"])
        vocab = feats.vocab(name)
        if len(vocab) < size:
            raise ArtifactError(
                f"{art}: its {name} vocabulary has {size} ids, that of {feats.path} {len(vocab)}"
                ": a warm start needs features that extend the model's (`funnelrec features "
                "build --update-from`)"
            )
        digest = old.get("digest")
        if digest is not None and vocab_digest(vocab.values[: size - 1]) != digest:
            raise ArtifactError(
                f"{art}: the {name} vocabulary of {feats.path} does not extend the one the "
                "model was trained on (its ids name other values); build the features with "
                "`funnelrec features build --update-from` the model's features"
            )


def check_features(meta: dict[str, Any], feats: Features, art: Path | str) -> None:
    """Raise ArtifactError unless `feats` has the data and item vocabulary `art` was trained on."""
    want = meta.get("data", {}).get("fingerprint")
    if want != feats.fingerprint:
        raise ArtifactError(
            f"{art} was trained on data with fingerprint {want}, {feats.path} was built from "
            f"{feats.fingerprint}"
        )
    item = feats.vocab("item")
    have = {"size": len(item), "digest": vocab_digest(item.values)}
    if meta.get("vocab", {}).get("item") != have:
        raise ArtifactError(f"{art}: its item vocabulary differs from that of {feats.path}")
    if (meta.get("model") or {}).get("item_content"):
        for name in ContentInputs.vocabularies(feats).values():
            if meta.get("vocab", {}).get(name) != _vocab_meta(feats, name):
                raise ArtifactError(
                    f"{art}: its {name} vocabulary differs from that of {feats.path}"
                )


def synthetic_batch(
    inputs: CandidateInputs,
    batch_size: int,
    *,
    history_len: int = 50,
    search_len: int = 20,
    generator: torch.Generator | None = None,
) -> CandidateBatch:
    """A batch of random examples of the given shape (benchmarks and tests): every
    history holds `history_len` items, every search bag `search_len` tokens."""
    g = generator
    b = batch_size

    def ids(n: int, vocab: int) -> Tensor:
        return torch.randint(1, max(vocab, 2), (n,), generator=g)

    return CandidateBatch(
        history=ids(b * history_len, inputs.item_vocab),
        history_offsets=torch.arange(b) * history_len,
        search=ids(b * search_len, inputs.token_vocab),
        search_offsets=torch.arange(b) * search_len,
        region=ids(b, inputs.region_vocab),
        device=ids(b, inputs.device_vocab),
        dense=torch.rand(b, inputs.num_dense, generator=g),
        example_age=torch.rand(b, generator=g),
        label=ids(b, inputs.item_vocab),
        user_id=torch.arange(b),
        ts=torch.zeros(b, dtype=torch.int64),
    )
