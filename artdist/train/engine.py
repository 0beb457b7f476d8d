"""Training and evaluation loops only: TrainState, train_one_epoch, run_inference, count_predictions."""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

from artdist.config import TASKS
from artdist.data.loader import bad_samples
from artdist.dist import all_reduce_sum, get_rank, get_world_size
from artdist.errors import NonFiniteLossError, UserError
from artdist.metrics import confusion_matrix, topk_correct
from artdist.train.loss import MultiTaskLoss
from artdist.train.numerics import autocast


# --------------------------------------------------------------------------- training


@dataclass
class TrainState:
    """What an optimizer step uses and advances; `global_step` is the number of steps taken so far.

    `lr_factor(step)` scales each param group's `base_lr`; it is written into the groups before
    every step (as nanoGPT's get_lr), so a resume needs only `global_step` to continue the schedule.
    """

    model: torch.nn.Module  # the DDP wrapper under torchrun
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_fn: MultiTaskLoss
    transform: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    amp_dtype: torch.dtype | None = None
    accum_steps: int = 1
    grad_clip: float = 0.0  # 0 disables
    lr_factor: Callable[[int], float] = lambda step: 1.0
    global_step: int = 0


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Write base_lr * factor into every param group; -> the largest (the head's, train.lr)."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return max(group["lr"] for group in optimizer.param_groups)


def train_one_epoch(state: TrainState, loader: Iterable, *, steps: int, start_step: int = 0,
                    should_stop: Callable[[], bool] = lambda: False, log_every: int = 0,
                    log: Callable[[dict], None] | None = None, max_bad: int | None = None,
                    after_step: Callable[[int, int], None] | None = None) -> dict:
    """Optimizer steps `start_step`..`steps`-1 of one epoch; `loader` must already skip the first ones.

    Every rank runs the same number of steps (the loader guarantees equal batches per rank). After
    each step the ranks agree on (1) whether any task's loss was non-finite (-> NonFiniteLossError
    before the weights are touched) and (2) `should_stop()` (preemption): then the epoch ends early.
    `log` (rank 0 only) gets running stats every `log_every` steps; `after_step` (every rank) gets
    (step in the epoch, global step) after each step that does not stop the epoch.
    Undecodable samples (data.loader.BAD_ID placeholders) are counted; once the ranks together saw more
    than `max_bad` of them this epoch, every rank raises the same UserError after that step.
    Returns {"step": position in the epoch, "global_step", "stopped", "loss", "task_loss",
    "task_accuracy", "images_per_sec", "data_wait_frac", "lr", "bad_samples": [count per rank]} (losses
    averaged over ranks and steps; accuracy over the labelled training samples of all ranks, as the model
    predicted them while it learned).
    """
    model, optimizer, scaler, accum_steps = state.model, state.optimizer, state.scaler, state.accum_steps
    model.train()
    world = get_world_size()
    tasks = state.loss_fn.tasks
    batches = iter(loader)
    # [loss, correct, labelled per task..., images, seconds waiting for the loader, steps]: over the epoch
    # and since the last log
    epoch_sums = torch.zeros(3 * len(tasks) + 3, dtype=torch.float64)
    window_sums = torch.zeros_like(epoch_sums)
    epoch_start = window_start = time.perf_counter()
    step, stopped = start_step, False
    lr = set_lr(optimizer, state.lr_factor(state.global_step))
    local_bad = epoch_bad = 0
    while step < steps and not stopped:
        # [loss, correct, labelled per task..., bad samples]: one all-reduce per step for all of them
        step_sums = torch.zeros(3 * len(tasks) + 1, device=state.device)
        images_seen, wait = 0, 0.0
        for micro in range(accum_steps):
            t0 = time.perf_counter()
            images, labels, ids = next(batches)
            wait += time.perf_counter() - t0
            bad = bad_samples(ids)
            local_bad += bad
            step_sums[-1] += bad
            x = state.transform(images)
            labels = labels.to(state.device, non_blocking=True)
            images_seen += labels.shape[0] * world
            # Gradients are all-reduced only on the last micro-step of an accumulated step.
            defer = isinstance(model, DistributedDataParallel) and micro < accum_steps - 1
            sync = model.no_sync() if defer else contextlib.nullcontext()
            with sync:
                with autocast(state.device, state.amp_dtype):
                    logits = model(x)
                loss, per_task = state.loss_fn(logits, labels)
                scaler.scale(loss / accum_steps).backward()
            step_sums[:len(tasks)] += per_task.detach()
            step_sums[len(tasks):-1] += _hits(logits, labels, tasks)
        all_reduce_sum(step_sums)  # one all-reduce: the ranks agree on the loss and count every rank's hits
        step_loss = step_sums[:len(tasks)] / (accum_steps * world)
        epoch_bad += int(step_sums[-1].item())
        if max_bad is not None and epoch_bad > max_bad:
            optimizer.zero_grad(set_to_none=True)
            raise UserError(f"{epoch_bad} undecodable samples in this epoch by global step {state.global_step + 1}, more "
                            f"than data.max_bad_fraction allows ({max_bad}); the warnings above name them: re-run "
                            "`artdist shard` on the source images, or raise data.max_bad_fraction")
        if not torch.isfinite(step_loss).all():
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(_non_finite_message(tasks, step_loss, state.global_step + 1, step))
        if state.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), state.grad_clip)
        lr = set_lr(optimizer, state.lr_factor(state.global_step))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        state.global_step += 1
        sums = torch.cat([step_loss.double().cpu(), step_sums[len(tasks):-1].double().cpu(),
                          torch.tensor([images_seen, wait, 1], dtype=torch.float64)])
        epoch_sums += sums
        window_sums += sums
        stopped = should_stop()
        if after_step is not None and not stopped:
            after_step(step, state.global_step)
        if log_every and state.global_step % log_every == 0:
            now = time.perf_counter()
            if log is not None:
                log(_stats(tasks, window_sums, now - window_start, lr, step, state.global_step))
            window_sums.zero_()
            window_start = now
    stats = _stats(tasks, epoch_sums, time.perf_counter() - epoch_start, lr, step, state.global_step)
    stats["stopped"] = stopped
    stats["bad_samples"] = per_rank(local_bad, state.device)
    return stats


