"""ResNet backbone + LSTM over a sequence read from its feature map + one linear head per task."""
from __future__ import annotations

import argparse
import os
from collections import OrderedDict
from pathlib import Path

import torch
import torchvision
from torch import nn

from artdist.config import MAX_IMAGE_SIZE, ModelConfig
from artdist.errors import UserError

TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
# The copy descriptor reads the stem (conv1..maxpool) and the first residual stage, each pooled to 4 x 4 cells.
COPY_STAGES = (TRUNK.index("maxpool") + 1, TRUNK.index("layer1") + 1)
COPY_GRID = 4
MAX_GRID = MAX_IMAGE_SIZE // 32  # spatial positional embedding: feature maps up to 64x64 (ResNet stride 32)
PREFETCH_HINT = "python -c \"import torchvision; torchvision.models.{name}(weights='{weights}')\""


class CNNLSTM(nn.Module):
    """backbone -> feature map [B, C, H, W] -> token sequence [B, T, d] -> LSTM -> summary -> heads."""

    def __init__(self, backbone: nn.Module, channels: int, sequence: str, hidden: int, layers: int,
                 bidirectional: bool, dropout: float, num_classes: dict[str, int]):
        super().__init__()
        self.backbone = backbone
        self.sequence = sequence
        # All modes project C -> hidden first: a 2048-wide LSTM input (resnet50+) would quadruple
        # the LSTM's input weights for no gain.
        self.proj = nn.Linear(channels, hidden)
        if sequence == "spatial":
            # Row + column embeddings: a 2-D position for any H x W up to MAX_GRID, so one model
            # serves 224 and 448 px inputs. Row-major flattening alone would hide row breaks.
            self.pos_row = nn.Parameter(torch.zeros(MAX_GRID, hidden))
            self.pos_col = nn.Parameter(torch.zeros(MAX_GRID, hidden))
            nn.init.trunc_normal_(self.pos_row, std=0.02)
            nn.init.trunc_normal_(self.pos_col, std=0.02)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional,
                            dropout=dropout if layers > 1 else 0.0)
        self.embed_dim = hidden * (2 if bidirectional else 1)
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({task: nn.Linear(self.embed_dim, n) for task, n in num_classes.items()})

    def _tokens(self, fmap: torch.Tensor) -> torch.Tensor:
        if self.sequence == "pooled":
            tokens = fmap.mean(dim=(2, 3))[:, None]
        elif self.sequence == "rows":
            tokens = fmap.mean(dim=3).transpose(1, 2)  # top to bottom
        elif self.sequence == "columns":
            tokens = fmap.mean(dim=2).transpose(1, 2)  # left to right
        else:
            tokens = fmap.flatten(2).transpose(1, 2)  # row-major H*W positions
        tokens = self.proj(tokens)
        if self.sequence == "spatial":
            height, width = fmap.shape[-2:]
            if max(height, width) > MAX_GRID:
                raise ValueError(f"feature map {height}x{width} exceeds the {MAX_GRID}x{MAX_GRID} positional "
                                 f"embedding; use images up to {MAX_GRID * 32} px")
            pos = self.pos_row[:height, None] + self.pos_col[None, :width]
            tokens = tokens + pos.reshape(height * width, -1)
        return tokens.contiguous()

    def forward_features(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(task -> logits, embedding [B, embed_dim] float32: the LSTM summary fed to the heads)."""
        fmap = self.backbone(x)
        # The recurrent part runs in fp32 outside autocast: cuDNN's autocast RNN path is fp16 even
        # when bf16 is requested, and bf16 runs have no GradScaler to rescue underflowing grads.
        with torch.autocast(fmap.device.type, enabled=False):
            _, (h_n, _) = self.lstm(self._tokens(fmap.float()))
            # Last hidden state of each direction of the top layer: each has read the whole
            # sequence (the backward one ending at the first token), so their concatenation
            # summarises all of it, and for pooled (length 1) it is the LSTM's output of the pooled vector.
            directions = 2 if self.lstm.bidirectional else 1
            embedding = torch.cat(list(h_n[-directions:]), dim=1)
            logits = {task: head(self.dropout(embedding)) for task, head in self.heads.items()}
        return logits, embedding

    def copy_descriptor(self, x: torch.Tensor) -> torch.Tensor:
        """[B, sum(copy_widths)] float32 for finding copies of a picture: the stem's and the first residual
        stage's feature maps, each pooled to a 4 x 4 grid with every channel standardised over its cells
        (brightness and contrast changes cancel, layout and texture remain), side by side. Two depths
        because each finds copies the other misses: recoloured ones the stem, crops the residual stage.
        The classifier's embedding cannot tell a crop from another painting of the same style
        (docs/benchmarks.md, Duplicates)."""
        parts, start = [], 0
        for stop in COPY_STAGES:
            x = self.backbone[start:stop](x)
            start = stop
            cells = nn.functional.adaptive_avg_pool2d(x.float(), COPY_GRID).flatten(2)
            parts.append(((cells - cells.mean(2, keepdim=True)) / (cells.std(2, keepdim=True) + 1e-6)).flatten(1))
        return torch.cat(parts, 1)

    @property
    def copy_widths(self) -> tuple[int, ...]:
        """The widths of copy_descriptor's parts, one per COPY_STAGES entry: the stage's last conv's
        channels x the grid's cells."""
        return tuple([m for m in self.backbone[:stop].modules() if isinstance(m, nn.Conv2d)][-1].out_channels
                     * COPY_GRID**2 for stop in COPY_STAGES)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_features(x)[0]

    def param_groups(self, lr: float, backbone_lr: float, weight_decay: float) -> list[dict]:
        """Optimizer groups: backbone vs the rest (own LR), each split so that norms, biases and
        positional embeddings get no weight decay."""
        groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            part = "backbone" if name.startswith("backbone.") else "head"
            decay = param.ndim > 1 and not name.startswith("pos_")
            groups.setdefault((part, decay), []).append(param)
        rates = {"backbone": backbone_lr, "head": lr}
        return [{"name": f"{part}{'' if decay else '_no_decay'}", "params": params, "lr": rates[part],
                 "weight_decay": weight_decay if decay else 0.0}
                for (part, decay), params in groups.items()]


def _trunk(resnet: torchvision.models.ResNet) -> nn.Sequential:
    """Everything up to layer4, keeping torchvision's names so its state_dicts load as they are."""
    return nn.Sequential(OrderedDict((name, getattr(resnet, name)) for name in TRUNK))


def _imagenet_state(backbone: str) -> dict[str, torch.Tensor]:
    weights, cached = _imagenet_cache(backbone)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)  # from the cache: it exists
    except RuntimeError as exc:  # hash mismatch: a truncated or foreign file under the cached name
        raise UserError(f"model.weights=imagenet: {cached} is damaged ({exc}); delete it and fetch it again with "
                        f"{PREFETCH_HINT.format(name=backbone, weights=weights.name)}") from None


