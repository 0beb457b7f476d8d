"""`artdist submit`: run a training job on SLURM (or locally) through submitit."""
from __future__ import annotations

import argparse

from artdist.commands.common import add_config_arguments
from artdist.config import load_config, override_section
from artdist.submit import submit_job, task_layout

# SlurmConfig fields that are also command-line flags; a flag that is given overrides the config.
FLAGS = ("nodes", "gpus_per_node", "partition", "time_min", "account", "qos", "cpus_per_task", "mem_gb", "constraint")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, required=True)
    g = p.add_argument_group("resources (default: the config's slurm: section)")
    g.add_argument("--nodes", type=int, help="number of nodes")
    g.add_argument("--gpus-per-node", type=int,
                   help="GPUs per node = training processes per node (with train.device=cpu: CPU processes)")
    g.add_argument("--partition", help="SLURM partition")
    g.add_argument("--time", dest="time_min", type=int, metavar="MIN", help="time limit in minutes")
    g.add_argument("--account", help="SLURM account")
    g.add_argument("--qos", help="SLURM quality of service")
    g.add_argument("--cpus-per-task", type=int, help="CPU cores per training process (loader workers + 1)")
    g.add_argument("--mem-gb", type=int, help="memory per node in GB (0: the cluster's default)")
    g.add_argument("--constraint", help="SLURM node constraint, e.g. a100")
    p.add_argument("--local", action="store_true",
                   help="run the job on this machine with submitit's LocalExecutor (one node; gloo on CPU)")


def run(args: argparse.Namespace) -> int:
    cfg = override_section(load_config(args.config, args.overrides), "slurm", {k: getattr(args, k) for k in FLAGS})
    job = submit_job(cfg, args.local)
    tasks, gpus = task_layout(cfg, args.local)
    where = "on this machine (submitit LocalExecutor)" if args.local else "to SLURM"
    print(f"submitted job {job.job_id} {where}: {cfg.slurm.nodes} node(s) x {tasks} task(s)"
          f"{f', {gpus} GPU(s) per node' if gpus else ' on CPU'}, run dir {cfg.run_dir}")
    print(f"  log (rank 0): {job.paths.stdout}  (stderr: {job.paths.stderr})")
    print(f"  follow:       tail -f {job.paths.stdout} {job.paths.stderr}")
    if args.local:
        print(f"  stop:         kill {job.job_id}")
    else:
        print(f"  status:       squeue -j {job.job_id}   sacct -j {job.job_id}")
    print(f"  tensorboard --logdir {cfg.run_dir / 'tb'}")
    return 0
