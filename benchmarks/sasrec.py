"""SASRec trained with full cross-entropy: the sequential peer of benchmarks/real_data.py.

The model is SASRec (Kang & McAuley, ICDM 2018) and the loss the one Klenitskiy & Vasilev
("Turning Dross Into Gold Loss", RecSys 2023) showed to be what SASRec was missing: a
softmax over every item at every position instead of one sampled negative. It is written
here, in plain PyTorch, so that the peer runs under exactly the protocol, data and
machine of the other models rather than being quoted from another library's run.

The model:
- item embeddings (id 0 = padding, a zero row) scaled by sqrt(hidden), plus learned
  positional embeddings, dropout, padded positions zeroed. `padding`: "left" (default)
  puts the most recent item at the last position whatever the history's length, as
  Kang & McAuley's code does; "right" counts positions from the window's first item, as
  the cross-entropy reference does (its batches are padded at the end);
- `blocks` blocks as in SASRec: the queries are the layer-normalised sequence, keys and
  values the sequence itself, causal attention (a position sees itself and the positions
  before it, never padding), the residual added to the normalised queries; then layer
  norm, a two-layer ReLU feed-forward with dropout and its own residual; padded positions
  zeroed again after each block; a last layer norm;
- logits = hidden state @ item embedding table (shared with the input), padding column
  left out of the softmax and set to -inf when scoring.
Initialisation: normal with std 0.02 (biases zero, layer norms one and zero), except the
query, key and value projections when `qkv_init="xavier"` (default): Xavier-uniform over
the three together, which is what the reference's per-module initialisation leaves them
at, since torch's attention layer holds them as one bare parameter.

Training sequences: each user's training items, oldest first, cut into windows of
max_len + 1 items, input = window[:-1], target = window[1:], padded on the `padding` side
(inference scores the position of the most recent item, the last or the last non-padding
one). `windows`: "last" (default, as the reference implementations do) keeps only each
user's most recent window; "all" also cuts the older part of long histories into further
windows, so that every training transition is a target exactly once per epoch. Every
non-padding position of every window is a target of a full-softmax cross-entropy, averaged
over the targets of a batch. Users with fewer than 2 training items give no target and are
left out.

Selection: after each epoch the model ranks all items for every validation user (input:
their training history, target: their validation item, their training items excluded from
the ranking but never the target, ties broken by a fixed random order of the items as in
`funnelrec.candidates.metrics`); the epoch with the best NDCG@10 is kept, training stops
after `patience` epochs without improvement, at `max_epochs`, or when the next epoch would
end past `max_seconds` (then `stopped_on_time`).

    run = fit_sasrec(train_histories, num_items, valid_histories, valid_targets,
                     SASRecConfig(max_seconds=600), on_epoch=print)
    scores = run.score(histories)  # [B, num_items + 1] float32, column 0 = -inf

Deterministic for a seed: every random draw (initialisation, dropout, shuffling) comes
from the seed, with the global torch RNG state restored afterwards; on the same machine
and thread count two fits give the same scores.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from funnelrec.baselines import Jagged
from funnelrec.candidates.metrics import RetrievalMetrics, exclusion_mask, target_ranks, tie_keys

# (row, item) logits held at once when scoring and validating, in chunks of rows.
LOGIT_BUDGET = 1 << 24
# (target, item) logits of the training loss held at once: the loss and its gradients are
# computed in chunks of rows of this many logits, so that a batch of long windows over a
# large catalogue fits in memory.
LOSS_BUDGET = 1 << 26
VALID_K = 10


@dataclass
class SASRecConfig:
    """The settings of the reference SASRec-with-cross-entropy runs. max_seconds: a
    wall-clock budget for the whole fit (validation included), None = none; threads:
    torch's intra-op threads during fit and score (restored afterwards), so that the peer
    runs on the same cores as the models it is compared with; windows, padding, qkv_init:
    see the module docstring; betas: Adam's ((0.9, 0.98) as in Kang & McAuley's code; the
    cross-entropy reference's is torch's default, (0.9, 0.999))."""

    hidden: int = 64
    blocks: int = 2
    heads: int = 1
    max_len: int = 50
    dropout: float = 0.2
    lr: float = 1e-3
    batch_size: int = 256
    max_epochs: int = 200
    patience: int = 10
    seed: int = 0
    max_seconds: float | None = None
    threads: int = 2
    windows: Literal["last", "all"] = "last"
    padding: Literal["left", "right"] = "left"
    qkv_init: Literal["normal", "xavier"] = "xavier"
    betas: tuple[float, float] = (0.9, 0.98)

    def __post_init__(self) -> None:
        choices = {"windows": ("last", "all"), "padding": ("left", "right"),
                   "qkv_init": ("normal", "xavier")}  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")


# ---------------------------------------------------------------------------------------
# The model


class _CausalAttention(nn.Module):
    """Multi-head attention whose queries and keys come from different tensors (SASRec
    normalises only the queries), with an output projection as torch's MultiheadAttention
    has."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden {hidden} is not a multiple of heads {heads}")
        self.heads = heads
        self.dropout = dropout
        self.query = nn.Linear(hidden, hidden)
        self.key_value = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor) -> Any:
        """queries, keys: [B, L, D]; allowed: [B, 1, L, L] bool, True = may attend."""
        b, n, d = queries.shape
        h = self.heads
        q = self.query(queries).view(b, n, h, d // h).transpose(1, 2)
        k, v = self.key_value(keys).view(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(o.transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.attention = _CausalAttention(hidden, heads, dropout)
        self.forward_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.ff1 = nn.Linear(hidden, hidden)
        self.ff2 = nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, keep: torch.Tensor) -> Any:
        q = self.attention_norm(x)
        x = q + self.attention(q, x, allowed)
        x = self.forward_norm(x)
        x = x + self.drop(self.ff2(self.drop(F.relu(self.ff1(x)))))
        return x * keep


class SASRec(nn.Module):
    """ids [B, L] (padded with 0 on the config's side) -> hidden states [B, L, D];
    `item_weights` are the output table of items 1..N."""

    def __init__(self, num_items: int, config: SASRecConfig) -> None:
        super().__init__()
        self.num_items = num_items
        self.max_len = config.max_len
        self.padding = config.padding
        self.item_emb = nn.Embedding(num_items + 1, config.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(config.max_len, config.hidden)
        self.emb_drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            _Block(config.hidden, config.heads, config.dropout) for _ in range(config.blocks)
        )
        self.last_norm = nn.LayerNorm(config.hidden, eps=1e-8)
        self.apply(self._init)
        if config.qkv_init == "xavier":
            # torch's MultiheadAttention keeps its query/key/value projection as one bare
            # [3D, D] parameter, which a per-module initialisation of Linear layers never
            # reaches: it stays at torch's Xavier-uniform over that whole matrix.
            bound = math.sqrt(6.0 / (4 * config.hidden))
            for m in self.modules():
                if isinstance(m, _CausalAttention):
                    nn.init.uniform_(m.query.weight, -bound, bound)
                    nn.init.uniform_(m.key_value.weight, -bound, bound)

    @staticmethod
    def _init(m: nn.Module) -> None:
        # The small normal initialisation of the cross-entropy reference (GPT-2 style):
        # with the tied output table it keeps the first softmax close to uniform.
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()

    def item_weights(self) -> torch.Tensor:
        return self.item_emb.weight[1:]

    def forward(self, ids: torch.Tensor) -> Any:
        n = ids.shape[1]
        keep = (ids > 0).unsqueeze(-1).to(self.item_emb.weight.dtype)  # [B, L, 1]
        x = self.item_emb(ids) * math.sqrt(self.item_emb.embedding_dim)
        if self.padding == "left":
            x = x + self.pos_emb.weight[self.max_len - n :]  # the last item at the last position
        else:
            x = x + self.pos_emb.weight[:n]  # positions counted from the window's first item
        x = self.emb_drop(x) * keep
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool, device=ids.device))
        # never attend to padding; a position always sees itself, so that a padded query
        # has one key (its output is zeroed anyway) instead of none (NaN)
        itself = torch.eye(n, dtype=torch.bool, device=ids.device)
        allowed = (causal & (ids > 0)[:, None, :]) | itself
        allowed = allowed.unsqueeze(1)  # [B, 1, L, L], one mask for every head
        for block in self.blocks:
            x = block(x, allowed, keep)
        return self.last_norm(x)


