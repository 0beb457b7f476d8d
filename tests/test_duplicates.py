"""Copies of one picture: hash index vs brute force, planted copies found per kind, the leakage policy,
embedding k-NN vs brute force, and copies in the outlier ranking and the evaluation ceiling."""
from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from artdist.config import TASKS, DataConfig, JobConfig, ModelConfig, ShardConfig, SynthConfig
from artdist.data import duplicates
from artdist.data.image import encode_image, prepare_image
from artdist.data.manifest import Manifest
from artdist.data.synth import make_corpus
from artdist.data.shard import shard_dataset
from artdist.model import build_model
from artdist.outliers import pipeline
from artdist.outliers.duplicates import copy_pairs, descriptor_pairs, find_groups
from artdist.outliers.scores import TaskScores


def _brute_pairs(codes: np.ndarray, k: int) -> set[tuple[int, int]]:
    d = duplicates.hamming(codes[:, None, :], codes[None, :, :])
    i, j = np.nonzero(np.triu(d <= k, 1))
    return set(zip(i.tolist(), j.tolist()))


@pytest.mark.parametrize("k", [0, 1, 3, 16, 20])
def test_band_index_finds_exactly_the_pairs_of_a_brute_force_scan(k):
    rng = np.random.default_rng(k)
    bits = rng.integers(0, 2, (300, 256), dtype=np.uint8)
    # near copies: flip up to k + 2 random bits of some codes, and a few identical codes
    flips = bits[::7].copy()
    for row in flips:
        row[rng.choice(256, rng.integers(1, k + 3), replace=False)] ^= 1
    bits = np.concatenate([bits, flips, bits[:5]])
    codes = duplicates.hash_codes([np.packbits(b).tobytes().hex() for b in bits])
    assert codes.shape == (len(bits), 4)
    found = {tuple(p) for p in duplicates.near_pairs(codes, k).tolist()}
    assert found == _brute_pairs(codes, k) and len(found) >= 5


def _brute_copy_pairs(emb: torch.Tensor, ratio: float, k: int) -> set[tuple[int, int]]:
    sims = emb @ emb.T
    sims.fill_diagonal_(-2.0)
    values, index = sims.topk(k, dim=1)
    found = set()
    for i in range(len(emb)):
        for m in range(k - 1):
            if 1 - values[i, m] < ratio * (1 - values[i, k - 1]):
                j = int(index[i, m])
                found.add((min(i, j), max(i, j)))
    return found


@pytest.mark.parametrize("seed", [0, 5])
def test_a_dark_nearly_flat_painting_keeps_its_phash_when_re_encoded_or_resized(seed):
    # A dark field a few grey levels deep, as in minimalist and colour-field paintings: on an 8-bit
    # thumbnail its cells round to the same few levels and a q60 copy moved 20-30 of the 256 bits.
    rng = np.random.default_rng(seed)
    h, w = 450, 600
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    field = 40 + sum(rng.uniform(-3, 3) * np.cos(np.pi * (i * x + 0.1 * rng.uniform()))
                     * np.cos(np.pi * (j * y + 0.1 * rng.uniform())) for i in range(1, 9) for j in range(1, 9))
    field[(np.abs(x - 0.5) < 0.03) & (np.abs(y - 0.5) < 0.1)] = 200
    pic = Image.fromarray(np.clip(np.stack([field, field * 0.9, field * 1.1], -1), 0, 255).astype(np.uint8))
    original = duplicates.perceptual_hash(prepare_image(encode_image(pic, "jpeg", 95), 448, 10**9))
    copies = [encode_image(pic, "jpeg", 60)] + [
        encode_image(pic.resize((round(w * f), round(h * f)), Image.Resampling.LANCZOS), "jpeg", 90) for f in (0.6, 0.85)]
    codes = duplicates.hash_codes([original] + [duplicates.perceptual_hash(prepare_image(c, 448, 10**9))
                                                for c in copies])
    distances = duplicates.hamming(codes[:1], codes[1:])
    assert distances.max() <= ShardConfig().dup_hamming, distances


