"""Typed job configuration: dataclass schema, YAML loading, dotted CLI overrides, saving."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import math
import textwrap
import tokenize
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
SEED_RANGE = (-2**63, 2**63 - 1)  # what torch.manual_seed accepts; numpy and the loader reduce it
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
    out: str = "data/synth"  # output folder: images/, labels/, planted_noise.csv and planted_duplicates.csv
    images: int = ranged(1200, MIN_SYNTH_IMAGES, 10_000_000)  # number of pictures
    seed: int = ranged(0, 0, SEED_RANGE[1])  # random seed; the same seed gives byte-identical files
    noise: float = fraction(0.0)  # fraction of images given a deliberately wrong label
    duplicates: float = fraction(0.0, hi_open=False)  # fraction of paintings given a planted copy (planted_duplicates.csv)
    size: int = ranged(128, 16, 4096)  # side of the generated pictures, px


@dataclass
class ShardConfig(Section):
    """`artdist shard`: label files + image folder -> WebDataset tar shards."""

    SECTION: ClassVar[str] = "shard"
    images: str = "data/synth/images"  # folder holding the style folders of images
    labels: str = "data/synth/labels"  # folder holding the nine ArtGAN label files
    out: str = "shards/demo"  # output folder for the tar shards and manifest.json
    split: Literal["artgan", "random"] = "artgan"  # artgan: official train/val + test from train; random: 60/20/20
    test_fraction: float = fraction(0.1)  # artgan: share of train carved out as test
    seed: int = ranged(0, *SEED_RANGE)  # random split / test carving salt; deterministic from the path either way
    max_short_side: int = positive(448, 16384)  # shorter side at most this many px: serves 224-448 px training
    resample: Literal["lanczos", "bicubic", "hamming", "bilinear", "box"] = (  # downscale filter after the JPEG draft;
        "bilinear")  # bilinear in torch: fastest, bytes vary by CPU family (pixels by <= 1 level); others in PIL (docs/benchmarks.md)
    format: Literal["jpeg", "webp", "png"] = "jpeg"  # image encoding inside the shards
    quality: int = ranged(85, 1, 100, interval=True)  # jpeg/webp quality (why 85: docs/benchmarks.md)
    passthrough: bool = True  # keep a JPEG's own bytes when re-encoding could only lose: no resize, baseline 4:2:0, no metadata, coarser than quality
    samples_per_shard: int = positive(1000, 10_000_000)  # target images per tar shard
    min_shards: int = ranged(8, 1, 100_000)  # per split, a floor for small splits: shuffling mixes whole shards
    workers: int = ranged(0, 0, 256)  # processes writing shards; 0: one per 1,000 images, at most all CPU cores
    max_pixels: int = ranged(200_000_000, 1, 10**10)  # decompression-bomb guard; larger images are skipped, reported
    dup_hamming: int = ranged(16, 0, 64)  # near-duplicates: 256-bit perceptual hashes differing in at most this many bits
    duplicate_policy: Literal["move", "drop", "report"] = "move"  # copies in several splits: move to the evaluation side, drop, or only report


@dataclass
class DataConfig(Section):
    """The training/evaluation input pipeline read from shards."""

    SECTION: ClassVar[str] = "data"
    shards: str = "shards/demo"  # folder of shards + manifest.json written by `artdist shard`
    image_size: int = positive(224, MAX_IMAGE_SIZE, note=f" (the LSTM's positional embedding covers feature "
                                                         f"maps up to {MAX_IMAGE_SIZE // 32} cells)")  # input side, px
    batch_size: int = positive(64, 65536)  # images per process and micro-step
    num_workers: int = ranged(4, 0, 256)  # loader processes per rank
    shuffle_buffer: int = positive(2000, 10_000_000)  # samples held by each loader worker's shuffle buffer (train split)
    augment: Literal["crop_flip", "rrc", "none"] = "crop_flip"  # crop_flip: pad, crop, flip; rrc: random resized crop, flip
    crop_padding: int = ranged(16, 0, MAX_IMAGE_SIZE)  # crop_flip: pad before the random crop; < image_size
    rrc_scale_min: float = fraction(0.35, lo_open=True, hi_open=False)  # rrc: smallest crop area fraction
    decode: Literal["cpu", "gpu"] = "cpu"  # JPEG decoding in loader workers, or nvjpeg on the GPU
    train_split: str = "train"  # split of the shards trained on
    val_split: str = "val"  # split evaluated after each epoch (picks model_best.pt) and audited for outliers
    test_split: str = "test"  # split evaluated once with model_best.pt at the end
    max_bad_fraction: float = fraction(0.001, hi_open=False)  # undecodable samples are skipped and counted; an epoch or evaluation with more than this share of them stops


@dataclass
class ModelConfig(Section):
    """ResNet backbone + LSTM over a sequence read from the feature map + one head per task."""

    SECTION: ClassVar[str] = "model"
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"] = "resnet50"  # torchvision ResNet trunk
    weights: str = "none"  # none | imagenet | path to a state_dict file
    sequence: Literal["pooled", "spatial", "rows", "columns"] = "spatial"  # LSTM input: pooled vector, or feature-map cells/rows/columns
    lstm_hidden: int = positive(512, 65536)  # LSTM hidden units per direction
    lstm_layers: int = positive(2, 64)  # stacked LSTM layers
    bidirectional: bool = True  # LSTM reads the sequence both ways
    dropout: float = fraction(0.1)  # dropout before each task head
    tasks: list[str] = field(default_factory=lambda: list(TASKS))  # heads to train, any of style, artist, genre
    primary_task: str = "style"  # task whose macro-F1 picks model_best.pt unless train.best_metric says otherwise


@dataclass
class TrainConfig(Section):
    """Optimisation and run control."""

    SECTION: ClassVar[str] = "train"
    epochs: int = positive(10, 10_000)  # passes over the train split
    lr: float = ranged(1e-3, 0.0)  # head + LSTM, for the global batch of batch_size*world*accum_steps
    backbone_lr: float = ranged(1e-4, 0.0)  # peak LR of the ResNet trunk
    weight_decay: float = ranged(0.05, 0.0)  # AdamW weight decay (not on biases and norms)
    warmup_epochs: float = ranged(1.0, 0.0, 10_000.0)  # linear LR warm-up length, then cosine decay
    min_lr_ratio: float = fraction(0.01, hi_open=False)  # final LR as a fraction of the peak
    grad_clip: float = ranged(1.0, 0.0)  # clip the gradient norm to this; 0 disables
    accum_steps: int = positive(1, 4096)  # micro-batches accumulated per optimizer step
    label_smoothing: float = fraction(0.1)  # cross-entropy label smoothing
    class_weighting: Literal["none", "inverse", "inverse_sqrt"] = "inverse_sqrt"  # class loss weight: 1, 1/n or 1/sqrt(n) of train counts
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 if supported, fp16 on older GPUs, off on CPU
    channels_last: bool = True  # NHWC memory layout on CUDA (faster convolutions with AMP)
    compile: bool = False  # torch.compile the backbone only (dynamo graph-breaks on nn.LSTM)
    seed: int = ranged(0, *SEED_RANGE)  # seed of model init, shuffling and augmentation
    deterministic: bool = False  # deterministic kernels only (slower; bit-identical reruns on the same hardware)
    device: Literal["auto", "cuda", "cpu"] = "auto"  # auto: CUDA when available, else CPU
    best_metric: str = ""  # TASK/METRIC, e.g. "style/macro_f1"; empty: macro-F1 of model.primary_task
    log_every: int = positive(20, 10**9)  # steps between console/TensorBoard train logs
    checkpoint_every: int = ranged(0, 0, 10**9)  # steps between mid-epoch saves of model_last.pt (a failure loses at most these); 0: epoch ends only


@dataclass
class OutlierConfig(Section):
    """Outlier scoring and reports."""

    SECTION: ClassVar[str] = "outliers"
    enabled: bool = True  # write val-split reports at the end of training
    threshold: float = fraction(0.6, hi_open=False)  # flagged when max_softmax < threshold
    top_k: int = positive(50, 100_000)  # outliers per task in the TensorBoard grid; the second k of precision@k
    flag_fraction: float = fraction(0.05, lo_open=True, hi_open=False)  # share of samples flagged by the combined score
    planted: str = ""  # planted_noise.csv from `artdist synth --noise`: measure AUROC/precision@k against it
    page_rows: int = positive(1000, 100_000)  # rows per task in index.html, best combined ranks first (CSV: all)
    tta: Literal["flip", "none"] = "flip"  # flip: score each painting as the mean of it and its mirror image (2x the passes)
    projector: int = ranged(1000, 0, 16_384)  # embeddings in TensorBoard's projector (half top outliers, half a fixed sample); 0: none; at most (8192 px sprite sheet / 64 px)^2


@dataclass
class DuplicatesConfig(Section):
    """`artdist duplicates`: near-duplicate paintings by a copy descriptor, each image's neighbours setting the scale."""

    SECTION: ClassVar[str] = "duplicates"
    ratio: float = fraction(0.2, lo_open=True)  # copy: cosine distance < ratio x that of the image's neighbours-th nearest
    neighbours: int = ranged(5, 2, 10_000)  # nearest images looked at per image; the last sets the distance scale
    chunk: int = positive(1024, 1_000_000)  # query rows per similarity block: memory O(chunk x images), never O(images^2)
    planted: str = ""  # planted_duplicates.csv from `artdist synth --duplicates`: recall/precision per kind


