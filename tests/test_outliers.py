"""Outlier scores, class Gaussians, AUROC/precision@k, reports, planted-noise quality, 2-rank gathering."""
from __future__ import annotations

import base64
import csv
import dataclasses
import io
import json
import math
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from artdist.cli import main as cli_main
from artdist.config import TASKS, DataConfig, JobConfig, ModelConfig, save_config, to_dict
from artdist.dist import free_port
from artdist.data.loader import make_eval_loader
from artdist.data.manifest import read_manifest
from artdist.data.transforms import DeviceTransform
from artdist.errors import UserError
from artdist.model import build_model
from artdist.outliers import pipeline, ranking
from artdist.outliers.report import read_sample_index
from artdist.outliers.scores import ClassGaussian, GaussianAccumulator, TaskScores, softmax_scores
from artdist.train.checkpoint import FORMAT, save_atomic

# --------------------------------------------------------------------------- scores on hand-made logits


def test_softmax_scores_match_hand_computation():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0], [1.0, 1.0, -1.0]])
    assigned = torch.tensor([0, 1, 1])
    s = softmax_scores(logits, assigned)
    for i, (row, a) in enumerate(zip(logits.tolist(), assigned.tolist())):
        z = sum(math.exp(v) for v in row)
        p = [math.exp(v) / z for v in row]
        assert s["max_softmax"][i].item() == pytest.approx(max(p), abs=1e-6)
        assert s["nll"][i].item() == pytest.approx(-math.log(p[a]), abs=1e-5)
        assert s["margin"][i].item() == pytest.approx(max(q for k, q in enumerate(p) if k != a) - p[a], abs=1e-6)
        assert s["energy"][i].item() == pytest.approx(-math.log(z), abs=1e-5)
    assert s["predicted"][:2].tolist() == [0, 2]
    assert s["margin"][0] < 0 < s["margin"][1]  # assigned wins / loses
    assert s["margin"][2].item() == pytest.approx(0.0, abs=1e-6)  # tie between assigned and another class


def test_scores_stay_finite_for_extreme_logits_and_half_precision():
    logits = torch.tensor([[80.0, -80.0]], dtype=torch.bfloat16)
    s = softmax_scores(logits, torch.tensor([1]))
    assert torch.isfinite(s["nll"]).all() and s["nll"].item() == pytest.approx(160.0, rel=1e-2)
    assert s["max_softmax"].dtype == torch.float32


# --------------------------------------------------------------------------- class Gaussians


