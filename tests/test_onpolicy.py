"""On-policy distillation (``data.on_policy``) and sequence-level KD (``scaledkd generate``) for causal-LM students.

The invariants: the rows the student generates are exactly what the teacher and the losses see (prompt +
continuation, the loss mask on the generated tokens only, EOS-stopped continuations padded and masked); the
student generates with its current weights; a ZeRO-3 student generates what an unsharded copy generates; lambda = 0
is today's path bit for bit; a teacher-written JSON-lines file trains like any other data.
"""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from scaledkd import cli, models
from scaledkd.build import baseline, resolve
from scaledkd.config import ConfigError, OnPolicyConfig, config_from_dict
from scaledkd.data import load_examples
from scaledkd.data.lm import IGNORE_INDEX
from scaledkd.engine import run as run_mod
from scaledkd.engine.step import distill_step
from scaledkd.inputs import loss_batch, model_inputs
from scaledkd.losses.divergence import token_divergence
from scaledkd.onpolicy import (
    document_prompts,
    generate_continuations,
    prompt_span,
    rows_this_micro,
    splice_rows,
    write_teacher_continuations,
)
from tests.conftest import tiny_model
from tests.test_lm import bpe_tokenizer, lm_recipe, stories
from tests.tiny import REPO, write_recipe

EOS, PAD = 2, 0


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name ds_configs/ relative to the repository


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A corpus, a prompt/response JSON-lines file, a BPE tokenizer and a random 4-block Llama teacher."""
    root = tmp_path_factory.mktemp("onpolicy")
    (root / "train.txt").write_text("\n\n".join(stories(160, seed=1)) + "\n")
    (root / "eval.txt").write_text("\n\n".join(stories(12, seed=2)) + "\n")
    prompts = [" ".join(s.split()[:4]) for s in stories(40, seed=3)]  # short: every record fits in a row
    responses = [" ".join(s.split()[:8]) for s in stories(40, seed=4)]
    (root / "sft.jsonl").write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n"
                                            for p, r in zip(prompts, responses)))
    tok = bpe_tokenizer(stories(160, seed=1))
    config = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=64, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                  max_position_embeddings=64, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                  tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    return root


def recipe(assets, out, on_policy=None, losses=None, **data):
    r = lm_recipe(assets, out, losses=losses or [{"name": "lm_kd", "params": {"divergence": "jsd"}},
                                                 {"name": "lm_task", "weight": 0.0}])
    r["train"].update(max_steps=2, save_every=0, lr=1e-2)
    r["data"].update(data)
    if on_policy is not None:
        r["data"]["on_policy"] = on_policy
    return r


def greedy_reference(model, prompt: list[int], steps: int, eos: int) -> list[int]:
    """Greedy continuation of one prompt by full forwards without a cache (the plain reference)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == eos:
                break
    return ids[len(prompt):]


# ------------------------------------------------------------------------------------------ rows and prompts


def test_rows_this_micro_gives_exactly_lambda_over_a_run():
    for fraction, batch in ((0.0, 4), (0.5, 4), (0.3, 4), (1.0, 3), (0.25, 1)):
        counts = [rows_this_micro(fraction, batch, m) for m in range(40)]
        assert all(0 <= c <= batch for c in counts)
        assert abs(sum(counts) - fraction * batch * 40) < 1
    assert {rows_this_micro(0.0, 8, m) for m in range(10)} == {0}
    assert {rows_this_micro(1.0, 8, m) for m in range(10)} == {8}