def per_rank(value: int, device: torch.device) -> list[int]:
    """Every rank's `value`, on every rank (a collective)."""
    slots = torch.zeros(get_world_size(), dtype=torch.int64, device=device)
    slots[get_rank()] = value
    return [int(v) for v in all_reduce_sum(slots).tolist()]


def _hits(logits: dict[str, torch.Tensor], labels: torch.Tensor, tasks: list[str]) -> torch.Tensor:
    """[correct per task..., labelled per task...] of one batch (labels of -1 are not counted)."""
    correct, labelled = [], []
    for task in tasks:
        y = labels[:, TASKS.index(task)]
        known = y >= 0
        correct.append((logits[task].detach().argmax(dim=1)[known] == y[known]).sum())
        labelled.append(known.sum())
    return torch.stack(correct + labelled).to(torch.float32)


def _stats(tasks: list[str], sums: torch.Tensor, elapsed: float, lr: float, step: int, global_step: int) -> dict:
    n = len(tasks)
    images, wait, steps = sums[3 * n:].tolist()
    task_loss = (sums[:n] / max(steps, 1)).tolist()
    accuracy = (sums[n:2 * n] / sums[2 * n:3 * n].clamp(min=1)).tolist()
    return {
        "step": step,
        "global_step": global_step,
        "loss": sum(task_loss),
        "task_loss": dict(zip(tasks, task_loss)),
        "task_accuracy": dict(zip(tasks, accuracy)),
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
            f"train.grad_clip, or check the data; `artdist train --resume-with-changes` with the changed config "
            f"resumes from model_last.pt, if one was saved")


# --------------------------------------------------------------------------- inference


