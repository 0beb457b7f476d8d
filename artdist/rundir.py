"""Every file name of a run directory (docs/design.md "Run directory") in one place; rank 0 writes them."""
from __future__ import annotations

from pathlib import Path

LAST = "model_last.pt"
BEST = "model_best.pt"
STOP_FILE = "PREEMPT"  # its existence asks a running job to save and stop


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

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def best(self) -> Path:
        return self.path / BEST

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tb"

    @property
    def class_counts(self) -> Path:
        """Train-split class counts for the loss weights, cached (a large split takes a while to read)."""
        return self.path / "class_counts.json"

    @property
    def changes(self) -> Path:
        """The history of config changes a resume was allowed to make (--resume-with-changes)."""
        return self.path / "config_changes.yaml"

    @property
    def finished(self) -> Path:
        """Written last, when training, test evaluation and reports are done: a rerun then does nothing."""
        return self.path / "finished.json"

    @property
    def stop_file(self) -> Path:
        return self.path / STOP_FILE

    @property
    def slurm(self) -> Path:
        return self.path / "slurm"

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
