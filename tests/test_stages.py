"""Multi-stage recipes: the stage schema, the derived per-stage configs (chains, ``stage:`` references,
overrides), and a tiny staged run that is interrupted, refused, resumed (finished stages skipped) and summarised."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from scaledkd import cli
from scaledkd.config import ConfigError, config_from_dict, load_config
from scaledkd.engine.stages import stage_configs
from tests.tiny import REPO, tiny_recipe, write_recipe


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name ds_configs/ relative to the repository


def staged(tmp_path: Path, teacher: Path, data_dir: Path, stages: list[dict], **overrides) -> dict:
    recipe = tiny_recipe(tmp_path, teacher, data_dir, **overrides)
    del recipe["losses"]
    recipe["stages"] = stages
    return recipe


FOUR_STAGES = [
    {"name": "teacher_ft", "trains": "teacher", "becomes_teacher": True, "losses": [{"name": "task"}],
     "train": {"lr": 1e-4, "max_steps": 5}},
    {"name": "ild", "losses": [{"name": "hidden_mse", "mapping": "last"}], "train": {"mixup": True},
     "student": {"layers": "upper"}},
    {"name": "kd", "losses": [{"name": "logit_kd", "params": {"temperature": 2.0}}],
     "teacher": {"ds_config": "ds_configs/teacher_replicated.json"}},
    {"name": "alone", "use_teacher": False, "losses": [{"name": "task"}],
     "student": {"init": "teacher_layers", "layers": [1, 3], "from_model": "stage:teacher_ft"}},
]


# --------------------------------------------------------------------------------------------- derived configs


def test_stage_configs_chain_students_and_teachers(tiny_assets, tmp_path):
    teacher, data_dir = tiny_assets
    cfg = config_from_dict(staged(tmp_path, teacher, data_dir, FOUR_STAGES, train__resume="latest"))
    ft, ild, kd, alone = stage_configs(cfg)
    root = tmp_path / "run"
    assert [c.output_dir for c in (ft, ild, kd, alone)] == [
        str(root / "stage_1_teacher_ft"), str(root / "stage_2_ild"), str(root / "stage_3_kd"),
        str(root / "stage_4_alone")]
    # A teacher stage trains a copy of the current teacher, with no teacher.
    assert ft.teacher is None and ft.student.init == "pretrained" and ft.student.path == str(teacher)
    assert ft.train.lr == 1e-4 and ft.train.max_steps == 5 and ft.train.resume is None
    # The first student stage builds from the (new) teacher's layers; its overrides apply to it alone.
    ft_export = str(root / "stage_1_teacher_ft" / "student")
    assert ild.teacher.path == ft_export and ild.student.init == "teacher_layers"
    assert ild.student.from_model == ft_export and ild.student.layers == "upper" and ild.train.mixup
    # Later student stages continue from the previous student stage's export.
    assert kd.student.init == "pretrained" and kd.student.path == str(root / "stage_2_ild" / "student")
    assert kd.teacher.path == ft_export and not kd.train.mixup and kd.train.lr == 1e-3
    # use_teacher: false drops the teacher; an explicit init restarts the chain; stage:<name> is that export.
    assert alone.teacher is None and alone.student.init == "teacher_layers"
    assert alone.student.from_model == ft_export and alone.student.layers == [1, 3]


def test_stage_references_in_loss_params_are_folders(tiny_assets, tmp_path):
    teacher, data_dir = tiny_assets
    stages = [{"name": "a", "losses": [{"name": "task"}]},
              {"name": "b", "losses": [{"name": "logit_kd", "params": {"where": "stage:a", "other": ["stage:a", 1]}}]}]
    cfg = config_from_dict(staged(tmp_path, teacher, data_dir, stages))
    params = stage_configs(cfg)[1].losses[0].params
    assert params == {"where": str(tmp_path / "run" / "stage_1_a"), "other": [str(tmp_path / "run" / "stage_1_a"), 1]}


def test_plan_mode_stands_in_for_missing_exports(tiny_assets, tmp_path):
    teacher, data_dir = tiny_assets
    cfg = config_from_dict(staged(tmp_path, teacher, data_dir, FOUR_STAGES))
    ft, ild, kd, alone = stage_configs(cfg, plan=True)
    # Nothing ran yet: the teacher stage's export is stood in for by the teacher it starts from, and the later
    # student stage by the spec the chain was built from (same architecture).
    assert ild.teacher.path == str(teacher) and ild.student.from_model == str(teacher)
    assert kd.student.init == "teacher_layers" and kd.student.layers == "upper"
    assert alone.student.from_model == str(teacher)


@pytest.mark.parametrize("stages, message", [
    ([{"name": "a", "train": {"epochz": 1}}], "unknown config key stages[a].train.epochz"),
    ([{"name": "a", "data": {"task": "nope"}}], "data.task='nope' is not valid"),
    ([{"name": "a"}, {"name": "a"}], "name 'a' is used twice"),
    ([{"name": "a b"}], "may use only letters"),
    ([{"name": "a", "becomes_teacher": True}], "becomes_teacher=true needs trains: teacher"),
    ([{"name": "a", "train": {"resume": "latest"}}], "resume a staged run with train.resume=latest"),
    ([{"name": "a", "trains": "teachers"}], "stages[a].trains='teachers' is not valid"),
    ([{"name": "a", "losses": [{"name": "ted_mse", "params": {"teacher_filters": "stage:b"}}]}, {"name": "b"}],
     "stage:b, which is not an earlier stage"),
    ([{"name": "a", "student": {"from_model": "stage:a"}}], "not an earlier stage"),
])
def test_stage_schema_errors(tiny_assets, tmp_path, stages, message):
    teacher, data_dir = tiny_assets
    recipe = staged(tmp_path, teacher, data_dir, stages)
    recipe["losses"] = [{"name": "task"}]
    with pytest.raises(ConfigError) as err:
        config_from_dict(recipe)
    assert message in str(err.value)


def test_stage_needs_losses_and_a_teacher(tiny_assets, tmp_path):
    teacher, data_dir = tiny_assets
    with pytest.raises(ConfigError, match=r"stages\[a\] has no losses"):
        config_from_dict(staged(tmp_path, teacher, data_dir, [{"name": "a"}]))
    recipe = staged(tmp_path, teacher, data_dir, [{"name": "a", "losses": [{"name": "logit_kd"}]}])
    recipe["student"] = {"init": "pretrained", "path": str(teacher)}
    del recipe["teacher"]
    with pytest.raises(ConfigError, match=r"stages\[a\] distils from a teacher"):
        config_from_dict(recipe)


def test_override_reaches_one_stage(tiny_assets, tmp_path):
    teacher, data_dir = tiny_assets
    path = write_recipe(tmp_path / "r.yaml", **staged(tmp_path, teacher, data_dir, FOUR_STAGES))
    cfg = load_config(path, ["stages.kd.train.max_steps=1", "train.lr=2e-4"])
    ft, ild, kd, _ = stage_configs(cfg)
    assert kd.train.max_steps == 1 and ild.train.max_steps == 3
    assert ild.train.lr == 2e-4 and ft.train.lr == 1e-4  # a stage's own value wins over the top level
    with pytest.raises(ConfigError, match=r"no stage named 'nope'; stages: \['teacher_ft', 'ild', 'kd', 'alone'\]"):
        load_config(path, ["stages.nope.train.max_steps=1"])
    with pytest.raises(ConfigError, match="name a key inside a stage"):
        load_config(path, ["stages.kd=1"])


# --------------------------------------------------------------------------------------------- a staged run


def run_cli(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_staged_run_resumes_skips_and_summarises(tiny_assets, tmp_path, capsys, monkeypatch):
    """Teacher fine-tune (becomes the teacher) -> student KD. Stage 2 dies at step 3 (a loss turns NaN on its
    third call), after checkpoints at steps 1 and 2. A plain re-run is refused; train.resume=latest skips the
    finished stage 1 and resumes stage 2 at step 2 (a fresh process's plugin counts from 0 again, so steps 3-4
    pass); only then does the summary metrics.json appear; a further re-run is refused as finished."""
    teacher, data_dir = tiny_assets
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "plugins"))
    stages = [
        {"name": "teacher_ft", "trains": "teacher", "becomes_teacher": True, "losses": [{"name": "task"}],
         "train": {"max_steps": 2}},
        {"name": "kd", "losses": [{"name": "logit_kd"}, {"name": "nan_after", "params": {"calls": 2}}],
         "train": {"max_steps": 4, "save_every": 1}},
    ]
    recipe = write_recipe(tmp_path / "r.yaml", **staged(tmp_path, teacher, data_dir, stages,
                                                        plugins=["nan_loss_plugin"]))
    root = tmp_path / "run"
    s1, s2 = root / "stage_1_teacher_ft", root / "stage_2_kd"

    code, _, err = run_cli(["distill", str(recipe)], capsys)
    assert code == 2 and "non-finite loss at step 3" in err
    assert (s1 / "metrics.json").is_file() and (s1 / "student" / "model.safetensors").is_file()
    assert not (s2 / "metrics.json").exists() and not (root / "metrics.json").exists()
    assert (s2 / "checkpoints" / "latest").read_text().strip() == "step_2"
    stage1_files = {p: p.read_bytes() for p in s1.rglob("*") if p.is_file()}

    code, _, err = run_cli(["distill", str(recipe)], capsys)
    assert code == 2 and "stage 2/2 'kd'" in err and "train.resume=latest" in err

    code, out, err = run_cli(["distill", str(recipe), "train.resume=latest"], capsys)
    assert code == 0, err
    assert {p: p.read_bytes() for p in s1.rglob("*") if p.is_file()} == stage1_files  # skipped, untouched
    log = [json.loads(x) for x in (s2 / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log if "step" in x and "event" not in x] == [1, 2, 3, 4]
    assert yaml.safe_load((s2 / "config.yaml").read_text())["train"]["resume"] == "latest"
    # Stage 2 distilled from stage 1's export, with a student built from that export's blocks.
    prov = json.loads((s2 / "student" / "scaledkd_provenance.json").read_text())
    assert prov["teacher"] == str(s1 / "student") and prov["student_init"]["from"] == str(s1 / "student")
    summary = json.loads((root / "metrics.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["teacher_ft", "kd"]
    assert summary["export_dir"] == str(s2 / "student") and summary["total_steps"] == 6
    assert summary["final"] == json.loads((s2 / "metrics.json").read_text())["final"]
    assert "exported final student" in out

    code, _, err = run_cli(["distill", str(recipe)], capsys)
    assert code == 2 and "already holds a finished staged run" in err


def test_interrupted_stage_without_checkpoint_restarts(tiny_assets, tmp_path, capsys):
    teacher, data_dir = tiny_assets
    stages = [{"name": "kd", "losses": [{"name": "logit_kd"}], "train": {"max_steps": 1}}]
    recipe = write_recipe(tmp_path / "r.yaml", **staged(tmp_path, teacher, data_dir, stages))
    partial = tmp_path / "run" / "stage_1_kd"
    partial.mkdir(parents=True)
    (partial / "log.jsonl").write_text("")  # a stage that died before its first checkpoint
    code, _, err = run_cli(["distill", str(recipe), "train.resume=latest"], capsys)
    assert code == 0, err
    assert (partial / "metrics.json").is_file() and (tmp_path / "run" / "metrics.json").is_file()
    assert not list((tmp_path / "run").glob("stage_1_kd.replaced-*"))  # the partial run, removed once finished


def test_finetune_of_a_staged_recipe_is_its_last_student_stage_without_teacher(tiny_assets, tmp_path):
    """A staged recipe's no-teacher baseline is one run of its last student stage, on the recipe's own student."""
    from scaledkd.build import baseline

    teacher, data_dir = tiny_assets
    stages = [{"name": "ild", "losses": [{"name": "hidden_mse"}], "train": {"epochs": 9}},
              {"name": "kd", "losses": [{"name": "logit_kd"}], "train": {"lr": 0.5}}]
    cfg = baseline(config_from_dict(staged(tmp_path, teacher, data_dir, stages)))
    assert not cfg.stages and cfg.teacher is None and [lc.name for lc in cfg.losses] == ["task"]
    assert cfg.train.lr == 0.5 and cfg.student.from_model == str(teacher)
    only_teacher = [{"name": "tf", "trains": "teacher", "losses": [{"name": "task"}]}]
    recipe = write_recipe(tmp_path / "r.yaml", **staged(tmp_path, teacher, data_dir, only_teacher))
    assert cli.main(["finetune", str(recipe)]) == 2