"""The candidate-generation network: `CandidateConfig`, `CandidateInputs`, `bag_mean` and
`CandidateModel` (user tower, output item embeddings, sampled softmax); see the package
docstring for its inputs and tower, and `content.py` for the item content tower."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from funnelrec.candidates.content import (
    AGE_BUCKETS,
    ContentEncoder,
    ContentInputs,
    ItemAge,
    VocabContent,
)
from funnelrec.errors import FunnelrecError
from funnelrec.features.batch import CandidateBatch, ItemContent
from funnelrec.kernels.bags import weighted_bag_sum
from funnelrec.kernels.softmax import Proposal, SampledSoftmax

if TYPE_CHECKING:
    from funnelrec.features import Features

# Embedding tables with at least this many rows get sparse gradients when `sparse` is
# unset. A dense (fused AdamW) step costs ~ rows x width, a sparse one (coalesce + lazy
# Adam) ~ lookups x width, so sparse wins once the table is large against the batch's
# lookups; this is the crossover measured for a history table at the throughput
# benchmark's batch (docs/candidates.md, "Sparse or dense tables"). It was measured with
# torch's SparseAdam; RowSparseAdam is faster, so the true crossover is now lower. Set
# `sparse` for other shapes.
SPARSE_AUTO_ROWS = 200_000


@dataclass(frozen=True)
class CandidateConfig:
    """Hyper-parameters of the candidate model and its loss (defaults: the paper's).

    dim:            d, the user vector and output item embedding width [256]
    depth:          tower depth 0-4 (see the package docstring) [paper's best: 4; default 2]
    item_dim:       input item (history) embedding width; None = dim
    token_dim:      search token embedding width; None = dim
    region_dim, device_dim: None = the features' log-cardinality rule
    tie_embeddings: share the input and output item tables (needs item_dim == dim)
    use_search, use_demographics, use_example_age: feature groups, to switch off for the
                    paper's feature ablations (Covington et al. 2016, section 3.5)
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
    c_row_sums:     the bags and the output table's gather through the C row sums where
                    they are built (False: torch; the same numbers to rounding, for A/B
                    runs and tests)
    c_softmax_rows: the sampled softmax's element-wise pass in C where it is built (False:
                    torch, likewise)
    item_content:   the item content tower (`content.py`; Yi et al. 2019, not the paper's):
                    an item's vector is its id row plus a vector computed from its channel,
                    topic, title tokens, duration and age, so that items outside the
                    vocabulary (never watched in the training window) have one too. Needs
                    features with the item content table. False: the paper's id-only model,
                    exactly (no content parameters, the same random draws) [False]
    title_dim:      width of the content tower's title token embeddings; None = the
                    features' log-cardinality rule
    id_dropout:     with `item_content`, in training, each scored item row's id part is
                    left out with this probability: those rows are scored by their content
                    alone, as items outside the vocabulary are at serving (an option to
                    lean the content vectors on; never at serving) [0.0]
    item_age:       with `item_content`, a term for the item's age since upload at the
                    example's time, per user (`content.ItemAge`): the query and the
                    exported item vectors gain `content.AGE_BUCKETS` dimensions. Needs
                    features whose content table has upload times [True]
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
    c_row_sums: bool = True
    c_softmax_rows: bool = True
    item_content: bool = False
    title_dim: int | None = None
    id_dropout: float = 0.0
    item_age: bool = True

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
        if not 0.0 <= self.id_dropout < 1.0:
            raise FunnelrecError(
                f"candidate config: id_dropout must be in [0, 1), got {self.id_dropout}"
            )
        if not 0.0 < self.history_decay <= 1.0:
            raise FunnelrecError(
                f"candidate config: history_decay must be in (0, 1], got {self.history_decay}"
            )
        if self.temperature <= 0:
            raise FunnelrecError(
                f"candidate config: temperature must be > 0, got {self.temperature}"
            )
        if self.ages_items and self.in_batch_negatives:
            raise FunnelrecError(
                "candidate config: the item-age term prices the sampled negatives at each "
                "example's time and does not take in_batch_negatives; set item_age=false "
                "or in_batch_negatives=false"
            )
        if self.loss == "sampled" and self.num_negatives < 1 and not self.in_batch_negatives:
            raise FunnelrecError("candidate config: sampled loss needs num_negatives >= 1")

    @property
    def ages_items(self) -> bool:
        """Whether the model has the item-age term (`item_age` applies to the tower)."""
        return self.item_content and self.item_age

    @property
    def out_dim(self) -> int:
        """Width of the query and exported item vectors: d, + the age buckets with
        `item_age`."""
        return self.dim + (AGE_BUCKETS if self.ages_items else 0)

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
    c_row_sums: bool = True,
) -> Tensor:
    """Mean embedding of each bag [B, dim], padding (id 0) left out; an empty bag -> 0.

    Computed as a weighted sum (weight 1 / non-padding length): the same numbers (to
    rounding) as EmbeddingBag's mode="mean" with padding_idx=0; on the CPU by
    `bags.weighted_bag_sum` (C row sums, or sparse-matrix products), elsewhere through the
    EmbeddingBag.
    decay < 1: a recency-weighted mean instead, the k-th id from a bag's end (bags are
    oldest first) weighing decay ** k, the weights of each bag normalised to sum to 1.
    keep: [n] bool, the ids to count (the others are left out like padding; positions
    from a bag's end still count them). c_row_sums: see `CandidateConfig`."""
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
    # on the CPU the bags' gradient through EmbeddingBag's backward is a per-id scatter,
    # several times slower (docs/candidates.md, "Training")
    if ids.device.type == "cpu":
        return weighted_bag_sum(
            table.weight, ids, offsets, weights, sparse_grad=table.sparse, c_row_sums=c_row_sums
        )
    out: Tensor = table(ids, offsets, per_sample_weights=weights)
    return out


def _normal_(weight: Tensor, std: float) -> None:
    with torch.no_grad():
        weight.normal_(0.0, std)
        weight[0].zero_()  # padding / OOV row: the zero vector


class CandidateModel(nn.Module):
    """User tower + output item embeddings + sampled softmax (see the package docstring).

    label_counts: [N + 1] training label count per item vocabulary id: the base of the
        unigram proposal Q and of in-batch negatives' correction. None: uniform (a model
        rebuilt to load a saved state dict, whose buffers then overwrite it).
    content_inputs: the content tower's sizes (`config.item_content` needs them).
    content_rows: the content of item vocabulary ids 0..N (`ContentTable.vocab_rows`);
        None: empty (a model rebuilt to load a saved state dict, which holds them).
    content_t_end: the reference time of the items' ages at serving (the content
        table's `t_end`); saved with the rows.

    With `item_content` the scored vector of item j is id_j + content_j (`content.py`):
    in training only the sampled softmax's label and negative rows are computed (the full
    softmax computes all), with the logQ correction unchanged. The history input stays
    the id table (with `tie_embeddings` too): a watch is an id the model has seen. With
    `item_age` the serving query is [u ; w(u)] and the item vectors [v_j ; age one-hot]
    (`content.ItemAge`).
    """

    def __init__(
        self,
        config: CandidateConfig,
        inputs: CandidateInputs,
        label_counts: Tensor | None = None,
        *,
        content_inputs: ContentInputs | None = None,
        content_rows: ItemContent | None = None,
        content_t_end: int | None = None,
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
            c_row_sums=c.c_row_sums,
            c_softmax_rows=c.c_softmax_rows,
        )
        # built last, so that the id model's parameters draw what they draw without it
        self.content: ContentEncoder | None = None
        self.content_rows: VocabContent | None = None
        self.content_inputs = content_inputs
        if c.item_content:
            if content_inputs is None:
                raise FunnelrecError("candidate model: item_content needs the content inputs")
            self.content = ContentEncoder(
                content_inputs, c.dim, title_dim=c.title_dim, sparse=self.sparse
            )
            self.content_rows = VocabContent(
                content_rows, inputs.item_vocab, content_inputs.num_dense, content_t_end
            )
        self.item_age: ItemAge | None = ItemAge(c.dim) if c.ages_items else None

    def item_embeddings(self) -> Tensor:
        """The item vectors v that score u: [N + 1, d] (row 0 = padding, never a
        candidate): the output table itself, or its rows L2-normalised (`normalize`);
        with `item_content`, each row plus the item's content vector."""
        table = self._output_table()
        if self.content is not None:
            ids = torch.arange(1, table.shape[0], device=table.device)
            table = torch.cat([table[:1], table[1:] + self._vocab_content(ids)])
        table = F.normalize(table, dim=1) if self.config.normalize else table
        if self.item_age is not None:
            assert self.content_rows is not None
            age = self.item_age.item_part(self.content_rows.upload_ts, self.content_rows.t_end)
            age[0] = 0.0  # padding, never a candidate
            table = torch.cat([table, age.to(table.dtype)], dim=1)
        return table

    def content_embeddings(self, content: ItemContent) -> Tensor:
        """The vectors [R, d] of items outside the vocabulary, from their content alone
        (their id row is 0), normalised as `item_embeddings` (`normalize`)."""
        if self.content is None:
            raise FunnelrecError("candidate model: no item content tower (item_content=false)")
        device = self._output_table().device
        content = content.to(device)
        v = self.content(content)
        v = F.normalize(v, dim=1) if self.config.normalize else v
        if self.item_age is not None:
            assert self.content_rows is not None
            age = self.item_age.item_part(content.upload_ts, self.content_rows.t_end)
            v = torch.cat([v, age.to(v.dtype)], dim=1)
        return v

    def _vocab_content(self, ids: Tensor) -> Tensor:
        """The content vectors [n, d] of item vocabulary ids [n]."""
        assert self.content is not None and self.content_rows is not None
        out: Tensor = self.content(self.content_rows.content().take(ids))
        return out

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
        if self.content is not None:
            out += self.content.tables()
        return out

    def user_vector(self, batch: CandidateBatch, example_age: Tensor) -> Tensor:
        """u [B, d] from a batch's context and the given example age [B]."""
        c = self.config
        keep = None
        if self.training and c.history_dropout > 0.0:
            keep = torch.rand(batch.history.shape, device=batch.history.device) >= c.history_dropout
        history = bag_mean(
            self.item_input,
            batch.history,
            batch.history_offsets,
            c.history_decay,
            keep,
            c_row_sums=c.c_row_sums,
        )
        parts = [history]
        if self.token_input is not None:
            search = bag_mean(
                self.token_input, batch.search, batch.search_offsets, c_row_sums=c.c_row_sums
            )
            parts.append(search)
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
        """Serving: the query [B, out_dim] with the example age set to
        `serving_example_age`: the end of the training window, or slightly past it
        (Covington et al. 2016, section 3.3)."""
        age = torch.full_like(batch.example_age, self.config.serving_example_age)
        return self.query(self.user_vector(batch, age))

    def query(self, u: Tensor) -> Tensor:
        """The vector [B, out_dim] that scores the exported items for user vectors u
        [B, d]: u itself, or [u ; w(u)] with `item_age`."""
        return u if self.item_age is None else self.item_age.query(u)

    def compute_loss(self, batch: CandidateBatch) -> Tensor:
        """Mean softmax loss of predicting each example's label (examples whose label is
        out of vocabulary, id 0, cannot be predicted and are left out)."""
        u = self.user_vector(batch, batch.example_age)
        labels, ts = batch.label, batch.ts
        keep = labels > 0
        if not bool(keep.all()):
            u, labels, ts = u[keep], labels[keep], ts[keep]
        if labels.numel() == 0:
            return u.sum() * 0.0  # keeps the graph: a batch of only unknown labels
        if self.content is not None:
            return self._content_loss(u, labels, ts)
        # the raw table: the softmax normalises only the rows it gathers (`normalize`)
        loss: Tensor = self.softmax(u, self._output_table(), labels, sparse=self.sparse)
        return loss

    def _content_loss(self, u: Tensor, labels: Tensor, ts: Tensor) -> Tensor:
        """The loss with the content tower: the id rows the loss scores plus their
        content vectors, computed for those rows only (the sampled softmax's labels and
        negatives) or for every item (the full softmax); with `item_age`, each scored
        item's age term at the example's time ts [B]."""
        sm, table = self.softmax, self._output_table()
        negatives = None
        if sm.full:
            ids = torch.arange(table.shape[0], device=labels.device)
        else:
            negatives = sm.sample(sm.num_negatives)
            if self.item_age is not None and self.content_rows is not None:
                # by upload time, as `ItemAge.sorted_pair_terms` reads them (the loss does
                # not depend on the negatives' order)
                up = self.content_rows.upload_ts[negatives]
                negatives = negatives[torch.argsort(up, stable=True)]
            ids = torch.cat([labels, negatives])
        id_rows = sm.gather_rows(table, ids, self.sparse)
        p = self.config.id_dropout
        if self.training and p > 0.0:
            keep = torch.rand(ids.shape[0], device=ids.device) >= p
            id_rows = id_rows * keep[:, None].to(id_rows.dtype)
        rows = id_rows + self._vocab_content(ids)
        if self.item_age is None:
            if negatives is None:
                full: Tensor = sm(u, rows, labels)
                return full
            return sm.rows_loss(u, rows, labels, negatives)
        assert self.content_rows is not None
        upload = self.content_rows.upload_ts
        w = self.item_age.weights(u)
        pos = self.item_age.label_terms(w, ts, upload[labels])
        if negatives is None:  # every item, row 0 (padding) left out
            # in upload order (`ItemAge.sorted_pair_terms`), then back in id order
            order = torch.argsort(upload[1:], stable=True)
            back = torch.empty_like(order)
            back[order] = torch.arange(len(order), device=order.device)
            ages = self.item_age.sorted_pair_terms(w, ts, upload[1:][order])
            ages = ages.index_select(1, back)
            # the label's own column: its age as the positive's (never left out)
            rows_i = torch.arange(len(labels), device=labels.device)
            ages = ages.index_put((rows_i, labels - 1), pos)
            if self.config.normalize:
                rows = F.normalize(rows, dim=1)
            logits = u @ rows[1:].T + ages
            return F.cross_entropy(logits, labels - 1)
        pair = self.item_age.sorted_pair_terms(w, ts, upload[negatives])
        return sm.rows_loss(u, rows, labels, negatives, extra=(pos, pair))
