"""ZeRO-3 partition-wise loading (scaledkd/zero3_load.py): every rank reads only its own elements of each tensor,
and the gathered model equals a plain load, with sharded checkpoints, tied embeddings, padded partitions (odd
tensor sizes) and a dtype change; names that do not line up fall back to transformers' loader."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from scaledkd.zero3_load import SafetensorsFile
from tests.tiny import REPO, free_port, make_tiny_bert

pytestmark = pytest.mark.multiproc
TIMEOUT = 240


def _llama(folder: Path, tied: bool, dtype: torch.dtype = torch.float32) -> Path:
    """A tiny Llama with odd-sized tensors (width 45, vocab 1001: every partition of 2 or 3 ranks is padded),
    saved in ``dtype`` as several safetensors shards."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(1)
    config = AutoConfig.for_model("llama", vocab_size=1001, hidden_size=45, head_dim=16, num_attention_heads=3,
                                  num_key_value_heads=1, intermediate_size=77, num_hidden_layers=3,
                                  max_position_embeddings=64, tie_word_embeddings=tied)
    AutoModelForCausalLM.from_config(config).to(dtype).save_pretrained(folder, max_shard_size="60KB")
    return folder


def _legacy_names(src: Path, dst: Path) -> None:
    """``src`` with its LayerNorm weights saved under the old TF names (``gamma``/``beta``)."""
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    state = load_file(str(src / "model.safetensors"))
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in state.items()}
    assert renamed.keys() != state.keys()
    save_file(renamed, str(dst / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("shape", [(), (7,), (5, 3), (4, 3, 2)])
def test_a_flat_range_reads_the_elements_of_the_flattened_tensor(tmp_path, shape, dtype):
    tensor = torch.arange(max(1, torch.Size(shape).numel())).to(dtype).reshape(shape)
    other = torch.full((3,), 7.0)  # a second tensor first in the file: offsets must be honoured
    save_file({"a_other": other, "t": tensor}, str(tmp_path / "t.safetensors"), metadata={"format": "pt"})
    file = SafetensorsFile(tmp_path / "t.safetensors")
    assert file.shape("t") == tuple(shape) and file.dtype("t") == dtype
    flat = tensor.reshape(-1)
    for start in range(flat.numel()):
        for stop in range(start + 1, flat.numel() + 1):
            assert torch.equal(file.read("t", start, stop), flat[start:stop])
    assert torch.equal(file.read("a_other", 0, 3), other)


_DEVICES = ["meta", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("device", _DEVICES)
def test_a_partition_outside_host_memory_is_filled(tmp_path, device):
    """Without parameter offload a ZeRO-3 partition (``param.ds_tensor``) lives on the GPU, which no file read can
    write into: the elements are read into host memory and copied over. ``meta`` (no storage, no numpy view either)
    stands in for a GPU where there is none; on a GPU the values are compared."""
    tensor = torch.arange(12, dtype=torch.float32)
    save_file({"t": tensor}, str(tmp_path / "t.safetensors"))
    out = torch.full((5,), -1.0, device=device)
    SafetensorsFile(tmp_path / "t.safetensors").read_into("t", 4, out)
    if device != "meta":
        assert torch.equal(out.cpu(), tensor[4:9])


def test_a_truncated_file_is_named(tmp_path):
    save_file({"t": torch.ones(1000)}, str(tmp_path / "t.safetensors"))
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated while reading 't'"):
        SafetensorsFile(tmp_path / "t.safetensors").read("t", 900, 1000)


@pytest.mark.parametrize("nproc", [2, 3])
def test_partitioned_load_equals_a_plain_load(tmp_path, nproc):
    assert len(list(_llama(tmp_path / "llama", tied=False).glob("*.safetensors"))) > 1, "not sharded: test is weak"
    _llama(tmp_path / "llama_tied", tied=True)
    _llama(tmp_path / "llama_bf16", tied=False, dtype=torch.bfloat16)  # a bf16 file in an fp32 run: cast to fp32
    make_tiny_bert(tmp_path / "bert")
    _legacy_names(tmp_path / "bert", tmp_path / "bert_legacy")
    specs = [f"{tmp_path / 'llama'}:causal_lm:0:fp32", f"{tmp_path / 'llama_tied'}:causal_lm:0:bf16",
             f"{tmp_path / 'llama_bf16'}:causal_lm:0:fp32",
             f"{tmp_path / 'bert'}:classification:2:fp32", f"{tmp_path / 'bert_legacy'}:classification:2:fp32"]
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), str(REPO / "tests" / "workers" / "zero3_load.py"), str(out), *specs]
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu",
           "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    for spec, result in report.items():
        # Legacy names (LayerNorm.gamma) are transformers' to convert: that model must come through its loader.
        expected = "bert_legacy" not in spec
        assert result["partitioned"] == expected, f"{spec}: partitioned loader ran: {result['partitioned']}"
        assert result["max_abs_diff"] == 0.0, (spec, result)
        assert result["dtypes"] == [result["dtypes"][0]] * 2, (spec, result)  # partitioned, plain
        assert result["logits_diff"] < 1e-5, (spec, result)


def test_a_head_for_another_number_of_labels_is_named_as_the_likely_cause(tmp_path):
    """A checkpoint fine-tuned on 3 labels loaded for a 2-label task: the model is built from its config.json with
    the task's num_labels, so only the head disagrees; the error names the tensor, both shapes and that cause."""
    from scaledkd import ds_config, models
    from scaledkd.config import TrainConfig
    from scaledkd.engine import dist, ds

    folder = make_tiny_bert(tmp_path / "bert3", num_labels=3)
    dist.init(120)
    cfg = ds_config.teacher_ds_config(ds_config.read_ds_config(str(REPO / "ds_configs" / "teacher_zero3.json")),
                                      TrainConfig(batch_size=2), dist.world_size())
    with ds.load_context(cfg), pytest.raises(ValueError) as err:
        models.load_pretrained(str(folder), "classification", 2)
    message = str(err.value)
    assert "'classifier.weight'" in message and "[3, 64]" in message and "[2, 64]" in message, message
    assert "different number of labels" in message and "num_labels=2" in message and "3 outputs" in message, message
