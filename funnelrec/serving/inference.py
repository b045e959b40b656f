"""The two models' forward passes for one request, at inference settings.

`RequestUserTower`: the candidate model's user vector for one user (`CandidateModel.forward`
of a batch of one), the same numbers without the bookkeeping of a batch of many bags:
each bag's mean is its ids weighted 1 / (its non-padding ids) summed by the same kernel
(`kernels.bags.weighted_bag_sum`), then the same tower. A batch of several users, a model
in training mode or one whose bags are recency-weighted goes through the model's forward.

`RequestRanker`: the ranker's forward pass for the candidates of one request.

A served ranking batch is one request: every row is the same user at the same time, and
only the candidate differs. The query-side inputs (the watch-history and search bags, and
the user's univalent ids: last watched item, region, device) are therefore the same on
every row, and so is their share of the first layer, W_shared x_shared + b. `RequestRanker`
computes that share once per request as a bias and multiplies only the per-candidate
inputs (the item's ids and the dense features) by their columns of W:

    h1 = relu(W_rows x_rows + (W_shared x_shared + b))      then the rest of the tower

That is the same function as `RankingModel.forward` (the sums group differently, so logits
agree to float32 rounding, not bit for bit), without averaging a copy of the bags per row
or multiplying the shared columns once per candidate. A batch whose rows do not share
their bags (not one request) goes through `RankingModel.forward` unchanged.

The serving path hands it the request as the featurizer makes it, the shared inputs once
(`request_logits` of a `features.serving.RequestFeatures`): no batch is laid out only for
the shared parts to be found again in it. `logits` takes a RankingBatch; both compute the
same numbers for the same request.

Everything runs under `torch.inference_mode()`: no autograd records, no version counters.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from funnelrec.candidates import CandidateModel
from funnelrec.features.batch import CandidateBatch, RankingBatch
from funnelrec.features.serving import RequestFeatures
from funnelrec.kernels.bags import weighted_bag_sum
from funnelrec.ranking.model import RankingModel


class RequestUserTower:
    """The query [out_dim] of one user by `model` (a loaded `CandidateModel`, eval mode):
    the user vector u [d], with the item-age term's weights after it where it has one."""

    def __init__(self, model: CandidateModel) -> None:
        self.model = model

    def user_vector(self, batch: CandidateBatch) -> np.ndarray:
        """[d] float32 u of the batch's one user (`CandidateModel.forward`'s numbers)."""
        m, c = self.model, self.model.config
        with torch.inference_mode():
            if len(batch) != 1 or m.training or c.history_decay != 1.0:
                return m(batch).float().numpy()[0]
            parts = [_bag_mean(m.item_input, batch.history, batch.history_offsets, c.c_row_sums)]
            if m.token_input is not None:
                parts.append(
                    _bag_mean(m.token_input, batch.search, batch.search_offsets, c.c_row_sums)
                )
            if m.region is not None and m.device_emb is not None:
                if batch.dense.shape[1] != m.inputs.num_dense:
                    return m(batch).float().numpy()[0]  # the model's error
                parts += [m.region(batch.region), m.device_emb(batch.device), batch.dense]
            if c.use_example_age:
                age = torch.full_like(batch.example_age, c.serving_example_age)
                parts.append(age.to(parts[0].dtype)[:, None])
            u: Tensor = m.tower(torch.cat(parts, dim=1))
            if c.normalize:
                u = F.normalize(u, dim=1) / c.temperature
            return m.query(u).float().numpy()[0]


def _bag_mean(table: nn.EmbeddingBag, ids: Tensor, offsets: Tensor, c_row_sums: bool) -> Tensor:
    """`candidates.model.bag_mean` of one bag [1, dim] (no recency weights, nothing dropped):
    each id weighted 1 / (non-padding ids), padding 0."""
    real = (ids != 0).to(table.weight.dtype)
    if ids.numel() == 0:
        out: Tensor = table(ids, offsets, per_sample_weights=real)
        return out
    # One bag: its count is the one sum, exact (a sum of ones), of `bag_mean`'s per-bag sums.
    weights = real / real.sum().clamp(min=1e-12)
    return weighted_bag_sum(
        table.weight, ids, offsets, weights, sparse_grad=table.sparse, c_row_sums=c_row_sums
    )