def _two_class_data(rng: np.random.Generator, n: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    y = rng.integers(0, 2, n)
    centers = np.array([[0.0, 0.0, 0.0], [4.0, -2.0, 1.0]])
    x = centers[y] + rng.normal(size=(n, 3)) * np.array([2.0, 0.5, 1.0])
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def test_gaussian_fit_matches_numpy_and_is_chunk_invariant():
    x, y = _two_class_data(np.random.default_rng(0))
    y[:7] = -1  # unknown labels are left out of the fit
    whole = GaussianAccumulator(2, 3, torch.device("cpu"))
    whole.add(x, y)
    chunked = GaussianAccumulator(2, 3, torch.device("cpu"))
    for part in range(0, len(y), 64):
        chunked.add(x[part:part + 64], y[part:part + 64])
    g, g2 = whole.fit(), chunked.fit()
    xs, ys = x.double().numpy()[7:], y.numpy()[7:]
    means = np.stack([xs[ys == c].mean(0) for c in (0, 1)])
    centred = xs - means[ys]
    pooled = centred.T @ centred / (len(ys) - 2)
    np.testing.assert_allclose(g.means.numpy(), means, rtol=1e-10)
    assert g.counts.tolist() == [float((ys == 0).sum()), float((ys == 1).sum())]
    # the shrunk covariance is (1 - rho) * pooled + rho * mean-variance * I, with 0 <= rho < 1
    assert 0.0 <= g.shrinkage < 1.0
    mu = np.trace(pooled) / 3
    np.testing.assert_allclose(g.covariance.numpy(), (1 - g.shrinkage) * pooled + g.shrinkage * mu * np.eye(3), rtol=1e-8)
    np.testing.assert_allclose(g.precision.numpy() @ g.covariance.numpy(), np.eye(3), atol=1e-9)
    np.testing.assert_allclose(g2.covariance.numpy(), g.covariance.numpy(), rtol=1e-9)
    assert g2.shrinkage == pytest.approx(g.shrinkage)


def test_oas_shrinks_noisy_isotropic_estimates_more_than_well_determined_ones():
    rng = np.random.default_rng(1)
    few = torch.tensor(rng.normal(size=(20, 10)))
    many = torch.tensor(rng.normal(size=(5000, 3)) * np.array([10.0, 1.0, 0.1]))
    rho = []
    for x in (few, many):
        acc = GaussianAccumulator(1, x.shape[1], torch.device("cpu"))
        acc.add(x, torch.zeros(len(x), dtype=torch.int64))
        rho.append(acc.fit().shrinkage)
    assert rho[0] > 0.5 and rho[1] < 0.01


def test_feature_scores_distance_and_gaussian_classifier():
    nan = float("nan")
    g = ClassGaussian(
        means=torch.tensor([[0.0, 0.0], [10.0, 10.0], [nan, nan]], dtype=torch.float64),
        covariance=torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64)),
        precision=torch.diag(torch.tensor([0.25, 1.0], dtype=torch.float64)),
        shrinkage=0.0, counts=torch.tensor([5.0, 5.0, 0.0]),  # class 2 had no training samples
    )
    emb = torch.tensor([[2.0, 0.0], [10.0, 13.0], [10.0, 13.0], [2.0, 0.0]])
    f = g.feature_scores(emb, torch.tensor([0, 1, 0, 2]))
    # squared distances: sample 0 -> (1, 116), samples 1 and 2 -> (194, 9)
    np.testing.assert_allclose(f["mahalanobis"][:3].numpy(), [1.0, 3.0, math.sqrt(194)], rtol=1e-12)
    expected_nll = [math.log1p(math.exp(-57.5)), math.log1p(math.exp(-92.5)), 92.5 + math.log1p(math.exp(-92.5))]
    np.testing.assert_allclose(f["feature_nll"][:3].numpy(), expected_nll, rtol=1e-9, atol=1e-12)
    assert f["feature_predicted"].tolist() == [0, 1, 1, 0]  # the unseen class is never predicted
    assert math.isnan(f["mahalanobis"][3]) and math.isnan(f["feature_nll"][3])


# --------------------------------------------------------------------------- ranking metrics


def test_auroc_perfect_inverted_ties_and_a_known_case():
    pos = np.array([0, 0, 1, 1], dtype=bool)
    assert ranking.auroc(np.array([0.1, 0.2, 0.8, 0.9]), pos) == 1.0
    assert ranking.auroc(np.array([0.9, 0.8, 0.2, 0.1]), pos) == 0.0
    assert ranking.auroc(np.full(4, 0.3), pos) == 0.5
    assert ranking.auroc(np.array([0.1, 0.4, 0.35, 0.8]), pos) == pytest.approx(0.75)
    # positives {1, 1}, negatives {1, 0}: pairs score 0.5 + 1 + 0.5 + 1 out of 4
    assert ranking.auroc(np.array([1.0, 0.0, 1.0, 1.0]), np.array([0, 0, 1, 1], dtype=bool)) == pytest.approx(0.75)
    assert math.isnan(ranking.auroc(np.array([0.1, 0.2]), np.array([False, False])))


def test_auroc_equals_pairwise_definition_on_random_data():
    rng = np.random.default_rng(2)
    s = rng.integers(0, 5, 60).astype(float)  # many ties
    pos = rng.random(60) < 0.3
    pairs = [(a > b) + 0.5 * (a == b) for a in s[pos] for b in s[~pos]]
    assert ranking.auroc(s, pos) == pytest.approx(np.mean(pairs))


def test_precision_at_k_with_and_without_ties():
    pos = np.array([1, 1, 0, 0, 0], dtype=bool)
    assert ranking.precision_at_k(np.array([5.0, 4, 3, 2, 1]), pos, 2) == 1.0
    assert ranking.precision_at_k(np.array([1.0, 2, 3, 4, 5]), pos, 2) == 0.0
    assert ranking.precision_at_k(np.array([5.0, 4, 3, 2, 1]), pos, 4) == 0.5
    # one sure hit above the cut, then 1 slot shared by three tied samples holding 1 positive
    assert ranking.precision_at_k(np.array([3.0, 2, 2, 2, 1]), pos, 2) == pytest.approx((1 + 1 / 3) / 2)


