"""`artdist relabel`: apply a reviewer's exported decisions as label corrections to a new shard set."""
from __future__ import annotations

import argparse

from artdist.data.relabel import relabel_shards


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Copy a shard set with the 'label wrong' decisions of a review (the CSV exported from "
        "outliers/<split>/index.html) applied: each such row with a suggested label changes that "
        "painting's label in that task. Images are copied unchanged; the new manifest.json lists "
        "every correction under 'relabels'. Train on the new folder with --set data.shards=NEW.")
    p.add_argument("decisions", metavar="DECISIONS.csv", help="decisions exported from the outlier page")
    p.add_argument("--shards", required=True, metavar="DIR", help="the shard set the report was made on")
    p.add_argument("--out", required=True, metavar="DIR", help="new, empty folder for the corrected shards")


def run(args: argparse.Namespace) -> int:
    manifest = relabel_shards(args.shards, args.decisions, args.out)
    record = manifest["relabels"][-1]
    kept = ", ".join(f"{n} {what}" for what, n in record["not_applied"].items()) or "none"
    print(f"{len(record['corrections'])} label correction(s) applied in {args.out} (rows left as they are: {kept})")
    return 0