@dataclass
class SlurmConfig(Section):
    """Defaults for `artdist submit` (each also a command-line flag)."""

    SECTION: ClassVar[str] = "slurm"
    partition: str = ""  # SLURM partition; empty: the cluster's default
    account: str = ""  # SLURM account; empty: none given
    qos: str = ""  # SLURM quality of service; empty: none given
    nodes: int = positive(1, 4096)  # number of nodes
    gpus_per_node: int = ranged(1, 0, 256)  # with train.device=cpu: CPU processes per node
    cpus_per_task: int = positive(8, 1024)  # CPU cores per training process (loader workers + 1)
    mem_gb: int = ranged(0, 0, 65536)  # memory per node, GB; 0: SLURM's default
    time_min: int = positive(240, 525_600)  # time limit, minutes
    signal_delay_s: int = ranged(120, 0, 86_400)  # USR2 this many seconds before the time limit: save and requeue
    max_num_timeout: int = ranged(20, 0, 10_000)  # requeues after a time limit or preemption, at most
    constraint: str = ""  # SLURM node constraint, e.g. a100; empty: none


@dataclass
class AuditConfig(Section):
    """`artdist audit`: K fold trainings that score every painting out of sample."""

    SECTION: ClassVar[str] = "audit"
    folds: int = ranged(5, 2, 1000)  # K: each fold's model trains on the other K-1 folds and scores its own
    splits: list[str] = field(default_factory=list)  # the splits audited together; empty: every split of the shards
    epochs: int = ranged(0, 0, 10_000)  # train.epochs of each fold run; 0: the job's train.epochs
    overrides: list[str] = field(default_factory=list)  # more KEY=VALUE for the fold runs, e.g. train.label_smoothing=0


