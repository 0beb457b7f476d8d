"""Everything a run writes to TensorBoard: the writer, curves, labelled confusion matrices, config and test text."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

from artdist.config import HEADLINE, JobConfig, to_dict, to_yaml
from artdist.rundir import RunDir

# the knobs worth comparing runs by, for the HPARAMS tab
HPARAM_KEYS = {"model": ("backbone", "weights", "sequence", "lstm_hidden", "lstm_layers"),
               "data": ("image_size", "batch_size", "augment"),
               "train": ("epochs", "lr", "backbone_lr", "weight_decay", "accum_steps", "label_smoothing",
                         "class_weighting", "amp")}


def open_writer(run_dir: RunDir | str, purge_step: int | None = None) -> SummaryWriter:
    """Rank 0: the run's writer; `purge_step` (a resumed run's global step) hides events the previous
    process logged after its last checkpoint, so a rerun never draws a curve twice."""
    return SummaryWriter(str(event_dir(run_dir)), purge_step=purge_step or None)


def event_dir(run_dir: RunDir | str) -> str:
    """RUN_DIR/tb/<run name>: `tensorboard --logdir RUN_DIR/tb` then lists the run by its name, not as '.'."""
    run_dir = RunDir(run_dir)
    return str(run_dir.tensorboard / run_dir.path.resolve().name)


def log_config(writer: SummaryWriter, cfg: JobConfig, world: int) -> None:
    """The resolved config in the TEXT tab (config/resolved), as the run dir's config.yaml has it."""
    writer.add_text("config/resolved", _code_block(f"# world size {world}\n{to_yaml(cfg)}"), 0)


def log_train(writer: SummaryWriter, stats: dict, step: int, device: torch.device) -> None:
    """Every train.log_every steps: train/loss, train/<task>/{loss,accuracy} (beside val/<task>/...), LR, throughput."""
    writer.add_scalar("train/loss", stats["loss"], step)
    for task, value in stats["task_loss"].items():
        writer.add_scalar(f"train/{task}/loss", value, step)
    for task, value in stats["task_accuracy"].items():
        writer.add_scalar(f"train/{task}/accuracy", value, step)
    writer.add_scalar("train/lr", stats["lr"], step)
    writer.add_scalar("train/images_per_sec", stats["images_per_sec"], step)
    writer.add_scalar("train/data_wait_frac", stats["data_wait_frac"], step)
    if device.type == "cuda":
        writer.add_scalar("train/gpu_mem_gb", torch.cuda.max_memory_allocated(device) / 2**30, step)


def log_validation(writer: SummaryWriter, report: dict, step: int) -> None:
    """After each epoch: val/<task>/{accuracy,top5,macro_f1,loss} curves and one labelled confusion image per task."""
    for task, r in report["tasks"].items():
        for key in (*HEADLINE, "loss"):
            if key in r:
                writer.add_scalar(f"{report['split']}/{task}/{key}", r[key], step)
        names = [row["class"] for row in r["per_class"]]
        writer.add_image(f"{report['split']}/{task}/confusion",
                         confusion_figure(r["confusion"], names, f"{report['split']} {task}"), step,
                         dataformats="HWC")
    writer.flush()


def log_final(writer: SummaryWriter, cfg: JobConfig, world: int, test: dict | None, step: int) -> None:
    """End of training: the test report as a table in the TEXT tab and its confusion images (IMAGES),
    never as single-point scalar charts; the HPARAMS tab gets the run's knobs against the last
    validation curves' values (tags it reads from the existing val/* scalars, so nothing is redrawn)."""
    if test is not None:
        rows = ["| task | " + " | ".join(HEADLINE) + " | labelled |", "|---" * (len(HEADLINE) + 2) + "|"]
        for task, r in test["tasks"].items():
            rows.append(f"| {task} | " + " | ".join(f"{r[k]:.4f}" for k in HEADLINE if k in r)
                        + f" | {r['num_labelled']} |")
        writer.add_text(f"{test['split']}/metrics", "\n".join(rows), step)
        for task, r in test["tasks"].items():
            names = [row["class"] for row in r["per_class"]]
            writer.add_image(f"{test['split']}/{task}/confusion",
                             confusion_figure(r["confusion"], names, f"{test['split']} {task}"), step,
                             dataformats="HWC")
    tree = to_dict(cfg)
    knobs = {f"{section}.{key}": tree[section][key] for section, names in HPARAM_KEYS.items() for key in names}
    knobs.update({"model.tasks": ",".join(cfg.model.tasks), "world_size": world})
    metrics = {f"{cfg.data.val_split}/{task}/{key}": 0.0 for task in cfg.model.tasks for key in HEADLINE}
    # summary.hparams, not SummaryWriter.add_hparams: the latter also writes every metric as a
    # one-point scalar chart in a sub-run, which buries the training curves.
    for summary in hparams_summary(knobs, metrics):
        writer.file_writer.add_summary(summary)
    writer.flush()


