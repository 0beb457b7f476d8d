"""Job config: YAML schema, errors that name key/file/valid keys, dotted overrides, round-trip."""
from pathlib import Path

import pytest

from artdist.errors import ConfigError
from artdist.config import JobConfig, from_dict, load_config, save_config, to_dict
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
])
def test_type_and_value_errors(tmp_path, text, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text))
    assert needle in str(exc.value)


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
    assert "| `data.shuffle_buffer` | int | `2000` |" in text
    assert "| `train.amp` | auto \\| bf16 \\| fp16 \\| off | `auto` |" in text


def test_docs_config_md_is_current(capsys):
    assert cli_main(["config", "--reference"]) == 0
    printed = capsys.readouterr().out
    assert (REPO / "docs" / "config.md").read_text() == printed, \
        "docs/config.md is out of date: artdist config --reference > docs/config.md"
