"""DeepSpeed engines: the ZeRO-3 load context and ``deepspeed.initialize``. The configs themselves are resolved as
data by :mod:`scaledkd.ds_config` (one config for the student, its own for the teacher)."""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

from ..ds_config import zero_stage

# DeepSpeed 0.19's ZeRO calls torch.distributed.reduce_scatter_tensor / all_gather_into_tensor, which torch 2.13 marks
# deprecated: a FutureWarning per collective (the once-per-location rule is reset whenever code enters
# warnings.catch_warnings), i.e. dozens per step with a model-sized reduce bucket. Nothing a user can act on.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is "
                        "deprecated", category=FutureWarning)


@contextlib.contextmanager
def load_context(ds_config: dict[str, Any] | None) -> Iterator[None]:
    """Partition at load time under ZeRO-3, and only for the model loaded inside this block.

    transformers partitions every ``from_pretrained`` while a stage-3 ``HfDeepSpeedConfig`` is alive, and a
    partitioned load needs all ranks. Keeping the config alive only around one model's load lets the teacher and
    the student use different stages, and keeps rank-local loads (student built from teacher layers, export)
    from deadlocking.
    """
    if ds_config is None or zero_stage(ds_config) != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841  (weakly referenced by transformers while alive)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep


def initialize(model, ds_config: dict[str, Any], optimizer=None, lr_scheduler=None):
    """``deepspeed.initialize`` with scaledkd's process group; returns the engine."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=ds_config,
        dist_init_required=False,
    )
    return engine
