"""Stage 2: the deep ranking network trained by watch-time weighted logistic regression
(Covington et al. 2016, section 4).

Each impression (a candidate item shown to a user on one page) becomes one input vector:

    [emb(impression item) | emb(seed item) | mean emb(last watched items) | ... | dense]

- One embedding table per id space ("vocabulary"). Features in the same space (impression
  item, seed item, last watched items) read ONE shared table, but each feature keeps its own
  slice of the input vector, so the network can tell "the item shown" from "an item watched".
- Multivalent features (bags) are averaged (`embedding_bag`, mode mean). Id 0 is padding and
  out-of-vocabulary: its row is the zero vector and it is left out of a bag's mean, so an
  empty or all-OOV bag embeds to zero.
- Dense features arrive already quantile-normalised to [0, 1) by the feature pipeline, as
  x, x^2 and sqrt(x) (Covington et al. 2016, section 4.1); the `x^2` and `sqrt(x)` columns
  can be dropped (`power_features=False`) for the paper's ablation.
- A tower of ReLU layers (the paper's Table 1 widths) ends in one logit z.

Training: weighted logistic regression. A clicked impression is a positive of weight
T / `watch_time_unit` (T = seconds watched); an unclicked one is a negative of weight 1.
The learned odds are then sum(T) / (unit * (N - k)) = E[T] (1 + P) / unit approximately
(N impressions, k clicks, P = k / N), so at serving `exp(z) * unit` estimates the expected
watch time of the impression. `objective="ctr"` gives every example weight 1 (plain
click-through rate), the paper's "weighted equally" ablation.

Calibration: that estimate runs high by 1 / (1 - P) at the optimum, and a finite training
run lands anywhere near it, so after training one positive factor c is fitted on the
validation split (`fit_calibration`: mean c * exp(z) * unit = mean observed watch time per
impression) and stored in the artifact. Expected watch time in seconds is then
c * exp(z) * unit (`expected_watch_time`, `seconds_from_logits`); a positive constant
keeps every ranking order and metric of order (AUC, weighted per-user loss) unchanged.

Worked example (one id space "item" of 1,000 ids, dim 16; a 64-wide tower):
    spec = RankingFeatureSpec(
        id_spaces=(IdSpace("item", 1000, 16),),
        categorical=(("item_id", "item"), ("seed_item_id", "item")),
        bags=(("last_watched", "item"),),
        dense_columns=("age", "age^2", "sqrt(age)"),
        power_columns=(1, 2),
    )
    model = RankingModel(spec, RankingConfig(tower=(64,)))
    z = model(batch)                       # [B] logits
    seconds = model.expected_watch_time(batch)   # [B] = c * exp(z) * watch_time_unit
    loss = model.compute_loss(batch)       # scalar, weighted logistic loss

The artifact a training run writes (`save_ranker_artifact`, read by `load_ranker`):

    ART/config.json         format version, kind "ranker", model config, feature spec,
                            calibration, training config and summary, the features'
                            data fingerprint
    ART/model.safetensors   the state dict

See docs/ranking.md for the metrics and the paper's Table 1 configurations.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike, NDArray
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from funnelrec import __version__
from funnelrec.data.dataset import read_artifact_meta, write_json_atomic
from funnelrec.errors import ArtifactError, FunnelrecError
from funnelrec.features.batch import RankingBatch
from funnelrec.kernels.bags import mean_bag
from funnelrec.training.loop import check_finite

# 2: config.json carries "calibration". Version 1 artifacts still load, uncalibrated (c = 1).
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)

# The paper's Table 1 tower configurations (hidden ReLU layer widths, bottom to top).
TOWER_PRESETS: dict[str, tuple[int, ...]] = {
    "none": (),
    "256": (256,),
    "512": (512,),
    "1024": (1024,),
    "512-256": (512, 256),
    "1024-512": (1024, 512),
    "1024-512-256": (1024, 512, 256),
}

Objective = Literal["watch_time", "ctr"]

# Tables with at least this many rows get sparse gradients when `RankingConfig.sparse` is
# None: below it a dense AdamW step over the whole table is cheaper than coalescing.
SPARSE_AUTO_ROWS = 200_000

KIND = "ranker"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class IdSpace:
    """One vocabulary and its embedding table: ids 0..vocab_size-1, 0 = padding / OOV."""

    name: str
    vocab_size: int
    dim: int


@dataclass(frozen=True)
class RankingFeatureSpec:
    """Which inputs a ranking batch carries and which table each categorical feature reads.

    id_spaces:     one entry per embedding table
    categorical:   (feature name, id space) for univalent ids, in input order
    bags:          (feature name, id space) for multivalent ids (averaged), in input order
    dense_columns: names of the F columns of `RankingBatch.dense`
    power_columns: indices into dense_columns of the x^2 and sqrt(x) columns (dropped when
                   `RankingConfig.power_features` is False)
    """

    id_spaces: tuple[IdSpace, ...]
    categorical: tuple[tuple[str, str], ...]
    bags: tuple[tuple[str, str], ...] = ()
    dense_columns: tuple[str, ...] = ()
    power_columns: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        spaces = [s.name for s in self.id_spaces]
        if len(set(spaces)) != len(spaces):
            raise FunnelrecError(f"ranking feature spec: duplicate id space in {spaces}")
        for s in self.id_spaces:
            if s.vocab_size < 1 or s.dim < 1:
                raise FunnelrecError(
                    f"ranking feature spec: id space '{s.name}' needs vocab_size >= 1 and "
                    f"dim >= 1, got {s.vocab_size} and {s.dim}"
                )
        names = [f for f, _ in self.categorical] + [f for f, _ in self.bags]
        if len(set(names)) != len(names):
            raise FunnelrecError(f"ranking feature spec: duplicate feature name in {names}")
        for feature, space in (*self.categorical, *self.bags):
            if space not in spaces:
                raise FunnelrecError(
                    f"ranking feature spec: feature '{feature}' uses unknown id space "
                    f"'{space}' (known: {', '.join(spaces)})"
                )
        for i in self.power_columns:
            if not 0 <= i < len(self.dense_columns):
                raise FunnelrecError(
                    f"ranking feature spec: power column index {i} outside the "
                    f"{len(self.dense_columns)} dense columns"
                )

    def space(self, name: str) -> IdSpace:
        """The id space called `name`."""
        for s in self.id_spaces:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (lists, not tuples)."""
        out: dict[str, Any] = json.loads(json.dumps(asdict(self)))
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> RankingFeatureSpec:
        """Inverse of `to_dict`."""
        try:
            return cls(
                id_spaces=tuple(IdSpace(**s) for s in raw["id_spaces"]),
                categorical=tuple((str(f), str(s)) for f, s in raw["categorical"]),
                bags=tuple((str(f), str(s)) for f, s in raw.get("bags", ())),
                dense_columns=tuple(str(c) for c in raw.get("dense_columns", ())),
                power_columns=tuple(int(i) for i in raw.get("power_columns", ())),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"malformed ranking feature spec ({e!r})") from None


