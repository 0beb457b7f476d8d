"""The audit: folds disjoint, covering, copies together, deterministic; a fold's model never trains on what
it scores; merge covers every sample once and refuses a missing or stale fold."""
from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from artdist.audit.folds import (ALL, HELDOUT, INSAMPLE, TRAIN, AuditDir, Sample, assign_folds, fold_config,
                                 painting_id, write_plan)
from artdist.audit.merge import FITTED, merge, save_fold_scores
from artdist.audit.run import train_fold
from artdist.config import load_config
from artdist.data.loader import TrainLoader, make_eval_loader
from artdist.data.manifest import read_manifest
from artdist.errors import UserError
from artdist.outliers.scores import TaskScores


def audit_config(shards: Path, planted: Path, run_dir: Path, folds: int = 3, extra: tuple[str, ...] = ()):
    """A tiny CPU recipe (32 px, one epoch) over the test shards."""
    sets = {"out_dir": run_dir, "data.shards": shards, "data.image_size": 32, "data.batch_size": 16,
            "data.num_workers": 0, "data.shuffle_buffer": 50, "data.crop_padding": 2, "model.backbone": "resnet18",
            "model.lstm_hidden": 16, "model.lstm_layers": 1, "model.sequence": "pooled", "train.epochs": 1,
            "train.device": "cpu", "train.warmup_epochs": 0, "outliers.planted": planted, "audit.folds": folds}
    return load_config(None, [f"{k}={v}" for k, v in sets.items()] + list(extra))


def samples_of(n: int, copies: int = 0, classes: int = 4, seed: int = 0) -> list[Sample]:
    """n synthetic samples; the first `copies` paintings have a second copy under another label."""
    rng = np.random.default_rng(seed)
    out = [Sample("train", "s.tar", f"k{i}", i, f"F/p{i}.jpg", 1000 + i, int(rng.integers(classes))) for i in range(n)]
    out += [Sample("val", "v.tar", f"c{i}", n + i, f"G/p{i}.jpg", 1000 + i, int(rng.integers(classes)))
            for i in range(copies)]
    return out


def test_folds_cover_once_keep_copies_together_stratify_and_repeat():
    samples = samples_of(300, copies=40)
    folds = assign_folds(samples, 5)
    assert len(folds) == len(samples) and set(folds) == set(range(5))  # every sample exactly one fold
    by_painting: dict[int, set[int]] = {}
    for s, f in zip(samples, folds):
        by_painting.setdefault(s.painting, set()).add(f)
    assert all(len(fs) == 1 for fs in by_painting.values())  # copies together
    sizes = Counter(next(iter(fs)) for fs in by_painting.values())
    assert max(sizes.values()) - min(sizes.values()) <= 1  # paintings per fold
    first = {}
    for s in samples:
        first.setdefault(s.painting, s)
    for label in range(4):  # stratified: each class spread evenly (±1 painting)
        per_fold = Counter(next(iter(by_painting[p])) for p, s in first.items() if s.label == label)
        assert max(per_fold.get(f, 0) for f in range(5)) - min(per_fold.get(f, 0) for f in range(5)) <= 1
    assert assign_folds(list(reversed(samples)), 5) == list(reversed(folds))  # input order does not matter
    assert assign_folds(samples, 5) == folds


def test_painting_id_from_the_shard_or_the_file_name():
    a = painting_id({"path": "Cubism/x_title.jpg"})
    assert a == painting_id({"path": "Fauvism/x_title.jpg"}) != painting_id({"path": "Cubism/y.jpg"})
    assert 0 <= a < 2**63
    assert painting_id({"path": "Cubism/x_title.jpg", "painting_id": 7}) == 7


@pytest.fixture(scope="module")
def plan(demo_shards, synth_corpus, tmp_path_factory):
    cfg = audit_config(demo_shards, synth_corpus / "planted_noise.csv", tmp_path_factory.mktemp("audit"))
    return cfg, write_plan(cfg)


def view_ids(view: Path, split: str) -> list[int]:
    return [s.meta["id"] for s in read_manifest(view).samples(split)]


