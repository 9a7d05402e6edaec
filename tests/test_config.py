"""Config: YAML + dotted overrides into frozen dataclasses, with clear errors."""
import dataclasses
from pathlib import Path

import pytest
import yaml

from move_scale.config import files
from move_scale.config.files import (
    CONFIG_DIR,
    bundled_configs,
    dump_config,
    resolve_config_path,
)
from move_scale.config.tree import ConfigError, flatten
from move_scale.stages.detector.config import DetectorConfig
from move_scale.stages.mae.config import MaeConfig
from move_scale.stages.move.build import DISCRIMINATOR_BUILDERS, FEATURE_BUILDERS
from move_scale.stages.move.config import (
    DISC_KINDS,
    FEATURE_KINDS,
    Config,
    config_from_dict,
    load_config,
)
from move_scale.stages.selfmask.config import SelfMaskConfig

CONFIGS = CONFIG_DIR


SCHEMAS = {"move": Config, "mae": MaeConfig, "detector": DetectorConfig,  # each stage's config schema,
           "selfmask": SelfMaskConfig}  # by the YAML's `stage`


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_into_its_stage_and_round_trips(path, tmp_path):
    schema = SCHEMAS[yaml.safe_load(path.read_text()).get("stage", "move")]
    cfg = files.load(schema, path)
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, out)
    assert files.load(schema, out) == cfg


def test_a_config_of_another_stage_is_one_clear_error():
    assert "mae_synthetic" in bundled_configs("mae") and "mae_synthetic" not in bundled_configs("move")
    assert "paper_duts" in bundled_configs("move") and "paper_duts" not in bundled_configs("mae")
    with pytest.raises(ConfigError, match=r"mae_debug configures the stage 'mae', not 'move'.*: .*paper_duts"):
        load_config("mae_debug")
    with pytest.raises(ConfigError, match=r"debug configures the stage 'move', not 'mae'.*: .*mae_synthetic"):
        files.load(MaeConfig, "debug")
    with pytest.raises(ConfigError, match=r"stage = 'mae': use one of 'move'"):
        load_config("debug", ["stage=mae"])


def test_the_mae_configs_train_the_architecture_their_move_configs_load():
    """configs/mae_synthetic.yaml pretrains the MAE that synthetic.yaml loads (and writes it where
    synthetic.yaml looks); mae_debug.yaml the MAE of debug.yaml: one architecture, said twice."""
    for mae_name, move_name in (("mae_synthetic", "synthetic"), ("mae_debug", "debug")):
        mae, move = files.load(MaeConfig, mae_name), load_config(move_name)
        assert dataclasses.replace(mae.model.mae, weights="x") == dataclasses.replace(move.model.mae, weights="x")
        assert mae.data.image_size == move.data.image_size
    assert load_config("synthetic").model.mae.weights == files.load(MaeConfig, "mae_synthetic").run_dir + "/mae.pth"


def test_bundled_configs_resolve_by_name_or_documented_path_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bundled = CONFIG_DIR / "paper_duts.yaml"
    for spec in ("paper_duts", "paper_duts.yaml", "configs/paper_duts.yaml", bundled):
        assert resolve_config_path(spec) == bundled
    assert resolve_config_path("ablations/mse_mae") == CONFIG_DIR / "ablations" / "mse_mae.yaml"
    assert load_config("configs/paper_duts.yaml") == load_config(bundled)
    assert {"debug", "demo", "paper_duts", "imagenet100", "synthetic", "ablations/mse_mae"} <= set(bundled_configs())
    own = tmp_path / "configs" / "paper_duts.yaml"  # a file of that name wins over the bundled one
    own.parent.mkdir()
    own.write_text("seed: 7\n")
    assert resolve_config_path("configs/paper_duts.yaml") == Path("configs/paper_duts.yaml")
    assert load_config("configs/paper_duts.yaml").seed == 7
    with pytest.raises(ConfigError, match=r"config file not found: papr_duts; .*bundled config: .*paper_duts"):
        load_config("papr_duts")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent" / "debug.yaml")  # an absolute path never falls back


