"""Reading back: `Features`, an opened features directory (manifest, transforms, shards),
and the serving-time candidate batch built with its transforms.

A features directory may be on any filesystem (`funnelrec.filesystems`: `s3://`, `gs://`,
any fsspec scheme). There its manifest and transforms (small) are copied to a local
temporary folder, `path`, and the example shards are read where they are
(`shard_files`): a multi-node training job reads the shards the build wrote, with no copy
step. A directory without its manifest, which is written last, is refused: its build or
upload has not finished.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pyarrow import fs as pafs

from funnelrec.data.dataset import Dataset
from funnelrec.errors import ArtifactError, FunnelrecError
from funnelrec.features.batch import CandidateBatch
from funnelrec.features.config import FORMAT_VERSION, MANIFEST, FeaturesConfig
from funnelrec.features.content import ContentTable, encode_items
from funnelrec.features.normalize import QuantileNormalizer
from funnelrec.features.splits import PART_NAMES
from funnelrec.features.tokenize import tokenize_array
from funnelrec.features.transforms import UserEncoder
from funnelrec.features.vectorised import drop_zeros
from funnelrec.features.vocab import Vocabulary
from funnelrec.filesystems import LocalCopy, Location, resolve


@dataclass(frozen=True)
class Demographics:
    """A user's demographics at serving time; None = unknown."""

    age: float | None = None
    gender: str | None = None
    region: str | None = None
    device: str | None = None
    logged_in: bool | None = None