@dataclass(frozen=True)
class RankingConfig:
    """Ranking model and objective. Defaults are the paper's best configuration.

    tower:              hidden ReLU widths, bottom to top; () = no hidden layer (a logistic
                        regression over the embeddings and dense inputs). See TOWER_PRESETS.
    objective:          "watch_time": positives weighted by watch time, negatives 1
                        (Covington et al. 2016, section 4.2);
                        "ctr": every impression weight 1 (the ablation).
    power_features:     feed the x^2 and sqrt(x) dense columns (False = the ablation).
    watch_time_unit:    seconds per unit of positive weight. A positive weighs T / unit, so
                        exp(logit) estimates E[T] / unit and expected_watch_time multiplies it
                        back: exact, only the scale of the loss changes. 1.0 = the paper.
    clicks_as_negatives: also count every clicked impression as a weight-1 negative, which
                        makes the odds sum(T) / N = E[T] exactly instead of E[T] / (1 - P).
                        False = the paper.
    sparse:             sparse gradients for embedding tables of >= SPARSE_AUTO_ROWS rows
                        (the training loop gives them lazy Adam); True = all, False = none.
                        None = auto.
    c_row_sums:         the bags' means through the C row sums where they are built (False:
                        torch; the same numbers to rounding, for A/B runs and tests).
    """

    tower: tuple[int, ...] = (1024, 512, 256)
    objective: Objective = "watch_time"
    power_features: bool = True
    watch_time_unit: float = 1.0
    clicks_as_negatives: bool = False
    sparse: bool | None = None
    c_row_sums: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.tower, str):
            if self.tower not in TOWER_PRESETS:
                raise FunnelrecError(
                    f"ranking config: unknown tower '{self.tower}' "
                    f"(presets: {', '.join(TOWER_PRESETS)})"
                )
            object.__setattr__(self, "tower", TOWER_PRESETS[self.tower])
        object.__setattr__(self, "tower", tuple(int(w) for w in self.tower))
        if any(w < 1 for w in self.tower):
            raise FunnelrecError(f"ranking config: tower widths must be >= 1, got {self.tower}")
        if self.objective not in ("watch_time", "ctr"):
            raise FunnelrecError(
                f"ranking config: objective must be 'watch_time' or 'ctr', got '{self.objective}'"
            )
        if not (self.watch_time_unit > 0 and math.isfinite(self.watch_time_unit)):
            raise FunnelrecError(
                f"ranking config: watch_time_unit must be > 0, got {self.watch_time_unit}"
            )

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> RankingConfig:
        """Build from a TOML table / JSON object; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise FunnelrecError(
                f"ranking config: unknown key(s) {', '.join(unknown)} "
                f"(known: {', '.join(sorted(known))})"
            )
        return cls(**dict(raw))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form."""
        d = asdict(self)
        d["tower"] = list(self.tower)
        return d


