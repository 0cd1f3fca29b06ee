"""DeepSpeed: the engine's JSON config generated from the `train` section, and initialisation."""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from vdm.config import ConfigError, TrainConfig


@dataclass(frozen=True)
class DistInfo:
    """Who this process is; read once from the launcher's environment, passed everywhere else."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1  # ranks on this machine

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, environ) -> "DistInfo":
        # torchrun says LOCAL_WORLD_SIZE, DeepSpeed's launcher LOCAL_SIZE
        local = environ.get("LOCAL_WORLD_SIZE", environ.get("LOCAL_SIZE", 1))
        return cls(rank=int(environ.get("RANK", 0)), local_rank=int(environ.get("LOCAL_RANK", 0)),
                   world_size=int(environ.get("WORLD_SIZE", 1)), local_world_size=int(local))


def set_cpu_threads(dist: DistInfo, environ) -> int:
    """Share the cores between the ranks of this machine: on CPU, oversubscribed OpenMP threads
    made a training step about 10x slower. An explicit OMP_NUM_THREADS is respected."""
    if "OMP_NUM_THREADS" not in environ and not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.local_world_size))
    return torch.get_num_threads()


PRECISION_DTYPES = {  # train.precision -> torch dtype (autocast, the accelerator check)
    "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def autocast(device: torch.device, precision: str):
    """Autocast alongside DeepSpeed's bf16/fp16 weights: norms and softmax stay fp32, inputs get cast."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISION_DTYPES[precision])


def check_precision(train: TrainConfig) -> None:
    """Fail at start, naming the key, when this machine's DeepSpeed accelerator cannot train in
    `train.precision`: DeepSpeed's CPU accelerator takes fp16 only where oneDNN has fp16 kernels
    (AVX512-FP16 or AMX-FP16; not on AMD Zen 4, for one), and otherwise raises deep in initialize."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    supported = [name for name, dtype in PRECISION_DTYPES.items() if dtype in accelerator.supported_dtypes()]
    if train.precision not in supported:
        raise ConfigError(f"train.precision: {train.precision} is not supported on this machine "
                          f"(DeepSpeed accelerator '{accelerator.device_name()}'); allowed here: {', '.join(supported)}")


def deepspeed_config(train: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed config dict for `train`; keys of `train.deepspeed_config` (a JSON file) override."""
    config = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": train.lr, "betas": list(train.betas),
                                                   "weight_decay": train.weight_decay, "eps": 1e-8}},
        "bf16": {"enabled": train.precision == "bf16"},
        # Dynamic loss scale; DeepSpeed skips overflowing steps and we count them (engine.skipped_steps).
        "fp16": {"enabled": train.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 500, "hysteresis": 2, "min_loss_scale": 1},
        "zero_optimization": {"stage": train.zero_stage, "overlap_comm": False,
                              "contiguous_gradients": True},
        "steps_per_print": 10**9,  # our own logger reports progress
        "wall_clock_breakdown": False,
    }
    if train.deepspeed_config:
        path = Path(train.deepspeed_config)
        if not path.is_file():
            raise FileNotFoundError(f"train.deepspeed_config: {path} does not exist")
        _merge(config, json.loads(path.read_text()))
    return config


def _merge(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def lr_lambda(train: TrainConfig):
    """Linear warmup then cosine decay to `min_lr_ratio` (or constant), as a LambdaLR factor."""
    def factor(step: int) -> float:
        if train.warmup_steps and step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        if train.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps))
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def initialize(module: torch.nn.Module, train: TrainConfig, world_size: int):
    """Wrap `module` in a DeepSpeed engine with AdamW and our LR schedule; returns the engine."""
    import deepspeed

    config = deepspeed_config(train, world_size)
    # DeepSpeed needs contiguous parameters (it broadcasts them viewed as bytes and flattens them
    # into its buffers); Unet3D keeps its conv weights channels-last for standalone use.
    module.to(memory_format=torch.contiguous_format)
    params = [p for p in module.parameters() if p.requires_grad]

    def scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train))

    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=params, config=config,
                                           lr_scheduler=scheduler)
    return engine


# DeepSpeed's CPU backend gives each rank a shared-memory segment for its intra-node allreduce,
# named after the launcher's address and port, and never unlinks it: without cleanup every run
# leaves world_size x ~66 MiB in /dev/shm (RAM) until reboot.
SHM_ALLREDUCE_DIR = Path("/dev/shm")


def shm_allreduce_segment(rank: int, environ) -> Path:
    """Path of this rank's DeepSpeed allreduce segment (its name as DeepSpeed's shm.cpp builds it)."""
    addr, port = environ.get("MASTER_ADDR", ""), environ.get("MASTER_PORT", "")
    return SHM_ALLREDUCE_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def init_distributed() -> None:
    """Start the process group (gloo on CPU, NCCL on GPU), chosen by DeepSpeed's accelerator.

    On CPU, once every rank has mapped every other rank's allreduce segment (a barrier), each
    rank unlinks its own: the mappings stay valid and the memory is freed when the processes
    exit, even if they are killed. (GPU accelerators have no such segment, and a NCCL barrier
    here would run before DeepSpeed picks each rank's device.)
    """
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    deepspeed.init_distributed()
    if get_accelerator().device_name() == "cpu":
        dist.barrier()
        shm_allreduce_segment(dist.get_rank(), os.environ).unlink(missing_ok=True)


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of a small tensor over all ranks (used for logging and for agreeing on skipping a step)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def all_reduce_sum(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum of a small tensor over all ranks, reduced on `device` (the engine's: NCCL reduces no CPU
    tensors); the result stays there. Without a process group, the values themselves."""
    import torch.distributed as dist

    values = values.to(device, copy=True)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
    return values


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
