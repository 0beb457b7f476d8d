"""`artdist train`: the training script, one process or one per device under torchrun; read top to bottom.

Launch (the run dir is runs/<name>, or out_dir):
    python -m artdist train --config jobs/demo.yaml                          # one process
    torchrun --standalone --nproc_per_node=2 -m artdist train --config jobs/demo.yaml
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 \\
        -m artdist train --config jobs/wikiart_style_r50.yaml              # 2 nodes x 8 GPUs
    artdist submit --config jobs/wikiart_style_r50.yaml                      # SLURM, through submitit
Any key can be changed on the command line: --set train.epochs=30 --set data.batch_size=32.

Running the same command again resumes from RUN_DIR/model_last.pt exactly where the last run
stopped (epoch, step in the epoch, optimizer, RNG streams; the LR is a function of the step). `touch RUN_DIR/PREEMPT`
makes all ranks stop after the current step, save, and return 'preempted'; SIGUSR2 or SIGTERM does
the same and returns 'terminated' (`artdist train` then exits with TERMINATED_EXIT, so that a
scheduler restarts it). Rank 0 holds RUN_DIR/LOCK meanwhile: a second training there fails at once.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import tarfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch._dynamo
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from artdist.config import JobConfig, best_metric, save_config
from artdist.data.loader import TrainLoader
from artdist.data.manifest import Manifest, read_manifest
from artdist.data.transforms import DeviceTransform
from artdist.dist import (all_reduce_sum, barrier, broadcast_buffers, broadcast_object, cleanup, gather_objects,
                          get_rank, get_world_size, init_distributed, is_dist, is_main_process, peer_gone)
from artdist.errors import ConfigError, NonFiniteLossError, UserError
from artdist.model import CNNLSTM, build_model, check_weights
from artdist import rundir
from artdist.rundir import RunDir
from artdist.train.checkpoint import Checkpointer, latest_checkpoint, load_checkpoint, seed_all
from artdist.train.engine import TrainState, train_one_epoch
from artdist.train.evaluation import evaluate_split, headline, write_report
from artdist.train.loss import MultiTaskLoss, class_weights
from artdist.train.numerics import resolve_amp, use_channels_last
from artdist.train.preempt import PreemptionWatch, requeue_slurm_job
from artdist.train.resume import (Policy, accepted_config, check_resume, describe, finished, mark_finished,
                                  record_changes, set_aside)
from artdist.train.tensorboard import log_config, log_final, log_train, log_validation, open_writer

TERMINATED_EXIT = 143  # 128 + SIGTERM: how a process ended by that signal exits, here after saving


# Called on every rank with the best model after the test evaluation: (model, cfg, manifest, device,
# amp dtype, TensorBoard writer or None); the job passes the outlier reports (a higher layer).
AfterTest = Callable[[CNNLSTM, JobConfig, Manifest, torch.device, "torch.dtype | None", "SummaryWriter | None"], object]


def main(cfg: JobConfig, after_test: AfterTest | None = None, policy: Policy = "check") -> str:
    """Train (or resume) `cfg`: 'done' after the test evaluation and `after_test` (or at once for a
    finished run), or 'preempted' (stop file) / 'terminated' (a signal) once the position is saved.
    `policy` says what a rerun may change (train.resume)."""
    device = init_distributed(cfg.train.device)
    run_dir = RunDir(cfg.run_dir)
    try:
        failure = None
        if policy == "fresh" and is_main_process():
            try:
                old = set_aside(run_dir)
            except UserError as exc:  # the run dir is in use: its LOCK is held
                failure = str(exc)
            else:
                if old is not None:
                    print(f"--fresh: the previous run in {run_dir} is kept as {old}", flush=True)
        failure = broadcast_object(failure)  # every rank waits for rank 0 before it looks at the run dir
        if failure:
            raise UserError(failure)
        created = is_main_process() and not run_dir.path.exists()
        with rundir.hold(cfg.run_dir, "training"):
            try:
                return _train(cfg, device, after_test, policy)
            except BaseException as exc:
                # A failed start (bad shards, weights, config...) leaves no run dir behind; a run that saved
                # a checkpoint, or whose loss diverged, keeps what it wrote. (The lock goes with the folder.)
                if created and not run_dir.last.exists() and not isinstance(exc, NonFiniteLossError):
                    shutil.rmtree(run_dir.path, ignore_errors=True)
                raise
    finally:
        cleanup()


def _train(cfg: JobConfig, device: torch.device, after_test: AfterTest | None, policy: Policy) -> str:
    """train(), with a failed torch.compile or a lost rank said as one UserError."""
    try:
        return train(cfg, device, after_test, policy)
    except torch._dynamo.exc.TorchDynamoException as exc:
        if not cfg.train.compile:
            raise
        # Compilation happens at the first step, deep inside dynamo/inductor: say what to change instead.
        detail = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)[:300]
        raise UserError(f"train.compile: torch.compile of the backbone failed ({detail}); set "
                        f"train.compile=false, or fix the compiler toolchain it names") from exc
    except RuntimeError as exc:
        # The survivors of a crashed rank: one line each; the crashed rank's own error says why.
        if not is_dist() or (gist := peer_gone(exc)) is None:
            raise
        last = RunDir(cfg.run_dir).last
        again = f"resume from {last}" if last.exists() else "start again (no checkpoint was saved yet)"
        raise UserError(f"rank {get_rank()}: another rank is gone ({gist}): it crashed or was killed, and its "
                        f"own error says why; run the same command to {again}") from exc


def train(cfg: JobConfig, device: torch.device, after_test: AfterTest | None = None, policy: Policy = "check") -> str:
    rank, world, master = get_rank(), get_world_size(), is_main_process()
    tcfg, run_dir = cfg.train, RunDir(cfg.run_dir)
    best_task, best_key = best_metric(cfg)
    check_weights(cfg.model)  # before any loader starts: a missing ImageNet cache is a one-line error

    # ---- an existing run: check what resuming it would change
    last = latest_checkpoint(run_dir)
    found = torch.tensor([float(last is not None)], device=device)
    all_reduce_sum(found)  # every rank learns whether all agree, so none is left waiting in a collective
    if 0 < found.item() < world:
        raise UserError(f"{int(found.item())} of {world} processes see {run_dir.last}: the run dir must be on a "
                        "file system that every node sees (set out_dir to a shared path)")
    saved = load_checkpoint(last) if last is not None else None
    changes = check_resume(accepted_config(run_dir, saved), cfg, run_dir, last, policy) if saved is not None else {}
    if saved is not None and not changes and saved["epoch"] >= tcfg.epochs and finished(run_dir):
        if master:
            print(f"{run_dir} is finished ({saved['epoch']} of {tcfg.epochs} epochs, test and reports done): "
                  f"nothing to do. Evaluate it with `artdist evaluate --run {run_dir}`; train it longer with "
                  f"--set train.epochs=N --resume-with-changes, or start over with --fresh", flush=True)
        return "done"
    barrier()  # every rank has read the run dir before rank 0 writes to it

    # ---- numerics: deterministic kernels on request, AMP dtype, memory layout
    if tcfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
    amp_dtype = resolve_amp(tcfg.amp, device)
    channels_last = use_channels_last(cfg, device)

    # ---- data: every rank gets len(loader) batches per epoch
    manifest = read_manifest(cfg.data.shards)
    num_classes = manifest.num_classes
    classless = [t for t in cfg.model.tasks if num_classes[t] == 0]
    if classless:
        raise UserError(f"{cfg.data.shards} has no {'/'.join(classless)} classes: its class file was missing or empty "
                        "when the shards were made (manifest.json anomalies: missing_tasks); add the class file and "
                        f"re-run `artdist shard`, or drop {'/'.join(classless)} from model.tasks")
    loader = TrainLoader(cfg.data, manifest, rank, world, tcfg.seed, tcfg.accum_steps)
    steps_per_epoch = len(loader) // tcfg.accum_steps  # exact: the loader rounds up to whole steps
    total_steps = steps_per_epoch * tcfg.epochs
    # What a step means in this job; saved with every checkpoint so that a resume can tell.
    layout = {"steps_per_epoch": steps_per_epoch, "world_size": world, "workers": loader.workers,
              "batch_size": cfg.data.batch_size, "accum_steps": tcfg.accum_steps}
    transform = DeviceTransform(cfg.data, device, train=True, channels_last=channels_last)

    # ---- run dir: only rank 0 writes
    if master:
        run_dir.path.mkdir(parents=True, exist_ok=True)
        run_dir.stop_file.unlink(missing_ok=True)  # a stop request was meant for the previous process
        for tmp in run_dir.partial_saves():  # a save killed mid-write (the lock says no one else is saving)
            tmp.unlink(missing_ok=True)
        if changes:
            record_changes(run_dir, changes, saved)
            run_dir.finished.unlink(missing_ok=True)  # training continues: the run is no longer finished
            print(f"--resume-with-changes: {describe(changes)}; recorded in {run_dir.changes}", flush=True)
        save_config(cfg, run_dir.config)
    counts = None
    if tcfg.class_weighting != "none":
        # Rank 0 reads the labels; a failure there must reach the other ranks, which would otherwise
        # wait in the broadcast until the collective times out.
        counts, failure = None, None
        if master:
            try:
                counts = train_class_counts(cfg, manifest)
            except (UserError, OSError, tarfile.TarError, ValueError, KeyError) as exc:
                failure = (f"cannot count the class labels of the '{cfg.data.train_split}' shards in "
                           f"{cfg.data.shards} ({type(exc).__name__}: {exc}); re-run `artdist shard`")
        counts, failure = broadcast_object((counts, failure))
        if failure:
            raise UserError(failure)
    barrier()

    # ---- model (same init on every rank), optimizer, loss; the LR is lr_factor of the step (TrainState)
    seed_all(tcfg.seed)
    model, optimizer, scaler, loss_fn = build_training(cfg, num_classes, counts, device, amp_dtype, channels_last)
    checkpointer = Checkpointer(run_dir, model, optimizer, scaler, cfg, manifest.classes, layout)
    if cfg.data.batch_size * tcfg.accum_steps < 2 and any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} cannot train {cfg.model.backbone}: its BatchNorm layers "
                          "need at least 2 images per batch; set data.batch_size >= 2")
    # Undecodable samples an epoch may hold (all ranks together) before the run stops.
    max_bad = math.floor(cfg.data.max_bad_fraction * len(loader) * cfg.data.batch_size * world)

    # ---- resume from model_last.pt if there is one; else per-rank streams for dropout/augmentation
    position = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_metric": -math.inf, "metrics": {}}
    if saved is not None:
        position = checkpointer.resume(last, tcfg.seed, saved)
        del saved  # the optimizer state is loaded; free the copy
    else:
        seed_all(tcfg.seed + rank)

    # ---- compile (backbone only: dynamo graph-breaks on nn.LSTM), then DDP
    if tcfg.compile:
        model.backbone.compile()  # in place: state_dict keys stay those of the plain model
    ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if is_dist() else model
    watch = PreemptionWatch(run_dir.stop_file, device=device).install()
    # A resumed run hides what the previous process logged after its last checkpoint (purge_step).
    writer = open_writer(run_dir, purge_step=position["global_step"] if last is not None else None) \
        if master else None
    if master:
        log_config(writer, cfg, world)
    state = TrainState(ddp_model, optimizer, scaler, loss_fn, transform, device, amp_dtype, tcfg.accum_steps,
                       tcfg.grad_clip, global_step=position["global_step"],
                       lr_factor=partial(lr_factor, warmup_steps=round(tcfg.warmup_epochs * steps_per_epoch),
                                         total_steps=total_steps, min_ratio=tcfg.min_lr_ratio))

    hosts = gather_objects(socket.gethostname())  # every rank says where it runs (multi-node placement)
    if master:
        print(f"artdist train {cfg.name}: {world} process(es) on {device.type}, amp {amp_dtype or 'off'}, "
              f"{steps_per_epoch} steps/epoch x {tcfg.epochs} epochs, global batch "
              f"{cfg.data.batch_size * world * tcfg.accum_steps}, run dir {run_dir}", flush=True)
        print("ranks by host: " + "; ".join(f"{host}: {' '.join(str(r) for r, h in enumerate(hosts) if h == host)}"
                                            for host in dict.fromkeys(hosts)), flush=True)
        if last is not None:
            print(f"resuming from {last}: epoch {position['epoch'] + 1}, step {position['step_in_epoch']}, "
                  f"global step {position['global_step']}", flush=True)

    # ---- train: one validation and one model_last.pt per epoch, and every train.checkpoint_every steps
    step_in_epoch = position["step_in_epoch"]
    clock = (time.perf_counter(), state.global_step)
    for epoch in range(position["epoch"], tcfg.epochs):
        epoch_start = time.perf_counter()
        loader.set_epoch(epoch, skip_batches=step_in_epoch * tcfg.accum_steps)
        log = partial(log_step, writer, device, epoch=epoch, epochs=tcfg.epochs, steps_per_epoch=steps_per_epoch,
                      total_steps=total_steps, clock=clock) if master else None
        stats = train_one_epoch(state, loader, steps=steps_per_epoch, start_step=step_in_epoch,
                                should_stop=watch.should_stop, log_every=tcfg.log_every, log=log, max_bad=max_bad,
                                after_step=partial(checkpoint_mid_epoch, checkpointer.save, tcfg.checkpoint_every,
                                                   steps_per_epoch, {**position, "epoch": epoch}))
        step_in_epoch = stats["step"]
        if step_in_epoch < steps_per_epoch:  # preempted mid-epoch: save the exact position
            checkpointer.save({**position, "epoch": epoch, "step_in_epoch": step_in_epoch,
                               "global_step": state.global_step}, best=False)
            return preempted(run_dir, writer, watch.signalled)
        step_in_epoch = 0

        broadcast_buffers(model)  # evaluate and save one model: rank 0's BatchNorm statistics
        val = evaluate_split(model, cfg, manifest, cfg.data.val_split, device, amp_dtype)
        metric = val["tasks"][best_task][best_key]
        is_best = metric > position["best_metric"]
        position = {"epoch": epoch + 1, "step_in_epoch": 0, "global_step": state.global_step,
                    "best_metric": max(metric, position["best_metric"]), "metrics": headline(val)}
        checkpointer.save(position, best=is_best)
        if master:
            log_epoch(writer, run_dir, epoch, tcfg.epochs, stats, val, is_best, time.perf_counter() - epoch_start)
        if stats["stopped"]:
            return preempted(run_dir, writer, watch.signalled)

    check_replicas(model)

    # ---- the best model on the test split, then the outlier reports on the validation split
    barrier()
    model.load_state_dict(load_checkpoint(run_dir.best)["model"])
    test = None
    if manifest.num_samples(cfg.data.test_split) > 0:
        test = evaluate_split(model, cfg, manifest, cfg.data.test_split, device, amp_dtype)
        if master:
            write_report(test, run_dir.eval_report(cfg.data.test_split), str(run_dir.best))
    elif master:
        print(f"no '{cfg.data.test_split}' samples in {cfg.data.shards}: test evaluation skipped", flush=True)
    if after_test is not None:
        after_test(model, cfg, manifest, device, amp_dtype, writer)
    if master:
        log_final(writer, cfg, world, test, position["global_step"])
        writer.close()
        mark_finished(run_dir, tcfg.epochs, position["global_step"])
        if watch.noticed():  # a scheduler's notice that came too late to stop anything: say why it did not
            print("a stop notice (signal or RUN_DIR/PREEMPT) came after the last training step: "
                  "the run finished instead of stopping", flush=True)
        print(f"done; watch it with: tensorboard --logdir {run_dir.tensorboard}", flush=True)
    return "done"


# --------------------------------------------------------------------------- helpers, in order of use


def train_class_counts(cfg: JobConfig, manifest: Manifest) -> dict[str, list[int]]:
    """Rank 0: samples per class of the train split, cached in the run dir (a large split takes a while to read)."""
    path = RunDir(cfg.run_dir).class_counts
    key = {"shards": str(Path(cfg.data.shards).resolve()), "split": cfg.data.train_split,
           "num_samples": manifest.num_samples(cfg.data.train_split)}
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["counts"]
    except (OSError, ValueError, AttributeError):
        pass  # absent, or cut short by a kill mid-write (never valid JSON then): count again
    counts = manifest.label_counts(cfg.data.train_split)
    path.write_text(json.dumps({"key": key, "counts": counts}))
    return counts


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of each group's base_lr at optimizer step `step`: linear warmup, then cosine to min_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def log_step(writer: SummaryWriter, device: torch.device, stats: dict, *, epoch: int, epochs: int,
             steps_per_epoch: int, total_steps: int, clock: tuple[float, int]) -> None:
    """Rank 0, every train.log_every steps: console progress line with ETA + TensorBoard train/*."""
    start, start_step = clock
    step = stats["global_step"]
    eta = (time.perf_counter() - start) / max(step - start_step, 1) * (total_steps - step)
    per_task = " ".join(f"{t} {v:.3f}" for t, v in stats["task_loss"].items())
    print(f"epoch {epoch + 1}/{epochs} step {stats['step']}/{steps_per_epoch} loss {stats['loss']:.4f} ({per_task}) "
          f"lr {stats['lr']:.2e} {stats['images_per_sec']:.0f} img/s data-wait {stats['data_wait_frac']:.0%} "
          f"eta {eta / 60:.1f} min", flush=True)
    log_train(writer, stats, step, device)


def log_epoch(writer: SummaryWriter, run_dir: RunDir, epoch: int, epochs: int, stats: dict, val: dict, is_best: bool,
              seconds: float) -> None:
    """Rank 0, after each epoch: val/* scalars and confusion images, one metrics.jsonl line, a console line."""
    step = stats["global_step"]
    metrics = headline(val)
    log_validation(writer, val, step)
    line = {"epoch": epoch + 1, "step": step, "train_loss": stats["loss"], "train_task_loss": stats["task_loss"],
            "train_task_accuracy": stats["task_accuracy"], "val_task_loss": {t: r["loss"] for t, r in val["tasks"].items()},
            "lr": stats["lr"], "images_per_sec": stats["images_per_sec"], "data_wait_frac": stats["data_wait_frac"],
            "val": metrics, "best": is_best, "time_s": seconds,
            # undecodable samples skipped, per rank
            "bad_samples": {"train": stats["bad_samples"], "val": val["bad_samples"]}}
    with open(run_dir.metrics, "a") as f:
        f.write(json.dumps(line) + "\n")
    shown = " ".join(f"{key} {value:.3f}" for key, value in metrics.items())
    print(f"epoch {epoch + 1}/{epochs} done in {seconds:.0f} s: val {shown}{' (best)' if is_best else ''}", flush=True)
    if sum(stats["bad_samples"]):
        print(f"  {sum(stats['bad_samples'])} undecodable training samples skipped this epoch (per rank: "
              f"{stats['bad_samples']})", flush=True)


def checkpoint_mid_epoch(save: Callable[..., None], every: int, steps_per_epoch: int, position: dict, step: int,
                         global_step: int) -> None:
    """Every rank, after each step: save model_last.pt every `every` global steps (the epoch end saves anyway)."""
    if every and global_step % every == 0 and step < steps_per_epoch:
        save({**position, "step_in_epoch": step, "global_step": global_step}, best=False)


def check_replicas(model: torch.nn.Module) -> None:
    """Every rank, after training: rank 0 says whether all ranks ended with the same parameters (DDP's promise)."""
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digests = gather_objects(digest.hexdigest())
    if is_main_process():
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        print(f"final parameters identical on all {len(digests)} ranks" if not differ else
              f"warning: final parameters of rank(s) {differ} differ from rank 0's", flush=True)


def preempted(run_dir: RunDir, writer: SummaryWriter | None, signalled: bool) -> str:
    """After the stop was saved: every rank returns 'terminated' (a signal) or 'preempted' (the stop file);
    rank 0 requeues when asked to (SLURM)."""
    barrier()
    outcome = "terminated" if signalled else "preempted"
    if is_main_process():
        writer.close()
        print(f"{outcome}: the position is saved in {run_dir.last}; run the same command to resume",
              flush=True)
        if os.environ.get("ARTDIST_REQUEUE") == "1" and os.environ.get("SLURM_JOB_ID"):
            requeue_slurm_job()
    return outcome


def build_training(cfg: JobConfig, num_classes: dict[str, int], counts: dict[str, list[int]] | None,
                   device: torch.device, amp_dtype: torch.dtype | None, channels_last: bool) -> tuple:
    """(model, optimizer, scaler, loss_fn) as a run trains them: AdamW over the model's param groups
    (each with the `base_lr` the LR schedule scales), a GradScaler for fp16, class-weighted loss."""
    tcfg = cfg.train
    model: CNNLSTM = build_model(cfg.model, num_classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.param_groups(tcfg.lr, tcfg.backbone_lr, tcfg.weight_decay))
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    empty = [t for t in cfg.model.tasks if counts and sum(counts[t]) == 0]
    if empty:
        raise UserError(f"the '{cfg.data.train_split}' split of {cfg.data.shards} has no {'/'.join(empty)} labels: "
                        f"nothing to train that head on; drop {'/'.join(empty)} from model.tasks")
    weights = {t: class_weights(counts[t], tcfg.class_weighting) if counts else None for t in cfg.model.tasks}
    loss_fn = MultiTaskLoss(cfg.model.tasks, weights, tcfg.label_smoothing).to(device)
    return model, optimizer, scaler, loss_fn
