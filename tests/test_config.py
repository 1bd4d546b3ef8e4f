from pathlib import Path

import pytest

from carclf.config import load_config, parse_override, read_config, save_config
from carclf.errors import CarclfError

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_defaults_recipe_then_overrides_in_that_order(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  epochs: 7\n  lr: 0.01\ndata:\n  img_size: 96\n")
    cfg = load_config(recipe, ["train.lr=3e-4", "train.folds=all"])
    assert cfg.train.epochs == 7  # from the recipe
    assert cfg.train.lr == pytest.approx(3e-4)  # override beats recipe; YAML-1.1 '3e-4' still a float
    assert cfg.train.folds == "all"
    assert cfg.data.img_size == 96
    assert cfg.model.name == "tf_efficientnet_lite0"  # default untouched


def test_unknown_key_fails_with_suggestion():
    with pytest.raises(CarclfError, match=r"unknown config key 'train.epoch'.*Did you mean 'train.epochs'"):
        load_config(None, ["train.epoch=3"])


def test_unknown_key_in_recipe_names_the_file(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("modle:\n  name: x\n")
    with pytest.raises(CarclfError, match=r"bad.yaml: unknown config key 'modle'.*'model'"):
        load_config(recipe)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=abc", "train.epochs' must be int"),
        ("train.ema=3", "train.ema' must be bool"),
        ("data.n_folds=1", "n_folds must be at least 2"),
        ("train.amp=fp8", "train.amp must be one of"),
        ("trainepochs", "must look like key.sub=value"),
        ("train=3", "'train' must be a mapping"),
        ("data.draft_factor=0", "draft_factor must be at least 1"),
        ("train.patience=-1", "patience must be 0"),
    ],
)
def test_bad_values_are_rejected(override, message):
    with pytest.raises(CarclfError, match=message):
        load_config(None, [override])


def test_int_given_where_float_expected_is_accepted():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0
    key, value = parse_override("train.folds=0")
    assert (key, value.value, value.raw) == ("train.folds", 0, "0")
    assert load_config(None, ["train.folds=0"]).train.folds == "0"


def test_string_fields_keep_the_text_as_typed():
    cfg = load_config(None, ["data.root=on", "name=1e5", "out_dir=null"])
    assert (cfg.data.root, cfg.name, cfg.out_dir) == ("on", "1e5", "null")


def test_missing_recipe_is_named():
    with pytest.raises(CarclfError, match="recipe 'nope.yaml' not found"):
        load_config("nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.epochs=3", "name=x", "data.root=데이터"])
    save_config(cfg, tmp_path / "config.yaml")
    assert read_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("recipe", CONFIGS, ids=lambda p: p.name)
def test_shipped_recipes_load(recipe):
    cfg = load_config(recipe)
    assert cfg.model.name


def test_lr_scaling_uses_the_global_batch():
    from carclf.config import effective_lr, global_batch

    cfg = load_config(None, ["data.batch_size=16", "train.lr=1e-3", "train.accum_steps=2", "train.lr_base_size=64"])
    assert global_batch(cfg, world_size=4) == 128
    assert effective_lr(cfg, world_size=4) == pytest.approx(2e-3)  # 16 x 2 x 4 = 128 photos: twice the base
    assert effective_lr(cfg, world_size=1) == pytest.approx(5e-4)
    cfg.train.lr_base_scale = "sqrt"
    assert effective_lr(cfg, world_size=4) == pytest.approx(1e-3 * 2**0.5)
    cfg.train.lr_base_size = 0
    assert effective_lr(cfg, world_size=4) == 1e-3  # no scaling unless asked


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (" lead", "name=' lead' has leading/trailing spaces"),
        ("lead ", "name='lead ' has leading/trailing spaces"),
        ("' lead'", "holds quote marks, which would become part of the folder name: write name=lead"),
        ('"lead"', "holds quote marks, which would become part of the folder name: write name=lead"),
    ],
)
def test_run_names_typed_with_stray_spaces_or_quote_marks_are_refused(tmp_path, capsys, name, message):
    """Issue 16 item 14: name=" lead" trained into runs/lead (the text was stripped); name=' lead' (quotes that
    reached carclf) made a folder whose name holds them."""
    from carclf.cli import main

    rc = main(["train", f"data.root={tmp_path / 'data'}", f"out_dir={tmp_path / 'runs'}", f"name={name}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert "spaces inside the name are fine" in err
    assert not (tmp_path / "runs").exists()


def test_other_text_values_with_stray_spaces_are_refused_naming_the_key():
    with pytest.raises(CarclfError, match=r"out_dir=' runs' has a leading or trailing space"):
        load_config(None, ["out_dir= runs"])
    with pytest.raises(CarclfError, match=r"data.root='/data ' has a leading or trailing space"):
        load_config(None, ["data.root=/data "])
    assert load_config(None, ["name=아반떼 실험 1"]).name == "아반떼 실험 1"
