"""Run configuration: one dataclass per section, loaded from one YAML file plus dotted overrides.

Unknown keys and bad values fail here, before any process starts, naming the key, the value and
what would be allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A configuration a run cannot start with; the message names the key and the allowed values."""


@dataclass
class ModelConfig:
    """Unet3D arguments (see vdm.model.unet3d)."""

    dim: int = 64
    dim_mults: tuple[int, ...] = (1, 2, 4, 8)
    channels: int = 3
    cond_dim: int | None = None  # None: the data manifest's encoder width (0: unconditional)
    attn_heads: int = 8
    attn_dim_head: int = 32
    init_kernel_size: int = 7
    resnet_groups: int = 8
    use_sparse_linear_attn: bool = True
    gradient_checkpointing: bool = False
    frame_cond: bool = True  # per-frame conditioning from (text, frame index): what moves where, when
    temporal_pos: bool = True  # absolute frame position in every temporal attention's input
    temporal_conv: bool = True  # a residual 1D convolution across frames in every level (pseudo-3D)
    spatial_pos: bool = True  # pixel coordinates as two extra input channels


@dataclass
class DiffusionConfig:
    """GaussianDiffusion arguments (see vdm.diffusion.gaussian)."""

    timesteps: int = 1000
    beta_schedule: str = "cosine"
    objective: str = "eps"
    loss_type: str = "l1"
    cond_drop_prob: float = 0.1
    use_dynamic_thres: bool = False
    dynamic_thres_percentile: float = 0.9
    min_snr_gamma: float | None = None
    offset_noise: float = 0.0
    zero_terminal_snr: bool = False
    prob_focus_present: float = 0.0


@dataclass
class DataConfig:
    """Where the shards are and how they are streamed (see vdm.data.stream)."""

    shards: typing.Any = ""  # a vdm-shard directory, a brace pattern, a list, or pipe: commands
    val_shards: typing.Any = None  # validation spec; None: the val/ folder beside `shards` if any; "": none
    weights: list[float] | None = None  # mix several datasets (one per entry of `shards`)
    mode: str = "epoch"  # epoch: each sample once per epoch; resampled: infinite stream
    num_workers: int = 2
    shuffle_buffer: int = 256
    hflip: bool = False
    frames: int | None = None  # None: from the manifest (required for pipe: sources)
    image_size: int | None = None


@dataclass
class TrainConfig:
    """Optimisation, precision, DeepSpeed and checkpointing."""

    output_dir: str = "runs/default"
    steps: int = 1000
    micro_batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    lr_schedule: str = "cosine"
    warmup_steps: int = 100
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    precision: str = "bf16"
    zero_stage: int = 2
    deepspeed_config: str | None = None  # a DeepSpeed JSON whose keys override the generated ones
    ema_decay: float = 0.995
    ema_update_every: int = 1
    ema_start_step: int = 0
    save_every: int = 500
    keep_last: int = 3
    seed: int = 0
    max_bad_steps: int = 20  # consecutive non-finite losses before the run stops
    stop_at: int | None = None  # save and exit at this step, schedule still to `steps` (chained jobs)


@dataclass
class LogConfig:
    """TensorBoard and console logging."""

    log_every: int = 10
    tensorboard: bool = True
    sample_every: int = 0  # 0: no sample videos during training
    sample_prompts: list[str] = field(default_factory=list)
    sample_steps: int = 20
    val_every: int = 0  # steps between validation losses on data.val_shards (and at the end); 0: off
    val_max_videos: int = 256  # the first N validation videos, all ranks together (0: all)


@dataclass
class SampleConfig:
    """Defaults for vdm-sample."""

    sampler: str = "dpmpp"
    steps: int = 20
    cond_scale: float = 5.0
    guidance_rescale: float = 0.0
    num_samples: int = 1
    format: str = "gif"
    fps: int = 8
    seed: int = 0


