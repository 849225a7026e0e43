"""``train.log_grad_norms``: the gradient norm of each weighted loss term w.r.t. the student's parameters.

Checked three ways: on a one-layer model whose gradients are worked out by hand, on a real tiny distillation
(:func:`distill_step` against one ``backward`` per term), and in a run's ``log.jsonl`` (logged steps only)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from scaledkd.build import resolve
from scaledkd.config import config_from_dict
from scaledkd.engine.step import GRAD_NORM, distill_step, term_grad_norms
from tests.tiny import REPO, tiny_recipe


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name ds_configs/ relative to the repository


def test_norms_of_a_linear_model_match_the_hand_derivation():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    x, y = torch.tensor([2.0, 1.0, 4.0]), torch.tensor(3.0)
    fit = (w @ x - y) ** 2        # d/dw = 2 (w.x - y) x = 2 (2 - 2 + 2 - 3) x = -2 x
    decay = (w ** 2).sum()        # d/dw = 2 w
    constant = torch.tensor(5.0)  # no path to w
    terms = {"fit": fit, "decay": decay, "constant": constant}
    weights = {"fit": 0.5, "decay": 3.0, "constant": 1.0}
    got = term_grad_norms(terms, weights, [w])

    g_fit = 0.5 * -2.0 * x                       # [-2, -1, -4]
    g_decay = 3.0 * 2.0 * w.detach()             # [6, -12, 3]
    assert got[GRAD_NORM + "fit"] == pytest.approx(math.sqrt(4 + 1 + 16))
    assert got[GRAD_NORM + "decay"] == pytest.approx(math.sqrt(36 + 144 + 9))
    assert got[GRAD_NORM + "constant"] == 0.0
    assert got[GRAD_NORM + "loss"] == pytest.approx(float((g_fit + g_decay).norm()))  # [4, -13, -1]
    assert w.grad is None  # nothing accumulated into .grad: that is the real backward's


def _by_hand(module, batch, t_out) -> dict[str, float]:
    """One fresh forward and ``backward`` per weighted term; the norm of the student's ``.grad``."""
    params = [p for p in module.student.parameters() if p.requires_grad]
    out = {}
    for name in [*module.losses, "loss"]:
        for p in params:
            p.grad = None
        total, terms = module(batch, t_out)
        (total if name == "loss" else module.weights[name] * terms[name]).backward()
        out[GRAD_NORM + name] = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params if p.grad is not None))
    for p in module.parameters():
        p.grad = None
    return out


def test_distill_step_reports_each_weighted_term_of_a_tiny_distillation(tiny_assets, tmp_path):
    from scaledkd.engine import run as run_mod

    teacher, data_dir = tiny_assets
    losses = [{"name": "task", "weight": 0.5}, {"name": "logit_kd", "weight": 0.5},
              {"name": "hidden_mse", "weight": 2.0}, {"name": "attn_kl", "weight": 10.0, "mapping": "uniform"}]
    cfg = config_from_dict(tiny_recipe(tmp_path, teacher, data_dir, losses=losses))
    run = run_mod.setup(resolve(cfg))
    batch = next(iter(run.batches(0)))
    t_out = run.teacher(batch)
    module = run.engine.module
    want = _by_hand(module, batch, t_out)
    got = distill_step(run.engine, run.teacher, batch, grad_norms=True)
    assert set(want) == {GRAD_NORM + k for k in ("task", "logit_kd", "hidden_mse", "attn_kl", "loss")}
    for key, value in want.items():
        assert value > 0, key
        assert got[key] == pytest.approx(value, rel=1e-4), key
    # The norms scale with the weights: the same step without them reports the terms only.
    plain = distill_step(run.engine, run.teacher, batch)
    assert not [k for k in plain if k.startswith(GRAD_NORM)] and "attn_kl" in plain


def test_a_run_logs_grad_norms_on_logged_steps_only(tiny_assets, tmp_path):
    from scaledkd import cli

    teacher, data_dir = tiny_assets
    recipe = tiny_recipe(tmp_path, teacher, data_dir, losses=[{"name": "task"}, {"name": "attn_kl"}])
    recipe["train"].update(max_steps=5, log_every=2, log_grad_norms=True)
    path = tmp_path / "recipe.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    assert cli.main(["distill", str(path)]) == 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = {x["step"]: x for x in lines if "step" in x and "event" not in x and "task" in x}
    assert sorted(steps) == [2, 4, 5]  # every 2nd step and the last
    for record in steps.values():
        assert {GRAD_NORM + "task", GRAD_NORM + "attn_kl", GRAD_NORM + "loss"} <= set(record)
        assert all(record[GRAD_NORM + k] > 0 for k in ("task", "attn_kl", "loss"))


def test_a_zero3_student_is_refused_before_any_model_loads(tiny_assets, tmp_path):
    """Under ZeRO-3 the student's parameters are partitioned, so the diagnostic cannot run; that is a config
    mistake to report at ``scaledkd validate`` time, not at the first logged step after the models loaded."""
    from scaledkd.config import ConfigError

    teacher, data_dir = tiny_assets
    recipe = tiny_recipe(tmp_path, teacher, data_dir, losses=[{"name": "task"}])
    recipe["student"]["ds_config"] = "ds_configs/zero3.json"
    recipe["train"]["log_grad_norms"] = True
    with pytest.raises(ConfigError, match=r"train.log_grad_norms=true .* ZeRO-3"):
        resolve(config_from_dict(recipe))
    recipe["train"]["log_grad_norms"] = False
    resolve(config_from_dict(recipe))  # the same recipe without the diagnostic resolves


def test_the_diagnostic_leaves_the_training_step_as_it_was(tiny_assets, tmp_path):
    """With dropout on, the measuring forward must not draw from the generator the step's own forward draws its
    masks from: the same step with and without train.log_grad_norms gives the same terms and the same weights."""
    from scaledkd.engine import run as run_mod

    teacher, data_dir = tiny_assets
    results = []
    for norms in (False, True):
        recipe = tiny_recipe(tmp_path / str(norms), teacher, data_dir,
                             losses=[{"name": "task", "weight": 0.5}, {"name": "logit_kd", "weight": 0.5}])
        run = run_mod.setup(resolve(config_from_dict(recipe)))
        student = run.engine.module.student
        for m in student.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.3  # the tiny teacher's config has dropout off
        batch = next(iter(run.batches(0)))
        torch.manual_seed(5)
        terms = distill_step(run.engine, run.teacher, batch, grad_norms=norms)
        assert any(k.startswith(GRAD_NORM) for k in terms) == norms
        results.append(({k: v for k, v in terms.items() if not k.startswith(GRAD_NORM)},
                        [p.detach().clone() for p in student.parameters()]))
    (plain, plain_weights), (measured, measured_weights) = results
    assert measured == plain
    assert all(torch.equal(a, b) for a, b in zip(plain_weights, measured_weights, strict=True))