class RequestRanker:
    """Logits of a request's candidates by `model` (a loaded `RankingModel`, eval mode).

    The first layer's weight is split into per-feature column blocks once, here.
    """

    def __init__(self, model: RankingModel) -> None:
        layers = list(model.tower.children())
        first = layers[0]
        if not isinstance(first, nn.Linear):
            raise TypeError(f"ranker tower starts with {type(first).__name__}, not Linear")
        self.model = model
        weight = first.weight.detach()
        self._bias = first.bias.detach()
        # [in, out] blocks, one per input feature, so a request's rows multiply as x @ W.
        self._blocks = {
            feature: weight[:, lo:hi].t().contiguous()
            for feature, (lo, hi) in model.input_slices.items()
        }
        self._tables: dict[str, Tensor] = {}
        for name, table in model.embeddings.items():
            assert isinstance(table, nn.Embedding)
            self._tables[name] = table.weight.detach()
        # The rest of the tower as (bias, weight^T) per Linear and None per ReLU, applied in
        # place (every activation here is a fresh tensor of this call): the same numbers
        # as the modules', without allocating a buffer per ReLU. Other layers: as modules.
        self._rest: list[tuple[Tensor, Tensor] | nn.Module | None] = []
        for layer in layers[1:]:
            if isinstance(layer, nn.Linear):
                self._rest.append((layer.bias.detach(), layer.weight.detach().t()))
            else:
                self._rest.append(None if type(layer) is nn.ReLU else layer)
        self._stacked: dict[tuple[str, ...], Tensor] = {}

    def logits(self, batch: RankingBatch) -> np.ndarray:
        """[C] float64 logits of the batch's rows (the model's forward, see the module doc)."""
        with torch.inference_mode():
            fast = self._complete(batch.categorical, batch.bags, batch.dense) and _one_request(
                batch
            )
            out = self._forward(batch) if fast else self.model(batch)
            return out.double().numpy()

    def request_logits(self, request: RequestFeatures) -> np.ndarray:
        """[C] float64 logits of one request's candidates, read as the featurizer gives them
        (`features.serving.RequestFeatures`: the shared inputs once), with the same numbers
        as `logits(request.batch())` without laying the batch out."""
        with torch.inference_mode():
            dense = torch.from_numpy(request.dense)
            known = request.shared.keys() | request.rows.keys()
            if len(request) == 0 or not self._complete(known, request.bags, dense):
                return self.model(request.batch()).double().numpy()
            shared: dict[str, int | Tensor] = dict(request.shared)
            rows: dict[str, Tensor] = {}
            for feature, ids in request.rows.items():
                if (ids == ids[0]).all():
                    shared[feature] = int(ids[0])
                else:
                    rows[feature] = torch.from_numpy(ids)
            bags = {name: torch.from_numpy(values) for name, values in request.bags.items()}
            return self._logits(shared, rows, bags, dense).double().numpy()

    def _complete(self, categorical: Iterable[str], bags: Iterable[str], dense: Tensor) -> bool:
        """Whether the inputs are every one the model reads (if not, the model's forward
        says which is missing)."""
        spec = self.model.spec
        names, bag_names = set(categorical), set(bags)
        return (
            dense.shape[-1] == self.model.n_dense_in
            and all(f in names for f, _ in spec.categorical)
            and all(f in bag_names for f, _ in spec.bags)
        )

    def _forward(self, batch: RankingBatch) -> Tensor:
        c = len(batch)
        shared: dict[str, int | Tensor] = {}
        rows: dict[str, Tensor] = {}
        for feature, ids in batch.categorical.items():
            if bool((ids == ids[0]).all()):
                shared[feature] = ids[0]
            else:
                rows[feature] = ids
        bags = {}
        for feature, (ids, _) in batch.bags.items():
            bags[feature] = ids[: ids.numel() // c]
        return self._logits(shared, rows, bags, batch.dense)

    def _logits(
        self,
        shared_ids: dict[str, int | Tensor],
        row_ids: dict[str, Tensor],
        bags: dict[str, Tensor],
        dense: Tensor,
    ) -> Tensor:
        """[C] logits of C rows: `shared_ids` the categorical ids the same on every row,
        `row_ids` [C] those that differ, `bags` [L] each the bag every row has, dense
        [C, F]. The shared inputs, side by side in the spec's order (categorical, then
        bags), are multiplied by their columns in one product added to the first layer's
        bias (not one product per input, each a few torch calls), so both callers compute
        the same numbers."""
        spec = self.model.spec
        shared: list[Tensor] = []
        shared_names: list[str] = []
        rows: list[Tensor] = []
        names: list[str] = []
        for feature, space in spec.categorical:
            table = self._tables[space]
            if feature in shared_ids:
                shared.append(table[shared_ids[feature]])
                shared_names.append(feature)
            else:
                rows.append(table.index_select(0, row_ids[feature]))
                names.append(feature)
        for feature, space in spec.bags:
            bag = bags[feature]
            bag = bag[bag != 0]  # padding is left out of the mean, as in `mean_bag`
            if bag.numel():  # an empty bag adds nothing
                shared.append(self._tables[space].index_select(0, bag).mean(0))
                shared_names.append(feature)
        bias = self._bias
        if shared:
            bias = torch.addmv(bias, self._stack(shared_names).t(), torch.cat(shared))
        rows.append(dense.to(torch.float32).index_select(-1, self.model.dense_keep))
        names.append("dense")
        hidden = torch.addmm(bias, torch.cat(rows, dim=1), self._stack(names))
        for layer in self._rest:
            if layer is None:
                hidden.relu_()
            elif isinstance(layer, tuple):
                hidden = torch.addmm(layer[0], hidden, layer[1])
            else:
                hidden = layer(hidden)
        return hidden.squeeze(-1)

    def _stack(self, features: list[str]) -> Tensor:
        """[sum of their widths, out] the first layer's blocks of `features`, one above the
        other (made once per list of features)."""
        key = tuple(features)
        stacked = self._stacked.get(key)
        if stacked is None:
            stacked = self._stacked[key] = torch.cat([self._blocks[f] for f in features])
        return stacked


def _one_request(batch: RankingBatch) -> bool:
    """Whether every row of `batch` carries the same bags (the batch of one request),
    checked rather than assumed: it is what lets the bags be averaged once."""
    c = len(batch)
    if c == 0:
        return False
    for ids, offsets in batch.bags.values():
        n, extra = divmod(ids.numel(), c)
        if extra or not torch.equal(offsets, torch.arange(c, dtype=offsets.dtype) * n):
            return False
        if n and not bool((ids.view(c, n) == ids[:n]).all()):
            return False
    return True
