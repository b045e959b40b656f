"""The ranker's forward pass for the candidates of one request, at inference settings.

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

Everything runs under `torch.inference_mode()`: no autograd records, no version counters.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from funnelrec.features.batch import RankingBatch
from funnelrec.ranking.model import RankingModel


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
            fast = self._complete(batch) and _one_request(batch)
            out = self._forward(batch) if fast else self.model(batch)
            return out.double().numpy()

    def _complete(self, batch: RankingBatch) -> bool:
        """Whether the batch has every input the model reads (if not, the model's forward
        says which is missing)."""
        spec = self.model.spec
        return (
            batch.dense.shape[-1] == self.model.n_dense_in
            and all(f in batch.categorical for f, _ in spec.categorical)
            and all(f in batch.bags for f, _ in spec.bags)
        )

    def _forward(self, batch: RankingBatch) -> Tensor:
        spec, c = self.model.spec, len(batch)
        shared = self._bias.clone()
        rows: list[Tensor] = []
        names: list[str] = []
        for feature, space in spec.categorical:
            ids = batch.categorical[feature]
            table = self._tables[space]
            if bool((ids == ids[0]).all()):
                shared += table[ids[0]] @ self._blocks[feature]
            else:
                rows.append(table.index_select(0, ids))
                names.append(feature)
        for feature, space in spec.bags:
            ids, _ = batch.bags[feature]
            bag = ids[: ids.numel() // c]
            bag = bag[bag != 0]  # padding is left out of the mean, as in `mean_bag`
            if bag.numel():
                shared += self._tables[space].index_select(0, bag).mean(0) @ self._blocks[feature]
        rows.append(batch.dense.to(torch.float32).index_select(-1, self.model.dense_keep))
        names.append("dense")
        key = tuple(names)
        stacked = self._stacked.get(key)
        if stacked is None:
            stacked = self._stacked[key] = torch.cat([self._blocks[n] for n in names])
        hidden = torch.addmm(shared, torch.cat(rows, dim=1), stacked)
        for layer in self._rest:
            if layer is None:
                hidden.relu_()
            elif isinstance(layer, tuple):
                hidden = torch.addmm(layer[0], hidden, layer[1])
            else:
                hidden = layer(hidden)
        return hidden.squeeze(-1)


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