def test_the_phash_of_a_picture_does_not_depend_on_how_its_pixels_were_made(real_sample):
    # prepare_image hands over the decoder's or the resize's tensor, or one made from PIL: their memory
    # layouts differ, and copies are grouped by hash, so the hash must be the pixels' alone.
    if not real_sample:
        pytest.skip("no real WikiArt sample beside this checkout")
    for path in real_sample[:6]:
        pixels = prepare_image(path.read_bytes(), 448, 10**9)
        hashes = {duplicates.perceptual_hash(p) for p in (pixels, pixels.permute(2, 0, 1).contiguous().permute(1, 2, 0),
                                                          torch.from_numpy(np.array(pixels.numpy())))}
        assert len(hashes) == 1 and bin(int(hashes.pop(), 16)).count("1") >= duplicates.MIN_BITS, path.name


def test_copy_pairs_in_chunks_match_the_rule_on_the_full_similarity_matrix():
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(500, 32), dim=1)
    emb[400:450] = torch.nn.functional.normalize(emb[:50] + 0.03 * torch.randn(50, 32), dim=1)  # near copies
    emb[450:460] = torch.nn.functional.normalize(emb[:10] + 0.03 * torch.randn(10, 32), dim=1)  # second copies
    pairs, sims = copy_pairs(emb, 0.2, neighbours=5, chunk=64)
    found = {tuple(p) for p in pairs.tolist()}
    assert found == _brute_copy_pairs(emb, 0.2, 5)
    assert {(i, 400 + i) for i in range(50)} | {(i, 450 + i) for i in range(10)} <= found  # every copy
    assert all(j >= 400 for _, j in found)  # and nothing else
    full = emb @ emb.T
    assert np.allclose(sims, full[pairs[:, 0], pairs[:, 1]].numpy(), atol=1e-5)
    assert len(copy_pairs(emb[:1], 0.2, 5, 64)[0]) == 0  # one image: nothing to compare


def test_descriptor_pairs_join_what_each_part_finds_with_its_highest_cosine():
    # Part A sees copies 0-9 in rows 100-109, part B copies 10-19 in rows 110-119: the join finds all 20.
    torch.manual_seed(1)
    a, b = torch.randn(120, 16), torch.randn(120, 24)
    a[100:110] = a[:10] + 0.02 * torch.randn(10, 16)
    b[110:120] = b[10:20] + 0.02 * torch.randn(10, 24)
    b[100:102] = b[:2] + 0.05 * torch.randn(2, 24)  # two copies B also sees, less sharply than A
    pairs, sims = descriptor_pairs(torch.cat([a, b], 1), (16, 24), 0.2, 5, 32)
    found = {tuple(p) for p in pairs.tolist()}
    assert {(i, 100 + i) for i in range(20)} <= found and all(j >= 100 for _, j in found)
    unit = [torch.nn.functional.normalize(x - x.mean(0), dim=1) for x in (a, b)]
    for (i, j), sim in zip(pairs.tolist(), sims.tolist()):
        assert sim == pytest.approx(max(float(u[i] @ u[j]) for u in unit), abs=1e-5)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_copy_widths_split_the_copy_descriptor_into_its_stages(backbone):
    model = build_model(ModelConfig(backbone=backbone, weights="none", lstm_hidden=16), {t: 3 for t in TASKS}).eval()
    with torch.no_grad():
        desc = model.copy_descriptor(torch.randn(2, 3, 64, 64))
    stem, stage1 = model.copy_widths
    assert desc.shape == (2, stem + stage1) and stem == 64 * 16 and stage1 == (64 if backbone == "resnet18" else 256) * 16
    # each part standardised per channel over its 16 cells
    for part in torch.split(desc, [stem, stage1], 1):
        cells = part.view(2, -1, 16)
        assert torch.allclose(cells.mean(2), torch.zeros(1), atol=1e-4)


@pytest.fixture(scope="module")
def copied_corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("copies")
    make_corpus(SynthConfig(out=str(out), images=100, seed=3, size=96, duplicates=0.5))
    return out


def _shard(corpus: Path, out: Path, policy: str) -> dict:
    return shard_dataset(ShardConfig(images=str(corpus / "images"), labels=str(corpus / "labels"), out=str(out),
                                     max_short_side=96, samples_per_shard=50, min_shards=2, workers=1,
                                     duplicate_policy=policy), progress=False)


