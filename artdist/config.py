"""Typed job configuration: dataclass schema, YAML loading, dotted CLI overrides, saving."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from artdist.errors import ConfigError

TASKS = ("style", "artist", "genre")
HEADLINE = ("accuracy", "top5", "macro_f1")  # the metrics reported per task; train.best_metric picks one
MAX_IMAGE_SIZE = 2048  # px; the spatial LSTM's positional embedding covers 2048 / 32 = 64 feature-map cells
MAX_SEED = 2**32 - 1  # numpy's seed range
MIN_SYNTH_IMAGES = 8  # room for every planted quirk of the synthetic corpus
INF = math.inf


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric key; NaN and ±inf are never allowed."""

    lo: float
    hi: float = INF
    lo_open: bool = False  # lo itself excluded
    hi_open: bool = False
    interval: bool = False  # name the whole interval in the error (fractions, 1..100)
    note: str = ""  # why the upper bound, appended to its error

    def error(self, value: float) -> str | None:
        """What is wrong with `value`, or None."""
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        low_ok = value > self.lo if self.lo_open else value >= self.lo
        high_ok = value < self.hi if self.hi_open else value <= self.hi
        if low_ok and high_ok:
            return None
        if self.interval:
            if isinstance(self.lo, int) and isinstance(self.hi, int):
                return f"must be {self.lo}..{self.hi}, got {value}"
            return (f"must be in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}"
                    f"{')' if self.hi_open else ']'}, got {value}")
        if not low_ok:
            return f"must be {'>' if self.lo_open else '>='} {_num(self.lo)}, got {value}"
        return f"must be {'<' if self.hi_open else '<='} {_num(self.hi)}{self.note}, got {value}"


def _num(x: float) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


def ranged(default: Any, lo: float, hi: float = INF, **kw: Any) -> Any:
    """A numeric dataclass field whose Range is checked whenever the config is built."""
    return field(default=default, metadata={"range": Range(lo, hi, **kw)})


def fraction(default: float, lo_open: bool = False, hi_open: bool = True) -> Any:
    return ranged(default, 0.0, 1.0, lo_open=lo_open, hi_open=hi_open, interval=True)


def positive(default: int, hi: int, **kw: Any) -> Any:
    return ranged(default, 0, hi, lo_open=True, **kw)


