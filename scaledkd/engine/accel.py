"""Who builds the DeepSpeed engines: ``deepspeed.initialize`` directly, or Accelerate's DeepSpeed integration.

Both factories answer the same two calls, so ``run.setup`` and the loop never know which one they have:

- ``load_context(role)``: the block in which the ``"teacher"``'s or ``"student"``'s model is loaded; a ZeRO-3
  role partitions at load time inside it. ``None`` is a rank-local load (a student copied from teacher layers):
  nothing partitions.
- ``initialize(role, model, optimizer=None, lr_scheduler=None)``: that role's ``DeepSpeedEngine``.

With Accelerate (``train.backend: accelerate``, or ``auto`` under ``accelerate launch`` with DeepSpeed), the
recipe's two DeepSpeed configs become two named plugins of one ``Accelerator``, ``"student"`` and ``"teacher"``,
and each model is prepared under its own plugin (accelerate's "multiple DeepSpeed models" API). The configs are
the ones ``ds.student_ds_config``/``ds.teacher_ds_config`` resolved, so both backends build identical engines.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import logging
import os
from collections.abc import Iterator
from typing import Any, Literal

import torch

from ..config import ConfigError, TrainConfig
from . import dist, ds

log = logging.getLogger("scaledkd")

Role = Literal["student", "teacher"]
LAUNCH_FLAG = "ACCELERATE_USE_DEEPSPEED"

# `accelerate launch` options that would configure DeepSpeed behind the recipe's back. The recipe's ds_configs
# and train.* are the only source of these settings; the launcher says where processes run, nothing more.
_LAUNCHER_DS_SETTINGS = {
    "ACCELERATE_DEEPSPEED_ZERO_STAGE": "zero_optimization.stage in student.ds_config / teacher.ds_config",
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "zero_optimization.offload_optimizer in student.ds_config",
    "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "zero_optimization.offload_param in the ds_configs",
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_NVME_PATH": "zero_optimization.offload_optimizer in student.ds_config",
    "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_NVME_PATH": "zero_optimization.offload_param in the ds_configs",
    "ACCELERATE_DEEPSPEED_ZERO3_INIT": "zero_optimization.stage: 3 in the ds_configs (partitioned loading)",
    "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "stage3_gather_16bit_weights_on_model_save in student.ds_config",
    "ACCELERATE_DEEPSPEED_CONFIG_FILE": "student.ds_config and teacher.ds_config",
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "train.grad_accum",
    "ACCELERATE_GRADIENT_CLIPPING": "train.grad_clip",
}
_PRECISION_NAMES = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def launched_by_accelerate() -> bool:
    """True in a process that ``accelerate launch`` started with its DeepSpeed launcher.

    ``ACCELERATE_USE_DEEPSPEED`` is what Accelerate itself reads to turn DeepSpeed on, and its DeepSpeed launcher
    (``distributed_type: DEEPSPEED`` or ``--use_deepspeed``) always sets it; the ``ACCELERATE_DEEPSPEED_*``
    variables appear only for options given on the command line or in the YAML.
    """
    return os.environ.get(LAUNCH_FLAG, "false").lower() == "true"


def resolve_backend(backend: str) -> Literal["deepspeed", "accelerate"]:
    if backend == "auto":
        return "accelerate" if launched_by_accelerate() else "deepspeed"
    if backend not in ("deepspeed", "accelerate"):
        raise ConfigError(f"train.backend={backend!r} is not valid; choose one of ['auto', 'deepspeed', 'accelerate']")
    return backend  # type: ignore[return-value]


class DeepSpeedEngines:
    """``deepspeed.initialize`` per role, each with its own config (``ds.load_context`` around ZeRO-3 loads)."""

    name = "deepspeed"

    def __init__(self, configs: dict[Role, dict[str, Any] | None]) -> None:
        self.configs = configs

    def load_context(self, role: Role | None):
        return ds.load_context(self.configs[role] if role else None)

    def initialize(self, role: Role, model, optimizer=None, lr_scheduler=None):
        return ds.initialize(model, self.configs[role], optimizer=optimizer, lr_scheduler=lr_scheduler)


def check_launcher_settings(train: TrainConfig, environ: dict[str, str] | os._Environ = os.environ) -> None:
    """Fail on ``accelerate launch`` DeepSpeed/precision options that the recipe's settings would contradict."""
    for var, where in _LAUNCHER_DS_SETTINGS.items():
        if environ.get(var) not in (None, "", "none"):
            option = var.removeprefix("ACCELERATE_").removeprefix("DEEPSPEED_").lower()
            raise ConfigError(
                f"accelerate launch set {option}={environ[var]!r} ({var}); scaledkd takes it from the recipe: set "
                f"{where} and remove it from the accelerate config/command line"
            )
    mixed = environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if mixed not in ("no", _PRECISION_NAMES[train.precision]):
        raise ConfigError(
            f"accelerate launch set mixed_precision={mixed!r} but the recipe has train.precision={train.precision!r}; "
            "precision comes from train.precision: use mixed_precision 'no' in the accelerate config"
        )


