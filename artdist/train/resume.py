"""The resume contract: which config changes a rerun of a run may make, the record of those it made, a finished run."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Literal

import yaml

from artdist.config import JobConfig, to_dict
from artdist.errors import UserError
from artdist.rundir import LOCK, RunDir, RunDirLock

# How a rerun treats an existing run: refuse changes that alter what is trained, record them, or start over.
Policy = Literal["check", "with_changes", "fresh"]

# Keys (or sections, ending in '.') whose change leaves what is trained as it was: how many processes
# and loader workers, where and how fast it runs, logging, the reports after training, resources; and
# audit.*, whose effect on a fold run is already in its train.* keys.
LAYOUT_KEYS = ("name", "out_dir", "data.num_workers", "data.batch_size", "data.decode", "train.accum_steps",
               "train.device", "train.amp", "train.compile", "train.channels_last", "train.deterministic",
               "train.log_every", "outliers.", "slurm.", "synth.", "shard.", "audit.")


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _is_layout(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in LAYOUT_KEYS)


def config_changes(saved: dict, cfg: JobConfig) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, new value)} for every key that alters what is trained. Keys the saved
    config lacks (added to the schema after the run started) are not changes: their defaults keep the
    behaviour of the version that wrote it."""
    old, new = _flat(saved), _flat(to_dict(cfg))
    return {key: (old[key], value) for key, value in new.items()
            if key in old and old[key] != value and not _is_layout(key)}


def describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())


def accepted_config(run_dir: RunDir, checkpoint: dict) -> dict:
    """The config a rerun is compared with: RUN_DIR/config.yaml, written only once a start accepted it
    (so it holds the changes --resume-with-changes made), else the checkpoint's."""
    try:
        tree = yaml.safe_load(run_dir.config.read_text())
    except (OSError, yaml.YAMLError):
        tree = None
    return tree if isinstance(tree, dict) else checkpoint["config"]


def check_resume(saved_config: dict, cfg: JobConfig, run_dir: RunDir, checkpoint: Path,
                 policy: Policy) -> dict[str, tuple[Any, Any]]:
    """The changes a resume from `checkpoint` makes; a UserError unless `policy` allows them."""
    changes = config_changes(saved_config, cfg)
    if changes and policy != "with_changes":
        raise UserError(
            f"{checkpoint} was trained with another config: {describe(changes)}. Resuming would continue those "
            f"weights under values they were not trained with. Start over with --fresh (the old run is kept as "
            f"{run_dir.path}.replaced-<time>) or another name (--set name=NEW), or continue with the changes "
            f"recorded in {run_dir.changes}: --resume-with-changes")
    return changes


def record_changes(run_dir: RunDir, changes: dict[str, tuple[Any, Any]], position: dict) -> None:
    """Rank 0: append one entry (when, at which epoch/step, key: [old, new]) to the run's change history."""
    history = yaml.safe_load(run_dir.changes.read_text()) if run_dir.changes.is_file() else []
    history.append({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "resumed_at": {"epoch": position["epoch"], "step_in_epoch": position["step_in_epoch"],
                                   "global_step": position["global_step"]},
                    "changes": {key: [old, new] for key, (old, new) in changes.items()}})
    run_dir.changes.write_text(yaml.safe_dump(history, sort_keys=False))


def finished(run_dir: RunDir) -> dict | None:
    """What the run's end wrote (epochs, global step) once training, test and reports were all done."""
    try:
        return json.loads(run_dir.finished.read_text())
    except (OSError, ValueError):
        return None


def mark_finished(run_dir: RunDir, epochs: int, global_step: int) -> None:
    """Rank 0, last act of a run: a rerun of the same command then does nothing."""
    run_dir.finished.write_text(json.dumps({"epochs": epochs, "global_step": global_step,
                                            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")


def set_aside(run_dir: RunDir) -> Path | None:
    """--fresh, rank 0: rename an existing run dir to <dir>.replaced-<UTC time>[-N] (nothing is deleted).

    Not on a requeued SLURM job (SLURM_RESTART_COUNT > 0): its first start already set the old run
    aside, and the run dir now holds the new run's own progress. A UserError when another process
    holds its LOCK.
    """
    if not run_dir.path.exists() or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
        return None
    stamp = f"{run_dir.path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    target, n = run_dir.path.with_name(stamp), 1
    while target.exists():  # set aside twice in one second: the first one is kept too
        n += 1
        target = run_dir.path.with_name(f"{stamp}-{n}")
    lock = RunDirLock(run_dir, "training --fresh").acquire()  # a run dir that a live process uses is not moved
    try:
        run_dir.path.rename(target)
    finally:
        lock.release()
    (target / LOCK).unlink(missing_ok=True)  # ours, moved along with the folder
    return target
