"""On a real SLURM (.ci/slurm-up.sh): `artdist audit --submit` sends the folds as one job array and the
merge as a job that waits for it (afterok), and the merge ends with the whole-dataset report."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from test_slurm import REPO, TERMINAL, _cluster_down_reason, job_env, job_state, wait_for_job

pytestmark = [pytest.mark.slurm, pytest.mark.skipif(_cluster_down_reason() is not None,
                                                    reason=str(_cluster_down_reason()))]


def test_audit_submits_a_fold_array_and_a_merge_that_runs_after_it(tmp_path, demo_shards, synth_corpus):
    run_dir = tmp_path / "run"
    sets = {"out_dir": run_dir, "data.shards": demo_shards, "data.image_size": 32, "data.batch_size": 16,
            "data.num_workers": 0, "data.shuffle_buffer": 50, "data.crop_padding": 2, "model.lstm_hidden": 16,
            "model.lstm_layers": 1, "model.sequence": "pooled", "train.device": "cpu", "audit.epochs": 1,
            "slurm.gpus_per_node": 2, "slurm.cpus_per_task": 1, "slurm.time_min": 30,
            "outliers.planted": synth_corpus / "planted_noise.csv"}
    res = subprocess.run(
        [sys.executable, "-m", "artdist", "audit", "--config", str(REPO / "jobs" / "audit_demo.yaml"), "--folds", "2",
         "--submit", *(a for k, v in sets.items() for a in ("--set", f"{k}={v}"))],
        env=job_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    array = re.search(r"submitted job array (\d+) to SLURM: 2 of 2 folds \(\1_0, \1_1\)", res.stdout).group(1)
    merge = re.search(r"submitted merge job (\d+) \(starts after array (\d+) succeeds", res.stdout)
    assert merge and merge.group(2) == array
    merge_id = merge.group(1)
    assert f"squeue -j {array},{merge_id}" in res.stdout
    # While the array runs, the merge job waits on it.
    if job_state(merge_id) not in TERMINAL:
        dependency = subprocess.run(["squeue", "-h", "-j", merge_id, "-o", "%E"], capture_output=True, text=True)
        assert dependency.stdout.strip() == "" or f"afterok:{array}" in dependency.stdout
    assert wait_for_job(merge_id, run_dir / "slurm" / merge_id) == "COMPLETED"
    for k in range(2):
        assert job_state(f"{array}_{k}") == "COMPLETED"
        assert json.loads((run_dir / "folds" / str(k) / "done.json").read_text())["fold"] == k
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["folds"] == 2 and set(summary["quality"]["style"]) == {"out_of_sample", "in_sample"}
    assert (run_dir / "outliers" / "all" / "index.html").is_file()
