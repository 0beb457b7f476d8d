"""Typed job configuration: dataclass schema, YAML loading, dotted CLI overrides, saving."""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from artdist.errors import ConfigError

TASKS = ("style", "artist", "genre")
MAX_IMAGE_SIZE = 2048  # px; the spatial LSTM's positional embedding covers 2048 / 32 = 64 feature-map cells


@dataclass
class SynthConfig:
    """`artdist synth`: a synthetic WikiArt-like corpus in the ArtGAN layout."""

    out: str = "data/synth"
    images: int = 1200
    seed: int = 0
    noise: float = 0.0  # fraction of images given a deliberately wrong label
    size: int = 128  # side of the generated pictures, px


@dataclass
class ShardConfig:
    """`artdist shard`: label files + image folder -> WebDataset tar shards."""

    images: str = "data/synth/images"
    labels: str = "data/synth/labels"
    out: str = "shards/demo"
    split: Literal["artgan", "random"] = "artgan"
    test_fraction: float = 0.1  # artgan: share of train carved out as test
    seed: int = 0  # random split / test carving salt; deterministic from the path either way
    max_short_side: int = 448  # shorter side at most this many px: serves 224-448 px training
    format: Literal["jpeg", "webp", "png"] = "jpeg"
    quality: int = 85  # 90 -> 85: decode 0.2 ms/img faster, shards ~25% smaller (docs/benchmarks.md)
    samples_per_shard: int = 1000
    min_shards: int = 8  # per split, a floor for small splits: shuffling mixes whole shards
    workers: int = 0  # 0: all CPU cores
    max_pixels: int = 200_000_000  # decompression-bomb guard; larger images are skipped and reported


@dataclass
class DataConfig:
    """The training/evaluation input pipeline read from shards."""

    shards: str = "shards/demo"
    image_size: int = 224
    batch_size: int = 64  # per rank
    num_workers: int = 4  # loader processes per rank
    shuffle_buffer: int = 2000
    augment: Literal["crop_flip", "rrc", "none"] = "crop_flip"
    crop_padding: int = 16  # crop_flip: pad before the random crop, as the seeds do
    rrc_scale_min: float = 0.35  # rrc: smallest crop area fraction
    decode: Literal["cpu", "gpu"] = "cpu"
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    # Undecodable samples are skipped and counted; a train epoch or an evaluation stops with an error
    # once more than this fraction of its samples were bad.
    max_bad_fraction: float = 0.001


@dataclass
class ModelConfig:
    """ResNet backbone + LSTM over a sequence read from the feature map + one head per task."""

    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"] = "resnet50"
    weights: str = "none"  # none | imagenet | path to a state_dict file
    sequence: Literal["pooled", "spatial", "rows", "columns"] = "spatial"
    lstm_hidden: int = 512
    lstm_layers: int = 2
    bidirectional: bool = True
    dropout: float = 0.1
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    primary_task: str = "style"


@dataclass
class TrainConfig:
    """Optimisation and run control."""

    epochs: int = 10
    lr: float = 1e-3  # head + LSTM, for the global batch of batch_size*world*accum_steps
    backbone_lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0  # 0 disables
    accum_steps: int = 1
    label_smoothing: float = 0.1
    class_weighting: Literal["none", "inverse", "inverse_sqrt"] = "inverse_sqrt"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 if supported, fp16 on older GPUs, off on CPU
    channels_last: bool = True
    compile: bool = False  # torch.compile the backbone only (dynamo graph-breaks on nn.LSTM)
    seed: int = 0
    deterministic: bool = False
    device: Literal["auto", "cuda", "cpu"] = "auto"
    best_metric: str = ""  # e.g. "style/macro_f1"; empty: macro-F1 of model.primary_task
    log_every: int = 20  # steps between console/TensorBoard train logs
    stop_after_steps: int = 0  # testing aid: exit (as if killed) after this many global steps; 0 = never


@dataclass
class OutlierConfig:
    """Outlier scoring and reports."""

    enabled: bool = True  # write val-split reports at the end of training
    threshold: float = 0.6  # the seeds' max-softmax rule
    top_k: int = 50  # outliers per task shown in HTML/TensorBoard
    flag_fraction: float = 0.05  # share of samples flagged by the combined score
    planted: str = ""  # planted_noise.csv from `artdist synth --noise`: measure AUROC/precision@k against it


