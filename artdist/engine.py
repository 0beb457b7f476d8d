"""Training and evaluation loops: multi-task loss, train_one_epoch, run_inference, evaluate."""
from __future__ import annotations

import contextlib
import json
import math
import os
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from artdist.cli import UserError
from artdist.config import TASKS, JobConfig
from artdist.dist import all_reduce_sum, get_world_size, is_dist
from artdist.metrics import confusion_matrix, topk_correct
from artdist.model import CNNLSTM, build_model


class NonFiniteLossError(UserError):
    """The loss became NaN/inf; raised on every rank at the same step (the ranks agree first)."""


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """train.amp -> autocast dtype (None = full fp32). auto: bf16/fp16 on GPUs, off on CPUs.

    CPUs without native bf16 run bf16 autocast 12-18x slower than fp32, so auto never picks it
    there; an explicit bf16/fp16 is honoured anyway.
    """
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        # Without including_emulation=False, pre-Ampere GPUs (V100, T4) report bf16 and run it emulated.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def use_channels_last(cfg: JobConfig, device: torch.device) -> bool:
    """train.channels_last applies on CUDA only, where the convolutions run on tensor cores in NHWC."""
    return cfg.train.channels_last and device.type == "cuda"


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> torch.autocast:
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


# --------------------------------------------------------------------------- loss


def label_counts(shards_dir: str | Path, manifest: dict, split: str,
                 num_classes: dict[str, int]) -> dict[str, list[int]]:
    """Samples per class and task in a split, read from the shards' json members (image bytes are seeked past)."""
    counts = {task: [0] * n for task, n in num_classes.items()}
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(Path(shards_dir) / shard["name"]) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.load(tar.extractfile(member))
                    for task, task_counts in counts.items():
                        if meta[task] >= 0:
                            task_counts[meta[task]] += 1
    return counts


def class_weights(counts: list[int], mode: str) -> torch.Tensor | None:
    """Per-class loss weights from class frequencies: `inverse` (1/n) or `inverse_sqrt` (1/sqrt n).

    Scaled so that the average training sample keeps weight 1, which leaves the loss scale (and so
    the learning rate) comparable across modes. A class absent from training is never a target;
    its weight 0 also keeps label-smoothing mass off it.
    """
    if mode == "none":
        return None
    n = torch.tensor(counts, dtype=torch.float64)
    w = torch.where(n > 0, n.clamp(min=1) ** (-1.0 if mode == "inverse" else -0.5), 0.0)
    return (w * n.sum() / (w * n).sum()).float()


