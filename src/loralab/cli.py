"""Command line: parses arguments and calls the library. Holds no logic of its own.

Every UserError becomes one line on stderr and exit code 2, with no traceback. Any other exception
is a bug in loralab: one line naming a crash report (crash.py) that holds the traceback, exit 1.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .cli_help import HelpFormatter, dtype_option, subparser_class
from .data.prompts import TEMPLATES
from .errors import UserError
from .peft.presets import COMBINE_METHODS, TARGET_PRESETS
from .runtime.allocator import reexec_with_allocator
from .study.cli_args import add_study_parser, add_tune_parser


def cmd_train(args) -> int:
    from .api import load_run_config, run
    from .summary import format_table

    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not os.path.exists(config):  # `loralab train data.path=x.jsonl`: no YAML
        config, overrides = None, [config] + overrides
    if config:
        from .shipped import resolve_config

        config = resolve_config(config)  # `loralab train demo`: the shipped config, from any folder
    cfg = load_run_config(config, overrides)  # what loralab.train() does, with the overrides as strings
    if args.nproc:
        from .train.launch import launch

        return launch(config, overrides, args.nproc, cfg.output_dir)
    result = run(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 speaks for all
        print(format_table(result.summary, cfg))
    return 0


def cmd_eval(args) -> int:
    from .inference import task_mismatch

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.adapter and not args.harness and (line := task_mismatch(args.adapter, tasks)):
        print(f"loralab: warning: {line}", file=sys.stderr)
    if args.harness:
        return _harness(args)
    from .inference import evaluate_model, format_eval

    result = evaluate_model(args.model, args.adapter, tasks=tasks, n=args.n, batch_size=args.batch_size,
                            template=args.template)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_eval(result))
    return 0


def _harness(args) -> int:
    from .eval.harness import format_before_after
    from .inference import harness_before_after

    tasks = [t.strip() for t in args.harness.split(",") if t.strip()]
    result = harness_before_after(args.model, args.adapter, tasks=tasks, include_path=args.include_path or [],
                                  batch_size=args.batch_size, limit=args.limit)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(format_before_after(result))
    return 0


def cmd_generate(args) -> int:
    from .inference import chat, generate_once

    if args.prompt is not None:
        print(generate_once(args.model, args.adapter, args.prompt, max_new_tokens=args.max_new_tokens,
                            raw=args.raw))
    else:
        chat(args.model, args.adapter, max_new_tokens=args.max_new_tokens)
    return 0


def _adapter_and_paths(args, command: str, n_paths: int) -> tuple[str | None, list[str]]:
    """`--adapter DIR` (the one way every command names an adapter) or, as before it existed, a first
    positional beyond the command's own `n_paths`: (adapter or None, the command's positionals)."""
    paths = list(args.paths or [])
    if len(paths) > n_paths + (args.adapter is None):
        extra = f" (--adapter {args.adapter} names the adapter)" if args.adapter is not None else ""
        raise UserError(f"{command}: unexpected folder(s) {' '.join(paths[n_paths:])}{extra}")
    if args.adapter is None and len(paths) == n_paths + 1:
        return paths[0], paths[1:]
    return args.adapter, paths


def cmd_merge(args) -> int:
    from .inference import merge_to_folder

    adapter, rest = _adapter_and_paths(args, "merge", 1)
    if adapter is None or len(rest) != 1:
        raise UserError("merge needs an adapter and a new folder: loralab merge --adapter DIR OUT_DIR")
    out = merge_to_folder(adapter, rest[0], dtype=args.dtype, model=args.model)
    print(f"merged model written to {out}")
    return 0


def cmd_export(args) -> int:
    from .inference import export_gguf

    adapter, _ = _adapter_and_paths(args, "export", 0)
    for path in export_gguf(adapter, lora_out=args.gguf, merged_out=args.merged_gguf, outtype=args.outtype,
                            model=args.model):
        print(f"wrote {path}")
    return 0


def cmd_combine(args) -> int:
    from .peft.combine import combine_adapters, parse_adapter_arg

    out = combine_adapters([parse_adapter_arg(a) for a in args.adapter], args.out_dir, method=args.method,
                           density=args.density, svd_rank=args.svd_rank, seed=args.seed, threads=args.threads,
                           progress=True)
    print(f"combined adapter written to {out}")
    return 0


def cmd_check(args) -> int:
    from .peft.check import format_table, runtime_support

    adapter, _ = _adapter_and_paths(args, "check", 0)
    if adapter is None:
        raise UserError("check needs an adapter: loralab check --adapter DIR")
    rows = runtime_support(adapter)
    print(json.dumps(rows, indent=2) if args.json else format_table(adapter, rows))
    return 0


def cmd_study(args) -> int:
    from .study.cli_args import study_kwargs
    from .study.runner import study_command
    from .study.spec import describe_presets

    if args.name == "list":
        print(describe_presets())
        return 0
    result = study_command(args.name, **study_kwargs(args))
    if isinstance(result, str):
        print(result)
    else:
        failed = [r for r in result["runs"] if r["status"] != "ok"]
        print(f"report: {result['report_md']}\n        {result['report_html']}\nresults: {result['results_csv']}")
        if failed:
            print(f"{len(failed)} run(s) failed or missing; see the Runs table")
    return 0


def cmd_tune(args) -> int:
    from .study.tune import tune_command

    result = tune_command(args.config, space=args.space, budget=args.budget, out=args.out, overrides=args.overrides,
                          parallel=args.parallel, ray=args.ray, dry_run=args.dry_run)
    done = isinstance(result, dict)
    print(f"chose {' '.join(result['overrides'])}\nreport: {result['report_md']}" if done else result)
    return 0


def cmd_fetch(args) -> int:
    from .io.models import fetch_bundled

    print(fetch_bundled(args.name))
    return 0


def cmd_estimate(args) -> int:
    from .api import estimate
    from .memory.fixes import format_estimate

    if args.fsdp and args.gpus < 2:
        raise UserError(f"--fsdp shards across GPUs: give --gpus 2 or more (got --gpus {args.gpus})")
    result = estimate(args.model, method=args.method, r=args.r, targets=args.targets, seq=args.seq, batch=args.batch,
                      optimizer=args.optimizer, precision=args.precision, grad_checkpointing=args.grad_checkpointing,
                      device=args.device, grad_accum=args.grad_accum, gpus=args.gpus, fsdp=args.fsdp, dora=args.dora,
                      gpu_gb=args.gpu_gb)
    if args.json:
        print(json.dumps(result))
    else:
        fixes = result.pop("fixes", [])
        print(format_estimate(result, args.model, args.gpu_gb, fixes))
    return 0


def _is_collective_failure(e: RuntimeError) -> bool:
    import torch.distributed

    text = str(e).lower()
    return isinstance(e, torch.distributed.DistError) or any(
        w in text for w in ("gloo", "nccl", "connection reset", "connection closed", "timed out"))


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="loralab", description="LoRA / QLoRA fine-tuning lab for causal LMs.",
                                formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"loralab {__version__}",
                   help="print loralab's version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           help="what to do (`loralab COMMAND --help` for its options)",
                           parser_class=subparser_class(HelpFormatter))

    t = sub.add_parser("train", help="fine-tune from a YAML config (plus key.sub=value overrides)")
    t.add_argument("config", nargs="?", help="YAML config file, or the name of a shipped one (demo: "
                   "the demo's config, from any folder)")
    t.add_argument("overrides", nargs="*", help="overrides such as lora.r=16 train.lr=1e-3")
    t.add_argument("--nproc", type=int, default=None, help="train on N processes of this machine (runs "
                   "torchrun; on several machines call torchrun yourself, see docs/distributed.md)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="exact-match accuracy of a model (plus adapter) on held-out tasks")
    e.add_argument("--model", default=None, help="base model (default: the adapter's base, or smollm2-135m)")
    e.add_argument("--adapter", default=None, metavar="DIR", help="adapter folder (PEFT format)")
    e.add_argument("--tasks", default="2da,2ds", help="comma-separated: arithmetic (2da, ...), instruction-suite "
                   "families (reverse_word, ...) or the groups suite / suite-held-out")
    e.add_argument("--n", type=int, default=100, help="questions per task")
    e.add_argument("--batch-size", type=int, default=50, help="prompts generated at once")
    e.add_argument("--template", default="auto", choices=TEMPLATES, help="prompt template, as data.template "
                   "(auto: raw for prompt/response tasks, the chat template for chat records)")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.add_argument("--harness", default=None, metavar="TASK[,TASK]",
                   help="run lm-evaluation-harness tasks instead (loralab_2da, ..., the loralab tag, or your own)"
                        ", on the base and then base + adapter")
    e.add_argument("--include-path", action="append", default=None, metavar="DIR",
                   help="a folder of lm-eval task files (YAML + data) for --harness; repeatable")
    e.add_argument("--limit", type=int, default=None, help="--harness: at most this many items per task")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="answer one prompt, or chat interactively, with base plus adapter")
    g.add_argument("--model", default=None, help="base model (default: the adapter's base, or smollm2-135m)")
    g.add_argument("--adapter", default=None, metavar="DIR", help="adapter folder (PEFT format); without it, the base "
                   "alone")
    g.add_argument("--prompt", default=None, help="one prompt; without it, an interactive chat")
    g.add_argument("--raw", action="store_true", help="feed the prompt as is (no chat template)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="longest answer, in tokens")
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("merge", help="merge an adapter into its base and write a plain HF folder",
                       usage="loralab merge --adapter DIR OUT_DIR [--model MODEL] [--dtype DTYPE]")
    m.add_argument("--adapter", default=None, metavar="DIR", help="adapter folder (PEFT format)")
    m.add_argument("paths", nargs="*", metavar="OUT_DIR", help="new folder for the merged model (the older "
                   "`merge ADAPTER_DIR OUT_DIR` still works)")
    m.add_argument("--model", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    m.add_argument("--dtype", default="auto", **dtype_option("merge"),
                   help="the merged weights' dtype (default auto: the base's own stored dtype)")
    m.set_defaults(func=cmd_merge)

    ex = sub.add_parser("export", help="write the adapter as a llama.cpp LoRA GGUF, and/or the merged model as GGUF",
                        usage="loralab export [--adapter DIR] [--gguf OUT.gguf] [--merged-gguf OUT.gguf] "
                              "[--dtype DTYPE] [--model MODEL]")
    ex.add_argument("--adapter", default=None, metavar="DIR", help="adapter folder (PEFT format); without it, "
                    "--merged-gguf writes the base (--model) alone")
    ex.add_argument("paths", nargs="*", metavar="ADAPTER_DIR", help="the older way to name the adapter: use "
                    "--adapter")
    ex.add_argument("--gguf", default=None, metavar="OUT.gguf", help="LoRA adapter GGUF (llama.cpp --lora)")
    ex.add_argument("--merged-gguf", default=None, metavar="OUT.gguf", help="base + adapter merged, with tokenizer")
    ex.add_argument("--dtype", "--outtype", dest="outtype", default="fp16", **dtype_option("gguf"),
                    help="--merged-gguf: the 2D weights' dtype, q8_0 for "
                    "GGUF's 8-bit blocks (1D weights stay fp32; --outtype is the older name)")
    ex.add_argument("--model", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    ex.set_defaults(func=cmd_export)

    c = sub.add_parser("combine", help="combine adapters into one PEFT adapter (as PEFT's add_weighted_adapter)",
                       description="Combine LoRA adapters with weights into one adapter folder, computed as PEFT's "
                                   "add_weighted_adapter computes it (docs/variants.md).")
    c.add_argument("out_dir", help="new folder for the combined adapter")
    c.add_argument("--adapter", action="append", required=True, metavar="DIR:WEIGHT",
                   help="an adapter folder and its weight (default 1); repeat for each adapter")
    c.add_argument("--method", default="svd", choices=COMBINE_METHODS, help="how the adapters combine "
                   "(docs/variants.md); svd: the weighted sum of the updates, truncated to --svd-rank")
    c.add_argument("--density", type=float, default=None, help="share of entries kept (ties, dare_*, magnitude_prune)")
    c.add_argument("--svd-rank", type=int, default=None, help="svd result rank (default: the largest input rank)")
    c.add_argument("--seed", type=int, default=0, help="DARE's random masks")
    c.add_argument("--threads", type=int, default=None, help="CPU threads for the arithmetic (default: torch's "
                   "own choice)")
    c.set_defaults(func=cmd_combine)

    k = sub.add_parser("check", help="which runtimes (loralab, PEFT, vLLM, GGUF) load an adapter folder as is",
                       usage="loralab check --adapter DIR [--json]")
    k.add_argument("--adapter", default=None, metavar="DIR", help="adapter folder (PEFT format)")
    k.add_argument("paths", nargs="*", metavar="ADAPTER_DIR", help="the older way to name the adapter: use "
                   "--adapter")
    k.add_argument("--json", action="store_true", help="print the table as JSON")
    k.set_defaults(func=cmd_check)

    add_study_parser(sub, cmd_study)  # study/cli_args.py
    add_tune_parser(sub, cmd_tune)

    f = sub.add_parser("fetch", help="download and cache a bundled model (default smollm2-135m)")
    f.add_argument("name", nargs="?", default="smollm2-135m", help="bundled model to fetch")
    f.set_defaults(func=cmd_fetch)
    x = sub.add_parser("estimate", help="predict peak training memory from a model config alone (no weights)")
    x.add_argument("--model", default="smollm2-135m", help="bundled config (llama-2-7b, llama-2-70b, llama-3.1-8b, "
                   "mistral-7b, qwen2.5-7b, smollm2-135m/360m/1.7b), an HF folder, or a config.json")
    x.add_argument("--method", default="lora", choices=["lora", "qlora", "full"], help="LoRA, QLoRA (4-bit "
                   "base) or full fine-tuning")
    x.add_argument("--r", type=int, default=8, help="LoRA rank")
    x.add_argument("--targets", default="all-linear", choices=list(TARGET_PRESETS), help="the modules LoRA "
                   "trains (a lora.targets preset)")
    x.add_argument("--seq", type=int, default=512, help="tokens per sequence (the longest batch sets the peak)")
    x.add_argument("--batch", type=int, default=1, help="micro batch")
    x.add_argument("--grad-accum", type=int, default=1, help="micro batches per optimizer step (gradients of "
                   "earlier ones stay alive: matters for full fine-tuning)")
    x.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "adamw8bit"], help="its state "
                   "per trainable parameter sets part of the peak")
    x.add_argument("--dtype", "--precision", dest="precision", default="bf16", **dtype_option("estimate"),
                   help="the run's compute dtype, as train.precision "
                   "(--precision is the older name)")
    x.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward "
                   "instead of keeping them")
    x.add_argument("--dora", action="store_true", help="DoRA: magnitude vectors, cached weight norms, one more "
                   "saved output per layer")
    x.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where the run trains (CPU: "
                   "the runtime's own memory counts too)")
    x.add_argument("--gpu-gb", type=float, default=None, help="GPU memory as on the card (GiB); says whether it "
                   "fits and, if not, the cheapest fixes")
    x.add_argument("--gpus", type=int, default=1, help="GPUs the run is spread over, each with its own micro "
                   "batch: the peak is per GPU (replicated, as DDP, unless --fsdp)")
    x.add_argument("--fsdp", action="store_true", help="FSDP2: weights, gradients and optimizer state sharded "
                   "across the --gpus (docs/distributed.md)")
    x.add_argument("--json", action="store_true", help="print one JSON object (peak_bytes, breakdown, ...)")
    x.set_defaults(func=cmd_estimate)
    return p


def main(argv: list[str] | None = None) -> int:
    """The one guard at the edge: whatever happens below ends in one line on stderr and an exit code."""
    try:
        return _main(argv)
    except UserError as e:
        print(f"loralab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loralab: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, RuntimeError) and int(os.environ.get("WORLD_SIZE", "1")) > 1 and _is_collective_failure(e):
            # a peer rank died or timed out: say so in one line (torchrun stops the job)
            print(f"loralab: error: rank {os.environ.get('RANK')}: lost the other ranks "
                  f"({(str(e).splitlines() or [''])[0][:160]})", file=sys.stderr)
            return 2
        return _crashed(argv, e)


def _main(argv: list[str] | None) -> int:
    if argv is None and "torch" not in sys.modules:  # the `loralab` command itself, not a caller's main([...])
        reexec_with_allocator()  # allocator.py: tcmalloc or mimalloc, before torch loads
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub is reachable: never wait on one
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # transformers imports torchao (when installed) while loading any model; its CUDA-only
    # extensions and torch's pytree deprecation notes are noise on a CPU run.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling a `nargs="*"` positional at the first option, so overrides written
    # after one (`study qlora --dry-run lora.r=4`) come back unparsed: they are still overrides.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides or []) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)


def _crashed(argv: list[str] | None, e: Exception) -> int:
    """Anything else is our bug, not the user's input: one line pointing at a crash report that
    holds the traceback, and exit 1 (2 means bad input, which this is not)."""
    from .crash import bug_line, write_crash_report

    command = list(sys.argv) if argv is None else ["loralab", *map(str, argv)]
    print(bug_line(e, write_crash_report(command, e)), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