def test_plan_views_partition_every_split_and_are_identical_across_runs(plan, demo_shards):
    cfg, p = plan
    audit_dir = AuditDir(cfg.run_dir)
    every = sorted(s.meta["id"] for split in ("train", "val", "test") for s in read_manifest(demo_shards).samples(split))
    assert p["num_samples"] == len(every) and sum(p["fold_sizes"]) == len(every)
    heldout = [view_ids(audit_dir.fold(k) / "shards", HELDOUT) for k in range(3)]
    assert sorted(i for ids in heldout for i in ids) == every  # disjoint and covering
    for k in range(3):
        train = view_ids(audit_dir.fold(k) / "shards", TRAIN)
        assert sorted(train + heldout[k]) == every and not set(train) & set(heldout[k])
        assert view_ids(audit_dir.fold(k) / "shards", INSAMPLE) == heldout[(k + 1) % 3]
    assert sorted(view_ids(audit_dir.shards, ALL)) == every
    view = audit_dir.fold(0) / "shards"  # class counts (loss weights) see the fold's training samples only
    counts = read_manifest(view).label_counts(TRAIN)
    styles = Counter(s.meta["style"] for s in read_manifest(view).samples(TRAIN) if s.meta["style"] >= 0)
    assert counts["style"] == [styles[c] for c in range(len(counts["style"]))]
    assert 0 < sum(counts["style"]) < len(every)
    table = audit_dir.table.read_bytes()
    assert write_plan(cfg)["fingerprint"] == p["fingerprint"] and audit_dir.table.read_bytes() == table


def test_another_plan_in_the_same_dir_is_refused(plan):
    cfg, _ = plan
    with pytest.raises(UserError, match="holds an audit of other shards, folds, recipe or outliers.tta"):
        write_plan(audit_config(cfg.data.shards, cfg.outliers.planted, cfg.run_dir, folds=4))
    # Each fold scores its paintings when it ends: scoring them another way is another audit.
    with pytest.raises(UserError, match="holds an audit of other shards, folds, recipe or outliers.tta"):
        write_plan(audit_config(cfg.data.shards, cfg.outliers.planted, cfg.run_dir, extra=("outliers.tta=none",)))


def test_the_fold_loaders_yield_only_their_samples_with_equal_steps_per_rank(plan):
    cfg, _ = plan
    fold = fold_config(cfg, 1)
    manifest = read_manifest(fold.data.shards)
    heldout = set(view_ids(Path(fold.data.shards), HELDOUT))
    train = set(view_ids(Path(fold.data.shards), TRAIN))
    seen, lengths = [], []
    for rank in range(2):
        loader = TrainLoader(fold.data, manifest, rank, 2, seed=0)
        loader.set_epoch(0)
        batches = list(loader)
        lengths.append(len(batches))
        seen += [i for _, _, ids in batches for i in ids.tolist()]
    assert lengths[0] == lengths[1] == len(loader)
    assert set(seen) == train and not set(seen) & heldout
    scored = [i for rank in range(2)
              for _, _, ids in make_eval_loader(fold.data, manifest, HELDOUT, rank, 2) for i in ids.tolist()]
    assert sorted(scored) == sorted(heldout)


def test_a_fold_run_scores_only_samples_its_loader_never_yielded_and_merge_checks_folds(plan, monkeypatch):
    cfg, p = plan
    audit_dir = AuditDir(cfg.run_dir)
    yielded: set[int] = set()
    original = TrainLoader.__iter__

    def recording(self):
        for batch in original(self):
            yielded.update(batch[2].tolist())
            yield batch

    monkeypatch.setattr(TrainLoader, "__iter__", recording)
    assert train_fold(fold_config(cfg, 0)) == "done"
    with np.load(audit_dir.fold_scores(0)) as data:
        scored = set(data["heldout/style/ids"].tolist()) | set(data["heldout/genre/ids"].tolist())
        # the in-sample fold once more as the model trained (outliers.tta is on by default): same samples
        assert np.array_equal(data["fitted/style/ids"], data["insample/style/ids"])
    assert yielded and scored and not yielded & scored
    assert scored <= set(view_ids(audit_dir.fold(0) / "shards", HELDOUT))
    done = json.loads(audit_dir.fold_done(0).read_text())
    assert done["fingerprint"] == p["fingerprint"] and done["fold"] == 0
    # A rerun of the finished fold is a no-op, not a refusal, even when the audit section is spelled
    # differently (its effect on the fold run is in train.*, which the plan's fingerprint guards).
    scores_written = audit_dir.fold_scores(0).stat().st_mtime_ns
    respelled = dataclasses.replace(cfg, audit=dataclasses.replace(cfg.audit, splits=list(p["splits"])))
    assert train_fold(fold_config(respelled, 0)) == "done"
    assert audit_dir.fold_scores(0).stat().st_mtime_ns == scores_written

    with pytest.raises(UserError, match=r"^fold 1 of 3 has not finished"):
        merge(cfg)
    audit_dir.fold_done(0).write_text(json.dumps({**done, "fingerprint": "0" * 16}))
    with pytest.raises(UserError, match=r"^fold 0 is stale"):
        merge(cfg)
    audit_dir.fold_done(0).write_text(json.dumps(done))