def test_prompt_span_rules():
    # plain text with BOS: [bos t t t t t eos], BOS predicts the first token -> a prefix of prefix_tokens
    ids, mask = [1, 5, 6, 7, 8, 9, 2], [True] * 6 + [False]
    assert prompt_span(ids, mask, list(range(7)), 7, EOS, prefix_tokens=3, max_prompt=10) == (0, 3)
    assert prompt_span(ids, mask, list(range(7)), 7, EOS, prefix_tokens=30, max_prompt=10) == (0, 6)  # not the EOS
    assert prompt_span(ids, mask, list(range(7)), 7, EOS, prefix_tokens=30, max_prompt=4) == (0, 4)  # room kept
    # a [prompt, response] record: [bos p p r r eos]; the prompt is bos + p p exactly, whatever prefix_tokens says
    ids, mask = [1, 11, 12, 13, 14, 2], [False, False, True, True, True, False]
    assert prompt_span(ids, mask, list(range(6)), 6, EOS, prefix_tokens=1, max_prompt=10) == (0, 3)
    # a packed row that opens with the EOS-ended tail of a document: the next document gives the prompt
    ids = [7, 2, 1, 5, 6, 7, 8, 9]
    positions = [0, 1, 0, 1, 2, 3, 4, 5]
    assert prompt_span(ids, [True] * 8, positions, 8, EOS, prefix_tokens=3, max_prompt=10) == (0, 1)
    ids = [2, 1, 5, 6, 7, 8, 9, 3]
    positions = [0, 0, 1, 2, 3, 4, 5, 6]
    assert prompt_span(ids, [False] + [True] * 7, positions, 8, EOS, prefix_tokens=3, max_prompt=10) == (1, 4)
    # padding after the real tokens is never part of a prompt
    assert prompt_span([1, 5, 2, 0, 0], [True, True, False, False, False], list(range(5)), 3, EOS, 8, 10) == (0, 2)


