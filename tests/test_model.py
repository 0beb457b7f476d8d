"""Tests for artdist.model: shapes per sequence mode, gradients, weight files, channels_last, fp32 LSTM."""
from __future__ import annotations

import pytest
import torch
import torchvision

from artdist.errors import UserError
from artdist.config import TASKS, ModelConfig
from artdist.model import CNNLSTM, build_model

NUM_CLASSES = {"style": 5, "artist": 4, "genre": 3}


def _model(sequence: str = "spatial", tasks: tuple[str, ...] = TASKS, **kw) -> CNNLSTM:
    cfg = ModelConfig(backbone="resnet18", sequence=sequence, lstm_hidden=16, lstm_layers=2,
                      tasks=list(tasks), primary_task=tasks[0], **kw)
    return build_model(cfg, NUM_CLASSES)


@pytest.mark.parametrize("tasks", [("genre",), TASKS])
@pytest.mark.parametrize("sequence", ["pooled", "spatial", "rows", "columns"])
def test_logits_and_embedding_shapes(sequence, tasks):
    torch.manual_seed(0)
    model = _model(sequence, tasks).eval()
    logits, embedding = model.forward_features(torch.randn(2, 3, 64, 64))
    assert set(logits) == set(tasks)
    assert all(logits[t].shape == (2, NUM_CLASSES[t]) for t in tasks)
    assert embedding.shape == (2, 32) and embedding.dtype == torch.float32  # bidirectional 2 x 16
    assert torch.equal(model(torch.randn(2, 3, 64, 64))[tasks[0]].isfinite(), torch.ones(2, NUM_CLASSES[tasks[0]], dtype=torch.bool))


def test_sequence_modes_read_different_tokens():
    # A 128 px input gives a 4x4 map: rows/columns/spatial see 4/4/16 tokens, not one pooled vector.
    model = _model("spatial")
    fmap = torch.randn(1, 512, 4, 4)
    lengths = {}
    for mode in ("pooled", "rows", "columns", "spatial"):
        model.sequence = mode
        lengths[mode] = model._tokens(fmap).shape[1]
    assert lengths == {"pooled": 1, "rows": 4, "columns": 4, "spatial": 16}


def test_gradients_reach_backbone():
    model = _model("spatial")
    logits = model(torch.randn(2, 3, 64, 64))
    sum(l.sum() for l in logits.values()).backward()
    assert model.backbone.conv1.weight.grad is not None
    assert model.backbone.conv1.weight.grad.abs().sum() > 0
    assert model.pos_row.grad is not None


def test_channels_last_matches_contiguous():
    model = _model("spatial").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = model(x)["style"]
        b = model(x.contiguous(memory_format=torch.channels_last))["style"]
    assert torch.allclose(a, b, atol=1e-4)


def test_autocast_keeps_lstm_fp32():
    model = _model("spatial")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, embedding = model.forward_features(torch.randn(1, 3, 64, 64))
    assert all(p.dtype == torch.float32 for p in model.lstm.parameters())
    assert embedding.dtype == torch.float32
    assert all(l.dtype == torch.float32 for l in logits.values())


def test_param_groups_split_decay_and_lrs():
    model = _model("spatial")
    groups = model.param_groups(lr=1e-3, backbone_lr=1e-4, weight_decay=0.05)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len(list(model.parameters())) == len({id(p) for p in grouped})
    assert by_name["backbone"]["lr"] == 1e-4 and by_name["head"]["lr"] == 1e-3
    assert all(p.ndim > 1 for p in by_name["backbone"]["params"] + by_name["head"]["params"])
    no_decay = {id(p) for p in by_name["head_no_decay"]["params"]}
    assert by_name["head_no_decay"]["weight_decay"] == 0.0 and id(model.pos_row) in no_decay
    assert id(model.backbone.bn1.weight) in {id(p) for p in by_name["backbone_no_decay"]["params"]}


@pytest.mark.parametrize("wrap", ["plain", "torchvision_checkpoint"])
def test_weights_file_round_trip(tmp_path, wrap):
    torch.manual_seed(1)
    resnet = torchvision.models.resnet18()
    state = resnet.state_dict()  # includes fc.*, which build_model must drop
    obj = state if wrap == "plain" else {"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    path = tmp_path / "r18.pth"
    torch.save(obj, path)
    model = _model("pooled", weights=str(path))
    trunk = model.backbone.state_dict()
    assert trunk and all(torch.equal(v, state[k]) for k, v in trunk.items())
    assert not any(k.startswith("fc.") for k in trunk)


def test_wrong_weights_file_names_the_problem(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(UserError, match=r"resnet18 .*unexpected .*layer1\.2"):
        _model("pooled", weights=str(path))
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(UserError, match=r"missing \d+: .*wrong shape 1: conv1.weight"):
        _model("pooled", weights=str(path))
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(UserError, match="not a loadable"):
        _model("pooled", weights=str(tmp_path / "junk.pth"))
    with pytest.raises(UserError, match="no such file"):
        _model("pooled", weights=str(tmp_path / "absent.pth"))


def test_imagenet_weights_without_cache_explain_prefetch(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache; there is no network here
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    # Hermetic on machines with internet too: torchvision's download function fails as offline.
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", _no_network)
    with pytest.raises(UserError, match=r"torchvision.models.resnet18\(weights='IMAGENET1K_V1'\)"):
        _model("pooled", weights="imagenet")


def test_imagenet_weights_are_checked_without_any_download_attempt(tmp_path, monkeypatch):
    from artdist.model import check_weights
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    tried = []
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", lambda *a, **k: tried.append(a))
    cfg = ModelConfig(backbone="resnet50", weights="imagenet", tasks=["style"], primary_task="style")
    with pytest.raises(UserError, match=r"not in the torchvision cache .*resnet50\(weights='IMAGENET1K_V2'\)"):
        check_weights(cfg)
    with pytest.raises(UserError, match="not in the torchvision cache"):
        build_model(cfg, {"style": 3})
    assert tried == []  # docs/cluster.md: training never downloads
    with pytest.raises(UserError, match="no such file"):
        check_weights(ModelConfig(weights=str(tmp_path / "absent.pth")))
    check_weights(ModelConfig(weights="none"))


def _no_network(*args, **kwargs):
    raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")


def test_tasks_missing_from_shards():
    cfg = ModelConfig(backbone="resnet18", tasks=["style"], primary_task="style")
    with pytest.raises(UserError, match="classes only for"):
        build_model(cfg, {"genre": 3})