@dataclass
class JobConfig:
    """One training job: everything a run needs, saved into its run directory."""

    name: str = "demo"  # run name: the run dir is runs/<name> and TensorBoard shows it
    out_dir: str = ""  # run directory; empty: runs/<name>
    data: DataConfig = field(default_factory=DataConfig)  # input pipeline
    model: ModelConfig = field(default_factory=ModelConfig)  # network
    train: TrainConfig = field(default_factory=TrainConfig)  # optimisation and run control
    outliers: OutlierConfig = field(default_factory=OutlierConfig)  # outlier scoring and reports
    duplicates: DuplicatesConfig = field(default_factory=DuplicatesConfig)  # `artdist duplicates`: near-duplicate paintings
    slurm: SlurmConfig = field(default_factory=SlurmConfig)  # `artdist submit` resources
    synth: SynthConfig = field(default_factory=SynthConfig)  # `artdist synth` corpus
    shard: ShardConfig = field(default_factory=ShardConfig)  # `artdist shard` packing
    audit: AuditConfig = field(default_factory=AuditConfig)  # `artdist audit` folds

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
                          f"{cfg.model.tasks} and METRIC one of {list(HEADLINE)}, "
                          f"e.g. {cfg.model.primary_task}/macro_f1")
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
RETIRED = {"train": ("stop_after_steps",), "duplicates": ("cosine", "max_neighbours")}