def test_paper_config_holds_the_paper_values():
    cfg = load_config(CONFIGS / "paper_duts.yaml")
    assert cfg.objective.shift_range == 0.125
    assert (cfg.objective.theta_min, cfg.objective.lambda_min) == (0.05, 100.0)
    assert (cfg.objective.lambda_bin, cfg.objective.bin_ramp_steps) == (12.5, 2500)
    assert cfg.optim.seg.betas == (0.9, 0.95) and cfg.optim.disc.betas == (0.0, 0.99)
    assert cfg.optim.seg.lr == cfg.optim.disc.lr == 2e-4
    assert (cfg.data.batch_size, cfg.train.epochs, cfg.data.image_size) == (32, 80, 224)
    assert cfg.data.crop_scale == (0.9, 1.0)
    assert cfg.model.segmenter.widths == (192, 128, 128, 128)
    assert load_config(CONFIGS / "imagenet100.yaml").model.segmenter.convs_per_block == 2


def test_dotted_overrides_apply_with_types():
    cfg = load_config(CONFIGS / "debug.yaml", ["optim.seg.lr=1e-4", "data.batch_size=7",
                                               "objective.real_inputs=[autoencoded]",
                                               "train.precision=bf16"])
    assert cfg.optim.seg.lr == pytest.approx(1e-4) and isinstance(cfg.optim.seg.lr, float)
    assert cfg.data.batch_size == 7
    assert cfg.objective.real_inputs == ("autoencoded",)
    assert cfg.train.precision == "bf16"
    # the file's other values survive
    assert cfg.model.features.embed_dim == 32


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3


def test_unknown_key_names_it_and_suggests_the_nearest():
    with pytest.raises(ConfigError, match=r"'optim\.seg\.lrr'.*did you mean 'optim\.seg\.lr'"):
        load_config(None, ["optim.seg.lrr=1e-4"])
    with pytest.raises(ConfigError, match=r"unknown config key 'objectiv'.*'objective'"):
        config_from_dict({"objectiv": {}})


def test_wrong_type_names_key_value_and_type():
    with pytest.raises(ConfigError, match=r"data\.batch_size: expected an integer, got 'many'"):
        load_config(None, ["data.batch_size=many"])
    with pytest.raises(ConfigError, match=r"optim\.seg\.betas: expected 2 values"):
        load_config(None, ["optim.seg.betas=[0.9]"])
    with pytest.raises(ConfigError, match=r"objective\.min_loss: expected true or false"):
        load_config(None, ["objective.min_loss=3"])


def test_bad_override_and_missing_file_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["optim.seg.lr"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_flatten_gives_dotted_leaves():
    flat = flatten(Config())
    assert flat["optim.disc.weight_decay"] == 0.01
    assert flat["model.features.layer"] == 10
    assert all(not isinstance(v, dict) for v in flat.values())


@pytest.mark.parametrize("override, message", [
    ("train.precision=fp64", r"train\.precision = 'fp64': use one of 'bf16', 'fp32'; did you mean 'fp32'\?"),
    ("model.features.kind=dinov2", r"model\.features\.kind = 'dinov2': .*did you mean 'dino'\?"),
    ("data.workers=-3", r"data\.workers = -3: use a value ≥ 0"),
    ("optim.seg.lr=.nan", r"optim\.seg\.lr = nan: use a value > 0"),
    ("model.disc.diffaug=[colour]", r"'colour' is not allowed.*did you mean 'color'\?"),
    ("data.crop_scale=[1.0,0.5]", r"data\.crop_scale = \[1\.0, 0\.5\]: .*smallest first"),
    ("data.image_size=100", r"data\.image_size = 100: not a multiple of model\.mae\.patch_size = 16"),
    ("model.features.layer=12", r"model\.features\.layer = 12: use a block index below model\.features\.depth = 12"),
    ("model.segmenter.widths=[8,8]", r"model\.segmenter\.widths = \[8, 8\]: .*give 4 widths"),
    ("tracking.uri=htp://host", r"unknown scheme 'htp'.*did you mean 'http'\?"),
    ("objective.theta_min=2", r"objective\.theta_min = 2\.0: use a value in \[0, 1\]"),
])
def test_every_value_is_checked_as_the_config_loads(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_relations_follow_the_feature_kind():
    # MAE features: the segmenter upsamples the MAE's 16-px patches, and no ViT patch applies
    cfg = load_config(None, ["model.features.kind=mae", "model.segmenter.widths=[512,256,128,128,128]"])
    assert cfg.model.features.kind == "mae"
    with pytest.raises(ConfigError, match=r"patches of 16 \(model\.mae\.patch_size\): give 5 widths"):
        load_config(None, ["model.features.kind=mae"])


def test_every_kind_the_config_accepts_has_a_builder():
    assert tuple(FEATURE_BUILDERS) == FEATURE_KINDS and tuple(DISCRIMINATOR_BUILDERS) == DISC_KINDS