def example_weights(
    label: Tensor, watch_time: Tensor, objective: Objective, watch_time_unit: float = 1.0
) -> Tensor:
    """Weight of each impression as a positive ([B]): T / unit for clicks, 0 otherwise.

    With objective "ctr" a click weighs 1. Negatives always weigh 1 (see `weighted_logistic_loss`).
    """
    clicked = label > 0.5
    if objective == "ctr":
        return clicked.to(torch.float32)
    return torch.where(clicked, watch_time.to(torch.float32) / watch_time_unit, 0.0)


def weighted_logistic_loss(
    logit: Tensor,
    label: Tensor,
    watch_time: Tensor,
    *,
    objective: Objective = "watch_time",
    watch_time_unit: float = 1.0,
    clicks_as_negatives: bool = False,
) -> Tensor:
    """Mean weighted logistic loss over a batch (a scalar).

    logit, label, watch_time: [B]. Per example:
        clicked:     -(T / unit) * log sigmoid(z)       (+ -log(1 - sigmoid(z)) if
                                                          clicks_as_negatives)
        not clicked: -log(1 - sigmoid(z))
    With objective "ctr", T / unit is replaced by 1. Summed and divided by B (a constant, so
    the minibatch gradient is unbiased for the mean over all impressions).
    """
    clicked = label > 0.5
    pos_w = example_weights(label, watch_time, objective, watch_time_unit)
    neg_w = torch.ones_like(pos_w) if clicks_as_negatives else (~clicked).to(torch.float32)
    # log sigmoid(z) and log(1 - sigmoid(z)) = log sigmoid(-z), both numerically stable.
    per = -pos_w * F.logsigmoid(logit) - neg_w * F.logsigmoid(-logit)
    return per.sum() / max(int(logit.shape[0]), 1)