@dataclass
class SlurmConfig:
    """Defaults for `artdist submit` (each also a command-line flag)."""

    partition: str = ""
    account: str = ""
    qos: str = ""
    nodes: int = 1
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    mem_gb: int = 0  # 0: SLURM's default
    time_min: int = 240
    signal_delay_s: int = 120
    max_num_timeout: int = 20
    constraint: str = ""


@dataclass
class JobConfig:
    """One training job: everything a run needs, saved into its run directory."""

    name: str = "demo"
    out_dir: str = ""  # empty: runs/<name>
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    outliers: OutlierConfig = field(default_factory=OutlierConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir or f"runs/{self.name}")


# --------------------------------------------------------------------------- conversion


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check/convert one YAML or CLI value against the field's annotation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if isinstance(value, bool):
            # YAML 1.1 reads an unquoted off/on/no/yes as a bool: give back the word this field allows.
            words = [w for w in (("on", "yes", "true") if value else ("off", "no", "false")) if w in args]
            value = words[0] if words else value
        if value not in args:
            raise ConfigError(f"{source}: {key} = {value!r} is not one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key, source)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        return [_convert(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads 3e-4 (no dot) as a string; accept what float() accepts.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
    return value


def _build(cls: type, data: Any, prefix: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix[:-1] or 'the top level'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(
                f"{source}: unknown key '{dotted}'. Valid keys{' under ' + prefix[:-1] if prefix else ''}: "
                + ", ".join(names)
            )
        tp = hints[key]
        if _is_dataclass_type(tp):
            kwargs[key] = _build(tp, value or {}, f"{dotted}.", source)
        else:
            kwargs[key] = _convert(value, tp, dotted, source)
    return cls(**kwargs)


def _parse_cli_value(text: str) -> Any:
    """`--set a.b=V`: V is read as YAML so numbers, booleans and lists work (`[style,genre]`)."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is not a section")
    node[parts[-1]] = value


def apply_overrides(tree: dict, overrides: list[str] | None, cls: type = None) -> dict:
    """Apply `key.sub=value` strings to a plain dict tree (before type checking)."""
    cls = cls or JobConfig
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set data.image_size=256")
        key, text = item.split("=", 1)
        key = key.strip()
        value = _parse_cli_value(text)
        # Strings that YAML would read as numbers stay strings where the schema wants a string.
        tp = _field_type(cls, key)
        if tp is str and not isinstance(value, str):
            value = text
        _set_dotted(tree, key, value)
    return tree


def _field_type(cls: type, dotted: str) -> Any:
    tp: Any = cls
    for part in dotted.split("."):
        if not _is_dataclass_type(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            valid = ", ".join(f.name for f in dataclasses.fields(tp))
            raise ConfigError(f"--set {dotted}: unknown key '{part}'. Valid keys: {valid}")
        tp = hints[part]
    return tp


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Load a job YAML (or defaults when path is None), apply `--set` overrides, validate."""
    tree: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (job configs live in jobs/, e.g. jobs/demo.yaml)")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if overrides:
        apply_overrides(tree, overrides)
        source += " + --set " + " ".join(overrides)
    cfg = _build(JobConfig, tree, "", source)
    validate(cfg, source)
    return cfg


def validate(cfg: JobConfig, source: str = "config") -> None:
    """Cross-field checks that types alone cannot express."""
    tasks = cfg.model.tasks
    if not tasks:
        raise ConfigError(f"{source}: model.tasks is empty; use any of {list(TASKS)}")
    for t in tasks:
        if t not in TASKS:
            raise ConfigError(f"{source}: model.tasks has unknown task {t!r}; valid: {list(TASKS)}")
    if cfg.model.primary_task not in tasks:
        raise ConfigError(f"{source}: model.primary_task={cfg.model.primary_task!r} is not in model.tasks={tasks}")
    positive = {
        "data.image_size": cfg.data.image_size,
        "data.batch_size": cfg.data.batch_size,
        "train.epochs": cfg.train.epochs,
        "train.accum_steps": cfg.train.accum_steps,
        "shard.samples_per_shard": cfg.shard.samples_per_shard,
        "shard.max_short_side": cfg.shard.max_short_side,
        "data.shuffle_buffer": cfg.data.shuffle_buffer,
        "model.lstm_hidden": cfg.model.lstm_hidden,
        "model.lstm_layers": cfg.model.lstm_layers,
        "train.log_every": cfg.train.log_every,
        "outliers.top_k": cfg.outliers.top_k,
        "slurm.nodes": cfg.slurm.nodes,
        "slurm.cpus_per_task": cfg.slurm.cpus_per_task,
        "slurm.time_min": cfg.slurm.time_min,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{source}: {key} must be > 0, got {value}")
    non_negative = {
        "data.num_workers": cfg.data.num_workers,
        "data.crop_padding": cfg.data.crop_padding,
        "train.lr": cfg.train.lr,
        "train.backbone_lr": cfg.train.backbone_lr,
        "train.weight_decay": cfg.train.weight_decay,
        "train.warmup_epochs": cfg.train.warmup_epochs,
        "train.grad_clip": cfg.train.grad_clip,
        "train.stop_after_steps": cfg.train.stop_after_steps,
        "slurm.gpus_per_node": cfg.slurm.gpus_per_node,
        "slurm.mem_gb": cfg.slurm.mem_gb,
        "slurm.signal_delay_s": cfg.slurm.signal_delay_s,
        "slurm.max_num_timeout": cfg.slurm.max_num_timeout,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{source}: {key} must be >= 0, got {value}")
    fractions = {  # [0, 1)
        "model.dropout": cfg.model.dropout,
        "train.label_smoothing": cfg.train.label_smoothing,
    }
    for key, value in fractions.items():
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{source}: {key} must be in [0, 1), got {value}")
    if not 0.0 <= cfg.train.min_lr_ratio <= 1.0:
        raise ConfigError(f"{source}: train.min_lr_ratio must be in [0, 1], got {cfg.train.min_lr_ratio}")
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        raise ConfigError(f"{source}: data.max_bad_fraction must be in [0, 1], got {cfg.data.max_bad_fraction}")
    if not 0.0 <= cfg.outliers.threshold <= 1.0:
        raise ConfigError(f"{source}: outliers.threshold must be in [0, 1], got {cfg.outliers.threshold}")
    if not 0.0 < cfg.data.rrc_scale_min <= 1.0:
        raise ConfigError(f"{source}: data.rrc_scale_min must be in (0, 1], got {cfg.data.rrc_scale_min}")
    if not 0.0 < cfg.outliers.flag_fraction <= 1.0:
        raise ConfigError(f"{source}: outliers.flag_fraction must be in (0, 1], got {cfg.outliers.flag_fraction}")
    if cfg.data.crop_padding >= cfg.data.image_size:
        raise ConfigError(f"{source}: data.crop_padding must be < data.image_size ({cfg.data.image_size}), "
                          f"got {cfg.data.crop_padding}")
    if cfg.data.image_size > MAX_IMAGE_SIZE:
        raise ConfigError(f"{source}: data.image_size must be <= {MAX_IMAGE_SIZE} (the LSTM's positional "
                          f"embedding covers feature maps up to {MAX_IMAGE_SIZE // 32} cells), got {cfg.data.image_size}")
    if not 0.0 <= cfg.synth.noise < 1.0:
        raise ConfigError(f"{source}: synth.noise must be in [0, 1), got {cfg.synth.noise}")
    if not 0.0 <= cfg.shard.test_fraction < 1.0:
        raise ConfigError(f"{source}: shard.test_fraction must be in [0, 1), got {cfg.shard.test_fraction}")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(to_yaml(cfg))


def from_dict(tree: dict, source: str = "saved config") -> JobConfig:
    """Rebuild a JobConfig saved with a run (e.g. inside a checkpoint)."""
    cfg = _build(JobConfig, tree, "", source)
    validate(cfg, source)
    return cfg


__all__ = [
    "TASKS",
    "ConfigError",
    "SynthConfig",
    "ShardConfig",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "OutlierConfig",
    "SlurmConfig",
    "JobConfig",
    "load_config",
    "apply_overrides",
    "save_config",
    "to_dict",
    "to_yaml",
    "from_dict",
]
