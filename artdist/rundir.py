"""Every file name of a run directory (docs/design.md "Run directory") in one place; rank 0 writes them."""
from __future__ import annotations

from pathlib import Path

LAST = "model_last.pt"
BEST = "model_best.pt"
STOP_FILE = "PREEMPT"  # its existence asks a running job to save and stop


def _entry(name: str) -> property:
    """A RunDir attribute: the path of `name` inside the run directory."""
    return property(lambda self: self.path / name)


class RunDir:
    """The paths of one run (`cfg.run_dir`, default runs/<name>/)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    config = _entry("config.yaml")
    last = _entry(LAST)
    best = _entry(BEST)
    metrics = _entry("metrics.jsonl")
    tensorboard = _entry("tb")
    class_counts = _entry("class_counts.json")  # train-split class counts for the loss weights, cached
    changes = _entry("config_changes.yaml")  # config changes a resume was allowed to make (--resume-with-changes)
    finished = _entry("finished.json")  # written last, when training, test and reports are done
    stop_file = _entry(STOP_FILE)
    slurm = _entry("slurm")

    def eval_report(self, split: str) -> Path:
        return self.path / f"eval_{split}.json"

    def outliers(self, split: str) -> Path:
        return self.path / "outliers" / split

    def checkpoint(self, name: str) -> Path:
        """A checkpoint by file name in this run, else `name` as a path.

        The run's own file first: `--run ../b` from inside run a must not pick up a's model_best.pt.
        """
        own = self.path / name
        return own if own.is_file() else Path(name)