@dataclass(eq=False)
class Features:
    """An opened features directory: its manifest, transforms and example counts.

    `location`: where it is, when not on a local filesystem (`path` is then a local copy of
    its manifest and transforms)."""

    path: Path
    manifest: dict[str, Any]
    config: FeaturesConfig
    _vocabs: dict[str, Vocabulary] = field(default_factory=dict)
    _norms: dict[str, QuantileNormalizer] = field(default_factory=dict)
    _content: ContentTable | None = None
    location: Location | None = None
    _copy: LocalCopy | None = None

    @classmethod
    def open(cls, path: Path | str) -> Features:
        """Open the features at a local path or a URI (see the module docstring)."""
        if isinstance(path, str) and "://" in path:
            loc = resolve(path)
            if not loc.is_local:
                return cls._open_remote(loc)
            path = loc.local
        path = Path(path)
        file = path / MANIFEST
        try:
            manifest = json.loads(file.read_text())
        except FileNotFoundError:
            raise ArtifactError(
                f"{path}: not a features directory, or its build has not finished (no {MANIFEST})"
            ) from None
        except (OSError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{file}: unreadable ({e})") from None
        return cls._with_manifest(path, manifest, file)

    @classmethod
    def _open_remote(cls, loc: Location) -> Features:
        file = loc.join(MANIFEST)
        if not file.is_file():
            raise ArtifactError(
                f"{loc.uri}: not a features directory, or its build or upload has not "
                f"finished (no {MANIFEST}: it is written last)"
            )
        copy = LocalCopy(
            loc, skip=lambda rel: rel != MANIFEST and not rel.startswith("transforms/")
        )
        feats = cls.open(copy.path)
        feats.location, feats._copy = loc, copy
        return feats

    @classmethod
    def _with_manifest(cls, path: Path, manifest: dict[str, Any], file: Path) -> Features:
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"{file}: features format version {manifest.get('format_version')}, "
                f"this funnelrec reads {FORMAT_VERSION}"
            )
        known = set(FeaturesConfig.__dataclass_fields__)
        config = FeaturesConfig(**{k: v for k, v in manifest["config"].items() if k in known})
        return cls(path=path, manifest=manifest, config=config)

    def copy_serving_part(self, dst: Path | str) -> None:
        """Copy the manifest and transforms (vocabularies, encoders, quantile maps) to a
        new directory `dst`: all a served request needs; the example shards stay behind."""
        dst = Path(dst)
        dst.mkdir()
        shutil.copy2(self.path / MANIFEST, dst / MANIFEST)
        shutil.copytree(self.path / "transforms", dst / "transforms")

    @property
    def uri(self) -> str:
        """Where these features are: their URI, or their local path."""
        return self.location.uri if self.location is not None else str(self.path)

    @property
    def split(self) -> str:
        return str(self.manifest["split"]["kind"])

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["data"]["fingerprint"])

    def check_dataset(self, ds: Dataset) -> None:
        """Raise ArtifactError unless `ds` is the data these features were built from."""
        if ds.fingerprint() != self.fingerprint:
            raise ArtifactError(
                f"{self.path} was built from data with fingerprint {self.fingerprint}, "
                f"{ds.path} has {ds.fingerprint()}: rebuild the features"
            )

    def vocab(self, name: str) -> Vocabulary:
        if name not in self._vocabs:
            entry = self.manifest["vocabularies"].get(name)
            if entry is None:
                raise ArtifactError(
                    f"{self.path}: no vocabulary '{name}' "
                    f"(have {', '.join(self.manifest['vocabularies'])})"
                )
            self._vocabs[name] = Vocabulary.load(self.path / entry["file"])
        return self._vocabs[name]

    def normalizer(self, stage: Literal["candidates", "ranking"]) -> QuantileNormalizer:
        if stage not in self._norms:
            file = self.path / "transforms" / f"{stage}_dense.json"
            if not file.exists():
                raise ArtifactError(f"{self.path}: no {stage} normaliser ({file.name})")
            self._norms[stage] = QuantileNormalizer.load(file)
        return self._norms[stage]

    @property
    def candidate_spec(self) -> dict[str, Any]:
        return dict(self.manifest["candidates"])

    @property
    def has_ranking(self) -> bool:
        return bool(self.manifest["ranking"].get("available"))

    @property
    def ranking_spec(self) -> dict[str, Any]:
        """The ranking feature spec (`ranking.RankingFeatureSpec.from_dict` reads it)."""
        if not self.has_ranking:
            raise ArtifactError(
                f"{self.path}: no ranking examples ({self.manifest['ranking'].get('reason')})"
            )
        return dict(self.manifest["ranking"]["spec"])

    def num_examples(self, stage: Literal["candidates", "ranking"], split: str) -> int:
        return int(self.manifest["counts"].get(stage, {}).get(split, 0))

    def shards(self, stage: Literal["candidates", "ranking"], split: str) -> list[Path]:
        """The local paths of a split's shards (`shard_files` for features on any
        filesystem)."""
        if self.location is not None:
            raise ArtifactError(
                f"{self.location.uri}: not on a local filesystem; read its shards with shard_files"
            )
        return [Path(p) for p in self.shard_files(stage, split)[1]]

    def shard_files(
        self, stage: Literal["candidates", "ranking"], split: str
    ) -> tuple[pafs.FileSystem, list[str]]:
        """The filesystem of a split's shards and their paths on it, in order."""
        return self.split_files(stage, split, lambda n: n.startswith("part-"))

    def split_files(
        self, stage: Literal["candidates", "ranking"], split: str, wanted: Callable[[str], bool]
    ) -> tuple[pafs.FileSystem, list[str]]:
        """The filesystem and paths of a split folder's Parquet files whose names pass
        `wanted` (a predicate), sorted by name; an error if there is none."""
        if split not in PART_NAMES:
            raise FunnelrecError(f"split must be one of {', '.join(PART_NAMES)}, got '{split}'")
        if stage == "ranking" and not self.has_ranking:
            self.ranking_spec  # raises with the reason  # noqa: B018
        root = self.location or resolve(self.path)
        folder = root.join(stage, split)
        files = folder.files(lambda n: n.endswith(".parquet") and wanted(n))
        if not files:
            raise ArtifactError(f"{folder.uri}: no example shards")
        return folder.fs, [f.path for f in files]

    @property
    def has_item_content(self) -> bool:
        """Whether the build wrote the item content table (features built before it did
        have none)."""
        return "item_content" in self.manifest

    def item_content(self) -> ContentTable:
        """The content of every catalogue item (`content.ContentTable`), read once."""
        if self._content is None:
            if not self.has_item_content:
                raise ArtifactError(
                    f"{self.path}: no item content table (features built by an older "
                    "funnelrec): rebuild them with `funnelrec features build`"
                )
            self._content = ContentTable.load(self.path / self.manifest["item_content"]["file"])
        return self._content

    def encode_item_content(self, items: pa.Table) -> ContentTable:
        """Items given as an items table (item_id and any of upload_ts, duration_s,
        channel_id, topic, title; rows in any order) encoded as the build encoded the
        catalogue, with its vocabularies, scaling and t_end: the content of a newly
        uploaded item, whose vector `CandidateModel.content_embeddings` computes."""
        table = self.item_content()
        names = self.manifest["item_content"]["vocabularies"].values()
        vocabs = {name: self.vocab(name) for name in names}
        return encode_items(items, vocabs, self.vocab("item"), table.t_end, table.scale)

    def item_label_counts(self) -> np.ndarray:
        """[V] how often each item vocabulary id is a training label (id 0: 0)."""
        t = pq.read_table(self.path / "transforms" / "item_label_counts.parquet")
        return np.asarray(t.column("count").to_numpy(), dtype=np.int64)

    def item_counts(self) -> np.ndarray:
        """[V] training watch count of each item vocabulary id (the sampling proposal's base)."""
        return np.asarray(self.vocab("item").counts, dtype=np.int64)

    def candidate_batch(
        self,
        histories: Sequence[Sequence[int]],
        queries: Sequence[Sequence[str]] = (),
        demographics: Sequence[Demographics | None] = (),
        *,
        user_ids: Sequence[int] | None = None,
        ts: Sequence[int] | None = None,
    ) -> CandidateBatch:
        """A serving-time batch: B users' raw context -> CandidateBatch (example_age 0).

        histories[b]:   dataset item ids the user watched, oldest first (last N used)
        queries[b]:     the user's query strings, oldest first (last N used)
        demographics[b]: their demographics (None or missing entries: unknown)
        Labels are 0 (there is nothing to predict).
        """
        b = len(histories)
        cfg = self.config
        qs = list(queries) or [[] for _ in range(b)]
        dems = list(demographics) or [None] * b
        if len(qs) != b or len(dems) != b:
            raise FunnelrecError(
                "candidate_batch: histories, queries, demographics differ in length"
            )
        item_vocab, token_vocab = self.vocab("item"), self.vocab("token")
        hist_raw = [list(h)[-cfg.history_n :] for h in histories]
        lens = np.array([len(h) for h in hist_raw], dtype=np.int64)
        flat = np.array([i for h in hist_raw for i in h], dtype=np.int64)
        hist = item_vocab.lookup(flat)
        hist, hist_off = drop_zeros(hist, np.concatenate([[0], np.cumsum(lens)]))
        q_raw = [list(q)[-cfg.search_n :] for q in qs]
        q_flat = [s for q in q_raw for s in q]
        tokens, tok_off = tokenize_array(pa.array(q_flat, type=pa.string()))
        q_off = np.concatenate([[0], np.cumsum([len(q) for q in q_raw])]).astype(np.int64)
        toks = token_vocab.lookup(tokens)
        toks, t_off = drop_zeros(toks, tok_off[q_off])
        d = [x or Demographics() for x in dems]
        enc = self._user_encoder()
        region, device, dense = enc.encode(
            age=np.array([np.nan if x.age is None else x.age for x in d], dtype=np.float64),
            logged_in=np.array(
                [np.nan if x.logged_in is None else float(x.logged_in) for x in d], dtype=np.float64
            ),
            gender=pa.array([x.gender for x in d], type=pa.string()),
            region=pa.array([x.region for x in d], type=pa.string()),
            device=pa.array([x.device for x in d], type=pa.string()),
            n=b,
        )
        return CandidateBatch(
            history=torch.from_numpy(hist.astype(np.int64)),
            history_offsets=torch.from_numpy(hist_off[:-1].astype(np.int64)),
            search=torch.from_numpy(toks.astype(np.int64)),
            search_offsets=torch.from_numpy(t_off[:-1].astype(np.int64)),
            region=torch.from_numpy(region.astype(np.int64)),
            device=torch.from_numpy(device.astype(np.int64)),
            dense=torch.from_numpy(dense),
            example_age=torch.zeros(b, dtype=torch.float32),
            label=torch.zeros(b, dtype=torch.int64),
            user_id=torch.tensor(
                list(user_ids) if user_ids is not None else [0] * b, dtype=torch.int64
            ),
            ts=torch.tensor(list(ts) if ts is not None else [0] * b, dtype=torch.int64),
        )

    def _user_encoder(self) -> UserEncoder:
        names = self.manifest["vocabularies"]
        cols = self.candidate_spec["dense_columns"]
        return UserEncoder(
            region=self.vocab("region"),
            device=self.vocab("device"),
            gender=self.vocab("gender") if "gender" in names else None,
            normalizer=self.normalizer("candidates"),
            has_age="age" in cols,
            has_logged_in="logged_in" in cols,
        )
