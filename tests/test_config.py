"""Job config: YAML schema, errors that name key/file/valid keys, dotted overrides, round-trip."""
import dataclasses
import math
import typing
from pathlib import Path

import pytest

from artdist.errors import ConfigError
from artdist.config import JobConfig, Range, from_dict, load_config, override_section, save_config, to_dict
from artdist.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_defaults_and_yaml_values(tmp_path):
    cfg = load_config(write(tmp_path, "name: x\ndata:\n  image_size: 96\nmodel:\n  tasks: [genre]\n  primary_task: genre\n"
                                      "train:\n  lr: 3e-4\n"))
    assert cfg.train.lr == pytest.approx(3e-4)  # YAML 1.1 reads 3e-4 as a string; the schema converts it
    assert cfg.name == "x" and cfg.data.image_size == 96 and cfg.model.tasks == ["genre"]
    assert cfg.data.batch_size == JobConfig().data.batch_size  # untouched keys keep defaults
    assert cfg.run_dir == Path("runs/x")


def test_unknown_key_names_key_file_and_valid_keys(tmp_path):
    path = write(tmp_path, "data:\n  imagesize: 96\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert "data.imagesize" in msg and str(path) in msg and "image_size" in msg and "batch_size" in msg


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'trainer'.*train"):
        load_config(write(tmp_path, "trainer: {epochs: 3}\n"))


@pytest.mark.parametrize("text,needle", [
    ("data: {image_size: big}\n", "data.image_size must be an integer"),
    ("train: {lr: fast}\n", "train.lr must be a number"),
    ("train: {compile: 1}\n", "train.compile must be true or false"),
    ("model: {backbone: vgg16}\n", "model.backbone = 'vgg16' is not one of"),
    ("model: {tasks: style}\n", "model.tasks must be a list"),
    ("data: 3\n", "data must be a mapping"),
    ("model: {tasks: [style], primary_task: genre}\n", "primary_task"),
    ("model: {tasks: [colour]}\n", "unknown task 'colour'"),
    ("data: {batch_size: 0}\n", "data.batch_size must be > 0"),
    ("data: {shuffle_buffer: 0}\n", "data.shuffle_buffer must be > 0"),
    ("data: {image_size: 4096}\n", "data.image_size must be <= 2048"),
    ("train: {label_smoothing: 1.5}\n", "train.label_smoothing must be in [0, 1)"),
    ("train: {grad_clip: -1}\n", "train.grad_clip must be >= 0"),
    ("model: {dropout: 1.0}\n", "model.dropout must be in [0, 1)"),
    ("model: {lstm_layers: 0}\n", "model.lstm_layers must be > 0"),
    ("train: {amp: sometimes}\n", "train.amp = 'sometimes' is not one of"),
    ("slurm: {nodes: 0}\n", "slurm.nodes must be > 0"),
    ("train: {lr: .nan}\n", "train.lr must be a finite number, got nan"),
    ("train: {grad_clip: .nan}\n", "train.grad_clip must be a finite number, got nan"),
    ("train: {weight_decay: .inf}\n", "train.weight_decay must be a finite number, got inf"),
    ("data: {batch_size: 1000000}\n", "data.batch_size must be <= 65536, got 1000000"),
    ("data: {num_workers: 1000}\n", "data.num_workers must be <= 256"),
    ("train: {epochs: 100000}\n", "train.epochs must be <= 10000"),
    ("data: 0\n", "data must be a mapping, got 0"),
    ("train: {best_metric: style/f1}\n", "train.best_metric='style/f1': expected TASK/METRIC"),
])
def test_type_and_value_errors(tmp_path, text, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text))
    assert needle in str(exc.value)


