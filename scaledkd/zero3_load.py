"""ZeRO-3 loading that never holds a whole model on a rank: each rank reads its own partition from the safetensors.

transformers' ZeRO-3 ``from_pretrained`` reads every checkpoint tensor on rank 0 (the other ranks map them on
``meta``), then gathers each module on every rank to copy the values in: each rank's memory passes through the
whole checkpoint (rank 0) or every module in turn, plus allocator growth. Issue 13 measured +1 x teacher bytes of
anonymous memory per rank while loading a 230 M teacher on 2 ranks, where the partition is 1/2 of it.

Here the model is built under ``deepspeed.zero.Init`` with weight initialisation switched off (each module's
parameters are allocated whole for a moment and partitioned as soon as the module is built), then every parameter's
partition (``param.ds_tensor``: elements ``[r * p, (r + 1) * p)`` of the row-major flattening, ``p = ceil(numel /
N)``, the last partition zero-padded) is filled from the checkpoint by reading only the rows that hold those
elements (``safe_open(...).get_slice``). No collective runs, no rank reads another rank's elements, and each rank
touches about 1/N of the files' pages.

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


def read_flat_range(handle, key: str, shape: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
    """Elements ``[start, stop)`` of the row-major flattening of checkpoint tensor ``key`` (shape ``shape``).

    Reads only the rows (slices along dim 0) that hold them: at most two rows more than ``stop - start`` elements.

    Returns:
        ``[stop - start]`` tensor in the checkpoint's dtype.
    """
    if not shape:  # a scalar
        return handle.get_tensor(key).reshape(-1)[start:stop]
    row = math.prod(shape[1:])
    first, last = start // row, -(-stop // row)
    rows = handle.get_slice(key)[first:last].reshape(-1)
    return rows[start - first * row:stop - first * row]


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


def load_partitioned(folder: Path, config: PretrainedConfig, model_class,
                     dtype: torch.dtype | None = None) -> PreTrainedModel | None:
    """``model_class`` (an Auto class) from the safetensors of ``folder``, partitioned across the ZeRO-3 group.

    Call on every rank of the group, inside a stage-3 load context. Returns None (nothing loaded, nothing to undo
    but a partitioned empty model) when ``folder`` has no safetensors or the names do not line up.

    Raises:
        ValueError: a checkpoint tensor's shape differs from the model's (names both).
    """
    from safetensors import safe_open

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
        handle = safe_open(str(file), framework="pt")
        handles.update({key: handle for key in handle.keys()})
    names = _checkpoint_names(model, handles)
    if names is None:
        return None
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, key in names.items():
            handle = handles[key]
            stored = tuple(handle.get_slice(key).get_shape())
            if name not in params:  # a persistent buffer: small and not partitioned, read whole
                buffer = model.get_buffer(name)
                buffer.copy_(handle.get_tensor(key).to(buffer.dtype))
                continue
            param = params[name]
            if stored != tuple(param.ds_shape):
                raise ValueError(f"{folder}: checkpoint tensor {key!r} has shape {list(stored)}, the model's {name!r} "
                                 f"{list(param.ds_shape)} (config.json does not describe these weights)")
            part = param.ds_tensor
            size = part.ds_numel
            start = size * param.ds_zero_partition_rank
            stop = min(start + size, param.ds_numel)
            part.zero_()  # the last rank's padding
            if start < stop:
                part[:stop - start].copy_(read_flat_range(handle, key, stored, start, stop).to(part.dtype))
    if model.can_generate() and (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    model.eval()  # as from_pretrained returns it
    log.info("partitioned load: %s read as %d partition(s) of %d tensor(s)", folder,
             torch.distributed.get_world_size(), len(names))
    return model