class MultiTaskLoss:
    """Sum over tasks of (weighted, label-smoothed) cross-entropy; labels of -1 are ignored.

    Each task's term is its weighted mean over the batch's known labels, and exactly 0 (not NaN)
    when the batch has none, without a host sync to find out.
    """

    def __init__(self, tasks: list[str], weights: dict[str, torch.Tensor | None], label_smoothing: float):
        self.tasks = tasks
        self.columns = [TASKS.index(t) for t in tasks]
        self.weights = weights
        self.label_smoothing = label_smoothing

    def __call__(self, logits: dict[str, torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (total loss, per-task losses [len(tasks)] detached)."""
        terms = []
        for task, col in zip(self.tasks, self.columns):
            y = labels[:, col]
            w = self.weights[task]
            per_sample = F.cross_entropy(logits[task].float(), y, weight=w, ignore_index=-1,
                                         label_smoothing=self.label_smoothing, reduction="none")
            known = (y >= 0).float()
            denom = (w[y.clamp(min=0)] * known).sum() if w is not None else known.sum()
            terms.append(per_sample.sum() / denom.clamp(min=1e-12))
        stacked = torch.stack(terms)
        return stacked.sum(), stacked.detach()

    def to(self, device: torch.device) -> MultiTaskLoss:
        self.weights = {t: None if w is None else w.to(device) for t, w in self.weights.items()}
        return self


# --------------------------------------------------------------------------- training


def train_one_epoch(
    model: torch.nn.Module,
    loader: Iterable,
    transform: Callable[[torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    loss_fn: MultiTaskLoss,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    steps: int,
    start_step: int,
    global_step: int,
    accum_steps: int,
    grad_clip: float,
    should_stop: Callable[[], bool],
    stop_after_steps: int = 0,
    log_every: int = 0,
    log: Callable[[dict], None] | None = None,
) -> dict:
    """Optimizer steps `start_step`..`steps`-1 of one epoch; `loader` must already skip the first ones.

    Every rank runs the same number of steps (the loader guarantees equal batches per rank). After
    each step the ranks agree on (1) whether any task's loss was non-finite (-> NonFiniteLossError
    before the weights are touched) and (2) `should_stop()` (preemption): then the epoch ends early.
    `log` (rank 0 only) gets running stats every `log_every` steps.
    Returns {"step": position in the epoch, "global_step", "stopped", "loss", "task_loss",
    "images_per_sec", "data_wait_frac", "lr"} (losses averaged over ranks and steps).
    """
    model.train()
    world = get_world_size()
    tasks = loss_fn.tasks
    batches = iter(loader)
    # [loss per task..., images, seconds waiting for the loader, steps]: over the epoch and since the last log
    epoch_sums = torch.zeros(len(tasks) + 3, dtype=torch.float64)
    window_sums = torch.zeros_like(epoch_sums)
    epoch_start = window_start = time.perf_counter()
    step, stopped = start_step, False
    lr = _head_lr(optimizer)
    while step < steps and not stopped:
        step_loss = torch.zeros(len(tasks), device=device)
        images_seen, wait = 0, 0.0
        for micro in range(accum_steps):
            t0 = time.perf_counter()
            images, labels, _ = next(batches)
            wait += time.perf_counter() - t0
            x = transform(images)
            labels = labels.to(device, non_blocking=True)
            images_seen += labels.shape[0] * world
            # Gradients are all-reduced only on the last micro-step of an accumulated step.
            defer = isinstance(model, DistributedDataParallel) and micro < accum_steps - 1
            sync = model.no_sync() if defer else contextlib.nullcontext()
            with sync:
                with autocast(device, amp_dtype):
                    logits = model(x)
                loss, per_task = loss_fn(logits, labels)
                scaler.scale(loss / accum_steps).backward()
            step_loss += per_task
        all_reduce_sum(step_loss)
        step_loss /= accum_steps * world
        if not torch.isfinite(step_loss).all():
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(_non_finite_message(tasks, step_loss, global_step + 1, step))
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        lr = _head_lr(optimizer)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        global_step += 1
        sums = torch.cat([step_loss.double().cpu(), torch.tensor([images_seen, wait, 1], dtype=torch.float64)])
        epoch_sums += sums
        window_sums += sums
        if stop_after_steps and global_step == stop_after_steps:
            print(f"train.stop_after_steps={stop_after_steps} reached: exiting without saving, as if killed",
                  flush=True)
            os._exit(3)
        stopped = should_stop()
        if log_every and global_step % log_every == 0:
            now = time.perf_counter()
            if log is not None:
                log(_stats(tasks, window_sums, now - window_start, lr, step, global_step))
            window_sums.zero_()
            window_start = now
    stats = _stats(tasks, epoch_sums, time.perf_counter() - epoch_start, lr, step, global_step)
    stats["stopped"] = stopped
    return stats


def _head_lr(optimizer: torch.optim.Optimizer) -> float:
    """The largest group lr: the head/LSTM one (train.lr), which the backbone's is a fraction of."""
    return max(group["lr"] for group in optimizer.param_groups)


def _stats(tasks: list[str], sums: torch.Tensor, elapsed: float, lr: float, step: int, global_step: int) -> dict:
    images, wait, steps = sums[len(tasks):].tolist()
    task_loss = (sums[:len(tasks)] / max(steps, 1)).tolist()
    return {
        "step": step,
        "global_step": global_step,
        "loss": sum(task_loss),
        "task_loss": dict(zip(tasks, task_loss)),
        "lr": lr,
        "images_per_sec": images / max(elapsed, 1e-9),
        "data_wait_frac": wait / max(elapsed, 1e-9),
    }


def _non_finite_message(tasks: list[str], step_loss: torch.Tensor, global_step: int, step: int) -> str:
    values = ", ".join(f"{t}={v:.4g}" for t, v in zip(tasks, step_loss.tolist()))
    bad = [t for t, v in zip(tasks, step_loss.tolist()) if not math.isfinite(v)]
    return (f"non-finite training loss at global step {global_step} (step {step + 1} of this epoch) in task "
            f"{', '.join(bad)} (loss per task, mean over ranks: {values}); the weights were not updated. "
            f"Try a lower train.lr / train.backbone_lr, train.amp=off (or bf16 instead of fp16), a smaller "
            f"train.grad_clip, or check the data; a rerun with the changed config resumes from model_last.pt, "
            f"if one was saved")


# --------------------------------------------------------------------------- inference


def run_inference(model: torch.nn.Module, loader: Iterable, transform: Callable[[torch.Tensor], torch.Tensor],
                  device: torch.device, amp_dtype: torch.dtype | None
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]]:
    """Yield (ids [B], labels [B,3], logits {task: [B,C] fp32}, embedding [B,D] fp32), all on `device`.

    `model` is the plain model (not the DDP wrapper); eval mode, no grad.
    """
    model.eval()
    with torch.no_grad():
        for images, labels, ids in loader:
            x = transform(images)
            with autocast(device, amp_dtype):
                logits, embedding = model.forward_features(x)
            yield (ids.to(device), labels.to(device), {t: v.float() for t, v in logits.items()}, embedding.float())