def _splits_in_shards(out: Path, manifest: dict) -> dict[str, str]:
    found = {}
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            with tarfile.open(out / shard["name"]) as tar:
                for member in tar:
                    if member.name.endswith(".json"):
                        meta = json.load(tar.extractfile(member))
                        assert meta["path"] not in found and meta["split"] == split
                        found[meta["path"]] = split
    return found


@pytest.fixture(scope="module")
def policies(copied_corpus, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    runs = {}
    for policy in ("report", "move", "drop"):
        out = tmp_path_factory.mktemp(policy)
        runs[policy] = out, _shard(copied_corpus, out, policy)
    return runs


def test_planted_copies_are_found_per_kind(copied_corpus, policies):
    _, manifest = policies["report"]
    planted = duplicates.read_planted(copied_corpus / duplicates.PLANTED_NAME)
    assert Counter(r["kind"] for r in planted) == {k: 10 for k in ("exact", "reencoded", "resized", "cropped", "jittered")}
    assert any(r["split"] != r["original_split"] for r in planted)
    groups = [[m["path"] for m in g["members"]] for g in manifest["duplicates"]["groups"]]
    score = duplicates.score_planted(groups, planted, set(manifest["duplicates"]["hashes"]))
    recall = {k: v["recall"] for k, v in score["recall"].items()}
    assert recall["exact"] == recall["reencoded"] == 1.0
    assert recall["resized"] >= 0.9 and recall["cropped"] < 1.0  # crops are the embedding's job
    assert score["precision"] >= 0.9
    exact = [g for g in manifest["duplicates"]["groups"] if g["kind"] == "exact"]
    assert len(exact) == 10 and all(g["several_classes"][:1] == ["style"] and not g["leakage"] for g in exact)
    table = duplicates.planted_table({"hashes": score})
    assert "recall exact (10)" in table and "1.000" in table


def test_the_copy_descriptor_finds_crops_and_recolourings_the_hashes_miss(copied_corpus, policies, tmp_path):
    """Even an untrained backbone's first stage finds them: the descriptor reads layout and texture."""
    shards, manifest = policies["report"]
    cfg = JobConfig(out_dir=str(tmp_path))
    cfg.data = DataConfig(shards=str(shards), image_size=64, batch_size=32, num_workers=0)
    cfg.model = ModelConfig(backbone="resnet18", weights="none", lstm_hidden=32)
    torch.manual_seed(0)
    model = build_model(cfg.model, {t: len(manifest["classes"][t]) for t in TASKS}).eval()
    manifest = Manifest.from_json(manifest, shards)
    groups, index = find_groups(model, cfg, manifest, torch.device("cpu"), None)
    planted = duplicates.read_planted(copied_corpus / duplicates.PLANTED_NAME)
    score = duplicates.score_planted([[m["path"] for m in g["members"]] for g in groups], planted,
                                     {ref.path for ref in index.values()})
    recall = {k: v["recall"] for k, v in score["recall"].items()}
    assert recall["cropped"] >= 0.9 and recall["jittered"] >= 0.8 and recall["resized"] >= 0.9, recall
    assert score["precision"] >= 0.9, score


def test_the_leakage_policy_moves_drops_or_only_reports(policies):
    report_out, report = policies["report"]
    before = _splits_in_shards(report_out, report)
    leaking = [g for g in report["duplicates"]["groups"] if g["leakage"]]
    assert leaking and report["duplicates"]["actions"] == []
    assert "leaking copy dropped" not in {s["reason"] for s in report["skipped"]}

    out, moved = policies["move"]
    after = _splits_in_shards(out, moved)
    actions = moved["duplicates"]["actions"]
    assert actions and {a["path"] for a in actions} < {m["path"] for g in leaking for m in g["members"]}
    assert set(after) == set(before)  # nothing lost
    changed = {p for p in before if before[p] != after[p]}
    assert changed == {a["path"] for a in actions}
    for a in actions:
        assert before[a["path"]] == a["from"] and after[a["path"]] == a["to"] and a["to"] in ("val", "test")
    for g in leaking:
        assert len({after[m["path"]] for m in g["members"]}) == 1
    assert sum(s["num_samples"] for s in moved["splits"].values()) == len(before)

    out, dropped = policies["drop"]
    kept = _splits_in_shards(out, dropped)
    gone = {a["path"] for a in dropped["duplicates"]["actions"]}
    assert gone == {a["path"] for a in actions} and all(a["to"] == "" for a in dropped["duplicates"]["actions"])
    assert set(kept) == set(before) - gone and all(kept[p] == before[p] for p in kept)
    assert {s["path"] for s in dropped["skipped"] if s["reason"] == "leaking copy dropped"} == gone


def test_a_rerun_after_moving_gives_the_same_shards(copied_corpus, policies, tmp_path):
    out, moved = policies["move"]
    again = _shard(copied_corpus, out, "move")
    assert again == moved


def _scores(assigned, predicted, ids) -> TaskScores:
    n = len(ids)
    f = lambda v: np.full(n, v, np.float32)  # noqa: E731
    return TaskScores(ids=np.array(ids), assigned=np.array(assigned), predicted=np.array(predicted),
                      max_softmax=f(0.9), nll=np.linspace(5, 0.1, n, dtype=np.float32), margin=f(0.5), energy=f(-3),
                      mahalanobis=f(1.0), feature_nll=np.linspace(5, 0.1, n, dtype=np.float32),
                      feature_predicted=np.array(predicted))


def test_a_painting_predicted_as_its_other_copy_is_not_a_mislabel(tmp_path):
    cfg = JobConfig(out_dir=str(tmp_path))
    cfg.outliers.flag_fraction = 0.5
    scores = _scores(assigned=[0, 1, 0, 1], predicted=[1, 0, 0, 1], ids=[10, 11, 12, 13])
    index = {i: type("Ref", (), {"path": f"S/p{i}.jpg"})() for i in (10, 11, 12, 13)}
    copies = {10: {"style": {1}, "artist": set(), "genre": set()}}  # sample 10 has a copy filed under class 1
    summary, rows, _ = pipeline._rank_task("style", scores, pipeline.combined_score(scores), ["A", "B"], cfg,
                                          index, tmp_path, {}, False, copies)
    by_id = {r["id"]: r for r in rows}
    assert by_id[10]["several_classes"] and by_id[10]["copy_labels"] == ["B"]
    assert not by_id[11]["several_classes"]  # predicted another class, but no copy is filed there
    assert summary["several_classes"] == 1
    assert "yes" in (tmp_path / "style.csv").read_text().splitlines()[1].split(",")


def test_copy_labels_and_the_ceiling_they_impose():
    members = lambda *rows: [{"path": p, "id": i, "split": s, "style": c, "artist": -1, "genre": -1}  # noqa: E731
                             for p, i, s, c in rows]
    manifest = Manifest(Path("."), {}, {}, "jpg", {"duplicates": {"groups": [{"members": members(("a", 1, "val", 0), ("b", 2, "val", 1))},
                                          {"members": members(("c", 3, "val", 2), ("d", 4, "val", 2),
                                                              ("e", 5, "val", 3))},
                                          {"members": members(("f", 6, "train", 0), ("g", 7, "val", 1))}]}})
    labels = duplicates.copy_labels(manifest)
    assert labels[1]["style"] == {1} and labels[3]["style"] == {2, 3} and labels[7]["style"] == {0}
    assert duplicates.copies_lost(manifest, "val", "style") == 2  # one of a/b, and e
    assert duplicates.copies_lost(manifest, "val", "genre") == 0


class _Predicts(torch.nn.Module):
    """A 'model' whose style prediction is the image tensor's value: evaluation counting without training."""

    def forward_features(self, x: torch.Tensor):
        logits = torch.nn.functional.one_hot(x.long(), 6).float()
        return {"style": logits, "artist": logits, "genre": logits}, x[:, None].float()


def test_evaluation_counts_a_prediction_matching_another_copy_s_label():
    from artdist.train import engine
    predicted = torch.tensor([1, 1, 0, 3, 5])
    labels = torch.tensor([[0, -1, -1], [1, -1, -1], [2, -1, -1], [3, -1, -1], [4, -1, -1]])
    ids = torch.tensor([1, 2, 3, 4, 5])
    copies = {1: {"style": {1}}, 3: {"style": {5}}, 5: {"style": set()}}  # only id 1's copy is filed as predicted
    result = engine.count_predictions(_Predicts(), [(predicted, labels, ids)], lambda x: x, torch.device("cpu"),
                                      None, ["style"], {"style": 6}, copies)
    assert int(result["confusion"]["style"].trace()) == 2 and result["copy_label_hits"]["style"] == 1