class Section:
    """Base of the config sections: checks every field's Range when one is built (also by dataclasses.replace)."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            rng = f.metadata.get("range")
            if rng is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
                problem = rng.error(value)
                if problem:
                    raise ConfigError(f"{self.SECTION}.{f.name} {problem}")


@dataclass
class SynthConfig(Section):
    """`artdist synth`: a synthetic WikiArt-like corpus in the ArtGAN layout."""

    SECTION: ClassVar[str] = "synth"
    out: str = "data/synth"
    images: int = ranged(1200, MIN_SYNTH_IMAGES, 10_000_000)
    seed: int = ranged(0, 0, MAX_SEED)
    noise: float = fraction(0.0)  # fraction of images given a deliberately wrong label
    size: int = ranged(128, 16, 4096)  # side of the generated pictures, px


@dataclass
class ShardConfig(Section):
    """`artdist shard`: label files + image folder -> WebDataset tar shards."""

    SECTION: ClassVar[str] = "shard"
    images: str = "data/synth/images"
    labels: str = "data/synth/labels"
    out: str = "shards/demo"
    split: Literal["artgan", "random"] = "artgan"
    test_fraction: float = fraction(0.1)  # artgan: share of train carved out as test
    seed: int = ranged(0, 0, MAX_SEED)  # random split / test carving salt; deterministic from the path either way
    max_short_side: int = positive(448, 16384)  # shorter side at most this many px: serves 224-448 px training
    format: Literal["jpeg", "webp", "png"] = "jpeg"
    quality: int = ranged(85, 1, 100, interval=True)  # docs/benchmarks.md: why 85
    samples_per_shard: int = positive(1000, 10_000_000)
    min_shards: int = ranged(8, 1, 100_000)  # per split, a floor for small splits: shuffling mixes whole shards
    workers: int = ranged(0, 0, 256)  # 0: all CPU cores
    max_pixels: int = ranged(200_000_000, 1, 10**10)  # decompression-bomb guard; larger images are skipped, reported


@dataclass
class DataConfig(Section):
    """The training/evaluation input pipeline read from shards."""

    SECTION: ClassVar[str] = "data"
    shards: str = "shards/demo"
    image_size: int = positive(224, MAX_IMAGE_SIZE, note=f" (the LSTM's positional embedding covers feature "
                                                         f"maps up to {MAX_IMAGE_SIZE // 32} cells)")
    batch_size: int = positive(64, 65536)  # per rank
    num_workers: int = ranged(4, 0, 256)  # loader processes per rank
    shuffle_buffer: int = positive(2000, 10_000_000)
    augment: Literal["crop_flip", "rrc", "none"] = "crop_flip"
    crop_padding: int = ranged(16, 0, MAX_IMAGE_SIZE)  # crop_flip: pad before the random crop; < image_size
    rrc_scale_min: float = fraction(0.35, lo_open=True, hi_open=False)  # rrc: smallest crop area fraction
    decode: Literal["cpu", "gpu"] = "cpu"
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    # Undecodable samples are skipped and counted; a train epoch or an evaluation stops with an error
    # once more than this fraction of its samples were bad.
    max_bad_fraction: float = fraction(0.001, hi_open=False)


@dataclass
class ModelConfig(Section):
    """ResNet backbone + LSTM over a sequence read from the feature map + one head per task."""

    SECTION: ClassVar[str] = "model"
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"] = "resnet50"
    weights: str = "none"  # none | imagenet | path to a state_dict file
    sequence: Literal["pooled", "spatial", "rows", "columns"] = "spatial"
    lstm_hidden: int = positive(512, 65536)
    lstm_layers: int = positive(2, 64)
    bidirectional: bool = True
    dropout: float = fraction(0.1)
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    primary_task: str = "style"


@dataclass
class TrainConfig(Section):
    """Optimisation and run control."""

    SECTION: ClassVar[str] = "train"
    epochs: int = positive(10, 10_000)
    lr: float = ranged(1e-3, 0.0)  # head + LSTM, for the global batch of batch_size*world*accum_steps
    backbone_lr: float = ranged(1e-4, 0.0)
    weight_decay: float = ranged(0.05, 0.0)
    warmup_epochs: float = ranged(1.0, 0.0, 10_000.0)
    min_lr_ratio: float = fraction(0.01, hi_open=False)
    grad_clip: float = ranged(1.0, 0.0)  # 0 disables
    accum_steps: int = positive(1, 4096)
    label_smoothing: float = fraction(0.1)
    class_weighting: Literal["none", "inverse", "inverse_sqrt"] = "inverse_sqrt"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 if supported, fp16 on older GPUs, off on CPU
    channels_last: bool = True
    compile: bool = False  # torch.compile the backbone only (dynamo graph-breaks on nn.LSTM)
    seed: int = ranged(0, 0, MAX_SEED)
    deterministic: bool = False
    device: Literal["auto", "cuda", "cpu"] = "auto"
    best_metric: str = ""  # TASK/METRIC, e.g. "style/macro_f1"; empty: macro-F1 of model.primary_task
    log_every: int = positive(20, 10**9)  # steps between console/TensorBoard train logs


@dataclass
class OutlierConfig(Section):
    """Outlier scoring and reports."""

    SECTION: ClassVar[str] = "outliers"
    enabled: bool = True  # write val-split reports at the end of training
    threshold: float = fraction(0.6, hi_open=False)  # flagged when max_softmax < threshold
    top_k: int = positive(50, 100_000)  # outliers per task shown in HTML/TensorBoard
    flag_fraction: float = fraction(0.05, lo_open=True, hi_open=False)  # share of samples flagged by the combined score
    planted: str = ""  # planted_noise.csv from `artdist synth --noise`: measure AUROC/precision@k against it


@dataclass
class SlurmConfig(Section):
    """Defaults for `artdist submit` (each also a command-line flag)."""

    SECTION: ClassVar[str] = "slurm"
    partition: str = ""
    account: str = ""
    qos: str = ""
    nodes: int = positive(1, 4096)
    gpus_per_node: int = ranged(1, 0, 256)  # with train.device=cpu: CPU processes per node
    cpus_per_task: int = positive(8, 1024)
    mem_gb: int = ranged(0, 0, 65536)  # 0: SLURM's default
    time_min: int = positive(240, 525_600)  # at most a year
    signal_delay_s: int = ranged(120, 0, 86_400)
    max_num_timeout: int = ranged(20, 0, 10_000)
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
        if _is_dataclass_type(tp):  # `data:` with nothing under it keeps the defaults; `data: 0` is an error
            kwargs[key] = _build(tp, {} if value is None else value, f"{dotted}.", source)
        else:
            kwargs[key] = _convert(value, tp, dotted, source)
    try:
        return cls(**kwargs)
    except ConfigError as exc:  # a Range: name where the value came from
        raise ConfigError(f"{source}: {exc}") from None


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
    """Checks across keys, which a field's Range cannot express (the Ranges ran when `cfg` was built)."""
    tasks = cfg.model.tasks
    if not tasks:
        raise ConfigError(f"{source}: model.tasks is empty; use any of {list(TASKS)}")
    for t in tasks:
        if t not in TASKS:
            raise ConfigError(f"{source}: model.tasks has unknown task {t!r}; valid: {list(TASKS)}")
    if cfg.model.primary_task not in tasks:
        raise ConfigError(f"{source}: model.primary_task={cfg.model.primary_task!r} is not in model.tasks={tasks}")
    if cfg.data.crop_padding >= cfg.data.image_size:
        raise ConfigError(f"{source}: data.crop_padding must be < data.image_size ({cfg.data.image_size}), "
                          f"got {cfg.data.crop_padding}")
    best_metric(cfg, source)