def test_robust_z_ignores_the_outlier_it_measures():
    z = ranking.robust_z(np.array([1.0, 2.0, 3.0, 4.0, 100.0]))
    assert z[2] == 0.0 and z[4] == pytest.approx(97 / 1.4826, rel=1e-5)


def _scores(nll, feature_nll) -> TaskScores:
    n = len(nll)
    zeros = np.zeros(n, np.float32)
    return TaskScores(
        ids=np.arange(100, 100 + n, dtype=np.int64), assigned=np.zeros(n, np.int64),
        predicted=np.zeros(n, np.int64), max_softmax=zeros + 0.9, nll=np.asarray(nll, dtype=np.float32),
        margin=zeros, energy=zeros, mahalanobis=zeros, feature_nll=np.asarray(feature_nll, dtype=np.float32),
        feature_predicted=np.zeros(n, np.int64),
    )


def test_combined_score_multiplies_one_plus_both_surprisals_and_stands_in_for_a_missing_one():
    s = _scores(nll=[0.1, 5.0, 0.2, 3.0], feature_nll=[1.0, 2.0, np.nan, 9.0])
    np.testing.assert_allclose(np.exp(ranking.combined_score(s)), [1.1 * 2, 6 * 3, 1.2 * 1.2, 4 * 10], rtol=1e-5)


def test_combined_score_keeps_its_top_when_the_gaussians_surprisal_is_rescaled():
    # A sum of nats lets the sharper expert rank alone (about half the top 20 changes at x100); the
    # product of (1 + surprisal) keeps most of its top.
    rng = np.random.default_rng(0)
    nll, feature = rng.exponential(1.0, 200), rng.exponential(1.0, 200)

    def top(scale: float) -> set[int]:
        return set(np.argsort(ranking.combined_score(_scores(nll=nll, feature_nll=scale * feature)))[-20:].tolist())

    assert len(top(1.0) & top(100.0)) >= 16


# --------------------------------------------------------------------------- on the demo shards

SPLIT = "val"


def small_config(shards: Path, run_dir: Path, planted: Path) -> JobConfig:
    cfg = JobConfig(name="outliers-test", out_dir=str(run_dir))
    cfg.data = DataConfig(shards=str(shards), image_size=64, batch_size=64, num_workers=0)
    cfg.model = ModelConfig(backbone="resnet18", sequence="pooled", lstm_hidden=32, lstm_layers=1, dropout=0.0)
    cfg.outliers.top_k = 10
    cfg.outliers.planted = str(planted)
    return cfg


def train_on_frozen_backbone(model: torch.nn.Module, cfg: JobConfig, manifest: dict, steps: int = 200) -> None:
    """Train everything after a fixed-seed (untrained) backbone on its cached training feature maps:
    a model that separates the synthetic classes in seconds, where end-to-end training takes minutes."""
    loader = make_eval_loader(cfg.data, manifest, cfg.data.train_split, 0, 1)
    transform = DeviceTransform(cfg.data, "cpu", train=False, channels_last=False)
    with torch.no_grad():
        cached = [(model.backbone(transform(images)), labels) for images, labels, _ in loader]
    fmaps, labels = torch.cat([c[0] for c in cached]), torch.cat([c[1] for c in cached])
    backbone, model.backbone = model.backbone, torch.nn.Identity()  # forward_features(fmaps) = the rest
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        logits, _ = model.forward_features(fmaps)
        loss = sum(torch.nn.functional.cross_entropy(logits[t], labels[:, TASKS.index(t)], ignore_index=-1)
                   for t in cfg.model.tasks)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.backbone = backbone
    model.eval()


@pytest.fixture(scope="module")
def probed(demo_shards, synth_corpus, tmp_path_factory):
    """(cfg, manifest, model, gaussians, val scores) of a fixed-seed backbone with trained LSTM + heads."""
    cfg = small_config(demo_shards, tmp_path_factory.mktemp("run"), synth_corpus / "planted_noise.csv")
    manifest = read_manifest(demo_shards)
    torch.manual_seed(0)
    model = build_model(cfg.model, manifest.num_classes).eval()
    train_on_frozen_backbone(model, cfg, manifest)
    cpu = torch.device("cpu")
    gaussians = pipeline.fit_class_gaussians(model, cfg, manifest, cpu, None)
    scores = pipeline.score_split(model, cfg, manifest, SPLIT, cpu, None, gaussians)
    return cfg, manifest, model, gaussians, scores