def run_inference(model: torch.nn.Module, loader: Iterable, transform: Callable[[torch.Tensor], torch.Tensor],
                  device: torch.device, amp_dtype: torch.dtype | None, tta: str = "none"
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]]:
    """Yield (ids [B], labels [B,3], logits {task: [B,C] fp32}, embedding [B,D] fp32), all on `device`.

    `model` is the plain model (not the DDP wrapper); eval mode, no grad. tta="flip": logits and
    embedding are the means over each picture and its mirror image (one forward of both).
    """
    model.eval()
    with torch.no_grad():
        for images, labels, ids in loader:
            x = transform(images)
            if tta == "flip":
                x = torch.cat([x, x.flip(-1)])
            # Eager even when train.compile is on: no_grad and the ragged last batch would each recompile
            # the backbone, and dynamo gives up after 8 recompiles (seen on an H200, docs/benchmarks.md).
            with autocast(device, amp_dtype), torch.compiler.set_stance("force_eager"):
                logits, embedding = model.forward_features(x)
            logits, embedding = {t: v.float() for t, v in logits.items()}, embedding.float()
            if tta == "flip":
                logits = {t: v.view(2, -1, v.shape[1]).mean(0) for t, v in logits.items()}
                embedding = embedding.view(2, -1, embedding.shape[1]).mean(0)
            yield ids.to(device), labels.to(device), logits, embedding


def count_predictions(model: torch.nn.Module, loader: Iterable, transform: Callable[[torch.Tensor], torch.Tensor],
                      device: torch.device, amp_dtype: torch.dtype | None, tasks: list[str],
                      num_classes: dict[str, int], copy_labels: dict[int, dict[str, set[int]]] | None = None) -> dict:
    """Confusion matrices, top-5 hits and sample counts over a split, summed over ranks.

    Every rank gets the same result: {"num_samples": samples seen (labelled or not, undecodable ones
    not), "confusion": {task: [C, C] int64 on CPU}, "top5_correct": {task: int}, "copy_label_hits": {task:
    int}, "loss_sum": {task: summed cross-entropy, nats}, "bad_samples": [undecodable samples per rank]}.
    Labels of -1 are left out of that task's matrix, hits and loss. copy_label_hits counts wrong
    predictions that are the label of another copy of the picture (`copy_labels`: id -> task -> labels).
    """
    copy_labels = copy_labels or {}
    sizes = [num_classes[t] ** 2 for t in tasks]
    # One flat counter vector -> one all-reduce: [confusions..., top5 per task, copy hits per task, samples seen].
    counts = torch.zeros(sum(sizes) + 2 * len(tasks) + 1, dtype=torch.int64, device=device)
    cms = {t: flat.view(num_classes[t], num_classes[t]) for t, flat in zip(tasks, counts[:sum(sizes)].split(sizes))}
    top5 = counts[sum(sizes):sum(sizes) + len(tasks)]
    copy_hits = counts[sum(sizes) + len(tasks):-1]
    losses = torch.zeros(len(tasks), dtype=torch.float64, device=device)
    bad = 0
    for ids, labels, logits, _ in run_inference(model, loader, transform, device, amp_dtype):
        batch_bad = bad_samples(ids)
        bad += batch_bad
        counts[-1] += labels.shape[0] - batch_bad
        copied = [(row, i) for row, i in enumerate(ids.tolist()) if i in copy_labels] if copy_labels else []
        for i, task in enumerate(tasks):
            y = labels[:, TASKS.index(task)]
            predicted = logits[task].argmax(dim=1)
            cms[task] += confusion_matrix(predicted, y, num_classes[task])
            top5[i] += topk_correct(logits[task], y, 5)
            losses[i] += torch.nn.functional.cross_entropy(logits[task], y, ignore_index=-1, reduction="sum").double()
            if copied:
                p, t = predicted.tolist(), y.tolist()
                copy_hits[i] += sum(t[row] >= 0 and p[row] != t[row] and p[row] in copy_labels[sid][task]
                                    for row, sid in copied)
    all_reduce_sum(counts)
    all_reduce_sum(losses)
    return {
        "num_samples": int(counts[-1]),
        "confusion": {t: cm.cpu() for t, cm in cms.items()},
        "top5_correct": {t: int(top5[i]) for i, t in enumerate(tasks)},
        "copy_label_hits": {t: int(copy_hits[i]) for i, t in enumerate(tasks)},
        "loss_sum": {t: float(losses[i]) for i, t in enumerate(tasks)},
        "bad_samples": per_rank(bad, device),
    }
