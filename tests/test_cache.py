"""The teacher-output cache: training from it equals training with the live teacher, the teacher is never loaded,
stale caches and uncacheable recipes are refused with the reason, and the CLI builds and uses it."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from scaledkd import cli, models
from scaledkd.build import resolve
from scaledkd.cache import (
    MANIFEST,
    CachedTeacher,
    StaleCache,
    TeacherCache,
    build_cache,
)
from scaledkd.config import ConfigError, config_from_dict
from tests import test_lm
from tests.test_lm import lm_recipe
from tests.tiny import REPO, WORDS, tiny_recipe, write_recipe

lm_assets = test_lm.lm_assets  # the tiny causal-LM corpus, tokenizer and teacher (a module-scoped fixture)

LOSSES = [{"name": "task", "weight": 0.5}, {"name": "logit_kd", "weight": 0.5}, {"name": "hidden_mse"},
          {"name": "attn_kl"}, {"name": "minilm_value"}]


@pytest.fixture(scope="module")
def ragged(tmp_path_factory, tiny_assets) -> tuple[Path, Path]:
    """The tiny teacher and an SST-2 folder whose sentences have 2 to 14 words: every batch is padded."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("ragged")
    (root / "SST-2").mkdir()
    for name, n in (("train.tsv", 96), ("dev.tsv", 32)):
        lines = ["sentence\tlabel"]
        for i in range(n):
            words = rng.choices(WORDS, k=rng.randint(1, 13)) + ["good" if i % 2 else "bad"]
            lines.append(" ".join(words) + "\t" + str(i % 2))
        (root / "SST-2" / name).write_text("\n".join(lines) + "\n")
    return tiny_assets[0], root


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name ds_configs/ relative to the repository


def _cfg(tmp_path: Path, teacher: Path, data_dir: Path, cache: Path | None, *, out: str = "run", losses=None,
         **overrides):
    recipe = tiny_recipe(tmp_path, teacher, data_dir, losses=losses or LOSSES, **overrides)
    recipe["output_dir"] = str(tmp_path / out)
    if cache is not None:
        recipe["teacher"]["cache"] = str(cache)
    return config_from_dict(recipe)


