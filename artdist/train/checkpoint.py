"""Checkpoints: atomic save (tmp + fsync + os.replace), checked load, the Checkpointer that saves and resumes a run."""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from artdist.config import JobConfig, to_dict
from artdist.data.manifest import Manifest
from artdist.dist import broadcast_object, gather_objects, get_rank, get_world_size, is_main_process
from artdist.errors import UserError
from artdist.model import CNNLSTM, build_model
from artdist.rundir import LAST, RunDir
from artdist.train.numerics import use_channels_last

FORMAT = "artdist-checkpoint/1"


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested dict/list: about the size of the saved file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save that never leaves a half-written `path`: a kill mid-save keeps the old file.

    A failed write (a full disk, a quota, a vanished folder) removes its temp file and is a UserError
    saying how much space the file needs and how much is free.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch reports a failed write as RuntimeError ("enforce fail")
        tmp.unlink(missing_ok=True)
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**20:,.0f} MiB free there"
        except OSError:
            free = "free space unknown"
        kept = f"the previous {path.name} is unchanged" if path.is_file() else f"no {path.name} was written"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot save {path} ({reason}): it needs about {_tensor_bytes(obj) / 2**20:,.0f} MiB, "
                        f"{free}; {kept}. Free some space (or set out_dir to another disk) and run the same "
                        "command again") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The rename itself is only durable once the directory entry is on disk.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by save_atomic with weights_only=True (no code runs on load)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; train first (artdist train) or pass an existing .pt file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, wrong format, foreign pickle: all mean "unusable file"
        raise UserError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"the file is corrupt or not an artdist checkpoint: pick another file, or delete it (a training run "
            f"without {LAST} starts again from epoch 1)"
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"checkpoint {path} is not an artdist checkpoint (no 'model' entry); "
                        "pick a model_*.pt from a run dir")
    if ckpt.get("format") != FORMAT:
        raise UserError(f"checkpoint {path} has format {ckpt.get('format')!r}, this artdist reads {FORMAT!r}; "
                        "pick a model_*.pt written by this version, or retrain")
    return ckpt


def latest_checkpoint(run_dir: str | Path | RunDir) -> Path | None:
    """The checkpoint a restarted run resumes from, or None for a fresh run."""
    path = RunDir(run_dir).last
    return path if path.is_file() else None


def rng_state() -> dict:
    """This process's RNG states as tensors/lists/numbers, so weights_only loading accepts them."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        # This process's own GPU only: the resumed rank may see a different number of them.
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [py_version, list(py_state), py_gauss],
    }


def set_rng_state(state: dict) -> None:
    """Inverse of rng_state()."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0])  # the current device, as rng_state() saved it
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))


