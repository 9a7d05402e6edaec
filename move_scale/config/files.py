"""Config files: the bundled experiment YAMLs, reading one into a stage's schema, writing it back.

    cfg = load(Config, "configs/paper_duts.yaml", ["optim.seg.lr=1e-4"])    # a stage's schema
    text = dump_config(cfg)                                                  # YAML that loads back equal

The experiment configs live in the repository's top-level `configs/` folder; `move_scale/configs`
is a link to it, through which the wheel ships them as package data (setup.cfg), so a clone and an
installed package find them from any folder: `paper_duts`, `paper_duts.yaml` and
`configs/paper_duts.yaml` name the bundled file unless a file of that path exists, which then wins
(`resolve_config_path`). Every YAML says which stage it configures (`stage:`, "move" when absent);
a file given to another stage's command is one error line naming both.
"""
from __future__ import annotations

import typing
from pathlib import Path

import yaml

from move_scale.config.tree import (
    ConfigError,
    build_tree,
    deep_copy,
    parse_override,
    read_yaml,
    set_dotted,
    to_dict,
)

CONFIG_DIR = (Path(__file__).parents[1] / "configs").resolve()  # a link to the top-level configs/ in a clone
DEFAULT_STAGE = "move"  # the stage of a YAML without a `stage:` key (MOVE's configs predate the key)


def stage_of(schema: type) -> str:
    """The stage a config schema belongs to: the default of its `stage` field."""
    return schema.__dataclass_fields__["stage"].default


def _stage_of_file(path: Path) -> str:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return DEFAULT_STAGE
    return data.get("stage", DEFAULT_STAGE) if isinstance(data, dict) else DEFAULT_STAGE


def bundled_configs(stage: str | None = None) -> list[str]:
    """Names of the bundled configs ("debug", ..., "ablations/mse_mae"), of one stage when given."""
    return sorted(p.relative_to(CONFIG_DIR).with_suffix("").as_posix() for p in CONFIG_DIR.rglob("*.yaml")
                  if stage is None or _stage_of_file(p) == stage)


def resolve_config_path(spec: str | Path, stage: str | None = None) -> Path:
    """The YAML file `spec` names: an existing file, else a bundled config by name, with or without
    ".yaml" and a leading "configs/" (so the documented `--config configs/x.yaml` works anywhere).
    The error lists the bundled configs (of `stage` when given)."""
    path = Path(spec)
    if path.is_file():
        return path
    name = path.as_posix().removesuffix(".yaml").removeprefix("./").removeprefix("configs/")
    bundled = CONFIG_DIR / f"{name}.yaml"
    if not path.is_absolute() and bundled.is_file():
        return bundled
    raise ConfigError(f"config file not found: {spec}; give a YAML path or a bundled config: "
                      + ", ".join(bundled_configs(stage)))


def from_dict(schema: type, data: dict, overrides: typing.Sequence[str] = ()) -> typing.Any:
    """A config of `schema` from a nested dict plus dotted overrides, every key and type checked."""
    tree = deep_copy(data)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(tree, key, value)
    return build_tree(schema, tree)


def load(schema: type, path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> typing.Any:
    """Read a YAML file or bundled config (`resolve_config_path`) into `schema`, or start from its
    defaults when `path` is None, and apply overrides. A file of another stage is a ConfigError."""
    stage = stage_of(schema)
    if path is None:
        return from_dict(schema, {}, overrides)
    found = resolve_config_path(path, stage)
    data = read_yaml(found)
    other = data.get("stage", DEFAULT_STAGE)
    if other != stage:
        raise ConfigError(f"{path} configures the stage {other!r}, not {stage!r}: give it to that "
                          f"stage's command; bundled configs of {stage!r}: "
                          + ", ".join(bundled_configs(stage)))
    return from_dict(schema, data, overrides)


def dump_config(cfg: typing.Any, path: str | Path | None = None) -> str:
    """The resolved config as YAML; written to `path` when given."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text
