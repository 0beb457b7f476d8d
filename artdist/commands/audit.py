"""`artdist audit`: out-of-sample outlier scores for every painting from K fold trainings."""
from __future__ import annotations

import argparse

import torch

from artdist.audit.folds import AuditDir
from artdist.commands.common import add_config_arguments
from artdist.config import load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Split every labelled painting of the shards (or --splits) into K folds (stratified by the primary "
        "task, copies together), train K ordinary runs under RUN_DIR/folds/k/ (model k on every fold but k), "
        "score fold k with model k, and rank the whole dataset by those out-of-sample scores: "
        "RUN_DIR/outliers/all/ and RUN_DIR/summary.json. Rerunning resumes; finished folds are kept.")
    add_config_arguments(p, required=True)
    p.add_argument("--folds", type=int, metavar="K", help="number of folds (default: the config's audit.folds)")
    p.add_argument("--splits", metavar="A,B", help="comma-separated splits to audit (default: every split)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--merge", action="store_true", help="only the merge of finished folds (what the merge job runs)")
    mode.add_argument("--local", action="store_true",
                      help="the folds one after another on this machine under torchrun, then the merge (default)")
    mode.add_argument("--submit", action="store_true",
                      help="SLURM: the folds as one job array (each a DDP job with the config's slurm: section), "
                           "then the merge as a job that starts after all of them succeed")
    mode.add_argument("--fold", type=int, metavar="k",
                      help="train and score fold k here (each torchrun process runs this; --local starts them)")
    mode.add_argument("--vs-cleanlab", action="store_true",
                      help="benchmark: cleanlab on the merged out-of-sample probabilities beside artdist's ranking "
                           "(needs `pip install cleanlab`)")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="--local: processes per fold (default: the local GPUs, or 2 CPU processes without)")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.folds is not None:
        overrides.append(f"audit.folds={args.folds}")
    if args.splits:
        overrides.append(f"audit.splits=[{args.splits}]")
    cfg = load_config(args.config, overrides)
    if args.fold is not None:
        from artdist.audit.run import run_fold
        run_fold(cfg, args.fold)
        return 0
    if args.merge:
        from artdist.audit.merge import merge
        merge(cfg)
        return 0
    if args.vs_cleanlab:
        from artdist.audit.peer import compare_cleanlab
        compare_cleanlab(cfg)
        return 0
    if args.submit:
        from artdist.audit.run import submit_audit
        folds, merge_job, plan = submit_audit(cfg)
        log_dir = cfg.run_dir / "slurm"
        if folds:
            array = folds[0].job_id.split("_")[0]
            print(f"submitted job array {array} to SLURM: {len(folds)} of {plan['folds']} folds "
                  f"({', '.join(j.job_id for j in folds)}), each {cfg.slurm.nodes} node(s) x "
                  f"{max(cfg.slurm.gpus_per_node, 1)} task(s); fold runs under {cfg.run_dir / 'folds'}/k")
        else:
            print(f"every fold of {cfg.run_dir} has finished: only the merge is submitted")
        print(f"submitted merge job {merge_job.job_id}"
              + (f" (starts after array {array} succeeds: afterok)" if folds else ""))
        ids = ",".join([*([array] if folds else []), merge_job.job_id])
        print(f"  status:  squeue -j {ids}   sacct -j {ids}")
        print(f"  logs:    {log_dir}/<job id>/ (fold k of the array: <array>_k/)")
        print(f"  follow:  tail -f {merge_job.paths.stdout}")
        print(f"  result:  {AuditDir(cfg.run_dir).summary} and {cfg.run_dir / 'outliers' / 'all' / 'index.html'}")
        return 0
    from artdist.audit.run import run_local
    config_args = ["--config", args.config, *(x for o in overrides for x in ("--set", o))]
    run_local(cfg, config_args, args.nproc or torch.cuda.device_count() or 2)
    return 0