def _step_records(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    return [x for x in lines if "step" in x and "event" not in x]


@pytest.mark.slow
def test_training_from_the_cache_equals_the_live_teacher(ragged, tmp_path, monkeypatch):
    from scaledkd.engine import run as run_mod

    teacher, data_dir = ragged
    cache = tmp_path / "cache"
    # Small shards, so the batches read rows from several files.
    summary = build_cache(_cfg(tmp_path, teacher, data_dir, cache), shard_bytes=64 * 1024)
    assert summary["built"] and summary["rows"] == 96 and summary["shards"] > 1
    assert summary["logits"] and {"hidden.4", "q.4", "k.4", "v.4"} <= set(summary["taps"])

    live = run_mod.setup(resolve(_cfg(tmp_path, teacher, data_dir, None, out="live")))
    run_mod.train(live)

    loaded = []
    real_load = models.load_pretrained
    monkeypatch.setattr(models, "load_pretrained", lambda path, *a, **k: loaded.append(path) or real_load(path, *a, **k))
    cached = run_mod.setup(resolve(_cfg(tmp_path, teacher, data_dir, cache, out="cached")))
    assert isinstance(cached.teacher, CachedTeacher) and cached.teacher_model is None
    run_mod.train(cached)
    assert str(teacher) not in loaded  # the teacher was never built

    want, got = _step_records(tmp_path / "live"), _step_records(tmp_path / "cached")
    assert [r["step"] for r in got] == [1, 2, 3]
    for w, g in zip(want, got, strict=True):
        for term in ("loss", "task", "logit_kd", "hidden_mse", "attn_kl", "minilm_value"):
            assert g[term] == pytest.approx(w[term], abs=1e-6, rel=0), (w["step"], term)

    # A batch straight from the loop: the cached captures are the live teacher's at real tokens, zeros at padding
    # (the batch is padded, so padded keys and queries are part of the comparison above).
    batch = next(live.batches(0))
    mask = batch["attention_mask"].bool()
    assert not mask.all()
    t_live, t_cache = live.teacher(batch), cached.teacher(batch)
    torch.testing.assert_close(t_cache.logits, t_live.logits, rtol=0, atol=1e-6)
    for kind in ("hidden", "q", "k", "v"):
        for layer, value in getattr(t_live.captures, kind).items():
            stored = getattr(t_cache.captures, kind)[layer]
            torch.testing.assert_close(stored[mask], value[mask], rtol=0, atol=1e-5)
            assert not stored[~mask].any()


@pytest.mark.slow
def test_stale_cache_is_refused_naming_what_changed(ragged, tmp_path):
    _, data_dir = ragged
    teacher = tmp_path / "teacher"
    shutil.copytree(ragged[0], teacher)
    cache = tmp_path / "cache"
    losses = [{"name": "logit_kd"}, {"name": "hidden_mse", "mapping": [[1, 2], [2, 4]]}]
    build_cache(_cfg(tmp_path, teacher, data_dir, cache, losses=losses))
    resolve(_cfg(tmp_path, teacher, data_dir, cache, losses=losses))  # up to date: accepted

    with pytest.raises(StaleCache, match=r"tokenisation changed \(data.max_length: 32 -> 16\)"):
        resolve(_cfg(tmp_path, teacher, data_dir, cache, losses=losses, data__max_length=16))
    with pytest.raises(StaleCache, match=r"taps changed \(the recipe reads hidden.3"):
        resolve(_cfg(tmp_path, teacher, data_dir, cache, losses=[{"name": "hidden_mse", "mapping": [[1, 3]]}]))
    with pytest.raises(StaleCache, match=r"training examples changed .*data.max_train_samples: None -> 50"):
        resolve(_cfg(tmp_path, teacher, data_dir, cache, losses=losses, data__max_train_samples=50))
    # Fewer taps than the cache holds is not stale.
    resolve(_cfg(tmp_path, teacher, data_dir, cache, losses=[{"name": "hidden_mse", "mapping": [[2, 4]]}]))

    from safetensors.torch import load_file, save_file

    weights = load_file(teacher / "model.safetensors")
    name = next(k for k in weights if k.endswith("weight") and weights[k].dim() == 2)
    weights[name] = weights[name] + 0.01
    save_file(weights, str(teacher / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(StaleCache, match=r"teacher weights changed \(model.safetensors differs\)"):
        resolve(_cfg(tmp_path, teacher, data_dir, cache, losses=losses))
    # The command refuses to replace it unless asked, then rebuilds it.
    with pytest.raises(StaleCache, match="--overwrite"):
        build_cache(_cfg(tmp_path, teacher, data_dir, cache, losses=losses))
    assert build_cache(_cfg(tmp_path, teacher, data_dir, cache, losses=losses), overwrite=True)["built"]
    resolve(_cfg(tmp_path, teacher, data_dir, cache, losses=losses))
    assert not list(tmp_path.glob(".cache.*"))  # no leftover build or replaced folders


def test_changed_tokenised_rows_are_refused_when_the_run_opens_the_cache(ragged, tmp_path):
    teacher, data_dir = ragged
    cache = tmp_path / "cache"
    build_cache(_cfg(tmp_path, teacher, data_dir, cache, losses=[{"name": "logit_kd"}]))
    plan = resolve(_cfg(tmp_path, teacher, data_dir, cache, losses=[{"name": "logit_kd"}]))
    from scaledkd import data

    tokenizer = models.load_tokenizer(plan.tokenizer_source)
    rows = data.prepare_split(plan.cfg.data, tokenizer, "train", 42, causal_lm=False,
                              examples=plan.examples["train"]).rows
    TeacherCache.open(cache, rows)
    with pytest.raises(StaleCache, match="tokenised training rows changed"):
        TeacherCache.open(cache, rows.select(range(95)))


def test_uncacheable_recipes_are_refused_with_the_reason(ragged, tmp_path):
    teacher, data_dir = ragged
    mixup = _cfg(tmp_path, teacher, data_dir, tmp_path / "cache", losses=[{"name": "hidden_mse"}],
                 train__mixup=True)
    with pytest.raises(ConfigError, match="train.mixup=true: the teacher must see the student's mixed inputs"):
        build_cache(mixup)
    with pytest.raises(ConfigError, match="train.mixup"):
        resolve(mixup)
    no_teacher_losses = _cfg(tmp_path, teacher, data_dir, tmp_path / "cache", losses=[{"name": "task"}])
    with pytest.raises(ConfigError, match="nothing to cache"):
        build_cache(no_teacher_losses)
    assert not (tmp_path / "cache").exists()
    with pytest.raises(ConfigError, match="holds no teacher cache"):
        resolve(_cfg(tmp_path, teacher, data_dir, tmp_path / "nowhere", losses=[{"name": "logit_kd"}]))


def test_relative_position_biases_are_not_cached(ragged, tmp_path):
    """MPNet's attention adds a [B, H, L, L] relative-position bias: attention losses on such a teacher are refused
    (the cache would grow with L^2 per row), while its hidden states and logits still cache."""
    import shutil

    from transformers import AutoConfig, AutoModelForSequenceClassification

    from tests.conftest import tiny_config

    bert, data_dir = ragged
    teacher = tmp_path / "mpnet"
    AutoModelForSequenceClassification.from_config(
        tiny_config("mpnet", max_position_embeddings=40, vocab_size=AutoConfig.from_pretrained(bert).vocab_size)
    ).save_pretrained(teacher)
    for f in bert.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(f, teacher / f.name)
    attention = _cfg(tmp_path, teacher, data_dir, tmp_path / "cache", losses=[{"name": "attn_kl"}])
    with pytest.raises(ConfigError, match=r"does not store attention-score biases \(teacher mpnet adds a "
                                          r"relative-position bias \[B, H, L, L\] at blocks \[4\]"):
        build_cache(attention)
    assert not (tmp_path / "cache").exists()
    summary = build_cache(_cfg(tmp_path, teacher, data_dir, tmp_path / "cache", losses=[{"name": "hidden_mse"}]))
    assert summary["built"] and summary["rows"] > 0


LM_LOSSES = [{"name": "lm_kd", "weight": 0.5, "params": {"divergence": "jsd", "top_k": 8, "chunk_size": 16}},
             {"name": "lm_task", "weight": 0.5}, {"name": "hidden_mse", "weight": 0.1}, {"name": "attn_kl", "weight": 0.1}]


def _lm_cfg(root: Path, out: Path, cache: Path | None, losses=None, **sections):
    recipe = lm_recipe(root, out, losses=losses or LM_LOSSES, **sections)
    if cache is not None:
        recipe["teacher"]["cache"] = str(cache)
    return config_from_dict(recipe)


@pytest.mark.slow
@pytest.mark.parametrize("packing", [True, False])
def test_causal_lm_from_the_cache_equals_the_live_teacher(lm_assets, tmp_path, packing):
    """Causal-LM rows (packed, or one padded document per row): the cache keeps the teacher's top-16 logits per
    token; lm_kd with top_k 8 (JSD), a hidden-state loss and attention KL (the Llama teacher's rotary cos/sin are
    stored per token) give the live teacher's values."""
    from scaledkd.engine import run as run_mod

    cache = tmp_path / "cache"
    data_cfg = {"task": "lm", "data_dir": str(lm_assets), "train_file": "train.txt", "eval_file": "eval.txt",
                "max_length": 32, "packing": packing}
    summary = build_cache(_lm_cfg(lm_assets, tmp_path / "x", cache, data=data_cfg), top_k=16, shard_bytes=64 * 1024)
    assert summary["top_k"] == 16 and not summary["logits"] and summary["shards"] > 1
    for name, with_cache in (("live", None), ("cached", cache)):
        run = run_mod.setup(resolve(_lm_cfg(lm_assets, tmp_path / name, with_cache, data=data_cfg)))
        assert (run.teacher_model is None) == (with_cache is not None)
        run_mod.train(run)
    want, got = _step_records(tmp_path / "live"), _step_records(tmp_path / "cached")
    assert [r["step"] for r in got] == [1, 2, 3]
    for w, g in zip(want, got, strict=True):
        for term in ("loss", "lm_kd", "lm_task", "hidden_mse", "attn_kl"):
            # 1e-6 relative: the cache was built from other batches than training draws (other padding widths, so
            # other float32 summation orders inside the teacher's matmuls), which moves values by ~1e-7 relative.
            assert g[term] == pytest.approx(w[term], abs=1e-6, rel=1e-6), (w["step"], term)


@pytest.mark.slow
def test_causal_lm_caches_need_top_k_logit_losses(lm_assets, tmp_path):
    full = [{"name": "lm_kd", "params": {"top_k": None}}]
    with pytest.raises(ConfigError, match=r"loss 'lm_kd' compares the whole vocabulary; set its params.top_k"):
        build_cache(_lm_cfg(lm_assets, tmp_path / "run", tmp_path / "cache", losses=full))
    top8 = [{"name": "lm_kd", "params": {"top_k": 8}}]
    with pytest.raises(ConfigError, match=r"--top-k 4 keeps fewer teacher logits per token than the recipe compares"):
        build_cache(_lm_cfg(lm_assets, tmp_path / "run", tmp_path / "cache", losses=top8), top_k=4)
    build_cache(_lm_cfg(lm_assets, tmp_path / "run", tmp_path / "cache", losses=top8))
    resolve(_lm_cfg(lm_assets, tmp_path / "run", tmp_path / "cache", losses=top8))
    top16 = [{"name": "lm_kd", "params": {"top_k": 16}}]
    with pytest.raises(StaleCache, match=r"loss 'lm_kd' compares the teacher's top 16 logits per token; the cache "
                                         r"holds its top 8"):
        resolve(_lm_cfg(lm_assets, tmp_path / "run", tmp_path / "cache", losses=top16))


@pytest.mark.slow
def test_cli_cache_then_distill(ragged, tmp_path, capsys):
    teacher, data_dir = ragged
    cache = tmp_path / "cache"
    recipe = write_recipe(tmp_path / "r.yaml", **tiny_recipe(tmp_path, teacher, data_dir))
    assert cli.main(["cache", str(recipe), f"teacher.cache={cache}"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["built"] and summary["rows"] == 96 and summary["bytes_per_row"] > 0
    assert (cache / MANIFEST).is_file()
    assert cli.main(["cache", str(recipe), f"teacher.cache={cache}"]) == 0  # up to date: kept
    assert json.loads(capsys.readouterr().out)["built"] is False
    assert cli.main(["distill", str(recipe), f"teacher.cache={cache}", "train.max_steps=2"]) == 0
    out = capsys.readouterr().out
    assert "exported final student" in out
    assert (tmp_path / "run" / "metrics.json").is_file()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert cli.main(["cache", str(recipe), f"teacher.cache={foreign}"]) == 2
    assert "holds no teacher cache" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine"


def test_cached_teacher_refuses_taps_the_cache_lacks(ragged, tmp_path):
    from scaledkd.taps import Tap

    teacher, data_dir = ragged
    cache = tmp_path / "cache"
    build_cache(_cfg(tmp_path, teacher, data_dir, cache, losses=[{"name": "logit_kd"}]))
    opened = TeacherCache(cache, json.loads((cache / MANIFEST).read_text()))
    with pytest.raises(StaleCache, match="holds no hidden.2"):
        CachedTeacher(opened, {Tap("hidden", 2)})


def test_a_teacher_without_its_task_head_is_keyed_on_the_seed(ragged, tmp_path):
    """A checkpoint without the task head (a bare encoder as a classification teacher): the run draws the head from
    train.seed when it loads the teacher; the cache draws the same head and is refused for another seed."""
    from transformers import AutoModel

    from scaledkd import data
    from scaledkd.cache import fresh_parameters

    teacher, data_dir = ragged
    bare = tmp_path / "bare"
    AutoModel.from_pretrained(teacher).save_pretrained(bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(teacher / name, bare / name)
    cache = tmp_path / "cache"
    losses = [{"name": "logit_kd"}]
    build_cache(_cfg(tmp_path, bare, data_dir, cache, losses=losses))
    plan = resolve(_cfg(tmp_path, bare, data_dir, cache, losses=losses))
    assert fresh_parameters(plan, [bare / "model.safetensors"]) == ["classifier.bias", "classifier.weight"]
    assert fresh_parameters(plan, [teacher / "model.safetensors"]) == []
    with pytest.raises(StaleCache, match=r"teacher config changed \(train.seed: 42 -> 43\)"):
        resolve(_cfg(tmp_path, bare, data_dir, cache, losses=losses, train__seed=43))

    rows = data.prepare_split(plan.cfg.data, models.load_tokenizer(str(bare)), "train", 42, causal_lm=False,
                              examples=plan.examples["train"])
    batch = rows.collate([rows.rows[i] for i in range(8)])
    torch.manual_seed(42)  # as the run seeds itself before loading the teacher
    live = models.load_pretrained(str(bare), "classification", 2).eval()
    with torch.no_grad():
        want = live(**{k: v for k, v in batch.items() if k != "labels"}).logits
    got = CachedTeacher(TeacherCache.open(cache, rows.rows), set())({**batch, "example_ids": torch.arange(8)}).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.multiproc
def test_two_ranks_read_the_cache_like_one_live_teacher(ragged, tmp_path):
    """Two gloo ranks (micro-batch 4) training from the cache log the losses of one rank (micro-batch 8) with the
    live teacher: each rank looks up its own rows (per-example losses; see tests/test_multiproc.py)."""
    from tests.test_multiproc import LOSSES as PER_EXAMPLE
    from tests.test_multiproc import launch, step_losses

    teacher, data_dir = ragged
    cache = tmp_path / "cache"
    build_cache(_cfg(tmp_path, teacher, data_dir, cache, losses=PER_EXAMPLE))
    recipes = {}
    for name, batch, with_cache in (("live", 8, False), ("cached", 4, True)):
        recipe = tiny_recipe(tmp_path, teacher, data_dir, losses=PER_EXAMPLE)
        recipe["output_dir"] = str(tmp_path / name)
        recipe["train"].update(batch_size=batch, max_steps=4)
        if with_cache:
            recipe["teacher"]["cache"] = str(cache)
        recipes[name] = write_recipe(tmp_path / f"{name}.yaml", **recipe)
    launch(recipes["live"], nproc=1)
    launch(recipes["cached"], nproc=2)
    want, got = step_losses(tmp_path / "live"), step_losses(tmp_path / "cached")
    assert len(got) == len(want) == 4
    for g, w in zip(got, want, strict=True):
        for key in ("loss", "task", "logit_kd", "pkd_cls"):
            assert g[key] == pytest.approx(w[key], rel=2e-4, abs=1e-7), (g["step"], key)
