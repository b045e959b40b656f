"""Candidate generation (SPEC 2): the deep retrieval network that gives a user vector u.

    inputs                          width
    mean of history item embeddings item_dim    nn.EmbeddingBag (mean), id 0 = padding
    mean of search token embeddings token_dim   (an unordered bag, SPEC 2.2)
    region, device embeddings       from the features' log rule
    dense demographics              F           gender, logged_in, age ... in [0, 1]
    example age                     1           SPEC 2.1; set to 0 at serving
        -> concatenated -> tower of ReLU layers -> u [B, d]

Tower depths as in the paper (d = 256 there): 0: linear to d; 1: d; 2: 2d -> d;
3: 4d -> 2d -> d; 4: 8d -> 4d -> 2d -> d. Items are scored by v_j . u with an output item
table v of width d, separate from the input item table unless `tie_embeddings`.

    model = CandidateModel(CandidateConfig(dim=64, depth=2), CandidateInputs.from_features(f),
                           label_counts=torch.from_numpy(f.item_label_counts()))
    loss = model.compute_loss(batch)          # training (sampled softmax, logQ correction)
    u = model(batch)                          # serving: example age = 0, [B, d]
    scores = u @ model.item_embeddings().T    # [B, N + 1]; column 0 is padding

The artifact directory a training run writes (see `save_candidate_artifact`):

    ART/config.json                  format version, model config and inputs, training
                                     config and summary, data fingerprint, vocabulary info
    ART/model.safetensors            the state dict (weights and the sampler's buffers)
    ART/item_embeddings.safetensors  "embeddings" float32 [N, d] (rows of vocabulary ids
                                     1..N) and "item_ids" int64 [N] (their dataset item ids)
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from funnelrec import __version__
from funnelrec.bags import weighted_bag_sum
from funnelrec.batch import CandidateBatch
from funnelrec.config import from_dict, read_toml
from funnelrec.dataset import AtomicDirectory, read_artifact_meta, write_json_atomic
from funnelrec.errors import ArtifactError, FunnelrecError
from funnelrec.softmax import Proposal, SampledSoftmax
from funnelrec.train import TrainConfig, TrainResult, loader_epochs, seed_everything, train

if TYPE_CHECKING:
    from funnelrec.distributed import Distributed
    from funnelrec.examples import Features

FORMAT_VERSION = 1
KIND = "candidates"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ITEM_EMBEDDINGS_FILE = "item_embeddings.safetensors"

# Embedding tables with at least this many rows get sparse gradients when `sparse` is
# unset. A dense (fused AdamW) step costs ~ rows x width, a sparse one (coalesce +
# SparseAdam) ~ lookups x width; measured for one history table (batch 1,024 x 50 ids,
# width 128, one thread) dense vs sparse: 10k rows 74 vs 350 ms, 100k 422 vs 674 ms,
# 300k 1,236 vs 1,048 ms, 1M 3,615 vs 1,123 ms (sparse measured with torch's SparseAdam;
# RowSparseAdam is faster, so the crossover is now lower). Set `sparse` for other shapes.
SPARSE_AUTO_ROWS = 200_000


@dataclass(frozen=True)
class CandidateConfig:
    """Hyper-parameters of the candidate model and its loss (defaults: the paper's).

    dim:            d, the user vector and output item embedding width [256]
    depth:          tower depth 0-4 (see the module docstring) [paper's best: 4; default 2]
    item_dim:       input item (history) embedding width; None = dim
    token_dim:      search token embedding width; None = dim
    region_dim, device_dim: None = the features' log-cardinality rule
    tie_embeddings: share the input and output item tables (needs item_dim == dim)
    use_search, use_demographics, use_example_age: feature groups (for ablations, SPEC 2)
    relu_output:    ReLU on the last tower layer too, as in the paper's tower
    dropout:        between tower layers
    loss:           "sampled" (the paper) or "full" softmax (exact; small vocabularies)
    num_negatives:  shared sampled negatives per batch ["thousands"]
    proposal:       Q: "unigram" (training label counts ** proposal_alpha), "log_uniform"
                    (Zipf over frequency-ordered ids) or "uniform"
    proposal_alpha: exponent of the unigram proposal [0.75]
    in_batch_negatives: also use the other examples' labels as negatives
    logq_correction: subtract log expected count from negative logits (off: ablation)
    sparse:         sparse gradients for the item and token tables; None = auto (tables
                    of >= SPARSE_AUTO_ROWS rows)
    serving_example_age: the example age fed at serving [0; "or slightly negative"]
    normalize:      score by cosine: u and every v_j L2-normalised, logits divided by
                    `temperature` (not the paper's plain dot product; it often trains
                    better on small data). The exported item vectors are normalised, and
                    serving's u is too, so the ANN index sees the same scores.
    temperature:    divides the cosine logits when `normalize` [1.0]
    history_decay:  1.0 = the paper's plain mean of the history bag; below 1, a
                    recency-weighted mean (the k-th latest watch weighs decay ** k)
    history_dropout: in training, each history watch is left out of its bag with this
                    probability (a regulariser for small data sets); never at serving
    """

    dim: int = 256
    depth: int = 2
    item_dim: int | None = None
    token_dim: int | None = None
    region_dim: int | None = None
    device_dim: int | None = None
    tie_embeddings: bool = False
    use_search: bool = True
    use_demographics: bool = True
    use_example_age: bool = True
    relu_output: bool = True
    dropout: float = 0.0
    loss: Literal["sampled", "full"] = "sampled"
    num_negatives: int = 4096
    proposal: Literal["unigram", "log_uniform", "uniform"] = "unigram"
    proposal_alpha: float = 0.75
    in_batch_negatives: bool = False
    logq_correction: bool = True
    sparse: bool | None = None
    serving_example_age: float = 0.0
    normalize: bool = False
    temperature: float = 1.0
    history_decay: float = 1.0
    history_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise FunnelrecError(f"candidate config: dim must be >= 1, got {self.dim}")
        if not 0 <= self.depth <= 4:
            raise FunnelrecError(f"candidate config: depth must be 0-4, got {self.depth}")
        if self.tie_embeddings and self.item_dim not in (None, self.dim):
            raise FunnelrecError(
                f"candidate config: tie_embeddings needs item_dim == dim ({self.item_dim} != "
                f"{self.dim})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise FunnelrecError(f"candidate config: dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.history_dropout < 1.0:
            raise FunnelrecError(
                f"candidate config: history_dropout must be in [0, 1), got {self.history_dropout}"
            )
        if not 0.0 < self.history_decay <= 1.0:
            raise FunnelrecError(
                f"candidate config: history_decay must be in (0, 1], got {self.history_decay}"
            )
        if self.temperature <= 0:
            raise FunnelrecError(
                f"candidate config: temperature must be > 0, got {self.temperature}"
            )
        if self.loss == "sampled" and self.num_negatives < 1 and not self.in_batch_negatives:
            raise FunnelrecError("candidate config: sampled loss needs num_negatives >= 1")

    def tower_widths(self) -> list[int]:
        """Output widths of the tower's layers, e.g. depth 3 -> [4d, 2d, d]."""
        if self.depth == 0:
            return [self.dim]
        return [self.dim * 2 ** (self.depth - 1 - i) for i in range(self.depth)]


@dataclass(frozen=True)
class CandidateInputs:
    """Sizes the data fixes: vocabulary sizes include id 0 (the embedding tables' rows).

    item_vocab: N + 1 (items are vocabulary ids 1..N); num_dense: F, the dense width.
    region_dim, device_dim: the features' embedding widths for those vocabularies.
    """

    item_vocab: int
    token_vocab: int
    region_vocab: int
    device_vocab: int
    num_dense: int
    region_dim: int = 8
    device_dim: int = 4

    @property
    def num_items(self) -> int:
        return self.item_vocab - 1

    @classmethod
    def from_features(cls, feats: Features) -> CandidateInputs:
        spec = feats.candidate_spec
        spaces = {s["name"]: s for s in spec["id_spaces"]}
        return cls(
            item_vocab=int(spaces["item"]["vocab_size"]),
            token_vocab=int(spaces["token"]["vocab_size"]),
            region_vocab=int(spaces["region"]["vocab_size"]),
            device_vocab=int(spaces["device"]["vocab_size"]),
            num_dense=len(spec["dense_columns"]),
            region_dim=int(spaces["region"]["dim"]),
            device_dim=int(spaces["device"]["dim"]),
        )


def bag_mean(
    table: nn.EmbeddingBag,
    ids: Tensor,
    offsets: Tensor,
    decay: float = 1.0,
    keep: Tensor | None = None,
) -> Tensor:
    """Mean embedding of each bag [B, dim], padding (id 0) left out; an empty bag -> 0.

    Computed as a weighted sum (weight 1 / non-padding length): the same numbers as
    EmbeddingBag's mode="mean" with padding_idx=0; on the CPU as sparse-matrix products
    (`bags.weighted_bag_sum`), elsewhere through the EmbeddingBag.
    decay < 1: a recency-weighted mean instead, the k-th id from a bag's end (bags are
    oldest first) weighing decay ** k, the weights of each bag normalised to sum to 1.
    keep: [n] bool, the ids to count (the others are left out like padding; positions
    from a bag's end still count them)."""
    real = (ids != 0).to(table.weight.dtype)
    if keep is not None:
        real = real * keep.to(real.dtype)
    if ids.numel() == 0:
        return table(ids, offsets, per_sample_weights=real)
    lengths = torch.diff(offsets, append=offsets.new_tensor([ids.shape[0]]))
    rows = torch.repeat_interleave(torch.arange(offsets.shape[0], device=ids.device), lengths)
    if decay != 1.0:
        # position from the bag's end: (start + length - 1) - index
        ends = offsets + lengths - 1
        back = (ends[rows] - torch.arange(ids.shape[0], device=ids.device)).to(real.dtype)
        real = real * torch.pow(torch.full_like(back, decay), back)
    count = torch.zeros(offsets.shape[0], dtype=real.dtype, device=ids.device)
    count.index_add_(0, rows, real)
    weights = real / count.clamp(min=1e-12)[rows]
    if ids.device.type == "cpu":  # CSR products: ~3x faster than EmbeddingBag's backward
        return weighted_bag_sum(table.weight, ids, offsets, weights, sparse_grad=table.sparse)
    out: Tensor = table(ids, offsets, per_sample_weights=weights)
    return out


def _normal_(weight: Tensor, std: float) -> None:
    with torch.no_grad():
        weight.normal_(0.0, std)
        weight[0].zero_()  # padding / OOV row: the zero vector


class CandidateModel(nn.Module):
    """User tower + output item embeddings + sampled softmax (see the module docstring).

    label_counts: [N + 1] training label count per item vocabulary id: the base of the
        unigram proposal Q and of in-batch negatives' correction. None: uniform (a model
        rebuilt to load a saved state dict, whose buffers then overwrite it).
    """

    def __init__(
        self,
        config: CandidateConfig,
        inputs: CandidateInputs,
        label_counts: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.inputs = inputs
        c = config
        if inputs.item_vocab < 2:
            raise FunnelrecError("candidate model: the item vocabulary is empty")
        item_dim = c.item_dim or c.dim
        token_dim = c.token_dim or c.dim
        self.sparse = (
            c.sparse
            if c.sparse is not None
            else max(inputs.item_vocab, inputs.token_vocab) >= SPARSE_AUTO_ROWS
        )
        self.item_input = nn.EmbeddingBag(
            inputs.item_vocab, item_dim, mode="sum", padding_idx=0, sparse=self.sparse
        )
        _normal_(self.item_input.weight, item_dim**-0.5)
        width = item_dim
        self.token_input: nn.EmbeddingBag | None = None
        if c.use_search:
            self.token_input = nn.EmbeddingBag(
                inputs.token_vocab, token_dim, mode="sum", padding_idx=0, sparse=self.sparse
            )
            _normal_(self.token_input.weight, token_dim**-0.5)
            width += token_dim
        self.region: nn.Embedding | None = None
        self.device_emb: nn.Embedding | None = None
        if c.use_demographics:
            rd, dd = c.region_dim or inputs.region_dim, c.device_dim or inputs.device_dim
            self.region = nn.Embedding(inputs.region_vocab, rd, padding_idx=0)
            self.device_emb = nn.Embedding(inputs.device_vocab, dd, padding_idx=0)
            _normal_(self.region.weight, rd**-0.5)
            _normal_(self.device_emb.weight, dd**-0.5)
            width += rd + dd + inputs.num_dense
        if c.use_example_age:
            width += 1
        layers: list[nn.Module] = []
        widths = c.tower_widths()
        for i, w in enumerate(widths):
            layers.append(nn.Linear(width, w))
            last = i == len(widths) - 1
            if c.depth > 0 and (not last or c.relu_output):
                layers.append(nn.ReLU())
            if c.dropout > 0 and not last:
                layers.append(nn.Dropout(c.dropout))
            width = w
        self.tower = nn.Sequential(*layers)
        self.item_output: nn.Embedding | None = None
        if not c.tie_embeddings:
            self.item_output = nn.Embedding(inputs.item_vocab, c.dim, padding_idx=0)
            _normal_(self.item_output.weight, c.dim**-0.5)
        counts = label_counts if label_counts is not None else torch.ones(inputs.item_vocab)
        if int(counts.shape[0]) != inputs.item_vocab:
            raise FunnelrecError(
                f"candidate model: label_counts has {counts.shape[0]} entries, "
                f"the item vocabulary {inputs.item_vocab}"
            )
        proposal = Proposal.from_counts(counts, kind=c.proposal, alpha=c.proposal_alpha)
        self.softmax = SampledSoftmax(
            proposal,
            label_counts=counts,
            num_negatives=c.num_negatives if c.loss == "sampled" else 0,
            in_batch_negatives=c.in_batch_negatives,
            correction=c.logq_correction,
            full=c.loss == "full",
            normalize_items=c.normalize,
        )

    def item_embeddings(self) -> Tensor:
        """The item vectors v that score u: [N + 1, d] (row 0 = padding, never a
        candidate): the output table itself, or its rows L2-normalised (`normalize`)."""
        table = self._output_table()
        return F.normalize(table, dim=1) if self.config.normalize else table

    def _output_table(self) -> Tensor:
        if self.item_output is not None:
            return self.item_output.weight
        return self.item_input.weight

    def sparse_parameters(self) -> list[Tensor]:
        """Parameters whose gradients are sparse (the training loop gives them lazy Adam)."""
        if not self.sparse:
            return []
        out = [self.item_input.weight]
        if self.token_input is not None:
            out.append(self.token_input.weight)
        if self.item_output is not None:
            out.append(self.item_output.weight)
        return out

    def user_vector(self, batch: CandidateBatch, example_age: Tensor) -> Tensor:
        """u [B, d] from a batch's context and the given example age [B]."""
        c = self.config
        keep = None
        if self.training and c.history_dropout > 0.0:
            keep = torch.rand(batch.history.shape, device=batch.history.device) >= c.history_dropout
        parts = [
            bag_mean(self.item_input, batch.history, batch.history_offsets, c.history_decay, keep)
        ]
        if self.token_input is not None:
            parts.append(bag_mean(self.token_input, batch.search, batch.search_offsets))
        if self.region is not None and self.device_emb is not None:
            if batch.dense.shape[1] != self.inputs.num_dense:
                raise FunnelrecError(
                    f"candidate model expects {self.inputs.num_dense} dense features, "
                    f"the batch has {batch.dense.shape[1]}"
                )
            parts += [self.region(batch.region), self.device_emb(batch.device), batch.dense]
        if c.use_example_age:
            parts.append(example_age.to(parts[0].dtype)[:, None])
        u: Tensor = self.tower(torch.cat(parts, dim=1))
        if c.normalize:
            u = F.normalize(u, dim=1) / c.temperature
        return u

    def forward(self, batch: CandidateBatch) -> Tensor:
        """Serving: u [B, d] with the example age set to `serving_example_age` (SPEC 2.1)."""
        age = torch.full_like(batch.example_age, self.config.serving_example_age)
        return self.user_vector(batch, age)

    def compute_loss(self, batch: CandidateBatch) -> Tensor:
        """Mean softmax loss of predicting each example's label (examples whose label is
        out of vocabulary, id 0, cannot be predicted and are left out)."""
        u = self.user_vector(batch, batch.example_age)
        labels = batch.label
        keep = labels > 0
        if not bool(keep.all()):
            u, labels = u[keep], labels[keep]
        if labels.numel() == 0:
            return u.sum() * 0.0  # keeps the graph: a batch of only unknown labels
        # the raw table: the softmax normalises only the rows it gathers (`normalize`)
        loss: Tensor = self.softmax(u, self._output_table(), labels, sparse=self.sparse)
        return loss


# --------------------------------------------------------------------------- artifacts


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
) -> None:
    """Write weights, exported item embeddings and config.json into directory `out`.

    item_ids: [N] dataset item id of vocabulary ids 1..N. meta: extra JSON (training config
    and summary, data fingerprint, vocabulary info). `out` should be a temporary directory
    that the caller renames into place (`dataset.AtomicDirectory`).
    """
    out = Path(out)
    item_ids = np.asarray(item_ids, dtype=np.int64)
    n = model.inputs.num_items
    if item_ids.shape != (n,):
        raise FunnelrecError(f"item_ids has shape {item_ids.shape}, the model has {n} items")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
    emb = model.item_embeddings().detach()[1:].to(torch.float32).cpu().contiguous()
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
        "dim": model.config.dim,
        "num_items": n,
        **meta,
    }
    write_json_atomic(out / CONFIG_FILE, config)


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
    config = _from_dict(CandidateConfig, meta["model"])
    inputs = _from_dict(CandidateInputs, meta["inputs"])
    model = CandidateModel(config, inputs)
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
    return model.to(device).eval()


def load_item_embeddings(art: Path | str) -> tuple[Tensor, Tensor]:
    """The exported item embeddings of `art`: (embeddings [N, d] float32, item_ids [N] int64)."""
    art = Path(art)
    read_candidate_config(art)
    try:
        t = load_file(str(art / ITEM_EMBEDDINGS_FILE))
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise ArtifactError(f"{art / ITEM_EMBEDDINGS_FILE}: cannot read ({e})") from None
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
        d = model.config.dim
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
    from funnelrec.examples import Features
    from funnelrec.loader import candidate_loader

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


def features_meta(feats: Features) -> dict[str, Any]:
    """What an artifact records about the features it was trained on."""
    item = feats.vocab("item")
    return {
        "data": {"fingerprint": feats.fingerprint, "features": str(feats.path)},
        "split": feats.split,
        "vocab": {
            "item": {"size": len(item), "digest": vocab_digest(item.values)},
            "token": {"size": len(feats.vocab("token"))},
            "region": {"size": len(feats.vocab("region"))},
            "device": {"size": len(feats.vocab("device"))},
        },
    }


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


# --------------------------------------------------------------------------- training run


@dataclass(frozen=True)
class CandidateTrainingConfig:
    """One training run of the candidate model: the model, the loop, and validation.

    model:          CandidateConfig ([model] in TOML, `model.dim=64` or just `dim=64`)
    train:          train.TrainConfig ([train] in TOML, `train.lr=0.01` or `lr=0.01`)
    valid_k:        K of the validation Recall@K (seen items excluded) that early stopping
                    watches [100]
    valid_examples: validation examples scored per evaluation (None = all)
    """

    model: CandidateConfig = field(default_factory=CandidateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    valid_k: int = 100
    valid_examples: int | None = 20_000


def load_training_config(
    path: Path | str | None = None, overrides: Sequence[str] = ()
) -> CandidateTrainingConfig:
    """Defaults, then a TOML file (sections [model] and [train]), then key=value overrides.

    A key of either section may be given without its section (`dim=64`, `lr=0.01`), in
    the file or on the command line: the two sections share no field names. Values are
    checked and parsed by `config.from_dict` (unknown keys are errors)."""
    values: dict[str, Any] = {}
    if path is not None:
        raw = read_toml(path)
        for key, value in raw.items():
            if isinstance(value, dict):
                values.setdefault(key, {}).update(value)
            else:
                _set(values, key, value)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FunnelrecError(f"override '{item}' is not of the form key=value")
        _set(values, key.strip(), value.strip())
    return from_dict(CandidateTrainingConfig, values)


def _set(values: dict[str, Any], key: str, value: Any) -> None:
    """values[section][key] = value, the section implied by an unqualified key."""
    parts = key.split(".")
    if len(parts) == 1:
        if key in CandidateConfig.__dataclass_fields__:
            parts = ["model", key]
        elif key in TrainConfig.__dataclass_fields__:
            parts = ["train", key]
    node = values
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise FunnelrecError(f"config key '{p}' is not a section")
    node[parts[-1]] = value


def checkpoint_path(out: Path | str) -> Path:
    """Where training toward artifact `out` checkpoints: `<out>.checkpoint.pt` beside it."""
    out = Path(out)
    return out.parent / f"{out.name}.checkpoint.pt"


def fit_candidates(
    feat: Path | str | Features,
    out: Path | str,
    config: CandidateTrainingConfig | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    dist: Distributed | None = None,
) -> TrainResult:
    """Train a candidate model on a features directory and write artifact `out`.

    Checkpoints go to `checkpoint_path(out)` (removed once the artifact is written); with
    `resume`, training continues from there. The artifact is built in a temporary
    directory and renamed into place.

    dist: this process's place in a data-parallel run (`distributed.setup`, under
    torchrun): each rank reads its share of the training row groups and of the validation
    examples, and only rank 0 writes checkpoints and the artifact. None: one process.
    """
    import itertools
    import math

    from funnelrec.distributed import Distributed, local_batch_size
    from funnelrec.examples import Features
    from funnelrec.loader import candidate_loader, seen_items
    from funnelrec.metrics import ModelScorer, SequentialSeen, evaluate_retrieval, query_batch

    cfg = config or CandidateTrainingConfig()
    dist = dist or Distributed()
    feats = feat if isinstance(feat, Features) else Features.open(feat)
    out = Path(out)
    ckpt = checkpoint_path(out)
    if out.exists() and not force:
        raise FunnelrecError(f"{out} already exists (use --force to overwrite)")
    if ckpt.exists() and not resume and not force:
        raise FunnelrecError(
            f"{ckpt} is left from an interrupted run: pass --resume to continue it "
            "or --force to start over"
        )
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    inputs = CandidateInputs.from_features(feats)
    counts = torch.as_tensor(np.array(feats.item_label_counts(), dtype=np.float64))
    seed_everything(cfg.train.seed)
    model = CandidateModel(cfg.model, inputs, label_counts=counts)
    loader = candidate_loader(
        feats,
        "train",
        batch_size=local_batch_size(cfg.train.batch_size, dist),
        shuffle=True,
        seed=cfg.train.seed,
        num_workers=cfg.train.num_workers,
        rank=dist.rank,
        world_size=dist.world_size,
    )
    evaluate = None
    if feats.num_examples("candidates", "valid") > 0:
        # the examples `metrics.evaluate_split(limit=valid_examples)` scores, their batches
        # shared out over the ranks in contiguous runs; Recall@K is then the mean over all
        total = feats.num_examples("candidates", "valid")
        if cfg.valid_examples is not None:
            total = min(total, cfg.valid_examples)
        vbs = min(query_batch(len(feats.vocab("item"))), max(total, 1))
        n_batches = math.ceil(total / vbs)
        # whole batches are scored: the last one may run past valid_examples
        flat, offsets = seen_items(feats, "valid", limit=n_batches * vbs)
        share = math.ceil(n_batches / dist.world_size)
        first = min(n_batches, dist.rank * share)
        last = min(n_batches, first + share)
        valid = candidate_loader(feats, "valid", batch_size=vbs)
        device = torch.device(cfg.train.device)
        num_items = len(feats.vocab("item")) - 1

        class OnDevice(ModelScorer):
            """Batches go to the model's device (a GPU), scores come back to the CPU,
            where the metrics' exclusion masks are."""

            def queries(self, batch: CandidateBatch) -> Tensor:
                return super().queries(batch.to(device))

            def scores(self, queries: Tensor) -> Tensor:
                return super().scores(queries).cpu()

        def evaluate(m: nn.Module) -> float:
            seen = SequentialSeen(flat, offsets)
            seen.cursor = first * vbs
            report = evaluate_retrieval(
                {"model": OnDevice(m)},
                itertools.islice(iter(valid), first, last),
                num_items=num_items,
                ks=(cfg.valid_k,),
                seen=seen,
            )
            recall = report.metrics["model"][f"recall@{cfg.valid_k}"]
            if not dist.enabled:
                return recall
            hits = recall * report.queries if report.queries else 0.0
            hits, queries = dist.all_reduce_sums([hits, report.queries])
            return hits / queries

    fmeta = features_meta(feats)
    result = train(
        model,
        loader_epochs(loader),
        cfg.train,
        steps_per_epoch=len(loader),
        checkpoint=ckpt,
        resume=resume,
        evaluate=evaluate,
        meta={"model": asdict(cfg.model), "features": fmeta, "valid_k": cfg.valid_k},
        progress=progress,
        description="train candidates",
        dist=dist,
    )
    meta = {
        **fmeta,
        "train": asdict(cfg.train),
        "valid_k": cfg.valid_k,
        "valid_examples": cfg.valid_examples,
        "training": {
            "steps": result.steps,
            "epochs": result.epochs,
            "examples": result.examples,
            "seconds": round(result.seconds, 3),
            "examples_per_s": round(result.examples_per_s, 1),
            "final_loss": result.loss,
            f"best_valid_recall@{cfg.valid_k}": result.best_metric,
            "best_step": result.best_step,
            "stopped_early": result.stopped_early,
            "valid_history": result.history,
            "processes": result.world_size,
            "comm_bytes_per_step": round(result.comm_bytes_per_step),
        },
    }
    if dist.is_main:
        target = AtomicDirectory(out, force=force)
        try:
            save_candidate_artifact(
                model, target.tmp, item_ids=feats.vocab("item").values, meta=meta
            )
            target.commit()
        except BaseException:
            target.abort()
            raise
        ckpt.unlink(missing_ok=True)
    dist.barrier()  # the other ranks return once the artifact is in place
    return result
