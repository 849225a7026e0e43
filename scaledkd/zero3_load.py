"""ZeRO-3 loading that never holds a whole model on a rank: each rank reads its own partition from the safetensors.

transformers' ZeRO-3 ``from_pretrained`` reads every checkpoint tensor on rank 0 (the other ranks map them on
``meta``), then gathers each module on every rank to copy the values in: each rank's memory passes through the
whole checkpoint (rank 0) or every module in turn, plus allocator growth. Issue 13 measured +1 x teacher bytes of
anonymous memory per rank while loading a 230 M teacher on 2 ranks, where the partition is 1/2 of it.

Here the model is built under ``deepspeed.zero.Init`` with weight initialisation switched off (each module's
parameters are allocated whole for a moment and partitioned as soon as the module is built), then every parameter's
partition (``param.ds_tensor``: elements ``[r * p, (r + 1) * p)`` of the row-major flattening, ``p = ceil(numel /
N)``, the last partition zero-padded) is filled from the checkpoint by reading only those elements
(:class:`SafetensorsFile`: one contiguous byte range per partition, read with plain file reads into the
partition itself, or through a host buffer of its size when the partition is on the GPU). No collective runs, no
rank reads another rank's elements, and nothing is memory-mapped.

Used by :func:`scaledkd.models.load_pretrained` while a stage-3 ``HfDeepSpeedConfig`` is alive (the engine's load
context). A checkpoint whose names do not line up with the model's (legacy names, a missing trained tensor, a
GGUF or ``.bin`` file) returns None and the caller uses transformers' own loader.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path

import torch
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel

log = logging.getLogger("scaledkd")


def safetensors_files(folder: Path) -> list[Path] | None:
    """The safetensors file(s) of a local model folder (single file or sharded index), or None."""
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in shards]
    return None


def zero3_enabled() -> bool:
    """A stage-3 ``HfDeepSpeedConfig`` is alive: models loaded now are to be partitioned."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())


# safetensors dtype names -> torch dtypes (the format's header spells them so).
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class SafetensorsFile:
    """Element ranges of the tensors of one ``.safetensors`` file, read with plain file reads.

    The format is an 8-byte little-endian header length, a JSON header (``dtype``, ``shape``, ``data_offsets``
    per tensor) and the row-major bytes of each tensor. A flat element range of a tensor is therefore one
    contiguous byte range, read with ``readinto`` straight into the destination: no memory map (whose touched pages
    would count in the process's RSS until the file is closed) and no copy of anything outside the range.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            try:
                header = json.loads(f.read(size))
            except (ValueError, MemoryError, OverflowError):
                raise ValueError(f"{path}: the safetensors header cannot be read; the file is truncated or corrupt "
                                 "(an interrupted copy or download?): copy it again") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + size
        self.tensors = header

    def keys(self):
        return self.tensors.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        name = self.tensors[key]["dtype"]
        if name not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {key!r} has dtype {name}, which scaledkd cannot load partitioned")
        return _DTYPES[name]

    def read_into(self, key: str, start: int, out: torch.Tensor) -> None:
        """Fill ``out`` (contiguous, 1-D, this tensor's dtype) with elements ``[start, start + out.numel())`` of the
        tensor's row-major flattening.

        A file read can only write host memory: an ``out`` elsewhere (a ZeRO-3 partition on the GPU, where it lives
        unless parameters are offloaded) gets the range through a host buffer of its size.
        """
        dtype = self.dtype(key)
        if out.dtype != dtype or not out.is_contiguous():
            raise ValueError(f"read_into {key!r}: needs a contiguous {dtype} buffer, got {out.dtype}")
        if out.device.type != "cpu":
            out.copy_(self.read(key, start, start + out.numel()))
            return
        begin = self.data_start + self.tensors[key]["data_offsets"][0] + start * out.element_size()
        view = memoryview(out.view(torch.uint8).numpy())
        with open(self.path, "rb", buffering=0) as f:
            f.seek(begin)
            done = 0
            while done < len(view):  # readinto may return less than asked
                n = f.readinto(view[done:])
                if not n:
                    raise ValueError(f"{self.path}: truncated while reading {key!r} (an interrupted copy?)")
                done += n

    def read(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of the row-major flattening of tensor ``key``: ``[stop - start]``."""
        out = torch.empty(stop - start, dtype=self.dtype(key))
        self.read_into(key, start, out)
        return out


@contextlib.contextmanager
def _partitioned_construction(dtype: torch.dtype | None):
    """Build modules with their parameters partitioned at construction and no weight initialisation.

    The same contexts transformers' ZeRO-3 ``from_pretrained`` enters, plus its ``set_zero3_state`` marker so the
    model's own constructor does not open a second ``zero.Init`` (nor re-initialise every module gathered) inside.
    """
    import deepspeed
    from transformers import initialization
    from transformers.integrations import deepspeed_config
    from transformers.integrations.deepspeed import prevent_arange_dtype_change
    from transformers.modeling_utils import set_zero3_state

    with contextlib.ExitStack() as stack:
        stack.enter_context(initialization.no_init_weights())
        stack.enter_context(prevent_arange_dtype_change())  # RoPE buffers keep their explicit dtypes
        kwargs = {"dtype": dtype} if dtype is not None else {}
        stack.enter_context(deepspeed.zero.Init(config_dict_or_path=deepspeed_config(), **kwargs))
        stack.enter_context(set_zero3_state())
        yield


def _checkpoint_names(model: PreTrainedModel, handles: dict[str, object]) -> dict[str, str] | None:
    """Model parameter/buffer name -> checkpoint key, for every parameter; None when one is not in the checkpoint.

    A name is found as it is, without the base-model prefix (a bare encoder saved without ``bert.``) or with it,
    or through any other name of the same (tied) parameter.
    """
    base = model.base_model_prefix
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)

    def find(name: str) -> str | None:
        for candidate in (name, name.removeprefix(f"{base}."), f"{base}.{name}"):
            if candidate in handles:
                return candidate
        return None

    names: dict[str, str] = {}
    for name, param in model.named_parameters():
        found = next((key for alias in aliases[id(param)] if (key := find(alias)) is not None), None)
        if found is None:
            log.info("partitioned load: %s is not in the checkpoint under that name; using transformers' loader", name)
            return None
        names[name] = found
    for name, _ in model.named_buffers():
        found = find(name)
        if found is not None:
            names[name] = found
    return names


