"""The item content tower (`CandidateConfig.item_content`): an item's vector from what is
known about it at upload, so that an item nobody has watched yet can be retrieved (Yi et
al. 2019, "Sampling-bias-corrected neural modeling for large corpus item
recommendations"; the paper of 2016 has only the id table).

    v_j = id_j + content_j        id_j: the output table's row (0 outside the vocabulary)
    content_j = W [channel_j ; topic_j ; mean(title tokens_j) ; dense_j] + b      [d]

    channel, topic   one embedding each (widths: the features' log-cardinality rule)
    title tokens     the mean of a bag of unigram and bigram embeddings (`title_dim`)
    dense            standardised log duration and age at the training window's end,
                     with missing flags (`features.content`)

With `item_age` (`ItemAge`), the score of item j for user u also gets a term for j's age
at the example's time (Covington et al. 2016, section 3.3: fresh content is what users
watch, and a model trained on a window learns the window's average popularity unless it
is told the time; the paper feeds the example's age, this the item's):

    score(u, j, t) = u . v_j + w(u)[bucket(t - upload_j)]        w(u) = A u + a   [K]

with K buckets of age in days (`AGE_EDGES_DAYS`, one more for an unknown upload time).
In training each example's own time t prices every scored item (the sampled negatives
too), and an item not yet uploaded at t is no candidate for it (masked, as an
accidental hit is). At serving the term is two more blocks of the dot product: the query
is [u ; w(u)] and item j's exported vector [v_j ; onehot(bucket(t_end - upload_j))], the
age at the training window's end, which serving's example age 0 stands for (items
uploaded later count as age 0). The index then holds d + K dimensions.

The inputs come from the features' item content table (`Features.item_content`), fitted
leak-free on the items known at the end of the training window. The candidate model
keeps the content of its vocabulary's items as buffers (`VocabContent`, saved with the
weights), so a loaded artifact scores its vocabulary without the features; items outside
the vocabulary are encoded from the table when the artifact is written.

    encoder = ContentEncoder(ContentInputs.from_features(feats), dim=64)
    v = encoder(feats.item_content().content())     # [R, 64], one row per catalogue item
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from funnelrec.errors import FunnelrecError
from funnelrec.features.batch import ItemContent
from funnelrec.features.content import DAY_S

if TYPE_CHECKING:
    from funnelrec.features import Features


@dataclass(frozen=True)
class ContentInputs:
    """Sizes the features fix for the content tower: vocabulary sizes include id 0.

    channel_vocab, topic_vocab, title_vocab: the content vocabularies' sizes;
    channel_dim, topic_dim, title_dim: their widths (the features' log rule; the model's
    `title_dim` overrides the title's); num_dense: the dense columns.
    """

    channel_vocab: int
    topic_vocab: int
    title_vocab: int
    num_dense: int
    channel_dim: int
    topic_dim: int
    title_dim: int

    @staticmethod
    def vocabularies(feats: Features) -> dict[str, str]:
        """{"channel" | "topic" | "title": the name of its content vocabulary}."""
        if not feats.has_item_content:
            feats.item_content()  # raises, saying how to get the table
        return dict(feats.manifest["item_content"]["vocabularies"])

    @classmethod
    def from_features(cls, feats: Features) -> ContentInputs:
        names = cls.vocabularies(feats)
        spec = feats.manifest["item_content"]
        vocabs = feats.manifest["vocabularies"]

        def entry(key: str) -> dict[str, Any]:
            return dict(vocabs[names[key]])

        return cls(
            channel_vocab=int(entry("channel")["size"]),
            topic_vocab=int(entry("topic")["size"]),
            title_vocab=int(entry("title")["size"]),
            num_dense=len(spec["dense_columns"]),
            channel_dim=int(entry("channel")["dim"]),
            topic_dim=int(entry("topic")["dim"]),
            title_dim=int(entry("title")["dim"]),
        )


def model_content(
    item_content: bool, feats: Features, *, item_age: bool = False
) -> tuple[ContentInputs | None, ItemContent | None, int | None]:
    """What a candidate model trained on `feats` is built with: (the content tower's
    sizes, the content of the item vocabulary's items, the training window's end: the
    reference time of the items' ages at serving); (None, None, None) without the
    tower."""
    if not item_content:
        return None, None, None
    inputs = ContentInputs.from_features(feats)
    table = feats.item_content()
    if item_age and not table.has_upload_ts:
        raise FunnelrecError(
            f"{feats.path}: the item content table was built before upload times were kept, "
            "which the item-age term needs; rebuild the features (`funnelrec features "
            "build`) or train with item_age=false"
        )
    return inputs, table.vocab_rows(len(feats.vocab("item"))), table.t_end


def _init_rows(weight: Tensor, std: float) -> None:
    with torch.no_grad():
        weight.normal_(0.0, std)
        weight[0].zero_()  # unknown / not fitted: the zero vector


class ContentEncoder(nn.Module):
    """[channel ; topic ; mean of title tokens ; dense] -> a linear layer -> [R, dim].

    sparse: sparse gradients for the three tables (as the model's id tables)."""

    def __init__(
        self,
        inputs: ContentInputs,
        dim: int,
        *,
        title_dim: int | None = None,
        sparse: bool = False,
    ) -> None:
        super().__init__()
        self.inputs = inputs
        tdim = title_dim or inputs.title_dim
        self.channel = nn.Embedding(
            inputs.channel_vocab, inputs.channel_dim, padding_idx=0, sparse=sparse
        )
        self.topic = nn.Embedding(
            inputs.topic_vocab, inputs.topic_dim, padding_idx=0, sparse=sparse
        )
        self.title = nn.EmbeddingBag(
            inputs.title_vocab, tdim, mode="mean", padding_idx=0, sparse=sparse
        )
        for table, width in ((self.channel, inputs.channel_dim), (self.topic, inputs.topic_dim)):
            _init_rows(table.weight, width**-0.5)
        _init_rows(self.title.weight, tdim**-0.5)
        width = inputs.channel_dim + inputs.topic_dim + tdim + inputs.num_dense
        self.out = nn.Linear(width, dim)

    def tables(self) -> list[Tensor]:
        """The embedding tables' weights (sparse gradients when built `sparse`)."""
        return [self.channel.weight, self.topic.weight, self.title.weight]

    def forward(self, content: ItemContent) -> Tensor:
        """The content vectors [R, dim] of R items."""
        if content.dense.shape[1] != self.inputs.num_dense:
            raise FunnelrecError(
                f"content encoder expects {self.inputs.num_dense} dense inputs, "
                f"the items have {content.dense.shape[1]}"
            )
        title = self.title(content.title, content.title_offsets)
        parts = [self.channel(content.channel), self.topic(content.topic), title, content.dense]
        out: Tensor = self.out(torch.cat([p.to(title.dtype) for p in parts], dim=1))
        return out


class VocabContent(nn.Module):
    """The content of the item vocabulary's items, row j = vocabulary id j (row 0 empty),
    kept as buffers so that they are saved with the weights and move with the model.

    A state dict's buffers replace these whatever their shapes (the title bags' length
    is known only from the data), so a model built without the rows loads them."""

    channel: Tensor
    topic: Tensor
    title: Tensor
    title_offsets: Tensor
    dense: Tensor
    upload_ts: Tensor
    t_end: Tensor

    def __init__(
        self, rows: ItemContent | None, num_rows: int, num_dense: int, t_end: int | None = None
    ) -> None:
        super().__init__()
        if rows is None:
            zeros = torch.zeros(num_rows, dtype=torch.int64)
            rows = ItemContent(
                zeros, zeros.clone(), torch.zeros(0, dtype=torch.int64), zeros.clone(),
                torch.zeros(num_rows, num_dense), torch.full((num_rows,), -math.inf,
                dtype=torch.float64),
            )  # fmt: skip
        if len(rows) != num_rows:
            raise FunnelrecError(
                f"item content has {len(rows)} rows, the item vocabulary {num_rows}"
            )
        for name in ("channel", "topic", "title", "title_offsets", "dense", "upload_ts"):
            self.register_buffer(name, getattr(rows, name).clone())
        # the reference time of the items' ages at serving (-inf: not known)
        end = -math.inf if t_end is None else float(t_end)
        self.register_buffer("t_end", torch.tensor(end, dtype=torch.float64))

    def content(self) -> ItemContent:
        return ItemContent(
            self.channel, self.topic, self.title, self.title_offsets, self.dense, self.upload_ts
        )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        if prefix + "upload_ts" not in state_dict and prefix + "dense" in state_dict:
            # saved before upload times were kept: unknown (only the item-age term reads them)
            rows = state_dict[prefix + "dense"].shape[0]
            state_dict[prefix + "upload_ts"] = torch.full((rows,), -math.inf, dtype=torch.float64)
            state_dict[prefix + "t_end"] = torch.tensor(-math.inf, dtype=torch.float64)
        for name, buf in list(self._buffers.items()):
            saved = state_dict.get(prefix + name)
            if isinstance(saved, Tensor) and buf is not None and saved.shape != buf.shape:
                self._buffers[name] = torch.empty_like(saved, device=buf.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


# The item-age term's buckets: upper edges in days since upload (the last bucket is open,
# one more holds items whose upload time is unknown). Finer where popularity changes
# fastest, right after upload.
AGE_EDGES_DAYS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 14.0, 21.0, 30.0, 60.0, 120.0, 365.0)
AGE_BUCKETS = len(AGE_EDGES_DAYS) + 2
UNKNOWN_AGE = AGE_BUCKETS - 1


def age_buckets(age_days: Tensor) -> Tensor:
    """The bucket [...] int64 of ages in days (negative: 0; not finite, from an unknown
    upload or reference time: `UNKNOWN_AGE`)."""
    edges = torch.tensor(AGE_EDGES_DAYS, dtype=age_days.dtype, device=age_days.device)
    known = torch.bucketize(age_days.clamp(min=0.0), edges)
    return torch.where(torch.isfinite(age_days), known, UNKNOWN_AGE)


class ItemAge(nn.Module):
    """The item-age term (module docstring): w(u) = A u + a [K], zero at the start so that
    training begins from the model without it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weights = nn.Linear(dim, AGE_BUCKETS)
        with torch.no_grad():
            self.weights.weight.zero_()
            self.weights.bias.zero_()

    def query(self, u: Tensor) -> Tensor:
        """[u ; w(u)]: [B, d + K], the query the exported item vectors answer."""
        return torch.cat([u, self.weights(u)], dim=1)

    def item_part(self, upload_ts: Tensor, now: Tensor) -> Tensor:
        """[R, K] one-hot of each item's age bucket at time `now` (seconds, a scalar)."""
        age = (now.to(torch.float64) - upload_ts.to(torch.float64)) / DAY_S
        return F.one_hot(age_buckets(age), AGE_BUCKETS).to(torch.float32)

    def label_terms(self, w: Tensor, ts: Tensor, upload: Tensor) -> Tensor:
        """The term [B] of each example's label (uploaded at `upload` [B]) at the
        example's time ts [B] (seconds), from the weights w = w(u) [B, K]."""
        age = (ts.to(torch.float64) - upload.to(torch.float64)) / DAY_S
        return w.gather(1, age_buckets(age)[:, None])[:, 0]

    def sorted_pair_terms(self, w: Tensor, ts: Tensor, upload: Tensor) -> Tensor:
        """The term [B, n] of every (example, item) pair, from the weights w = w(u)
        [B, K], the examples' times ts [B] and the items' upload times `upload` [n] in
        ascending order (unknown, -inf, first); -inf where the item was not yet uploaded
        at the example's time (no candidate then). The same as `age_buckets` of every
        age, in a few passes over the [B, n] matrix where bucketing each age took many.

        In that order an example's ages fall as the column rises, so its buckets are runs
        of columns, their boundaries where the upload passes t - edge (a search of the
        sorted uploads per example and edge). The count c of boundaries at or before a
        column is then a cumulative sum, and it indexes the weights reordered: c = 0 is
        the oldest bucket, c = len(edges) the newest, one more not yet uploaded (-inf),
        and unknown uploads take the last index."""
        b, n = w.shape[0], upload.shape[0]
        t = ts.to(torch.float64)
        up = upload.to(torch.float64).contiguous()
        edges = torch.tensor((*AGE_EDGES_DAYS, 0.0), dtype=torch.float64, device=w.device)
        # boundaries [B, E + 1]: the first column younger than each edge (left: an age equal
        # to an edge is in the bucket below it), then the first not yet uploaded (right)
        at = torch.cat(
            [
                torch.searchsorted(up, t[:, None] - edges[None, :-1] * DAY_S),
                torch.searchsorted(up, t[:, None], right=True),
            ],
            dim=1,
        )
        marks = torch.zeros(b, n + 1, dtype=torch.int64, device=w.device)
        marks.scatter_add_(1, at, torch.ones_like(at))
        count = marks[:, :n].cumsum_(1)
        unknown = int(torch.isinf(up).sum())
        last = len(AGE_EDGES_DAYS)
        # the weights by count: buckets from the oldest known down to 0, then "not yet
        # uploaded", then the unknown bucket
        future = torch.full((b, 1), float("-inf"), dtype=w.dtype, device=w.device)
        reordered = torch.cat([w[:, : last + 1].flip(1), future, w[:, UNKNOWN_AGE:]], dim=1)
        if unknown:
            count[:, :unknown] = last + 2
        return reordered.gather(1, count)