def _imagenet_cache(backbone: str) -> tuple[torchvision.models.WeightsEnum, Path]:
    """The ImageNet weights of `backbone` and their file in the torchvision cache, which must exist:
    training never downloads (compute nodes rarely have internet, and N ranks would fetch at once)."""
    enum = torchvision.models.get_model_weights(backbone)
    weights = enum["IMAGENET1K_V2"] if "IMAGENET1K_V2" in enum.__members__ else enum["IMAGENET1K_V1"]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if not cached.is_file():
        raise UserError(
            f"model.weights=imagenet: {backbone} {weights.name} is not in the torchvision cache ({cached}). "
            f"On a machine with internet (e.g. a login node) run "
            f"{PREFETCH_HINT.format(name=backbone, weights=weights.name)} with the same TORCH_HOME, "
            f"or set model.weights to a local file")
    return weights, cached


def check_weights(model_cfg: ModelConfig) -> None:
    """Fail before any data loader or process starts when model.weights cannot be loaded as it is."""
    if model_cfg.weights == "imagenet":
        _imagenet_cache(model_cfg.backbone)
    elif model_cfg.weights != "none" and not Path(model_cfg.weights).is_file():
        raise UserError(f"model.weights={model_cfg.weights}: no such file; use none, imagenet or a path to a "
                        "state_dict")


def _file_state(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict or a checkpoint holding one under "model"/"state_dict" (torchvision references,
    DDP `module.` prefixes, and artdist runs' `backbone.` prefixes are handled)."""
    if not path.is_file():
        raise UserError(f"model.weights={path}: no such file; use none, imagenet or a path to a state_dict")
    try:
        # torchvision's reference checkpoints also store their argparse.Namespace.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a text or foreign file fails in many ways (KeyError, EOFError...)
        raise UserError(f"model.weights={path} is not a loadable torch state_dict file "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"model.weights={path} holds no state_dict (a dict of tensor names -> tensors)")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    return state


def _load_trunk(trunk: nn.Sequential, state: dict[str, torch.Tensor], source: str, backbone: str) -> None:
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = trunk.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        def some(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        problems = [f"{label} {len(keys)}: {some(keys)}" for label, keys in
                    (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)) if keys]
        raise UserError(f"model.weights={source} does not fit model.backbone={backbone} — {'; '.join(problems)}")
    trunk.load_state_dict(state, strict=True)


def build_model(model_cfg: ModelConfig, num_classes: dict[str, int]) -> CNNLSTM:
    """The configured CNNLSTM with one head per task in model_cfg.tasks (num_classes from the manifest)."""
    absent = [task for task in model_cfg.tasks if task not in num_classes]
    if absent:
        raise UserError(f"model.tasks has {absent} but the shards define classes only for {sorted(num_classes)}")
    resnet = torchvision.models.get_model(model_cfg.backbone, weights=None)
    channels = resnet.fc.in_features
    trunk = _trunk(resnet)
    if model_cfg.weights == "imagenet":
        _load_trunk(trunk, _imagenet_state(model_cfg.backbone), "imagenet", model_cfg.backbone)
    elif model_cfg.weights != "none":
        _load_trunk(trunk, _file_state(Path(model_cfg.weights)), model_cfg.weights, model_cfg.backbone)
    return CNNLSTM(trunk, channels, model_cfg.sequence, model_cfg.lstm_hidden, model_cfg.lstm_layers,
                   model_cfg.bidirectional, model_cfg.dropout,
                   {task: num_classes[task] for task in model_cfg.tasks})