def planted_in_split(planted_csv: Path, manifest: dict, shards: Path, task: str) -> set[str]:
    with open(planted_csv, newline="") as f:
        planted = {row["path"] for row in csv.DictReader(f) if row["task"] == task}
    paths = {ref.path for ref in read_sample_index(manifest, SPLIT).values()}
    return planted & paths


def test_gathered_scores_cover_the_split_once(probed):
    cfg, manifest, _, _, scores = probed
    labelled = manifest.splits[SPLIT].num_samples
    for task, s in scores.items():
        assert np.all(np.diff(s.ids) > 0)  # sorted, unique
        assert 0 < len(s.ids) <= labelled
        assert np.all((s.assigned >= 0) & (s.assigned < len(manifest.classes[task])))
        assert np.isfinite(s.mahalanobis).all() and (s.mahalanobis > 0).all()
        assert np.isfinite(s.feature_nll).all() and (s.feature_nll >= 0).all()
        assert np.all((s.max_softmax >= 1 / len(manifest.classes[task])) & (s.max_softmax <= 1))
    assert len(scores["style"].ids) == labelled  # every synthetic image has a style


def test_planted_noise_is_found_far_better_than_by_the_max_softmax_rule(probed, tmp_path, capsys):
    cfg, manifest, _, gaussians, scores = probed
    cfg = dataclasses.replace(cfg, out_dir=str(tmp_path / "run"))
    summary = pipeline.write_reports(scores, cfg, manifest, SPLIT, ranking.read_planted(cfg.outliers.planted),
                              shrinkage={t: g.shrinkage for t, g in gaussians.items()})
    q = summary["tasks"]["style"]["quality"]
    planted = planted_in_split(Path(cfg.outliers.planted), manifest, Path(cfg.data.shards), "style")
    assert q["planted"] == q["k"] == len(planted) > 0
    combined, baseline = q["scores"]["combined"], q["scores"]["max_softmax"]
    assert combined["auroc"] >= 0.85
    assert combined["auroc"] >= baseline["auroc"] + 0.2
    assert combined["precision_at_k"] > baseline["precision_at_k"]
    for task, t in summary["tasks"].items():  # the weaker tasks too, by a smaller margin
        assert t["quality"]["scores"]["combined"]["auroc"] > t["quality"]["scores"]["max_softmax"]["auroc"] + 0.05, task
    printed = capsys.readouterr().out
    assert re.search(rf"max_softmax +{baseline['auroc']:5.3f}", printed) and f"{combined['auroc']:5.3f}" in printed
    stored = json.loads((tmp_path / "run" / "outliers" / SPLIT / "summary.json").read_text())
    assert stored["tasks"]["style"]["quality"] == q
    assert stored["tta"] == cfg.outliers.tta == "flip" and "mirror image" in stored["combined"]  # the page says so


def expected_flags(s: TaskScores, cfg: JobConfig) -> tuple[set[int], list[int]]:
    """Independently of the report code: ids flagged by either rule, and the combined-flagged ids in rank order."""
    combined = ranking.combined_score(s)
    order = sorted(range(len(s.ids)), key=lambda i: (-combined[i], s.ids[i]))
    n_flag = math.ceil(cfg.outliers.flag_fraction * len(s.ids))
    top = [int(s.ids[i]) for i in order[:n_flag]]
    below = {int(i) for i in s.ids[s.max_softmax < cfg.outliers.threshold]}
    return below | set(top), top


def page_data(page: Path) -> dict:
    """The data the review page renders, as inlined in index.html."""
    found = re.search(r'<script type="application/json" id="artdist-data">(.*?)</script>', page.read_text(), re.S)
    return json.loads(found.group(1))


