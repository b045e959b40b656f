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

The inputs come from the features' item content table (`Features.item_content`), fitted
leak-free on the items known at the end of the training window. The candidate model
keeps the content of its vocabulary's items as buffers (`VocabContent`, saved with the
weights), so a loaded artifact scores its vocabulary without the features; items outside
the vocabulary are encoded from the table when the artifact is written.

    encoder = ContentEncoder(ContentInputs.from_features(feats), dim=64)
    v = encoder(feats.item_content().content())     # [R, 64], one row per catalogue item
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from funnelrec.errors import FunnelrecError
from funnelrec.features.batch import ItemContent

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
    item_content: bool, feats: Features
) -> tuple[ContentInputs | None, ItemContent | None]:
    """What a candidate model trained on `feats` is built with: (the content tower's
    sizes, the content of the item vocabulary's items); (None, None) without the tower."""
    if not item_content:
        return None, None
    inputs = ContentInputs.from_features(feats)
    return inputs, feats.item_content().vocab_rows(len(feats.vocab("item")))


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

    def __init__(self, rows: ItemContent | None, num_rows: int, num_dense: int) -> None:
        super().__init__()
        if rows is None:
            zeros = torch.zeros(num_rows, dtype=torch.int64)
            rows = ItemContent(
                zeros, zeros.clone(), torch.zeros(0, dtype=torch.int64), zeros.clone(),
                torch.zeros(num_rows, num_dense),
            )  # fmt: skip
        if len(rows) != num_rows:
            raise FunnelrecError(
                f"item content has {len(rows)} rows, the item vocabulary {num_rows}"
            )
        for name in ("channel", "topic", "title", "title_offsets", "dense"):
            self.register_buffer(name, getattr(rows, name).clone())

    def content(self) -> ItemContent:
        return ItemContent(self.channel, self.topic, self.title, self.title_offsets, self.dense)

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
        for name, buf in list(self._buffers.items()):
            saved = state_dict.get(prefix + name)
            if isinstance(saved, Tensor) and buf is not None and saved.shape != buf.shape:
                self._buffers[name] = torch.empty_like(saved, device=buf.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