def seed_all(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python's random."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


BEST_KEYS = ("format", "model", "epoch", "step_in_epoch", "global_step", "best_metric", "metrics", "config",
             "class_names")


def weights_only(ckpt: dict) -> dict:
    """A training checkpoint without optimizer, scaler, RNG and layout: model_best.pt."""
    return {key: ckpt[key] for key in BEST_KEYS if key in ckpt}


class Checkpointer:
    """Saves and resumes one run's training state (model_last.pt / model_best.pt), holding what it saves.

    `model` is the plain model, so its keys carry no DDP prefix. `layout` = {"steps_per_epoch",
    "world_size", "workers", "batch_size", "accum_steps"} says what a step means in this job.
    A position is {"epoch", "step_in_epoch", "global_step", "best_metric", "metrics"}: the next step
    to run (step_in_epoch 0 of epoch+1 after a whole epoch), the best validation value so far, and
    the latest validation metrics.
    """

    def __init__(self, run_dir: str | Path | RunDir, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, cfg: JobConfig, class_names: dict[str, list[str]], layout: dict):
        self.run_dir = RunDir(run_dir)
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.cfg, self.class_names, self.layout = cfg, class_names, layout

    def save(self, position: dict, best: bool) -> None:
        """Every rank (each rank's RNG state is gathered); rank 0 writes model_last.pt (the whole
        training state) and, when `best`, model_best.pt (weights_only: what evaluate, outliers and
        predict read, without the optimizer state that would triple its size)."""
        rng = gather_objects(rng_state())
        failure = None
        if is_main_process():
            try:
                self._write(position, best, rng)
            except UserError as exc:
                failure = str(exc)
        # Every rank stops on a failed save; the others would wait in the next collective until it times out.
        failure = broadcast_object(failure)
        if failure:
            raise UserError(failure)

    def _write(self, position: dict, best: bool, rng: list) -> None:
        ckpt = {
            "format": FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            **position,
            "layout": self.layout,
            "rng": rng,
            "config": to_dict(self.cfg),
            "class_names": self.class_names,
        }
        # BEST first: killed between the two writes, the resumed run finds the old model_last.pt and
        # redoes this epoch, whereas the other order would leave a best_metric that model_best.pt lacks.
        if best:
            save_atomic(weights_only(ckpt), self.run_dir.best)
        save_atomic(ckpt, self.run_dir.last)

    def resume(self, path: Path, seed: int, ckpt: dict | None = None) -> dict:
        """Load the state saved in `path` (already loaded: `ckpt`) into this rank's objects; -> its position.

        When the saved layout differs from this job's (more GPUs, another batch size...), a step no
        longer means the same samples: the position is carried over as the same fraction of the
        epoch, in this job's steps, and the LR schedule (a function of global_step) continues there.

        The optimizer keeps this job's hyper-parameters (base LRs, weight decay), so a run can resume
        with, say, a lower train.lr after a non-finite loss (`artdist train --resume-with-changes`, see
        train.resume); with an unchanged config every value is
        the saved one. RNG states continue exactly when the world size is unchanged; otherwise each
        rank is reseeded from (seed, rank, global step): training continues, but not bit-identically.
        """
        ckpt = load_checkpoint(path) if ckpt is None else ckpt
        configured = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError) as exc:
            raise UserError(
                f"{path} does not fit this job's model/optimizer ({str(exc).splitlines()[0]}); it was written by a "
                f"different config: pick another `name`/`out_dir` for this job, or delete {path.parent} to start over"
            ) from None
        for group, settings in zip(self.optimizer.param_groups, configured):
            group.update(settings)
        position = {key: ckpt[key] for key in ("epoch", "step_in_epoch", "global_step", "best_metric", "metrics")}
        saved, layout = ckpt.get("layout", self.layout), self.layout
        if saved != layout:
            old_steps, new_steps = saved["steps_per_epoch"], layout["steps_per_epoch"]
            step = min(round(position["step_in_epoch"] * new_steps / old_steps), new_steps - 1) \
                if position["step_in_epoch"] else 0
            position.update(step_in_epoch=step, global_step=position["epoch"] * new_steps + step)
            if is_main_process():
                changed = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in layout.items() if saved.get(k) != v)
                print(f"note: {path} was written with another layout ({changed}): resuming at step {step} of "
                      f"{new_steps} in epoch {position['epoch'] + 1}; the rest of that epoch's samples are "
                      "not exactly the ones the interrupted run had left", flush=True)
        # An fp16 run's scaler state is meaningless (and rejected) once amp changed, and vice versa.
        if self.scaler.is_enabled() and ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        rank, world = get_rank(), get_world_size()
        if len(ckpt["rng"]) == world:
            set_rng_state(ckpt["rng"][rank])
        else:
            if is_main_process():
                print(f"note: {path} was written by {len(ckpt['rng'])} processes, this run has {world}: "
                      "RNG streams are reseeded, so the continuation is not bit-identical", flush=True)
            seed_all(seed + rank + 1_000_003 * ckpt["global_step"])
        return position


def load_trained_model(ckpt: dict, cfg: JobConfig, device: torch.device) -> CNNLSTM:
    """The checkpoint's model on `device` in eval mode (heads sized by the class names it was trained with)."""
    model = build_model(cfg.model, {task: len(names) for task, names in ckpt["class_names"].items()})
    model.load_state_dict(ckpt["model"])
    if use_channels_last(cfg, device):
        model = model.to(memory_format=torch.channels_last)
    return model.to(device).eval()


def check_classes(manifest: Manifest, ckpt: dict, cfg: JobConfig, path: Path) -> None:
    """Refuse shards whose class lists differ from the ones the checkpoint's heads were trained on."""
    changed = [t for t in cfg.model.tasks if manifest.classes[t] != ckpt["class_names"][t]]
    if changed:
        raise UserError(f"{cfg.data.shards} defines other {'/'.join(changed)} classes than {path} was trained "
                        "with; use shards made from the same label files (--set data.shards=DIR)")