def evaluate(model: torch.nn.Module, loader: Iterable, transform: Callable[[torch.Tensor], torch.Tensor],
             device: torch.device, amp_dtype: torch.dtype | None, tasks: list[str],
             num_classes: dict[str, int]) -> dict:
    """Confusion matrices, top-5 hits and sample counts over a split, summed over ranks.

    Every rank gets the same result: {"num_samples": samples seen (labelled or not),
    "confusion": {task: [C, C] int64 on CPU}, "top5_correct": {task: int}}. Labels of -1 are left
    out of that task's matrix and hits.
    """
    sizes = [num_classes[t] ** 2 for t in tasks]
    # One flat counter vector -> one all-reduce: [confusions..., top5 per task, samples seen].
    counts = torch.zeros(sum(sizes) + len(tasks) + 1, dtype=torch.int64, device=device)
    cms = {t: flat.view(num_classes[t], num_classes[t]) for t, flat in zip(tasks, counts[:sum(sizes)].split(sizes))}
    top5 = counts[sum(sizes):-1]
    for _, labels, logits, _ in run_inference(model, loader, transform, device, amp_dtype):
        counts[-1] += labels.shape[0]
        for i, task in enumerate(tasks):
            y = labels[:, TASKS.index(task)]
            cms[task] += confusion_matrix(logits[task].argmax(dim=1), y, num_classes[task])
            top5[i] += topk_correct(logits[task], y, 5)
    all_reduce_sum(counts)
    return {
        "num_samples": int(counts[-1]),
        "confusion": {t: cm.cpu() for t, cm in cms.items()},
        "top5_correct": {t: int(top5[i]) for i, t in enumerate(tasks)},
    }


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics).

    DDP syncs buffers at the start of each training forward, so after the last step each rank
    holds statistics updated by its own last batch; evaluating or saving must use one model.
    """
    if is_dist():
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


def build_training(cfg: JobConfig, classes: dict[str, int], counts: dict[str, list[int]] | None,
                   device: torch.device, amp_dtype: torch.dtype | None, channels_last: bool,
                   lr_lambda: Callable[[int], float]) -> tuple:
    """(model, optimizer, scheduler, scaler, loss_fn) as a run trains them: AdamW over the model's
    param groups, `lr_lambda` as the LR schedule, a GradScaler for fp16, class-weighted loss."""
    tcfg = cfg.train
    model: CNNLSTM = build_model(cfg.model, classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.param_groups(tcfg.lr, tcfg.backbone_lr, tcfg.weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    empty = [t for t in cfg.model.tasks if counts and sum(counts[t]) == 0]
    if empty:
        raise UserError(f"the '{cfg.data.train_split}' split of {cfg.data.shards} has no {'/'.join(empty)} labels: "
                        f"nothing to train that head on; drop {'/'.join(empty)} from model.tasks")
    weights = {t: class_weights(counts[t], tcfg.class_weighting) if counts else None for t in cfg.model.tasks}
    loss_fn = MultiTaskLoss(cfg.model.tasks, weights, tcfg.label_smoothing).to(device)
    return model, optimizer, scheduler, scaler, loss_fn