def fake_fold_scores(cfg, k: int, fingerprint: str, rng: np.random.Generator) -> None:
    """Random scores for fold k's held-out and in-sample samples, as a fold run writes them."""
    audit_dir = AuditDir(cfg.run_dir)
    manifest = read_manifest(audit_dir.fold(k) / "shards")
    parts, probs = {}, {}
    for part in (HELDOUT, INSAMPLE):
        metas = [s.meta for s in manifest.samples(part)]
        parts[part] = {}
        for task in cfg.model.tasks:
            rows = sorted((m["id"], m[task]) for m in metas if m[task] >= 0)
            n, c = len(rows), len(manifest.classes[task])
            p = rng.dirichlet(np.ones(c), size=n).astype(np.float32)
            ids, assigned = (np.array(col, dtype=np.int64) for col in zip(*rows))
            parts[part][task] = TaskScores(
                ids=ids, assigned=assigned, predicted=p.argmax(1), max_softmax=p.max(1),
                nll=-np.log(p[np.arange(n), assigned]), margin=rng.random(n, dtype=np.float32),
                energy=rng.random(n, dtype=np.float32), mahalanobis=rng.random(n, dtype=np.float32),
                feature_nll=rng.random(n, dtype=np.float32), feature_predicted=p.argmax(1))
            if part == HELDOUT:
                probs[task] = p
    # As the model trained, without outliers.tta: here it fitted every label it saw.
    parts[FITTED] = {task: dataclasses.replace(s, predicted=s.assigned.copy()) for task, s in parts[INSAMPLE].items()}
    save_fold_scores(audit_dir.fold_scores(k), parts, probs)
    audit_dir.fold_done(k).write_text(json.dumps({"fingerprint": fingerprint, "fold": k}))


def test_merge_ranks_every_sample_once_with_its_split_and_fold(demo_shards, synth_corpus, tmp_path, capsys):
    cfg = audit_config(demo_shards, synth_corpus / "planted_noise.csv", tmp_path / "run", folds=2)
    p = write_plan(cfg)
    rng = np.random.default_rng(0)
    for k in range(2):
        fake_fold_scores(cfg, k, p["fingerprint"], rng)
    summary = merge(cfg)
    audit_dir = AuditDir(cfg.run_dir)
    with open(audit_dir.table, newline="") as f:
        table = {int(r["id"]): r for r in csv.DictReader(f)}
    with open(cfg.run_dir / "outliers" / ALL / "style.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["id"]) for r in rows) == sorted(table)  # every sample (all are style-labelled), once
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    assert all(r["split"] == table[int(r["id"])]["split"] and r["fold"] == table[int(r["id"])]["fold"] for r in rows)
    stored = json.loads(audit_dir.summary.read_text())
    assert set(stored["quality"]["style"]) == {"out_of_sample", "in_sample"}
    # The fit of the planted labels is read from the fitted part (1.0 by construction), not from the in-sample
    # scores (random predictions here).
    assert stored["planted_fit_in_sample"] == {task: 1.0 for task in cfg.model.tasks}
    assert stored["quality"]["style"]["out_of_sample"]["planted"] > 0
    assert "AUROC out" in capsys.readouterr().out
    with np.load(audit_dir.probs) as data:
        assert data["style/probs"].shape == (len(table), len(read_manifest(demo_shards).classes["style"]))
    assert summary["num_samples"] == len(table)
    pytest.importorskip("cleanlab")
    from artdist.audit.peer import compare_cleanlab
    peer = compare_cleanlab(cfg)
    assert set(peer["tasks"]["style"]["methods"]) >= {"artdist combined", "cleanlab get_label_quality_scores"}
    assert json.loads((cfg.run_dir / "vs_cleanlab.json").read_text())["tasks"]["style"]["planted"] > 0


@pytest.mark.slow
def test_cli_audits_locally_and_a_rerun_keeps_finished_folds(demo_shards, synth_corpus, tmp_path):
    run_dir = tmp_path / "run"
    sets = {"out_dir": run_dir, "data.shards": demo_shards, "data.image_size": 32, "data.batch_size": 16,
            "data.num_workers": 0, "data.shuffle_buffer": 50, "data.crop_padding": 2, "model.lstm_hidden": 16,
            "model.lstm_layers": 1, "model.sequence": "pooled", "model.backbone": "resnet18", "audit.epochs": 1,
            "train.device": "cpu", "outliers.planted": synth_corpus / "planted_noise.csv"}
    cmd = [sys.executable, "-m", "artdist", "audit", "--config", "jobs/audit_demo.yaml", "--folds", "2", "--nproc", "2",
           *(a for k, v in sets.items() for a in ("--set", f"{k}={v}"))]
    repo = Path(__file__).resolve().parents[1]
    first = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "AUROC out" in first.stdout and (run_dir / "summary.json").is_file()
    again = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.count("finished before, kept") == 2
