"""Quantile normalisation of continuous features, fitted on training values only.

As in Covington et al. 2016, section 4.1: for each column, `n_quantiles + 1` quantiles of
the training values are the knots of a piecewise-linear map onto [0, 1): a value is placed
by linear interpolation between the knots around it, so on training data the output is
close to uniform whatever the input's scale or skew. Knot k sits at level
k / (n_quantiles + 1), so the largest training value maps to n/(n+1) < 1.

- Heavy ties: equal knots are merged into one whose level is the mean of theirs, so a
  value shared by 60% of the rows lands in the middle of its 60% band (the map stays a
  function and stays monotone).
- Constant columns: a single knot; every value maps to its level (about 0.5): no signal.
- Outside the training range (serving): values clamp to the first / last level.
- Missing values (NaN): x = 0 and a separate indicator column `name_missing` = 1. A column
  gets the indicator when its training values had NaNs or it is declared `nullable`.

Each column is emitted as x, x^2 and sqrt(x) (super- and sub-linear shapes, section 4.1), unless
fitted with `powers=False`. Output column order: per input column, in input order,
`name`, `name^2`, `sqrt(name)`, then `name_missing` if it has one.

Example:
    qn = QuantileNormalizer.fit({"duration": d, "age": a}, nullable=("age",))
    qn.output_columns      # ['duration', 'duration^2', 'sqrt(duration)', 'age', ...]
    dense = qn.transform({"duration": d2, "age": a2})   # [B, F] float32
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from funnelrec.errors import ArtifactError, FunnelrecError

FORMAT_VERSION = 1


@dataclass(frozen=True, eq=False)
class ColumnQuantiles:
    """The fitted map of one column: strictly increasing `knots` [K] -> `levels` [K]."""

    name: str
    knots: np.ndarray
    levels: np.ndarray
    has_missing: bool

    def __call__(self, values: np.ndarray) -> np.ndarray:
        """[B] float values (NaN = missing) -> [B] float64 in [0, 1); missing -> 0."""
        v = np.asarray(values, dtype=np.float64)
        if self.knots.size == 0:
            return np.zeros(v.shape, dtype=np.float64)
        out = np.interp(v, self.knots, self.levels)
        out[np.isnan(v)] = 0.0
        return out


def _fit_column(name: str, values: np.ndarray, n_quantiles: int, nullable: bool) -> ColumnQuantiles:
    v = np.asarray(values, dtype=np.float64)
    if np.isinf(v).any():
        raise FunnelrecError(f"quantile normaliser: column '{name}' has infinite values")
    missing = np.isnan(v)
    v = v[~missing]
    if v.size == 0:
        empty = np.zeros(0, dtype=np.float64)
        return ColumnQuantiles(name, empty, empty, True)
    probs = np.arange(n_quantiles + 1, dtype=np.float64) / n_quantiles
    knots = np.quantile(v, probs)
    levels = np.arange(n_quantiles + 1, dtype=np.float64) / (n_quantiles + 1)
    # Merge equal knots (ties); the level of a merged knot is the mean of its levels.
    uniq, inverse = np.unique(knots, return_inverse=True)
    merged = np.bincount(inverse, weights=levels) / np.bincount(inverse)
    return ColumnQuantiles(name, uniq, merged, bool(missing.any() or nullable))


class QuantileNormalizer:
    """Per-column quantile maps plus the x, x^2, sqrt(x) (+ missing flag) expansion."""

    def __init__(self, columns: list[ColumnQuantiles], *, n_quantiles: int, powers: bool) -> None:
        self.columns = columns
        self.n_quantiles = n_quantiles
        self.powers = powers
        self._by_name = {c.name: c for c in columns}
        if len(self._by_name) != len(columns):
            raise FunnelrecError("quantile normaliser: duplicate column names")

    @classmethod
    def fit(
        cls,
        data: Mapping[str, np.ndarray],
        *,
        n_quantiles: int = 1000,
        powers: bool = True,
        nullable: Collection[str] = (),
        max_values: int | None = 1_000_000,
        seed: int = 0,
    ) -> QuantileNormalizer:
        """Fit one map per column of `data` (name -> [N] floats, NaN = missing).

        Columns longer than `max_values` are fitted on a seeded random sample of that size:
        1,000 quantiles are estimated well from a million values, and sorting fewer is fast.
        """
        if n_quantiles < 1:
            raise FunnelrecError(
                f"quantile normaliser: n_quantiles must be >= 1, got {n_quantiles}"
            )
        rng = np.random.default_rng(seed)
        cols = []
        for name, values in data.items():
            v = np.asarray(values, dtype=np.float64)
            if max_values is not None and v.size > max_values:
                v = v[rng.choice(v.size, size=max_values, replace=False)]
            cols.append(_fit_column(name, v, n_quantiles, name in nullable))
        return cls(cols, n_quantiles=n_quantiles, powers=powers)

    @property
    def input_columns(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def output_columns(self) -> list[str]:
        """Names of the F columns `transform` returns, in order."""
        names = []
        for c in self.columns:
            names.append(c.name)
            if self.powers:
                names += [f"{c.name}^2", f"sqrt({c.name})"]
            if c.has_missing:
                names.append(f"{c.name}_missing")
        return names

    @property
    def power_columns(self) -> list[int]:
        """Indices (into output_columns) of the x^2 and sqrt(x) columns."""
        return [
            i
            for i, n in enumerate(self.output_columns)
            if n.endswith("^2") or (n.startswith("sqrt(") and n.endswith(")"))
        ]

    def column(self, name: str) -> ColumnQuantiles:
        try:
            return self._by_name[name]
        except KeyError:
            raise FunnelrecError(f"quantile normaliser has no column '{name}'") from None

    def transform(self, data: Mapping[str, np.ndarray]) -> np.ndarray:
        """name -> [B] raw values (NaN = missing)  ->  [B, F] float32 (see output_columns)."""
        missing_cols = [c.name for c in self.columns if c.name not in data]
        if missing_cols:
            raise FunnelrecError(
                f"quantile normaliser: input lacks column(s) {', '.join(missing_cols)}"
            )
        n = len(np.asarray(data[self.columns[0].name])) if self.columns else 0
        out = np.empty((n, len(self.output_columns)), dtype=np.float32)
        j = 0
        for c in self.columns:
            raw = np.asarray(data[c.name], dtype=np.float64)
            if raw.shape != (n,):
                raise FunnelrecError(
                    f"quantile normaliser: column '{c.name}' has shape {raw.shape}, expected ({n},)"
                )
            x = c(raw)
            out[:, j] = x
            j += 1
            if self.powers:
                out[:, j] = x * x
                out[:, j + 1] = np.sqrt(x)
                j += 2
            if c.has_missing:
                out[:, j] = np.isnan(raw)
                j += 1
        return out

    def to_dict(self) -> dict[str, object]:
        return {
            "format_version": FORMAT_VERSION,
            "n_quantiles": self.n_quantiles,
            "powers": self.powers,
            "columns": [
                {
                    "name": c.name,
                    "knots": c.knots.tolist(),
                    "levels": c.levels.tolist(),
                    "has_missing": c.has_missing,
                }
                for c in self.columns
            ],
        }

    @classmethod
    def from_dict(
        cls, raw: Mapping[str, object], where: object = "normaliser"
    ) -> QuantileNormalizer:
        if raw.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"{where}: normaliser format version {raw.get('format_version')}, "
                f"this funnelrec reads {FORMAT_VERSION}"
            )
        try:
            cols = [
                ColumnQuantiles(
                    str(c["name"]),
                    np.asarray(c["knots"], dtype=np.float64),
                    np.asarray(c["levels"], dtype=np.float64),
                    bool(c["has_missing"]),
                )
                for c in raw["columns"]  # type: ignore[attr-defined]
            ]
            return cls(cols, n_quantiles=int(raw["n_quantiles"]), powers=bool(raw["powers"]))  # type: ignore[call-overload]
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{where}: malformed normaliser ({e!r})") from None

    def save(self, path: Path | str) -> None:
        """Write JSON atomically (floats round-trip exactly)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict()) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path | str) -> QuantileNormalizer:
        path = Path(path)
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{path}: cannot read normaliser ({e})") from None
        return cls.from_dict(raw, where=path)