def _code_block(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())  # markdown: indented = verbatim


# --------------------------------------------------------------------------- confusion matrix picture

_FONT_PX = 12
_CELL_MIN = 22  # px; fits a 3-digit count in the font above
_LOW, _HIGH = np.array([255.0, 255.0, 255.0]), np.array([8.0, 48.0, 107.0])  # white -> dark blue


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled TrueType font: no system fonts needed


def _colour(share: float) -> tuple[int, int, int]:
    return tuple(int(round(v)) for v in _LOW + share * (_HIGH - _LOW))


def confusion_figure(confusion: list[list[int]] | np.ndarray | torch.Tensor, class_names: list[str],
                     title: str) -> np.ndarray:
    """A confusion matrix as a picture (HWC uint8): class names on both axes, each cell coloured by
    its share of the true class's row and printed with its count, each row's count beside its name,
    and a colour scale. Classes absent from both the labels and the predictions are left out so 27
    styles on a small split stay readable; the title says how many were left out."""
    cm = np.asarray(torch.as_tensor(confusion).cpu(), dtype=np.int64)
    shown = [i for i in range(len(cm)) if cm[i].sum() or cm[:, i].sum()] or list(range(len(cm)))
    cm = cm[np.ix_(shown, shown)]
    names = [class_names[i] for i in shown]
    rows = cm.sum(axis=1)
    share = cm / np.maximum(rows[:, None], 1)
    n = len(shown)
    font, small = _font(_FONT_PX), _font(_FONT_PX - 2)
    cell = max(_CELL_MIN, max((int(small.getlength(str(v))) + 6 for v in cm.flat), default=_CELL_MIN))
    labels = [f"{name} ({count})" for name, count in zip(names, rows)]
    left = max(int(font.getlength(s)) for s in labels) + 10
    top_labels = max(int(font.getlength(s)) for s in names) + 10
    head = 2 * (_FONT_PX + 6)
    bar = 70  # colour scale on the right
    hidden = len(class_names) - n
    title += f" ({hidden} classes absent from labels and predictions not shown)" if hidden else ""
    subtitle = "rows: true class (labelled count); columns: predicted; colour: share of the row"
    width = max(left + n * cell + bar, int(font.getlength(title)) + 12, int(small.getlength(subtitle)) + 12)
    span = max(n * cell, 60)  # colour scale height
    height = head + top_labels + max(n * cell, span) + 10
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((6, 4), title, fill="black", font=font)
    draw.text((6, 4 + _FONT_PX + 4), subtitle, fill=(70, 70, 70), font=small)
    y0, x0 = head + top_labels, left
    # column names, written sideways
    for j, name in enumerate(names):
        text = Image.new("RGB", (top_labels, cell), "white")
        ImageDraw.Draw(text).text((4, (cell - _FONT_PX) // 2), name, fill="black", font=font)
        rotated = text.rotate(90, expand=True)  # reads bottom to top, ending at the matrix
        img.paste(rotated, (x0 + j * cell, head))
    for i in range(n):
        draw.text((left - 6, y0 + i * cell + cell // 2), labels[i], fill="black", font=font, anchor="rm")
        for j in range(n):
            box = (x0 + j * cell, y0 + i * cell, x0 + (j + 1) * cell - 1, y0 + (i + 1) * cell - 1)
            colour = _colour(float(share[i, j]))
            draw.rectangle(box, fill=colour, outline=(225, 225, 225))
            if cm[i, j]:
                ink = "white" if share[i, j] > 0.5 else "black"
                draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), str(int(cm[i, j])), fill=ink, font=small,
                          anchor="mm")
    # colour scale: 0 (white) at the bottom to 1 (dark blue) at the top of the matrix
    bx = x0 + n * cell + 14
    for k in range(span):
        draw.line([(bx, y0 + k), (bx + 14, y0 + k)], fill=_colour(1 - k / max(span - 1, 1)))
    draw.rectangle((bx, y0, bx + 14, y0 + span - 1), outline="black")
    for value, y in ((1.0, y0), (0.5, y0 + span // 2), (0.0, y0 + span - 1)):
        draw.text((bx + 18, y), f"{value:.1f}", fill="black", font=small, anchor="lm")
    return np.asarray(img)
