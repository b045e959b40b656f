"""The models' embedding tables mapped from their files (`serving.memory`): views of the
file's pages, equal to what was loaded, copy-on-write."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from funnelrec.candidates import load_candidate_model
from funnelrec.pipeline import build_tiny_artifact
from funnelrec.ranking.model import load_ranker
from funnelrec.serving.memory import map_embedding_tables, release_unused_memory
from funnelrec.serving.recommender import Recommender

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_artifact(tmp_path_factory.mktemp("memory"), steps=50)


def _mapped_files() -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's file mappings (Linux)."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            out.append((lo, hi, fields[5]))
    return out


def _tables(model: nn.Module) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        names[id(m.weight)]: m.weight
        for m in model.modules()
        if isinstance(m, nn.Embedding | nn.EmbeddingBag)
    }


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps: Linux")
def test_a_loaded_artifact_reads_its_embedding_tables_from_the_files(art: Path) -> None:
    rec = Recommender.load(art)
    assert rec.mapped_bytes > 0
    maps = _mapped_files()
    for model, folder in ((rec.candidate_model, "candidates"), (rec.ranker, "ranker")):
        file = (art / folder / WEIGHTS).resolve()
        saved = load_file(str(file))
        for name, table in _tables(model).items():
            at = table.data_ptr()
            assert any(lo <= at < hi and path == str(file) for lo, hi, path in maps), name
            torch.testing.assert_close(table.detach(), saved[name], rtol=0, atol=0)


def test_only_what_the_file_holds_is_mapped_and_a_write_stays_private(
    art: Path, tmp_path: Path
) -> None:
    file = art / "ranker" / WEIGHTS
    model = load_ranker(art / "ranker")
    tables = _tables(model)
    changed = next(iter(tables))
    with torch.no_grad():
        tables[changed][1] += 1.0  # no longer the file's values: keeps its own copy
    before = file.read_bytes()
    mapped = map_embedding_tables(model, file)
    after = _tables(model)
    assert mapped == sum(t.numel() * t.element_size() for n, t in after.items() if n != changed)
    with torch.no_grad():
        for table in after.values():
            table[1] = 7.0  # copy on write: the file is left as it was
    assert file.read_bytes() == before
    release_unused_memory()  # hands freed memory back; nothing else to see


def test_a_candidate_model_maps_its_tables_too(art: Path) -> None:
    model = load_candidate_model(art / "candidates")
    want = {n: t.detach().clone() for n, t in _tables(model).items()}
    assert map_embedding_tables(model, art / "candidates" / WEIGHTS) == sum(
        t.numel() * t.element_size() for t in want.values()
    )
    for name, table in _tables(model).items():
        np.testing.assert_array_equal(table.detach().numpy(), want[name].numpy())