def base_log_odds(
    label: Tensor,
    watch_time: Tensor,
    config: RankingConfig,
) -> float:
    """The best constant logit for these impressions: log(sum positive w / sum negative w).

    label, watch_time: [N] (a sample of the training impressions is enough). Starting the
    output bias here (`RankingModel.set_output_bias`) saves the first steps of training the
    climb from odds 1 to odds ~ E[T], tens to hundreds with watch times in seconds.
    """
    clicked = label > 0.5
    pos = float(example_weights(label, watch_time, config.objective, config.watch_time_unit).sum())
    neg = float(len(label) if config.clicks_as_negatives else int((~clicked).sum()))
    if pos <= 0 or neg <= 0:
        return 0.0
    return math.log(pos / neg)


@dataclass(frozen=True)
class Calibration:
    """Raw estimate to seconds: expected watch time = factor * exp(logit) * watch_time_unit.

    One positive factor, so the order of any two impressions never changes.
    factor:        c (1.0 = uncalibrated)
    fitted_on:     the split it was fitted on ("valid"), None when not fitted
    impressions:   how many impressions it was fitted on
    mean_raw:      mean exp(logit) * unit over them (seconds), before calibration
    mean_observed: mean observed watch time per impression over them (0 for non-clicks)
    note:          why the factor is 1 when it was not fitted
    """

    factor: float = 1.0
    fitted_on: str | None = None
    impressions: int = 0
    mean_raw: float | None = None
    mean_observed: float | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if not (self.factor > 0 and math.isfinite(self.factor)):
            raise FunnelrecError(f"calibration factor must be > 0 and finite, got {self.factor}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (stored in config.json under "calibration")."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Calibration:
        """Inverse of `to_dict`."""
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in raw.items() if k in known})
        except (TypeError, FunnelrecError) as e:
            raise ArtifactError(f"malformed ranker calibration ({e})") from None


def fit_calibration(
    logit: ArrayLike,
    watch_time: ArrayLike,
    *,
    watch_time_unit: float = 1.0,
    fitted_on: str = "valid",
) -> Calibration:
    """The factor c with mean(c * exp(logit) * unit) = mean(watch_time) over these impressions.

    logit, watch_time: [n] held-out impressions (watch time 0 when not clicked). Returns an
    unfitted Calibration (factor 1, with a note) when there is nothing to fit: no
    impressions or no watch time. Computed in log space, so large logits do not overflow
    (up to exp(logit) ~ 1e300, where the factor itself would leave float64).
    """
    z = np.asarray(logit, dtype=np.float64).ravel()
    t = np.asarray(watch_time, dtype=np.float64).ravel()
    if len(z) != len(t):
        raise FunnelrecError(f"calibration: {len(z)} logits but {len(t)} watch times")
    if len(z) == 0:
        return Calibration(note=f"not fitted: the {fitted_on} split has no impressions")
    if not np.isfinite(z).all():
        raise FunnelrecError("calibration: non-finite logits")
    observed = float(t.mean())
    if not observed > 0:
        return Calibration(note=f"not fitted: no watch time in the {fitted_on} split")
    # log mean(exp(z)) = logsumexp(z) - log n, stable for any z
    top = float(z.max())
    log_mean_raw = top + math.log(float(np.exp(z - top).sum())) - math.log(len(z))
    log_mean_raw += math.log(watch_time_unit)
    log_factor = math.log(observed) - log_mean_raw
    if max(abs(log_mean_raw), abs(log_factor)) > 700:  # exp() of these leaves float64
        raise FunnelrecError(
            f"calibration: exp(logit) averages e^{log_mean_raw:.0f}, beyond float64 range"
        )
    return Calibration(
        factor=math.exp(log_factor),
        fitted_on=fitted_on,
        impressions=len(z),
        mean_raw=math.exp(log_mean_raw),
        mean_observed=observed,
    )


