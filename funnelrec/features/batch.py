"""Batches of training examples as tensors: what the example loaders yield and models eat.

Bags (watch history, search tokens) are jagged, in the form `nn.EmbeddingBag` takes:
a flat 1-D tensor of ids and a 1-D tensor of each example's start offset into it. An
empty bag is allowed and embeds to the zero vector. Id 0 is padding / out of vocabulary.

Example (two users; the first watched items 3 and 5, the second nothing yet):
    history = tensor([3, 5]), history_offsets = tensor([0, 2])
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Self

import torch
from torch import Tensor


def _to(obj: object, device: torch.device | str) -> object:
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_to(v, device) for v in obj)
    return obj


class _Batch:
    def to(self, device: torch.device | str) -> Self:
        """The same batch with every tensor on `device`."""
        moved = {f.name: _to(getattr(self, f.name), device) for f in fields(self)}  # type: ignore[arg-type]
        return replace(self, **moved)  # type: ignore[type-var]


@dataclass(frozen=True)
class CandidateBatch(_Batch):
    """B candidate-generation examples (Covington et al. 2016, section 3): a user's context
    before a label watch.

    history, history_offsets:   [H], [B]  item vocabulary ids of the last N watches
    search, search_offsets:     [S], [B]  token vocabulary ids of the last N queries (a bag)
    region, device:             [B]       categorical vocabulary ids (0 = unknown)
    dense:                      [B, F]    gender, logged_in, age, ... each in [0, 1]
    example_age:                [B]       t_max of the training window - t, in [0, 1]; 0 at serving
    label:                      [B]       item vocabulary id of the watch to predict
    user_id, ts:                [B]       dataset user id and label time (for evaluation)
    """

    history: Tensor
    history_offsets: Tensor
    search: Tensor
    search_offsets: Tensor
    region: Tensor
    device: Tensor
    dense: Tensor
    example_age: Tensor
    label: Tensor
    user_id: Tensor
    ts: Tensor

    def __len__(self) -> int:
        return int(self.label.shape[0])


@dataclass(frozen=True)
class RankingBatch(_Batch):
    """B ranking examples (Covington et al. 2016, section 4): one impression each, with query
    and item features.

    categorical: name -> [B]               univalent ids (impression item, channel, topic, ...)
    bags:        name -> ([N], [B])        multivalent ids + offsets (last watched items, ...)
    dense:       [B, F]                    quantile-normalised x, x^2, sqrt(x) (+ missing flags)
    label:       [B]                       1.0 clicked, 0.0 not
    watch_time:  [B]                       seconds watched (0 when not clicked)
    user_id, request_id: [B]               for the weighted per-user loss (pairs on one page)

    Which id space (embedding table) each categorical or bag feature uses is part of the
    feature spec saved with the examples, not of the batch.
    """

    categorical: dict[str, Tensor]
    bags: dict[str, tuple[Tensor, Tensor]]
    dense: Tensor
    label: Tensor
    watch_time: Tensor
    user_id: Tensor
    request_id: Tensor

    def __len__(self) -> int:
        return int(self.label.shape[0])


@dataclass(frozen=True)
class ItemContent(_Batch):
    """R items' content, as the candidate model's content tower reads it
    (`features.content`: what each column holds and how it is fitted).

    channel, topic:       [R]       content vocabulary ids (0 = unknown)
    title, title_offsets: [T], [R]  title token ids (unigrams + bigrams), a bag per item
    dense:                [R, K]    standardised log duration and age, missing flags
    upload_ts:            [R]       float64 upload time in seconds (-inf: unknown)
    """

    channel: Tensor
    topic: Tensor
    title: Tensor
    title_offsets: Tensor
    dense: Tensor
    upload_ts: Tensor

    def __len__(self) -> int:
        return int(self.channel.shape[0])

    def take(self, rows: Tensor) -> ItemContent:
        """The content of rows `rows` [n] (any order, repeats allowed)."""
        ends = torch.cat([self.title_offsets[1:], self.title_offsets.new_tensor([len(self.title)])])
        starts = self.title_offsets[rows]
        lengths = ends[rows] - starts
        offsets = torch.cumsum(lengths, 0) - lengths
        total = int(lengths.sum())
        idx = torch.arange(total, device=rows.device) + torch.repeat_interleave(
            starts - offsets, lengths, output_size=total
        )
        return ItemContent(
            channel=self.channel[rows],
            topic=self.topic[rows],
            title=self.title[idx],
            title_offsets=offsets,
            dense=self.dense[rows],
            upload_ts=self.upload_ts[rows],
        )