def test_range_errors_are_one_line_naming_the_source(tmp_path):
    path = write(tmp_path, "train: {lr: .nan}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value) == f"{path}: train.lr must be a finite number, got nan"
    with pytest.raises(ConfigError, match=r"^defaults \+ --set train.grad_clip=nan: train.grad_clip must be a finite"):
        load_config(None, ["train.grad_clip=nan"])


def test_every_numeric_key_has_a_finite_range():
    checked = 0
    for section in (JobConfig().data, JobConfig().model, JobConfig().train, JobConfig().outliers, JobConfig().slurm,
                    JobConfig().synth, JobConfig().shard):
        hints = typing.get_type_hints(type(section))
        for f in dataclasses.fields(section):
            if hints[f.name] in (int, float):
                rng = f.metadata.get("range")
                assert isinstance(rng, Range), f"{section.SECTION}.{f.name} has no Range"
                assert rng.error(math.nan) and rng.error(math.inf), f"{section.SECTION}.{f.name} takes non-finite"
                checked += 1
    assert checked > 40


def test_ranges_hold_when_a_section_is_replaced():
    with pytest.raises(ConfigError, match=r"^shard.quality must be 1..100, got 0$"):
        dataclasses.replace(JobConfig().shard, quality=0)


def test_override_section_applies_given_flags_and_checks_them():
    cfg = load_config(None)
    changed = override_section(cfg, "slurm", {"nodes": 4, "partition": None, "time_min": 30})
    assert (changed.slurm.nodes, changed.slurm.partition, changed.slurm.time_min) == (4, cfg.slurm.partition, 30)
    assert override_section(cfg, "slurm", {"nodes": None}) is cfg
    with pytest.raises(ConfigError, match=r"^command line: slurm.nodes must be > 0, got 0$"):
        override_section(cfg, "slurm", {"nodes": 0})
    with pytest.raises(ConfigError, match=r"^command line: synth.noise must be a finite number"):
        override_section(cfg, "synth", {"noise": float("nan")})


def test_yaml_off_and_on_words_stay_words(tmp_path):
    # YAML 1.1 reads unquoted off/no as false; `amp: off` must still mean the word.
    assert load_config(write(tmp_path, "train: {amp: off}\n")).train.amp == "off"
    assert load_config(None, ["train.amp=off"]).train.amp == "off"
    assert load_config(None, ["train.amp=no"]).train.amp == "off"


def test_dotted_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "data: {image_size: 96}\n"), [
        "data.image_size=256", "train.lr=3e-4", "model.tasks=[style, genre]", "train.compile=true",
        "name=123", "model.weights=/w/r50.pth",
    ])
    assert cfg.data.image_size == 256
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.tasks == ["style", "genre"]
    assert cfg.train.compile is True
    assert cfg.name == "123"  # a string field keeps digits as text
    assert cfg.model.weights == "/w/r50.pth"


@pytest.mark.parametrize("override,needle", [
    ("data.imagesize=3", "unknown key 'imagesize'"),
    ("data", "expected KEY=VALUE"),
    ("data.image_size=abc", "data.image_size must be an integer"),
])
def test_override_errors(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [override])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "data: [1,\n"))


def test_save_round_trip(tmp_path):
    cfg = load_config(None, ["name=rt", "train.epochs=7", "model.tasks=[artist]", "model.primary_task=artist"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert to_dict(from_dict(to_dict(cfg))) == to_dict(cfg)


def test_every_shipped_job_config_loads():
    jobs = sorted((REPO / "jobs").glob("*.yaml"))
    assert jobs, "jobs/ holds no YAML configs"
    for path in jobs:
        cfg = load_config(path)
        assert cfg.name, path


def test_cli_config_prints_resolved_yaml_and_fails_cleanly(tmp_path, capsys):
    assert cli_main(["config", "--set", "data.image_size=80"]) == 0
    assert "image_size: 80" in capsys.readouterr().out
    assert cli_main(["config", "--config", str(write(tmp_path, "bogus: 1\n"))]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'bogus'" in err and "Traceback" not in err


def _all_keys(cls, prefix=""):
    import dataclasses
    import typing
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _all_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name]


def test_config_reference_lists_every_key_with_type_default_and_meaning():
    from artdist.config import reference
    text = reference()
    rows = {line.split("|")[1].strip().strip("`"): [c.strip() for c in line.split(" | ")]
            for line in text.splitlines() if line.startswith("| `")}
    keys = dict(_all_keys(JobConfig))
    assert set(rows) == set(keys)
    for key, cells in rows.items():
        _, type_cell, default_cell, meaning = cells[0], cells[1], cells[2], cells[3].rstrip(" |")
        assert type_cell and default_cell.startswith("`"), key
        assert len(meaning) > 3, f"{key} has no one-line meaning: add a comment on its line in artdist/config.py"
    assert "| `data.shuffle_buffer` | int in (0, 10000000] | `2000` |" in text  # type, allowed range, default
    assert "| `train.amp` | auto \\| bf16 \\| fp16 \\| off | `auto` |" in text


def test_docs_config_md_is_current(capsys):
    assert cli_main(["config", "--reference"]) == 0
    printed = capsys.readouterr().out
    assert (REPO / "docs" / "config.md").read_text() == printed, \
        "docs/config.md is out of date: artdist config --reference > docs/config.md"