class RankingModel(nn.Module):
    """The ranking network: shared embedding tables, per-feature inputs, ReLU tower, one logit.

    Attributes:
        embeddings: id space name -> nn.Embedding [vocab_size, dim] (row 0 fixed at zero)
        tower:      nn.Sequential of Linear+ReLU layers then Linear(., 1)
        input_slices: feature name -> (start, stop) of its slice in the first layer's input
        calibration: the factor from exp(logit) * unit to seconds (not a weight: it lives in
                    config.json, and `fit_calibration` sets it after training)
    """

    dense_keep: Tensor  # [F'] indices of the dense columns fed to the network
    sparse_spaces: frozenset[str]  # id spaces whose tables get sparse gradients

    def __init__(self, spec: RankingFeatureSpec, config: RankingConfig | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.config = config or RankingConfig()
        self.calibration = Calibration()
        sparse = self.config.sparse
        self.sparse_spaces = frozenset(
            s.name
            for s in spec.id_spaces
            if sparse or (sparse is None and s.vocab_size >= SPARSE_AUTO_ROWS)
        )
        self.embeddings = nn.ModuleDict(
            {
                s.name: nn.Embedding(
                    s.vocab_size, s.dim, padding_idx=0, sparse=s.name in self.sparse_spaces
                )
                for s in spec.id_spaces
            }
        )
        for table in self.embeddings.values():
            # Small init: the mean of many small vectors stays small next to dense inputs.
            nn.init.normal_(table.weight, std=0.05)  # type: ignore[arg-type]
            with torch.no_grad():
                table.weight[0].zero_()  # type: ignore[index]

        keep = [
            i
            for i in range(len(spec.dense_columns))
            if self.config.power_features or i not in set(spec.power_columns)
        ]
        self.register_buffer("dense_keep", torch.tensor(keep, dtype=torch.long), persistent=False)
        self.n_dense_in = len(spec.dense_columns)

        self.input_slices: dict[str, tuple[int, int]] = {}
        width = 0
        for feature, space in (*spec.categorical, *spec.bags):
            dim = spec.space(space).dim
            self.input_slices[feature] = (width, width + dim)
            width += dim
        self.input_slices["dense"] = (width, width + len(keep))
        width += len(keep)
        self.input_width = width

        layers: list[nn.Module] = []
        prev = width
        for w in self.config.tower:
            layers += [nn.Linear(prev, w), nn.ReLU()]
            prev = w
        layers.append(nn.Linear(prev, 1))
        self.tower = nn.Sequential(*layers)

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Embedding tables with sparse gradients (the training loop gives them lazy Adam)."""
        tables = [self.embeddings[name] for name in sorted(self.sparse_spaces)]
        return [t.weight for t in tables if isinstance(t, nn.Embedding)]  # type: ignore[misc]

    def set_output_bias(self, value: float) -> None:
        """Start the logit at `value` (e.g. log of the base odds) so training skips the climb."""
        last = self.tower[-1]
        assert isinstance(last, nn.Linear)
        with torch.no_grad():
            last.bias.fill_(value)

    def features(self, batch: RankingBatch) -> Tensor:
        """The first layer's input: [B, input_width], one slice per feature (input_slices)."""
        parts: list[Tensor] = []
        for feature, space in self.spec.categorical:
            ids = batch.categorical.get(feature)
            if ids is None:
                raise FunnelrecError(f"ranking batch lacks categorical feature '{feature}'")
            parts.append(self.embeddings[space](ids))
        for feature, space in self.spec.bags:
            bag = batch.bags.get(feature)
            if bag is None:
                raise FunnelrecError(f"ranking batch lacks bag feature '{feature}'")
            ids, offsets = bag
            table = self.embeddings[space]
            assert isinstance(table, nn.Embedding)
            # on the CPU, `mean_bag`'s C row sums (or CSR products) give a faster backward
            # than embedding_bag's per-id scatter (docs/candidates.md, "Training")
            if ids.device.type == "cpu" and ids.numel():
                parts.append(
                    mean_bag(
                        table.weight,
                        ids,
                        offsets,
                        sparse_grad=table.sparse,
                        c_row_sums=self.config.c_row_sums,
                    )
                )
            else:
                parts.append(
                    F.embedding_bag(
                        ids, table.weight, offsets, mode="mean", padding_idx=0, sparse=table.sparse
                    )
                )
        if batch.dense.shape[-1] != self.n_dense_in:
            raise FunnelrecError(
                f"ranking batch has {batch.dense.shape[-1]} dense columns, the model was built "
                f"for {self.n_dense_in} ({', '.join(self.spec.dense_columns)})"
            )
        parts.append(batch.dense.to(torch.float32).index_select(-1, self.dense_keep))
        return torch.cat(parts, dim=-1)

    def forward(self, batch: RankingBatch) -> Tensor:
        """Logits [B]; see `expected_watch_time` for seconds."""
        out: Tensor = self.tower(self.features(batch)).squeeze(-1)
        return out

    def expected_watch_time(self, batch: RankingBatch, *, calibrated: bool = True) -> Tensor:
        """Expected watch time per impression in seconds, [B]: c * exp(logit) * unit.

        calibrated=False leaves out the calibration factor c (the raw odds estimate). For
        objective "ctr" exp(logit) is click odds, and c only scales them to the mean.
        """
        factor = self.calibration.factor if calibrated else 1.0
        return torch.exp(self.forward(batch)) * (self.config.watch_time_unit * factor)

    def seconds_from_logits(
        self, logit: ArrayLike, *, calibrated: bool = True
    ) -> NDArray[np.float64]:
        """Expected watch time in seconds of logits already computed ([n] -> [n], NumPy).

        The serving path's conversion: c * exp(logit) * unit, monotone in the logit.
        """
        factor = self.calibration.factor if calibrated else 1.0
        z = np.asarray(logit, dtype=np.float64)
        out: NDArray[np.float64] = np.exp(z) * (self.config.watch_time_unit * factor)
        return out

    def compute_loss(self, batch: RankingBatch) -> Tensor:
        """The training objective on one batch (scalar): see `weighted_logistic_loss`."""
        return weighted_logistic_loss(
            self.forward(batch),
            batch.label,
            batch.watch_time,
            objective=self.config.objective,
            watch_time_unit=self.config.watch_time_unit,
            clicks_as_negatives=self.config.clicks_as_negatives,
        )

    def metadata(self) -> dict[str, Any]:
        """What `load_ranker` needs besides the weights (JSON-able)."""
        return {
            "format_version": FORMAT_VERSION,
            "kind": "ranker",
            "config": self.config.to_dict(),
            "spec": self.spec.to_dict(),
            "calibration": self.calibration.to_dict(),
        }


UNCALIBRATED_V1 = "format 1 artifact (before calibration): factor 1, exp(logit) * unit as is"


def build_ranker(metadata: Mapping[str, Any]) -> RankingModel:
    """A fresh (untrained) model from `RankingModel.metadata()` output (or config.json).

    The calibration comes along; a format 1 artifact has none and gets factor 1 (its
    `calibration.note` says so).
    """
    version = metadata.get("format_version")
    if version not in READ_VERSIONS or metadata.get("kind") != KIND:
        raise ArtifactError(
            f"ranker metadata: format version {version} kind {metadata.get('kind')!r}, "
            f"this funnelrec reads versions {', '.join(map(str, READ_VERSIONS))} kind '{KIND}'"
        )
    try:
        spec = RankingFeatureSpec.from_dict(metadata["spec"])
        config = RankingConfig.from_dict(metadata["config"])
    except (KeyError, FunnelrecError) as e:
        raise ArtifactError(f"ranker metadata: {e}") from None
    model = RankingModel(spec, config)
    if version == 1:
        model.calibration = Calibration(note=UNCALIBRATED_V1)
    elif "calibration" in metadata:
        model.calibration = Calibration.from_dict(metadata["calibration"])
    else:
        raise ArtifactError(f"ranker metadata: format version {version} without calibration")
    return model


def save_ranker_artifact(model: RankingModel, out: Path | str, *, meta: Mapping[str, Any]) -> None:
    """Write `model.safetensors` and `config.json` into directory `out`.

    meta: extra JSON (training config and summary, features fingerprint, validation
    metrics). `out` should be a temporary directory the caller renames into place
    (`dataset.AtomicDirectory`), so a reader never sees half an artifact.
    """
    out = Path(out)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
    write_json_atomic(
        out / CONFIG_FILE,
        {**dict(meta), **model.metadata(), "created_by": f"funnelrec {__version__}"},
    )


def read_ranker_config(art: Path | str) -> dict[str, Any]:
    """config.json of a ranker artifact, checked for kind and format version (1 or 2)."""
    try:
        return read_artifact_meta(art, CONFIG_FILE, KIND, FORMAT_VERSION, "ranker")
    except ArtifactError as newest:
        try:
            return read_artifact_meta(art, CONFIG_FILE, KIND, 1, "ranker")
        except ArtifactError:
            raise newest from None


def load_ranker(art: Path | str, device: str | torch.device = "cpu") -> RankingModel:
    """The trained ranker of artifact `art`, in eval mode on `device`.

    A format 1 artifact (no calibration) loads with factor 1 and a warning.
    """
    art = Path(art)
    model = build_ranker(read_ranker_config(art))
    if model.calibration.note == UNCALIBRATED_V1:
        warnings.warn(
            f"{art}: {UNCALIBRATED_V1}; retrain to calibrate expected watch time",
            stacklevel=2,
        )
    try:
        state = load_file(str(art / WEIGHTS_FILE))
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise ArtifactError(f"{art / WEIGHTS_FILE}: cannot read weights ({e})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = str(e).splitlines()
        first = lines[1].strip() if len(lines) > 1 else str(e)
        raise ArtifactError(
            f"{art / WEIGHTS_FILE}: weights do not fit the config ({first})"
        ) from None
    check_finite(model, art / WEIGHTS_FILE)
    return model.to(device).eval()


@dataclass
class RankingPredictions:
    """Logits of held-out impressions with what the metrics need, all [n] NumPy arrays."""

    logit: NDArray[np.float64]
    label: NDArray[np.float32]
    watch_time: NDArray[np.float32]
    user_id: NDArray[np.int64]
    request_id: NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.logit)


def predict(
    model: RankingModel,
    batches: Iterable[RankingBatch],
    progress: Callable[[int], None] | None = None,
) -> RankingPredictions:
    """Score every impression of `batches` (e.g. `loader.ranking_loader(FEAT, "test")`).

    progress: called with each batch's size (for a progress bar).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    cols: dict[str, list[np.ndarray]] = {f: [] for f in RankingPredictions.__dataclass_fields__}
    with torch.no_grad():
        for batch in batches:
            cols["logit"].append(model(batch.to(device)).double().cpu().numpy())
            cols["label"].append(batch.label.cpu().numpy())
            cols["watch_time"].append(batch.watch_time.cpu().numpy())
            cols["user_id"].append(batch.user_id.cpu().numpy())
            cols["request_id"].append(batch.request_id.cpu().numpy())
            if progress is not None:
                progress(len(batch))
    model.train(was_training)
    dtypes = {
        "logit": np.float64,
        "label": np.float32,
        "watch_time": np.float32,
        "user_id": np.int64,
        "request_id": np.int64,
    }
    return RankingPredictions(
        **{
            k: np.concatenate(v).astype(dtypes[k]) if v else np.zeros(0, dtypes[k])
            for k, v in cols.items()
        }
    )


def tower_name(tower: Sequence[int]) -> str:
    """Display name of a tower: "none", "512", "1024->512->256"."""
    return "->".join(str(w) for w in tower) if tower else "none"