# ---------------------------------------------------------------------------------------
# Sequences


def _right_padded(left: np.ndarray) -> np.ndarray:
    """Rows padded with 0 on the left, with the padding moved to the right (the items keep
    their order)."""
    order = np.argsort(left == 0, axis=1, kind="stable")
    return np.take_along_axis(left, order, axis=1)


def _left_padded(h: Jagged, length: int) -> np.ndarray:
    """[B, length] the last `length` items of each row, left-padded with 0."""
    lengths = np.diff(h.offsets)
    take = np.minimum(lengths, length)
    out = np.zeros((len(h), length), dtype=np.int64)
    rows = np.repeat(np.arange(len(h), dtype=np.int64), take)
    starts = np.repeat(np.cumsum(take) - take, take)
    k = np.arange(rows.size, dtype=np.int64) - starts  # 0..take-1 within the row
    out[rows, length - take[rows] + k] = h.values[h.offsets[rows + 1] - take[rows] + k]
    return out


def training_windows(
    h: Jagged, max_len: int, windows: str = "last", padding: str = "left"
) -> np.ndarray:
    """[W, max_len + 1] windows of item ids, padded with 0 on the `padding` side: input =
    [:, :-1], target = [:, 1:]. "last": each user's most recent max_len + 1 items; "all":
    also the older items, in windows whose targets do not overlap (each transition a target
    once)."""
    lengths = np.diff(h.offsets)
    users = np.flatnonzero(lengths >= 2)
    n = lengths[users]
    if windows == "last":
        per_user = np.ones(users.size, dtype=np.int64)
    elif windows == "all":
        per_user = -(-(n - 1) // max_len)  # ceil: the transitions, max_len per window
    else:
        raise ValueError(f"windows must be 'last' or 'all', got {windows!r}")
    user = np.repeat(np.arange(users.size), per_user)
    j = np.arange(user.size) - np.repeat(np.cumsum(per_user) - per_user, per_user)
    end = n[user] - j * max_len  # exclusive end of the window, within the user's row
    local = end[:, None] - (max_len + 1) + np.arange(max_len + 1)[None, :]
    base = h.offsets[users][user][:, None]
    out = np.where(local >= 0, h.values[base + np.maximum(local, 0)], 0).astype(np.int64)
    if padding == "right":
        return _right_padded(out)
    if padding != "left":
        raise ValueError(f"padding must be 'left' or 'right', got {padding!r}")
    return out


# ---------------------------------------------------------------------------------------
# Training


class _FullSoftmaxCE(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weights.T` against `target`, with its gradients
    computed in the forward pass, `rows` rows of logits at a time.

    The full softmax's logits are the whole cost of training on a large catalogue. Autograd
    would keep them (or, chunked, recompute them) and pass over them again to build the
    log-softmax and its gradient; here each chunk's logits become softmax minus one-hot in
    place and go straight into the two gradient products, so memory is bounded by one chunk
    and each logit is made once. The loss is linear in the chunks, so the backward pass only
    scales the stored gradients."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weights: torch.Tensor, target: torch.Tensor, rows: int
    ) -> torch.Tensor:
        grad_hidden = torch.empty_like(hidden)
        grad_weights = torch.zeros_like(weights)
        total = hidden.new_zeros(())
        for lo in range(0, hidden.shape[0], rows):
            h, t = hidden[lo : lo + rows], target[lo : lo + rows]
            z = h @ weights.T
            lse = torch.logsumexp(z, dim=1, keepdim=True)
            total += (lse.squeeze(1) - z.gather(1, t[:, None]).squeeze(1)).sum()
            z.sub_(lse).exp_()  # the softmax
            z[torch.arange(t.numel()), t] -= 1.0
            grad_hidden[lo : lo + rows] = z @ weights
            grad_weights.addmm_(z.T, h)
        ctx.save_for_backward(grad_hidden, grad_weights)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        grad_hidden, grad_weights = ctx.saved_tensors
        return grad_hidden * grad, grad_weights * grad, None, None


def full_softmax_ce(
    hidden: torch.Tensor, weights: torch.Tensor, target: torch.Tensor, rows: int | None = None
) -> torch.Tensor:
    """Summed cross-entropy of `hidden` [R, D] against classes `target` [R] over the rows of
    `weights` [N, D], the same value and gradients as
    `F.cross_entropy(hidden @ weights.T, target, reduction="sum")`."""
    rows = rows or max(1, LOSS_BUDGET // max(1, weights.shape[0]))
    out: torch.Tensor = _FullSoftmaxCE.apply(hidden, weights, target, rows)
    return out


def _loss(model: SASRec, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean full-softmax cross-entropy over the batch's non-padding targets (items 1..N,
    padding never a class)."""
    hidden = model(inputs)
    mask = targets > 0
    t = targets[mask] - 1
    return full_softmax_ce(hidden[mask], model.item_weights(), t) / t.numel()


@torch.no_grad()
def _final_states(model: SASRec, histories: Jagged) -> torch.Tensor:
    """[B, D] the hidden state after each history's last max_len items (zeros for an empty
    history)."""
    left = _left_padded(histories, model.max_len)
    if len(left) == 0:
        return model.item_emb.weight.new_zeros((0, model.item_emb.embedding_dim))
    if model.padding == "left":
        last = np.full(len(left), model.max_len - 1)
    else:
        left = _right_padded(left)
        last = np.maximum((left > 0).sum(axis=1) - 1, 0)
    ids, at = torch.from_numpy(left), torch.from_numpy(last)
    return torch.cat(
        [
            model(ids[lo : lo + 1024])[torch.arange(min(1024, len(ids) - lo)), at[lo : lo + 1024]]
            for lo in range(0, len(ids), 1024)
        ]
    )


def _rows(h: Jagged, lo: int, hi: int) -> Jagged:
    a, b = int(h.offsets[lo]), int(h.offsets[hi])
    return Jagged(h.values[a:b], h.offsets[lo : hi + 1] - a)


@torch.no_grad()
def _validate(
    model: SASRec, histories: Jagged, targets: np.ndarray, keys: torch.Tensor
) -> dict[str, float]:
    model.eval()
    n1 = model.num_items + 1
    acc = RetrievalMetrics((VALID_K,))
    rows = max(1, LOGIT_BUDGET // n1)
    w = model.item_weights()
    for lo in range(0, len(histories), rows):
        hi = min(len(histories), lo + rows)
        part = _rows(histories, lo, hi)
        s = torch.full((hi - lo, n1), -math.inf)
        s[:, 1:] = _final_states(model, part) @ w.T
        exclude = exclusion_mask(
            torch.from_numpy(part.values), torch.from_numpy(part.offsets[:-1]), n1
        )
        t = torch.from_numpy(np.asarray(targets[lo:hi], dtype=np.int64)).reshape(-1, 1)
        acc.update(target_ranks(s, t, exclude, keys), torch.ones(hi - lo))
    m = acc.compute()
    return {
        f"valid ndcg@{VALID_K}": m[f"ndcg@{VALID_K}"],
        f"valid hr@{VALID_K}": m[f"hr@{VALID_K}"],
    }


@dataclass
class SASRecRun:
    """A fitted SASRec: the best epoch's model (eval mode) and how training went."""

    model: SASRec
    config: SASRecConfig
    best_epoch: int
    epochs_run: int
    fit_seconds: float
    stopped_on_time: bool
    history: list[dict[str, float]] = field(default_factory=list)

    def score(self, histories: Jagged) -> np.ndarray:
        """[B, num_items + 1] float32 logits of the next item after each history (its
        last max_len items); column 0 (padding) -inf. Nothing is excluded."""
        h = Jagged.of(histories)
        previous = torch.get_num_threads()
        torch.set_num_threads(self.config.threads)
        try:
            self.model.eval()
            out = np.empty((len(h), self.model.num_items + 1), dtype=np.float32)
            out[:, 0] = -np.inf
            w = self.model.item_weights().detach()
            rows = max(1, LOGIT_BUDGET // out.shape[1])
            for lo in range(0, len(h), rows):
                hi = min(len(h), lo + rows)
                out[lo:hi, 1:] = (_final_states(self.model, _rows(h, lo, hi)) @ w.T).numpy()
            return out
        finally:
            torch.set_num_threads(previous)


def fit_sasrec(
    train_histories: Jagged,
    num_items: int,
    valid_histories: Jagged,
    valid_targets: np.ndarray,
    config: SASRecConfig | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> SASRecRun:
    """Train on `train_histories` (one row per user, items 1..num_items oldest first),
    select the epoch by NDCG@10 of `valid_targets` after `valid_histories`."""
    config = config or SASRecConfig()
    train_histories, valid_histories = Jagged.of(train_histories), Jagged.of(valid_histories)
    if len(valid_histories) != len(valid_targets):
        raise ValueError(
            f"{len(valid_histories)} validation histories but {len(valid_targets)} targets"
        )
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            return _fit(
                train_histories,
                num_items,
                valid_histories,
                np.asarray(valid_targets, dtype=np.int64),
                config,
                on_epoch,
                started,
            )
    finally:
        torch.set_num_threads(previous_threads)


def _fit(
    train: Jagged,
    num_items: int,
    valid: Jagged,
    valid_targets: np.ndarray,
    config: SASRecConfig,
    on_epoch: Callable[[dict[str, float]], None] | None,
    started: float,
) -> SASRecRun:
    rng = np.random.default_rng(config.seed)
    keys = tie_keys(num_items + 1, config.seed)
    windows = torch.from_numpy(
        training_windows(train, config.max_len, config.windows, config.padding)
    )
    if len(windows) == 0:
        raise ValueError("no user has 2 or more training items: nothing to train on")
    model = SASRec(num_items, config)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr, betas=config.betas)
    history: list[dict[str, float]] = []
    best, best_epoch, best_state = -math.inf, 0, copy.deepcopy(model.state_dict())
    stopped_on_time = False
    for epoch in range(1, config.max_epochs + 1):
        epoch_start = time.perf_counter()
        model.train()
        order = torch.from_numpy(rng.permutation(len(windows)))
        total, batches = 0.0, 0
        for lo in range(0, len(order), config.batch_size):
            w = windows[order[lo : lo + config.batch_size]]
            loss = _loss(model, w[:, :-1], w[:, 1:])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total, batches = total + loss.item(), batches + 1
        row: dict[str, float] = {"epoch": epoch, "loss": total / batches}
        row.update(_validate(model, valid, valid_targets, keys))
        row["seconds"] = time.perf_counter() - epoch_start
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        if row[f"valid ndcg@{VALID_K}"] > best:
            best, best_epoch = row[f"valid ndcg@{VALID_K}"], epoch
            best_state = copy.deepcopy(model.state_dict())
        if epoch - best_epoch >= config.patience or epoch == config.max_epochs:
            break
        # the next epoch is expected to take as long as the slower of the last one and the
        # mean so far (the machine may be shared, and epochs slow down with it)
        elapsed = time.perf_counter() - started
        expected = max(row["seconds"], elapsed / epoch)
        if config.max_seconds is not None and elapsed + expected > config.max_seconds:
            stopped_on_time = True
            break
    model.load_state_dict(best_state)
    model.eval()
    return SASRecRun(
        model=model,
        config=config,
        best_epoch=best_epoch,
        epochs_run=len(history),
        fit_seconds=time.perf_counter() - started,
        stopped_on_time=stopped_on_time,
        history=history,
    )