class AccelerateEngines:
    """Accelerate's DeepSpeed integration with one plugin per role (``"student"``, ``"teacher"``).

    Selecting a plugin makes its config the one transformers sees (``HfDeepSpeedConfig``), which is what makes a
    ZeRO-3 ``from_pretrained`` partition at load time; it is dropped again after every load and prepare, so a
    rank-local load (a student copied from teacher blocks, an export) never waits for ranks that are not loading.
    """

    name = "accelerate"

    def __init__(self, configs: dict[Role, dict[str, Any] | None], train: TrainConfig) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin, DistributedType, InitProcessGroupKwargs

        check_launcher_settings(train)
        # Accelerate refuses a config file when ACCELERATE_CONFIG_DS_FIELDS lists launcher fields (it always lists
        # mixed_precision when the YAML names one); check_launcher_settings made the equivalent check above.
        fields = os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
        try:
            plugins = {role: DeepSpeedPlugin(hf_ds_config=copy.deepcopy(cfg)) for role, cfg in configs.items()
                       if cfg is not None}
        finally:
            if fields is not None:
                os.environ["ACCELERATE_CONFIG_DS_FIELDS"] = fields
        # Without an explicit gloo backend on CPU every process would silently become rank 0 of a world of 1.
        group = InitProcessGroupKwargs(backend="nccl" if torch.cuda.is_available() else "gloo",
                                       timeout=datetime.timedelta(seconds=train.dist_timeout_s))
        self.accelerator = Accelerator(deepspeed_plugins=plugins, kwargs_handlers=[group])
        state = self.accelerator.state
        if state.distributed_type != DistributedType.DEEPSPEED:
            raise ConfigError(
                f"Accelerate did not enable DeepSpeed (distributed_type={state.distributed_type}); "
                "`accelerate launch --cpu` and use_cpu: true turn DeepSpeed off: use launch/accelerate/cpu_test.yaml"
            )
        if state.num_processes != dist.world_size():
            raise RuntimeError(f"Accelerate sees {state.num_processes} processes, the process group "
                               f"{dist.world_size()}; the launcher and the engine disagree about the world")
        self._unset()  # the Accelerator selected the first plugin; nothing is loaded yet

    @staticmethod
    def _unset() -> None:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()

    @contextlib.contextmanager
    def load_context(self, role: Role | None) -> Iterator[None]:
        self._unset()
        if role is not None:
            self.accelerator.state.select_deepspeed_plugin(role)
        try:
            yield
        finally:
            self._unset()

    def initialize(self, role: Role, model, optimizer=None, lr_scheduler=None):
        self.accelerator.state.select_deepspeed_plugin(role)
        try:
            prepared = self.accelerator.prepare(model, optimizer) if optimizer is not None else \
                self.accelerator.prepare(model)
        finally:
            self._unset()
        engine = prepared[0] if isinstance(prepared, tuple) else prepared
        if optimizer is None:
            # A frozen (inference) engine: keep accelerator.backward() free for the engine that trains.
            self.accelerator.deepspeed_engine_wrapped = None
        if lr_scheduler is not None:
            # Accelerate passes DeepSpeed only DeepSpeed's own scheduler types; a torch scheduler is attached the way
            # deepspeed.initialize(lr_scheduler=...) attaches it, so engine.step() steps it and checkpoints hold it.
            engine.lr_scheduler = lr_scheduler
        return engine


def engine_factory(train: TrainConfig, student: dict[str, Any], teacher: dict[str, Any] | None
                   ) -> DeepSpeedEngines | AccelerateEngines:
    """The factory ``train.backend`` asks for, holding the resolved student and teacher DeepSpeed configs."""
    configs: dict[Role, dict[str, Any] | None] = {"student": student, "teacher": teacher}
    backend = resolve_backend(train.backend)
    factory = AccelerateEngines(configs, train) if backend == "accelerate" else DeepSpeedEngines(configs)
    log.info("DeepSpeed engines built by %s (train.backend=%s)", factory.name, train.backend)
    return factory