# --------------------------------------------------------------------------- reference (docs/config.md)

def _meanings(cls: type) -> dict[str, str]:
    """field -> the comments on its lines in this file: the schema's one-line documentation."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    found = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            lines = range(node.lineno, (node.end_lineno or node.lineno) + 1)
            found[node.target.id] = " ".join(comments[i] for i in lines if i in comments)
    return found


def _range_text(rng: Range) -> str:
    hi = "∞" if rng.hi == INF else _num(rng.hi)
    return f"{'(' if rng.lo_open else '['}{_num(rng.lo)}, {hi}{')' if rng.hi_open or rng.hi == INF else ']'}"


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " \\| ".join(str(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    return getattr(tp, "__name__", str(tp))


def _default_text(value: Any) -> str:
    if isinstance(value, str):
        return f'`"{value}"`' if value == "" else f"`{value}`"
    return "`" + yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...") + "`"


def reference() -> str:
    """The config reference as Markdown: every key with its type, default and meaning (docs/config.md)."""
    out = ["# Config reference", "",
           "Generated from the schema in `artdist/config.py` by `artdist config --reference`; "
           "a test checks that this file is current.",
           "A job YAML sets any of these keys; `--set section.key=value` overrides one on the command line.", ""]
    top = JobConfig()
    hints, meanings = typing.get_type_hints(JobConfig), _meanings(JobConfig)
    plain = [f for f in dataclasses.fields(JobConfig) if not _is_dataclass_type(hints[f.name])]
    sections = [f for f in dataclasses.fields(JobConfig) if _is_dataclass_type(hints[f.name])]
    rows = [(f, hints[f.name], getattr(top, f.name), meanings.get(f.name, "")) for f in plain]
    out += _table(rows)
    for f in sections:
        cls = hints[f.name]
        out += ["", f"## `{f.name}`: {(cls.__doc__ or '').strip()}", ""]
        sub_hints, sub_meanings, default = typing.get_type_hints(cls), _meanings(cls), getattr(top, f.name)
        out += _table([(g, sub_hints[g.name], getattr(default, g.name), sub_meanings.get(g.name, ""))
                       for g in dataclasses.fields(cls)], f"{f.name}.")
    return "\n".join(out) + "\n"


def _table(rows: list[tuple[dataclasses.Field, Any, Any, str]], prefix: str = "") -> list[str]:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f, tp, value, meaning in rows:
        rng = f.metadata.get("range")
        kind = _type_name(tp) + (f" in {_range_text(rng)}" if rng else "")
        lines.append(f"| `{prefix}{f.name}` | {kind} | {_default_text(value)} | {meaning.replace('|', chr(92) + '|')} |")
    return lines


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
    "DuplicatesConfig",
    "SlurmConfig",
    "AuditConfig",
    "JobConfig",
    "load_config",
    "apply_overrides",
    "override_section",
    "save_config",
    "to_dict",
    "to_yaml",
    "from_dict",
    "reference",
]
