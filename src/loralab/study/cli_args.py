"""The `loralab study` and `loralab tune` command lines (cli.py calls these; kept here so the study
room owns its flags)."""
from __future__ import annotations


def add_study_parser(sub, func) -> None:
    s = sub.add_parser("study", help="run a preset study (the article's experiments) and write a report",
                       description="Run a study: cells x seeds, each a `loralab train` in its own process; "
                                   "finished runs are skipped, so rerunning resumes. NAME: a preset "
                                   "(`loralab study list`) or a study YAML file.")
    s.add_argument("name", help="a preset (`loralab study list` names them), a study YAML, or 'list'")
    s.add_argument("overrides", nargs="*", help="config overrides for every cell, e.g. model.name=/models/llama-2-7b")
    s.add_argument("--scale", default="cpu", choices=["cpu", "gpu"], help="cpu: minutes on a laptop CPU with the "
                   "default model; gpu: the article's Llama-2-7B settings (give model.name=...)")
    s.add_argument("--out", default=None, help="study folder (default runs/studies/NAME-SCALE)")
    s.add_argument("--seeds", type=int, default=None, help="seeds per cell (default: the preset's)")
    s.add_argument("--parallel", type=int, default=1, help="runs at once (default 1)")
    s.add_argument("--ray", default=None, metavar="auto|local|ADDRESS", help="run each (cell, seed) as a Ray task: "
                   "auto = the running cluster, local = a private Ray on this machine, or a cluster's address; the "
                   "study folder must be shared by every node (pip install 'loralab[ray]'; docs/studies.md)")
    s.add_argument("--gpus-per-run", type=float, default=0, help="GPUs each run holds on the Ray cluster (default 0)")
    s.add_argument("--cpus-per-run", type=int, default=1, help="CPUs each run holds on the Ray cluster, and its "
                   "train.threads (default 1)")
    s.add_argument("--until-decided", action="store_true", help="after the study's seeds, add one seed a round to "
                   "the cells behind unclear claims until each is decided (intervals corrected for the repeated "
                   "looks; docs/studies.md)")
    s.add_argument("--budget", default=None, help="with --until-decided: wall time for the whole study, e.g. 45m "
                   "(default 45m)")
    s.add_argument("--max-seeds", type=int, default=None, help="with --until-decided: seeds a cell may reach "
                   "(default 8)")
    s.add_argument("--no-reuse", action="store_true", help="train every run here, even one whose training a study "
                   "beside this one (the same parent folder) already made; by default such a run is copied")
    s.add_argument("--dry-run", action="store_true", help="print the cells and their overrides, run nothing")
    s.add_argument("--report-only", action="store_true", help="rebuild the report from the study folder")
    s.set_defaults(func=func)


def study_kwargs(args) -> dict:
    return {"scale": args.scale, "out": args.out, "seeds": args.seeds, "parallel": args.parallel,
            "dry_run": args.dry_run, "report_only": args.report_only, "overrides": args.overrides, "ray": args.ray,
            "gpus_per_run": args.gpus_per_run, "cpus_per_run": args.cpus_per_run,
            "until_decided": args.until_decided, "budget": args.budget, "max_seeds": args.max_seeds,
            "reuse": not args.no_reuse}


def add_tune_parser(sub, func) -> None:
    t = sub.add_parser("tune", help="search rank, alpha and learning rate within a time budget (successive halving)",
                       description="Successive halving over a grid: short runs of every point, the best third "
                                   "three times longer, ... then the chosen point against the config as given on "
                                   "seeds 1-3, with their paired interval (docs/studies.md).")
    t.add_argument("config", help="a run config YAML, or 'demo' (the bundled demo; default space "
                   "\"lr=[1e-3, 2e-3, 4e-3] lora.r=[8, 16, 32]\")")
    t.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. data.n_train=200")
    t.add_argument("--space", default=None, help='the grid, e.g. "lr=[1e-4, 3e-4] lora.r=[8, 16] lora.alpha=[16, 32]"')
    t.add_argument("--budget", default="30m", help="wall time for the search and the comparison")
    t.add_argument("--out", default=None, help="folder (default runs/tune/CONFIG-NAME)")
    t.add_argument("--parallel", type=int, default=1, help="runs at a time, each with its share of the cores")
    t.add_argument("--ray", default=None, metavar="auto|local|ADDRESS",
                   help="run each run as a Ray task, as many at once as the cluster holds (one CPU each)")
    t.add_argument("--dry-run", action="store_true", help="print the grid and the rungs, run nothing")
    t.set_defaults(func=func)