@pytest.mark.parametrize("packed", [True, False])
def test_splice_rows_puts_generated_tokens_under_the_loss_mask_only(packed):
    batch = {"input_ids": torch.tensor([[1, 5, 6, 7, 2, 1], [1, 8, 9, 4, 4, 2], [1, 3, 3, 3, 2, 0]]),
             "labels": torch.tensor([[5, 6, 7, 2, -100, -100], [8, 9, 4, 4, 2, -100], [3, 3, 3, 2, -100, -100]])}
    batch["loss_mask"] = batch["labels"] != IGNORE_INDEX
    if packed:
        batch["position_ids"] = torch.tensor([[0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 0]])
    else:
        batch["attention_mask"] = torch.tensor([[1] * 6, [1] * 6, [1, 1, 1, 1, 1, 0]])
    before = {k: v.clone() for k, v in batch.items()}
    seqs = [[1, 5, 40, 41, 42, 43, 44, 2], [1, 3, 50]]  # row 0: prompt 2 + 6 generated (EOS); row 2: early stop
    out = splice_rows(batch, [0, 2], seqs, [2, 2], PAD)
    assert all(torch.equal(batch[k], before[k]) for k in batch)  # the input batch is untouched
    assert out["input_ids"].shape == (3, 8) and set(out) == set(batch)
    assert out["input_ids"][0].tolist() == seqs[0]
    assert out["input_ids"][2].tolist() == [1, 3, 50, PAD, PAD, PAD, PAD, PAD]
    for r, seq in ((0, seqs[0]), (2, seqs[1])):
        scored = out["loss_mask"][r].nonzero().flatten().tolist()
        # position i predicts token i + 1: exactly the generated tokens (after the 2-token prompt) are predicted
        assert [out["input_ids"][r, i + 1].item() for i in scored] == seq[2:]
        assert (out["labels"][r] == IGNORE_INDEX).all()
    assert out["input_ids"][1, :6].tolist() == before["input_ids"][1].tolist()  # kept row, padded on the right
    assert out["labels"][1, :6].tolist() == before["labels"][1].tolist() and not out["loss_mask"][1, 6:].any()
    if packed:
        assert out["position_ids"][0].tolist() == list(range(8))
        assert out["position_ids"][2].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]  # padding: a document of its own
        assert out["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    else:
        assert out["attention_mask"].tolist() == [[1] * 8, [1] * 6 + [0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="token_type_ids"):
        splice_rows({**batch, "token_type_ids": batch["input_ids"]}, [0], seqs[:1], [2], PAD)
    ids = splice_rows({**batch, "example_ids": torch.tensor([10, 11, 12])}, [0, 2], seqs, [2, 2], PAD)["example_ids"]
    assert ids.tolist() == [-1, 11, -1]  # generated rows come from no example (a teacher cache must not serve them)


# ------------------------------------------------------------------------------------------ generation


def test_greedy_generation_equals_the_uncached_reference_and_stops_at_eos():
    model = tiny_model("llama", layers=2, max_position_embeddings=64)
    prompts = [[1, 5, 9, 12, 40], [1, 7], [1, 33, 34]]  # different lengths: left padding must not shift anything
    free = generate_continuations(model, prompts, max_new_tokens=6, temperature=0.0, eos_id=99, pad_id=PAD, seed=0)
    assert free == [greedy_reference(model, p, 6, 99) for p in prompts]
    # Make the third token row 0 generates the end of a document: row 0 stops there, the others run on.
    eos = free[0][2]
    stopped = generate_continuations(model, prompts, max_new_tokens=6, temperature=0.0, eos_id=eos, pad_id=PAD,
                                     seed=0)
    assert stopped == [greedy_reference(model, p, 6, eos) for p in prompts]
    assert stopped[0] == free[0][:3]
    assert model.training is False


def test_sampling_is_seeded_and_leaves_the_global_rng_alone():
    model = tiny_model("gpt2", layers=2)
    prompts = [[1, 5, 9], [1, 7, 3]]
    torch.manual_seed(123)
    a = generate_continuations(model, prompts, max_new_tokens=8, temperature=1.0, eos_id=99, pad_id=PAD, seed=5)
    after = torch.rand(1)
    torch.manual_seed(123)
    b = generate_continuations(model, prompts, max_new_tokens=8, temperature=1.0, eos_id=99, pad_id=PAD, seed=5)
    assert a == b and torch.equal(torch.rand(1), after)
    c = generate_continuations(model, prompts, max_new_tokens=8, temperature=1.0, eos_id=99, pad_id=PAD, seed=6)
    assert c != a


# ------------------------------------------------------------------------------------------ in a run


def _setup(assets, out, student_ds: str | None = None, **kw):
    r = recipe(assets, out, **kw)
    if student_ds:
        r["student"]["ds_config"] = student_ds
    return run_mod.setup(resolve(config_from_dict(r)))


def _plain_student(run) -> torch.nn.Module:
    """An unsharded copy of the engine's student with its current weights."""
    from scaledkd.export import gather_student_state

    student = run.engine.module.student
    plain = AutoModelForCausalLM.from_config(copy.deepcopy(student.config))
    plain.load_state_dict(gather_student_state(run.engine.module))
    return plain.eval()


def test_generated_rows_are_what_teacher_and_losses_score(assets, tmp_path):
    run = _setup(assets, tmp_path / "run", on_policy={"fraction": 0.5, "max_new_tokens": 8, "temperature": 0.0,
                                                      "prefix_tokens": 4})
    batch = next(run.batches(0))
    mixed = run.on_policy(batch, 0)
    assert rows_this_micro(0.5, 4, 0) == 2
    plain = _plain_student(run)
    eos = run.tokenizer.eos_token_id
    for r in range(4):
        if r >= 2:  # rows not due keep their data
            width = batch["input_ids"].shape[1]
            assert torch.equal(mixed["input_ids"][r, :width], batch["input_ids"][r])
            assert torch.equal(mixed["labels"][r, :width], batch["labels"][r])
            continue
        ids = batch["input_ids"][r].tolist()
        s, e = prompt_span(ids, batch["loss_mask"][r].tolist(), batch["position_ids"][r].tolist(), len(ids), eos,
                           prefix_tokens=4, max_prompt=32 - 8)
        prompt = ids[s:e]
        assert 1 <= len(prompt) <= 4 and eos not in prompt
        cont = greedy_reference(plain, prompt, 8, eos)
        n = len(prompt) + len(cont)
        assert mixed["input_ids"][r, :n].tolist() == prompt + cont
        assert mixed["position_ids"][r, :n].tolist() == list(range(n))
        assert mixed["loss_mask"][r].nonzero().flatten().tolist() == list(range(len(prompt) - 1, n - 1))
    # The step's teacher and lm_kd term read exactly those rows: the logged term equals the divergence computed
    # by hand from the teacher's and the student's logits on the mixed batch.
    with torch.no_grad():
        t_logits = run.teacher_model(**model_inputs(mixed)).logits
        s_logits = plain(**model_inputs(mixed)).logits
    expected = token_divergence(s_logits, t_logits, loss_batch(mixed).token_mask, kind="jsd", temperature=1.0,
                                beta=0.5, chunk_size=None)
    terms = distill_step(run.engine, run.teacher, mixed)
    assert terms["lm_kd"] == pytest.approx(expected.item(), rel=1e-5)


def test_generation_follows_the_students_current_weights(assets, tmp_path):
    run = _setup(assets, tmp_path / "run", on_policy={"fraction": 1.0, "max_new_tokens": 8, "temperature": 0.0})
    batches = run.batches(0)
    probe = next(batches)
    before = run.on_policy(probe, 0)["input_ids"]
    for micro in range(3):  # a few optimiser steps at lr 1e-2 on fully on-policy batches
        distill_step(run.engine, run.teacher, run.on_policy(next(batches), micro + 1))
    after = run.on_policy(probe, 0)
    assert not torch.equal(before, after["input_ids"])
    plain, eos = _plain_student(run), run.tokenizer.eos_token_id
    for r in range(probe["input_ids"].shape[0]):
        prompt_len = int(after["loss_mask"][r].nonzero()[0]) + 1
        prompt = after["input_ids"][r, :prompt_len].tolist()
        cont = greedy_reference(plain, prompt, 8, eos)
        assert after["input_ids"][r, prompt_len:prompt_len + len(cont)].tolist() == cont


@pytest.mark.slow
@pytest.mark.parametrize("gather", [True, False])
def test_zero3_generation_equals_unsharded_generation(assets, tmp_path, gather):
    run = _setup(assets, tmp_path / "run", student_ds="ds_configs/zero3.json",
                 on_policy={"fraction": 1.0, "max_new_tokens": 8, "temperature": 0.0, "gather_zero3": gather,
                            "prefix_tokens": 5})
    assert run.engine.zero_optimization_stage() == 3
    params = list(run.engine.module.student.parameters())
    assert all(hasattr(p, "ds_id") for p in params)
    sharded = [p.numel() == 0 for p in params]  # all but the small ones ZeRO-3 keeps whole (persistence threshold)
    assert sum(sharded) > len(params) // 2
    batch = next(run.batches(0))
    mixed = run.on_policy(batch, 0)
    assert [p.numel() == 0 for p in params] == sharded, "generation leaves the student's weights sharded"
    plain, eos = _plain_student(run), run.tokenizer.eos_token_id
    for r in range(batch["input_ids"].shape[0]):
        ids = batch["input_ids"][r].tolist()
        s, e = prompt_span(ids, batch["loss_mask"][r].tolist(), batch["position_ids"][r].tolist(), len(ids), eos,
                           prefix_tokens=5, max_prompt=32 - 8)
        cont = greedy_reference(plain, ids[s:e], 8, eos)
        assert mixed["input_ids"][r, :e - s + len(cont)].tolist() == ids[s:e] + cont
    terms = distill_step(run.engine, run.teacher, mixed)  # the engine still trains after generating
    assert terms["lm_kd"] > 0


@pytest.mark.multiproc
def test_zero3_generation_on_two_gloo_ranks_equals_unsharded_generation(assets, tmp_path):
    """Two ranks, each generating from its own rows: gathered and sharded generation both give the greedy tokens
    of an unsharded copy, and the step after them runs (no rank left waiting in a collective)."""
    from tests.test_multiproc import launch

    r = recipe(assets, tmp_path / "run", on_policy={"fraction": 1.0, "max_new_tokens": 8, "temperature": 0.0})
    r["student"]["ds_config"] = "ds_configs/zero3.json"
    r["train"]["batch_size"] = 2
    launch(write_recipe(tmp_path / "r.yaml", **r), str(tmp_path / "out"), module="tests.workers.onpolicy_zero3")
    reports = [json.loads((tmp_path / f"out.rank{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        for mode in ("gather", "sharded"):
            assert report[mode]["rows"] == 2 and report[mode]["mismatches"] == 0, (mode, report)
            assert report[mode]["lm_kd"] > 0
    assert reports[0]["gather"]["first_row"] != reports[1]["gather"]["first_row"]  # the ranks' prompts differ


def _step_records(run_dir):
    lines = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    return [x for x in lines if "step" in x and "event" not in x]


@pytest.mark.slow
def test_lambda_zero_is_the_plain_path_and_lambda_half_trains(assets, tmp_path, capsys):
    losses = {}
    for name, on_policy in (("off", None), ("zero", {"fraction": 0.0, "max_new_tokens": 6}), ("half", {"fraction": 0.5,
                                                                               "max_new_tokens": 6})):
        path = write_recipe(tmp_path / f"{name}.yaml", **recipe(assets, tmp_path / name, on_policy=on_policy))
        code = cli.main(["distill", str(path)])
        assert code == 0, capsys.readouterr().err
        losses[name] = _step_records(tmp_path / name)
    keys = ("loss", "lm_kd", "lm_task")
    assert [[r[k] for k in keys] for r in losses["zero"]] == [[r[k] for k in keys] for r in losses["off"]]
    assert "ms_generate" not in losses["off"][0]
    half = losses["half"]
    assert len(half) == 2 and half[0]["ms_generate"] > 0 and 1 <= half[0]["generated_tokens"] <= 6
    assert [r["lm_kd"] for r in half] != [r["lm_kd"] for r in losses["off"]]
    assert json.loads((tmp_path / "half" / "metrics.json").read_text())["final"]["perplexity"] > 1


@pytest.mark.slow
def test_resumed_on_policy_run_samples_the_same_continuations(assets, tmp_path, capsys):
    """4 sampled (temperature 1) on-policy steps with a checkpoint every 2; a resume from step_2 logs the same
    losses and ends with the same weights: the samples depend on (seed, micro-batch, rank), not on the process."""
    import shutil

    from safetensors.torch import load_file

    from scaledkd.files import FINISHED_MARKER

    def run(root, **train):
        r = recipe(assets, root / "run", on_policy={"fraction": 0.5, "max_new_tokens": 6})
        r["train"].update(max_steps=4, save_every=2, keep_checkpoints=0, **train)
        assert cli.main(["distill", str(write_recipe(root / "r.yaml", **r))]) == 0, capsys.readouterr().err

    full, cut = tmp_path / "full", tmp_path / "cut"
    full.mkdir()
    run(full)
    shutil.copytree(full, cut)
    for leftover in (FINISHED_MARKER, "student", "checkpoints/step_4", "log.jsonl"):
        target = cut / "run" / leftover
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    (cut / "run" / "checkpoints" / "latest").write_text("step_2")
    run(cut, resume="latest")
    want, got = _step_records(full / "run"), _step_records(cut / "run")
    assert [r["lm_kd"] for r in got] == [r["lm_kd"] for r in want[2:]]
    a = load_file(full / "run" / "student" / "model.safetensors")
    b = load_file(cut / "run" / "student" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_on_policy_with_prompt_response_data_keeps_the_prompt(assets, tmp_path):
    run = _setup(assets, tmp_path / "run", on_policy={"fraction": 1.0, "max_new_tokens": 6, "temperature": 0.0},
                 train_file="sft.jsonl", eval_file=None, text_columns=["prompt", "response"], packing=False)
    batch = next(run.batches(0))
    mixed = run.on_policy(batch, 0)
    for r in range(batch["input_ids"].shape[0]):
        first_scored = int(batch["loss_mask"][r].nonzero()[0])
        prompt_len = int(mixed["loss_mask"][r].nonzero()[0]) + 1
        assert prompt_len == first_scored + 1  # BOS + the record's prompt, nothing of its response
        assert torch.equal(mixed["input_ids"][r, :prompt_len], batch["input_ids"][r, :prompt_len])
        n = int(mixed["attention_mask"][r].sum())
        assert mixed["loss_mask"][r].nonzero().flatten().tolist() == list(range(prompt_len - 1, n - 1))


# ------------------------------------------------------------------------------------------ refusals


def test_on_policy_config_refusals(assets, tmp_path):
    with pytest.raises(ConfigError, match=r"fraction=1.5 must be in \[0, 1\]"):
        OnPolicyConfig(fraction=1.5)
    with pytest.raises(ConfigError, match="temperature"):
        OnPolicyConfig(temperature=-1.0)
    with pytest.raises(ConfigError, match="needs a causal-LM student"):
        config_from_dict({**recipe(assets, tmp_path / "r"), "data": {"task": "sst2", "data_dir": "x",
                                                                     "on_policy": {"fraction": 0.5}}})
    with pytest.raises(ConfigError, match="leaves no room for a prompt"):
        config_from_dict(recipe(assets, tmp_path / "r", on_policy={"max_new_tokens": 32}))
    with pytest.raises(ConfigError, match="no loss with a non-zero weight reads the teacher"):
        resolve(config_from_dict(recipe(assets, tmp_path / "r", on_policy={"fraction": 0.5, "max_new_tokens": 8},
                                        losses=[{"name": "lm_task"}, {"name": "lm_kd", "weight": 0.0}])))
    cfg = config_from_dict(recipe(assets, tmp_path / "r", on_policy={"fraction": 0.5, "max_new_tokens": 8}))
    assert baseline(cfg).data.on_policy is None  # the no-teacher baseline has nothing to score samples with


# ------------------------------------------------------------------------------------------ sequence-level KD


@pytest.mark.slow
def test_generate_writes_teacher_continuations_that_train_as_data(assets, tmp_path, capsys):
    rec = write_recipe(tmp_path / "r.yaml", **recipe(assets, tmp_path / "unused"))
    out = tmp_path / "seqkd.jsonl"
    code = cli.main(["generate", str(rec), "--out", str(out), "--max-new-tokens", "6", "--prefix-tokens", "3",
                     "--max-samples", "10", "--batch-size", "4"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert summary["records"] == len(records) == 10
    # Each response is the teacher's greedy continuation of its prompt.
    teacher = AutoModelForCausalLM.from_pretrained(assets / "teacher").eval()
    cfg = config_from_dict(recipe(assets, tmp_path / "unused"))
    tok = models.load_tokenizer(str(assets / "teacher"))
    docs = load_examples(dataclasses.replace(cfg.data, max_train_samples=10), "train", cfg.train.seed)
    for (text, ids), record in zip(document_prompts(docs, tok, 3), records, strict=True):
        assert record["prompt"] == text
        cont = greedy_reference(teacher, ids, 6, tok.eos_token_id)
        assert record["response"] == tok.decode(cont, skip_special_tokens=True)
    # The file trains like any [prompt, response] data, and its training documents are the records.
    kept = [r for r in records if r["response"].strip()]
    train = recipe(assets, tmp_path / "student", train_file=str(out), eval_file=None,
                   text_columns=["prompt", "response"], packing=False)
    train["data"]["heldout_fraction"] = 0.2
    plan = resolve(config_from_dict(train))
    seen = {(p, r) for p, r in zip(plan.examples["train"]["prompt"], plan.examples["train"]["text"])}
    assert seen and seen <= {(r["prompt"], r["response"]) for r in kept}
    code = cli.main(["distill", str(write_recipe(tmp_path / "s.yaml", **train))])
    assert code == 0, capsys.readouterr().err
    assert len(_step_records(tmp_path / "student")) == 2


def test_generate_refuses_recipes_it_cannot_serve(assets, tmp_path, capsys):
    no_teacher = recipe(assets, tmp_path / "x")
    no_teacher["teacher"] = None
    no_teacher["student"] = {"init": "config", "from_model": str(assets / "teacher"), "num_layers": 2}
    no_teacher["losses"] = [{"name": "lm_task"}]
    code = cli.main(["generate", str(write_recipe(tmp_path / "n.yaml", **no_teacher)), "--out",
                     str(tmp_path / "o.jsonl")])
    assert code == 2 and "has no teacher" in capsys.readouterr().err
    with pytest.raises(ValueError, match="temperature"):
        write_teacher_continuations(config_from_dict(recipe(assets, tmp_path / "x")), tmp_path / "o.jsonl",
                                    temperature=-0.5)