def test_csv_json_page_and_tensorboard_show_exactly_the_flagged_samples(probed, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    cfg, manifest, _, _, scores = probed
    cfg = dataclasses.replace(cfg, out_dir=str(tmp_path / "run"))
    writer = SummaryWriter(str(tmp_path / "tb"))
    planted = ranking.read_planted(cfg.outliers.planted)
    pipeline.write_reports(scores, cfg, manifest, SPLIT, planted, writer=writer)
    writer.close()
    out = tmp_path / "run" / "outliers" / SPLIT
    data = page_data(out / "index.html")
    assert data["tasks"] == list(cfg.model.tasks)
    paths = {int(i): p for i, p in data["paths"].items()}
    for task, s in scores.items():
        flagged, top = expected_flags(s, cfg)
        with open(out / f"{task}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert {int(r["id"]) for r in rows} == flagged and len(rows) == len(flagged)
        assert [int(r["rank"]) for r in rows] == sorted(int(r["rank"]) for r in rows)
        assert [int(r["id"]) for r in rows if r["flagged_combined"] == "yes"] == top
        assert all(r["reasons"] for r in rows)
        for r in rows:
            assert (r["flagged_max_softmax"] == "yes") == (float(r["max_softmax"]) < cfg.outliers.threshold)
            if r["flagged_max_softmax"] == "yes":
                assert f"below {cfg.outliers.threshold:g} confidence" in r["reasons"]
            if r["predicted"] != r["assigned"]:
                assert f"predicted {r['predicted']} with" in r["reasons"]
        js = json.loads((out / f"{task}.json").read_text())
        assert [r["id"] for r in js["rows"]] == [int(r["id"]) for r in rows]
        # the page: every flagged row (page_rows is above their count here), same ranks, labels and paths
        shown = [r for r in data["rows"] if r["task"] == task]
        assert [r["id"] for r in shown] == [int(r["id"]) for r in rows]
        for r, c in zip(shown, rows):
            assert r["ranks"]["combined"] == int(c["rank"]) and paths[r["id"]] == c["path"]
            assert (r["assigned"], r["predicted"]) == (c["assigned"], c["predicted"])
            assert r["planted"] == ((task, c["path"]) in planted)
            assert "other" not in r["kinds"]  # every reason text has a kind for the page's filter
            for other, (label, predicted) in r["others"].items():
                o = scores[other]
                j = int(np.flatnonzero(o.ids == r["id"])[0])
                assert label == manifest.classes[other][o.assigned[j]]
                assert predicted == manifest.classes[other][o.predicted[j]]
        assert any(r["planted"] for r in shown) or not any((task, p) in planted for p in paths.values())
        typical = [i for members in data["typical"][task].values() for i in members]
        assert typical and not set(typical) & set(top)
        assert set(data["typical"][task]) <= set(manifest.classes[task])
    assert data["quality"]["style"]["planted"] > 0
    # thumbnails inline, enlarged views beside the page, nothing fetched from a network
    assert set(data["thumbs"]) == set(data["paths"]) == set(data["large"])
    for i, src in list(data["thumbs"].items())[:5]:
        assert src.startswith("data:image/jpeg;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as img:
            assert img.format == "JPEG" and max(img.size) <= 128
        with Image.open(out / data["large"][i]) as img:  # the shard's own picture: 64 px square here
            assert img.format == "JPEG" and img.size == (64, 64)
    assert "http" not in (out / "index.html").read_text()
    for i, uri in data["originals"].items():  # the synthetic images are reachable: each links its original
        assert uri == (Path(manifest.extra["options"]["images"]) / data["paths"][i]).resolve().as_uri()
    assert set(data["originals"]) == set(data["paths"])
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert set(events.Tags()["images"]) == {f"outliers/{SPLIT}/{t}" for t in cfg.model.tasks}
    image = events.Images(f"outliers/{SPLIT}/style")[0]
    assert image.width > 128 and image.height > 128


def test_projector_holds_the_top_outliers_and_a_fixed_sample_with_their_labels(probed, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    cfg, manifest, model, gaussians, _ = probed
    cfg = dataclasses.replace(cfg, out_dir=str(tmp_path / "run"),
                              outliers=dataclasses.replace(cfg.outliers, projector=20))
    projected: list = []
    scores = pipeline.score_split(model, cfg, manifest, SPLIT, torch.device("cpu"), None, gaussians, projected)
    ids, emb = projected[0]
    assert len(ids) == 20 == len(set(ids.tolist())) and emb.shape == (20, gaussians["style"].means.shape[1])
    worst = {}
    for s in scores.values():
        for i, c in zip(s.ids.tolist(), ranking.combined_score(s).tolist()):
            worst[i] = max(worst.get(i, -math.inf), c)
    top = sorted(worst, key=lambda i: (-worst[i], i))[:10]
    assert set(top) <= set(ids.tolist())
    writer = SummaryWriter(str(tmp_path / "tb"))
    pipeline.write_reports(scores, cfg, manifest, SPLIT, writer=writer, projected=(ids, emb))
    writer.close()
    [config] = list((tmp_path / "tb").rglob("projector_config.pbtxt"))
    assert "sprite" in config.read_text()
    folder = next(p.parent for p in (tmp_path / "tb").rglob("metadata.tsv"))
    lines = (folder / "metadata.tsv").read_text().splitlines()
    header, rows = lines[0].split("\t"), [line.split("\t") for line in lines[1:]]
    assert header[:4] == ["path", "style", "style_predicted", "style_outlier_rank"]
    index = read_sample_index(manifest, SPLIT)
    assert [r[0] for r in rows] == [index[i].path for i in ids.tolist()]
    style = scores["style"]
    rank = ranking.descending_ranks(ranking.combined_score(style), style.ids)
    for i, r in zip(ids.tolist(), rows):
        j = int(np.flatnonzero(style.ids == i)[0])
        assert r[1] == manifest.classes["style"][style.assigned[j]] and r[3] == str(rank[j])
    vectors = np.loadtxt(folder / "tensors.tsv", delimiter="\t")
    np.testing.assert_allclose(vectors, emb, rtol=1e-4, atol=1e-5)
    with Image.open(folder / "sprite.png") as sprite:
        assert sprite.width >= 64 * 4


def test_a_lost_or_repeated_sample_is_an_error(probed, monkeypatch):
    cfg, manifest, _, gaussians, _ = probed
    width = gaussians["style"].means.shape[1]

    def fake_batches(model, cfg, manifest, split, device, amp_dtype):
        ids = torch.tensor([3, 4, 4])  # id 4 twice
        labels = torch.zeros(3, 3, dtype=torch.int64)
        logits = {t: torch.zeros(3, len(manifest.classes[t])) for t in cfg.model.tasks}
        yield ids, labels, logits, torch.zeros(3, width)

    monkeypatch.setattr(pipeline, "_batches", fake_batches)
    with pytest.raises(UserError, match="exactly once"):
        pipeline.score_split(None, cfg, manifest, SPLIT, torch.device("cpu"), None, gaussians)


TWO_RANK_SCRIPT = """
import pickle, sys, torch
from artdist import dist
from artdist.data.manifest import read_manifest
from artdist.outliers import pipeline
cfg, state_path, out_path = pickle.load(open(sys.argv[1], "rb"))
device = dist.init_distributed("cpu")
manifest = read_manifest(cfg.data.shards)
from artdist.model import build_model
model = build_model(cfg.model, manifest.num_classes).eval()
model.load_state_dict(torch.load(state_path))
gaussians = pipeline.fit_class_gaussians(model, cfg, manifest, device, None)
projected = []
scores = pipeline.score_split(model, cfg, manifest, "val", device, None, gaussians, projected)
if dist.is_main_process():
    pickle.dump((scores, {t: g.means for t, g in gaussians.items()}, projected), open(out_path, "wb"))
dist.cleanup()
"""


def test_two_ranks_give_the_same_scores_and_ids_as_one(probed, tmp_path):
    cfg, manifest, model, gaussians, scores = probed
    cfg = dataclasses.replace(cfg, outliers=dataclasses.replace(cfg.outliers, projector=15))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    with open(tmp_path / "args.pkl", "wb") as f:
        pickle.dump((cfg, str(tmp_path / "model.pt"), str(tmp_path / "out.pkl")), f)
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", TWO_RANK_SCRIPT, str(tmp_path / "args.pkl")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    with open(tmp_path / "out.pkl", "rb") as f:
        two, two_means, two_projected = pickle.load(f)
    one_projected: list = []
    pipeline.score_split(model, cfg, manifest, SPLIT, torch.device("cpu"), None, gaussians, one_projected)
    np.testing.assert_array_equal(two_projected[0][0], one_projected[0][0])  # the same paintings chosen
    np.testing.assert_allclose(two_projected[0][1], one_projected[0][1], rtol=1e-4, atol=1e-5)
    for task, one in scores.items():
        np.testing.assert_array_equal(two[task].ids, one.ids)
        np.testing.assert_array_equal(two[task].assigned, one.assigned)
        np.testing.assert_array_equal(two[task].predicted, one.predicted)
        for name in ("max_softmax", "nll", "margin", "energy"):
            np.testing.assert_allclose(getattr(two[task], name), getattr(one, name), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(two[task].mahalanobis, one.mahalanobis, rtol=1e-4)
        np.testing.assert_allclose(two_means[task].numpy(), gaussians[task].means.numpy(), rtol=1e-6, atol=1e-9)


def test_cli_scores_a_saved_run_and_explains_bad_input(probed, tmp_path, capsys):
    cfg, manifest, model, _, scores = probed
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_atomic({"format": FORMAT, "model": model.state_dict(), "config": to_dict(cfg),
                 "class_names": manifest.classes},
                run_dir / "model_best.pt")
    assert cli_main(["outliers", "--run", str(run_dir), "--set", "outliers.top_k=3"]) == 0
    out = run_dir / "outliers" / SPLIT
    assert "planted-noise detection" in capsys.readouterr().out  # the saved config names the planted file
    for task, s in scores.items():
        flagged, top = expected_flags(s, cfg)
        with open(out / f"{task}.csv", newline="") as f:
            assert {int(r["id"]) for r in csv.DictReader(f)} == flagged
    assert {r["task"] for r in page_data(out / "index.html")["rows"]} == set(scores)
    assert (out / "images").is_dir()

    def error(*argv: str) -> str:
        assert cli_main(["outliers", *argv]) == 2
        return capsys.readouterr().err

    assert "no such directory" in error("--run", str(tmp_path / "missing"))
    assert "does not exist" in error("--run", str(run_dir), "--checkpoint", "model_last.pt")
    assert "planted-noise file" in error("--run", str(run_dir), "--planted", str(tmp_path / "none.csv"))
    assert "unknown key" in error("--run", str(run_dir), "--set", "outliers.topk=3")


@pytest.mark.slow
def test_end_to_end_training_finds_the_planted_noise(demo_shards, synth_corpus, tmp_path):
    """`artdist train` from scratch (resnet18, 64 px) on the demo shards writes outlier reports at the end."""
    cfg = small_config(demo_shards, tmp_path / "run", synth_corpus / "planted_noise.csv")
    cfg.model = dataclasses.replace(cfg.model, sequence="spatial", lstm_hidden=64)
    cfg.data = dataclasses.replace(cfg.data, batch_size=32, augment="crop_flip", crop_padding=4)
    cfg.train = dataclasses.replace(cfg.train, epochs=10, lr=3e-3, backbone_lr=3e-3, warmup_epochs=1, device="cpu")
    save_config(cfg, tmp_path / "job.yaml")
    assert cli_main(["train", "--config", str(tmp_path / "job.yaml")]) == 0
    summary = json.loads((tmp_path / "run" / "outliers" / SPLIT / "summary.json").read_text())
    style = summary["tasks"]["style"]["quality"]["scores"]
    assert style["combined"]["auroc"] >= 0.9
    assert style["combined"]["auroc"] >= style["max_softmax"]["auroc"] + 0.2


def test_embedding_duplicates_report_every_group_member_with_its_split_and_labels(probed, tmp_path, capsys):
    from artdist.outliers import duplicates as embedding_duplicates
    cfg, manifest, model, _, _ = probed
    cfg = dataclasses.replace(cfg, out_dir=str(tmp_path))
    cfg.duplicates = dataclasses.replace(cfg.duplicates, chunk=64)
    groups, index = embedding_duplicates.find_groups(model, cfg, manifest, torch.device("cpu"), None)
    assert len(index) == sum(s.num_samples for s in manifest.splits.values())
    summary = embedding_duplicates.write_reports(groups, index, cfg, manifest, planted=None)
    out = tmp_path / "duplicates"
    with open(out / "groups.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(len(g["members"]) for g in groups) and summary["groups"] == len(groups)
    for row in rows:
        assert index[int(row["id"])].path == row["path"] and row["split"] in manifest.splits
        assert -1.0 <= float(row["cosine"]) <= 1.0
    assert json.loads((out / "groups.json").read_text())["groups"] == groups
    assert (out / "index.html").read_text().count("<figure>") == sum(len(g["members"]) for g in groups[:200])
    assert "embedding near-duplicates (distance < 0.2 x the 5th neighbour's)" in capsys.readouterr().out