@dataclass
class Config:
    """A whole run: one section per component."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _choices() -> dict[str, tuple]:
    from vdm.diffusion import BETA_SCHEDULES, LOSS_TYPES, OBJECTIVES, SAMPLERS

    return {
        "diffusion.beta_schedule": BETA_SCHEDULES,
        "diffusion.objective": OBJECTIVES,
        "diffusion.loss_type": LOSS_TYPES,
        "data.mode": ("epoch", "resampled"),
        "train.lr_schedule": ("cosine", "constant"),
        "train.precision": ("bf16", "fp16", "fp32"),
        "train.zero_stage": (0, 1, 2, 3),
        "sample.sampler": SAMPLERS,
        "sample.format": ("gif", "mp4", "png"),
    }


def _coerce(key: str, value, hint):
    """Check ``value`` against the dataclass field type ``hint``, converting lists to tuples."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else typing.Any
        items = [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is float and isinstance(value, str):
        try:  # PyYAML reads `1e-4` (no dot) as a string
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected float, got {value!r}") from None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint in (int, float, str) and (not isinstance(value, hint) or isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def section_from_dict(cls, data: dict, prefix: str = ""):
    """Build config dataclass `cls` from a plain dict, checking keys and value types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a mapping of keys to values, got {data!r}")
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint} (keys of {prefix.rstrip('.') or 'the config'}: "
                              f"{', '.join(names)})")
    values = {}
    for name in names:
        if name not in data:
            continue
        if dataclasses.is_dataclass(hints[name]):
            values[name] = section_from_dict(hints[name], data[name] or {}, f"{prefix}{name}.")
        else:
            values[name] = _coerce(prefix + name, data[name], hints[name])
    return cls(**values)


def _set_dotted(data: dict, dotted: str, raw: str) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(raw) if raw != "" else ""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config, apply ``key.sub=value`` overrides (values parsed as YAML), validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), raw)
    config = section_from_dict(Config, data, "")
    validate(config)
    return config


def validate(config: Config) -> None:
    """Check choices and ranges; raise ConfigError naming the key, the value and what is allowed."""
    for dotted, allowed in _choices().items():
        section, key = dotted.split(".")
        value = getattr(getattr(config, section), key)
        if value not in allowed:
            raise ConfigError(f"{dotted}: {value!r} is not one of {', '.join(map(str, allowed))}")
    positive = {"model.dim": config.model.dim, "model.channels": config.model.channels,
                "diffusion.timesteps": config.diffusion.timesteps, "train.steps": config.train.steps,
                "train.micro_batch_size": config.train.micro_batch_size, "train.grad_accum": config.train.grad_accum,
                "train.save_every": config.train.save_every, "train.keep_last": config.train.keep_last,
                "log.log_every": config.log.log_every, "sample.steps": config.sample.steps}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value!r}")
    unit = {"diffusion.cond_drop_prob": config.diffusion.cond_drop_prob,
            "diffusion.prob_focus_present": config.diffusion.prob_focus_present,
            "train.ema_decay": config.train.ema_decay, "train.min_lr_ratio": config.train.min_lr_ratio}
    for key, value in unit.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key}: must be in [0, 1], got {value!r}")
    if not config.model.dim_mults or any(m <= 0 for m in config.model.dim_mults):
        raise ConfigError(f"model.dim_mults: must be positive integers, got {config.model.dim_mults!r}")
    if config.train.lr <= 0:
        raise ConfigError(f"train.lr: must be > 0, got {config.train.lr!r}")
    if config.data.num_workers < 0:
        raise ConfigError(f"data.num_workers: must be >= 0, got {config.data.num_workers!r}")
    _validate_validation(config)


def _validate_validation(config: Config) -> None:
    """The validation keys: log.val_every and log.val_max_videos, and data.val_shards when it is needed."""
    for key in ("val_every", "val_max_videos"):
        if getattr(config.log, key) < 0:
            raise ConfigError(f"log.{key}: must be >= 0, got {getattr(config.log, key)!r}")
    spec = config.data.val_shards
    if spec is not None and spec is not False and not isinstance(spec, (str, list, dict)):
        raise ConfigError(f"data.val_shards: expected a shard spec (a vdm-shard directory, a brace pattern, a "
                          f"list), null (the val/ folder beside data.shards) or \"\" (none), got {spec!r}")
    if config.log.val_every and spec in ("", False, []):
        raise ConfigError(f"log.val_every={config.log.val_every} needs validation shards but data.val_shards is "
                          f"{spec!r} (none); set data.val_shards to a spec or null (the val/ folder beside "
                          f"data.shards), or log.val_every=0")