def best_metric(cfg: JobConfig, source: str = "config") -> tuple[str, str]:
    """train.best_metric as (task, metric); default: macro-F1 of the primary task."""
    name = cfg.train.best_metric or f"{cfg.model.primary_task}/macro_f1"
    task, _, key = name.partition("/")
    if task not in cfg.model.tasks or key not in HEADLINE:
        raise ConfigError(f"{source}: train.best_metric={name!r}: expected TASK/METRIC with TASK one of "
                          f"{cfg.model.tasks} and METRIC one of {list(HEADLINE)}, e.g. {cfg.model.primary_task}/macro_f1")
    return task, key


def override_section(cfg: JobConfig, section: str, flags: dict[str, Any]) -> JobConfig:
    """`cfg` with the command-line flags that were given (not None) set in `section`, checked as --set is.

    The flags become part of the config, so a run's config.yaml records what actually ran.
    """
    given = {key: value for key, value in flags.items() if value is not None}
    if not given:
        return cfg
    tree = to_dict(cfg)
    tree[section].update(given)
    return from_dict(tree, "command line")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(to_yaml(cfg))


# Keys that older versions saved into run configs and checkpoints; dropped when one is read back.
RETIRED = {"train": ("stop_after_steps",)}


def from_dict(tree: dict, source: str = "saved config") -> JobConfig:
    """Rebuild a JobConfig saved with a run (e.g. inside a checkpoint)."""
    tree = {**tree, **{section: {k: v for k, v in tree[section].items() if k not in keys}
                       for section, keys in RETIRED.items() if isinstance(tree.get(section), dict)}}
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
    "override_section",
    "save_config",
    "to_dict",
    "to_yaml",
    "from_dict",
]