def _shape_mismatch(folder: Path, key: str, stored: tuple[int, ...], name: str, wanted: tuple[int, ...],
                    num_labels: int) -> str:
    """The error for checkpoint tensor ``key`` (shape ``stored``) that cannot fill the model's ``name`` (``wanted``).

    The model is built from the folder's own config.json, so only what the run changes in it can disagree with
    the weights: the task's ``num_labels``, i.e. a classifier head trained for another label set.
    """
    head = len(stored) == len(wanted) >= 1 and stored[1:] == wanted[1:] and wanted[0] == num_labels
    cause = (f"the checkpoint's head has {stored[0]} outputs and this run's task has num_labels={num_labels}"
             if head else f"the run's task sets num_labels={num_labels} and the checkpoint's head may have another "
                          "number of outputs; failing that, config.json does not describe these weights")
    return (f"{folder}: checkpoint tensor {key!r} has shape {list(stored)}, but the model built for this run needs "
            f"{name!r} with shape {list(wanted)}. Likely cause: a head for a different number of labels ({cause}). "
            "Use a checkpoint for this task's labels, or its base model without the task head")


def load_partitioned(folder: Path, config: PretrainedConfig, model_class,
                     dtype: torch.dtype | None = None) -> PreTrainedModel | None:
    """``model_class`` (an Auto class) from the safetensors of ``folder``, partitioned across the ZeRO-3 group.

    Call on every rank of the group, inside a stage-3 load context. Returns None (nothing loaded, nothing to undo
    but a partitioned empty model) when ``folder`` has no safetensors or the names do not line up.

    Raises:
        ValueError: a checkpoint tensor's shape differs from the model's (names both).
    """
    from transformers.integrations import deepspeed_config

    files = safetensors_files(folder)
    offload = ((deepspeed_config() or {}).get("zero_optimization", {}).get("offload_param") or {}).get("device")
    if files is None or offload == "nvme":  # NVMe partitions live in swap files DeepSpeed manages
        return None
    with _partitioned_construction(dtype):
        model = model_class.from_config(config, **({"dtype": dtype} if dtype is not None else {}))
    model.tie_weights()  # what transformers' ZeRO-3 path does after construction: tied heads share the partition
    handles = {}
    for file in files:
        handle = SafetensorsFile(file)
        handles.update({key: handle for key in handle.keys()})
    names = _checkpoint_names(model, handles)
    if names is None:
        return None
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, key in names.items():
            handle = handles[key]
            stored = handle.shape(key)
            if name not in params:  # a persistent buffer: small and not partitioned, read whole
                buffer = model.get_buffer(name)
                buffer.copy_(handle.read(key, 0, math.prod(stored)).reshape(stored).to(buffer.dtype))
                continue
            param = params[name]
            if stored != tuple(param.ds_shape):
                raise ValueError(_shape_mismatch(folder, key, stored, name, tuple(param.ds_shape), config.num_labels))
            part = param.ds_tensor
            size = part.ds_numel
            start = size * param.ds_zero_partition_rank
            stop = min(start + size, param.ds_numel)
            part.zero_()  # the last rank's padding
            if start < stop and handle.dtype(key) == part.dtype:
                handle.read_into(key, start, part[:stop - start])  # into the partition (host-staged on a GPU)
            elif start < stop:
                part[:stop - start].copy_(handle.read(key, start, stop).to(part.dtype))
    if model.can_generate() and (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    model.eval()  # as from_pretrained returns it
    log.info("partitioned load: %s read as %d partition(s) of %d tensor(s)", folder,
             torch.distributed.get_world_size(), len(names))
    return model
