from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from funnelrec.config import apply_overrides, load_config
from funnelrec.errors import FunnelrecError


@dataclass(frozen=True)
class Tower:
    depth: int = 2
    widths: tuple[int, ...] = (512, 256)


@dataclass(frozen=True)
class Outer:
    tower: Tower = field(default_factory=lambda: Tower(depth=4, widths=(8,)))


def test_partial_section_keeps_the_parents_default_and_none_is_empty() -> None:
    cfg = load_config(Outer, None, ["tower.depth=1"])
    assert cfg.tower == Tower(depth=1, widths=(8,))
    assert load_config(Outer, None, ["tower.widths=none"]).tower.widths == ()


@dataclass(frozen=True)
class Cfg:
    lr: float = 0.01
    optimizer: Literal["adamw", "adagrad"] = "adamw"
    cap: int | None = 30
    shuffle: bool = True
    name: str = "x"
    tower: Tower = field(default_factory=Tower)


def test_defaults_toml_and_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('lr = 0.5\nname = "from-file"\n[tower]\ndepth = 3\n')
    cfg = load_config(Cfg, f, ["tower.widths=1024,512,256", "cap=none", "shuffle=false"])
    assert cfg == Cfg(
        lr=0.5, cap=None, shuffle=False, name="from-file", tower=Tower(3, (1024, 512, 256))
    )
    assert load_config(Cfg).lr == 0.01
    assert load_config(Cfg, None, ["optimizer=adagrad", "cap=7"]).cap == 7


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lrr=1", "unknown config key 'lrr'"),
        ("tower.dpth=1", "unknown config key 'tower.dpth'"),
        ("lr=fast", "config key 'lr' must be a number"),
        ("optimizer=sgd", "must be one of adamw, adagrad"),
        ("shuffle=maybe", "must be true or false"),
        ("novalue", "not of the form key=value"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(FunnelrecError, match=message):
        load_config(Cfg, None, [override])


def test_bad_toml_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("lr = = 1")
    with pytest.raises(FunnelrecError, match="invalid TOML"):
        load_config(Cfg, f)
    with pytest.raises(FunnelrecError, match="cannot read config"):
        load_config(Cfg, tmp_path / "missing.toml")


@dataclass(frozen=True)
class Model:
    dim: int = 8
    tower: tuple[int, ...] = (4,)
    seed: int = 0


@dataclass(frozen=True)
class Train:
    lr: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class Run:
    model: Model = field(default_factory=Model)
    train: Train = field(default_factory=lambda: Train(lr=0.5))
    valid_k: int = 100


def test_a_key_one_section_has_may_leave_the_section_out(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text("dim = 16\nvalid_k = 10\n[train]\nseed = 3\n")
    cfg = load_config(Run, f, ["lr=0.25", "model.seed=2"])
    assert cfg == Run(model=Model(dim=16, seed=2), train=Train(lr=0.25, seed=3), valid_k=10)
    # the file's partial [train] section kept the parent's lr default (0.5, not Train's 0.1)
    assert load_config(Run, f).train == Train(lr=0.5, seed=3)
    with pytest.raises(FunnelrecError, match=r"several sections: say model.seed or train.seed"):
        load_config(Run, None, ["seed=1"])
    with pytest.raises(FunnelrecError, match="unknown config key 'dimm'"):
        load_config(Run, None, ["dimm=1"])


def test_integer_tuples_by_name_and_presets_with_overrides() -> None:
    assert load_config(Run, None, ["tower=1024-512-256"]).model.tower == (1024, 512, 256)
    assert load_config(Run, None, ["model.tower=256"]).model.tower == (256,)
    assert load_config(Run, None, ["model.tower=512,256"]).model.tower == (512, 256)
    assert load_config(Run, None, ["model.tower=none"]).model.tower == ()
    with pytest.raises(FunnelrecError, match="must be an integer"):
        load_config(Run, None, ["model.tower=1024-x"])
    preset = Run(model=Model(dim=32), valid_k=5)
    assert apply_overrides(preset, ["lr=1"]) == Run(
        model=Model(dim=32), train=Train(lr=1.0), valid_k=5
    )
    assert load_config(Run, None, ["dim=4"], defaults=preset).model == Model(dim=4)
