"""The ``cifarbench`` command: parse, call, print. User errors are one line on stderr and exit code 2.

Only torch-free modules are imported at the top: every command builds this parser, and ``status``, ``submit``
and ``collect`` never pay for importing torch. The training layer is imported inside the commands that train."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from cifarbench.config.extras import missing_logger
from cifarbench.config.resources import AUTO, MPS_MODES
from cifarbench.config.spec import (
    ARCHS,
    COMPILE_MODES,
    DATASETS,
    LOADERS,
    LOGGERS,
    PRECISIONS,
    REAL_DATASETS,
    RECIPES,
    SYNTHETIC_DATASETS,
    RunSpec,
    get_recipe,
)
from cifarbench.errors import Problems, UsageError, check_int, check_name, plural
from cifarbench.store.datasets import SYNTHETIC_SIZES, image_counts


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2, like every other user error
        raise UsageError(f"{self.prog}: {message}")


def _cmd_models(args) -> int:
    rows = [dataclasses.asdict(arch) for arch in ARCHS.values()]  # the registry's measured figures: no torch
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<11} {'family':<8} {'depth':>5} {'params (10)':>12} {'params (100)':>12} {'fwd MACs':>10}")
    for r in rows:
        print(
            f"{r['name']:<11} {r['family']:<8} {r['depth']:>5} {r['params_10']:>12,} {r['params_100']:>12,} "
            f"{r['macs'] / 1e6:>9.1f}M"
        )
    return 0


def _load_grid(path):
    """The grid, each run's id knowing which data it reads (``store.datasets.fingerprint``)."""
    from cifarbench.config.grid import load_grid
    from cifarbench.store.datasets import fingerprint

    return load_grid(path, fingerprint=fingerprint)


def _cmd_run(args) -> int:
    if why := missing_logger(args.logger):
        raise UsageError(why)
    from cifarbench.store.datasets import fingerprint
    from cifarbench.train import fit

    try:
        spec = RunSpec(
            model=args.model,
            dataset=args.dataset,
            recipe=get_recipe(args.opt),
            batch_size=args.batch_size,
            seed=args.seed,
            epochs=args.epochs,
            precision=args.precision,
            loader=args.loader,
            deterministic=args.deterministic,
            compile=args.compile,
            val_split=args.val_split,
            data_fingerprint=fingerprint(args.dataset, args.data_root),
            data_root=args.data_root,
            verify=not args.no_verify,
            results=args.results,
            logger=args.logger,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    fit.resolve_precision(spec.precision, fit.default_device())  # a wrong choice fails before any record
    path = fit.fit(spec, num_workers=args.workers)
    print(f"record: {path}")
    return 0


def _cmd_data(args) -> int:
    from cifarbench.train import data

    if args.data_cmd == "download":
        names = list(REAL_DATASETS) if args.dataset == "all" else [args.dataset]
        for name in names:
            data.download(name, args.root)
            print(f"{name}: downloaded and verified in {args.root}")
    else:
        names = list(SYNTHETIC_DATASETS) if args.dataset == "all" else [args.dataset]
        for name in names:
            folder = data.write_synthetic(
                name, args.root, train_size=args.train_size, test_size=args.test_size, force=args.force
            )
            print(f"{name}: {args.train_size} train / {args.test_size} test images in {folder}")
    return 0


def _probe_arguments(p, flag: str) -> None:
    p.add_argument(
        flag,
        dest="probe_timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="seconds to wait for the probe jobs to start and answer (default 600)",
    )


def _cmd_probe(args) -> int:
    """`cifarbench probe GRID`: submit's planning and checks for every run of the grid, then the probes alone."""
    for key in ("dry_run", "retry_failed", "wait", "collect", "no_preflight", "strict"):
        setattr(args, key, False)
    args.force, args.probe, args.probe_only = True, True, True
    return _cmd_submit(args)


def _probe(tasks, results, *, on_slurm: bool, timeout_s: float, only: bool = False) -> None:
    """Run the probes of ``tasks``, print their table and notes; raise Problems where one failed."""
    from cifarbench import __version__
    from cifarbench.cluster import probe
    from cifarbench.system import git_commit

    todo = probe.probes(tasks)
    kind = "slurm" if on_slurm else "local"
    print(f"probing {plural(len(todo), 'environment')} ({kind}): one short job each, waiting up to {timeout_s:g} s")
    outcomes = probe.run_probes(
        todo, lambda p: probe.start(p, results, kind), timeout_s=timeout_s, failure=probe.failure
    )
    here = (__version__, git_commit())
    for line in [*probe.table(outcomes, here=here), *probe.notes(outcomes, here=here)]:
        print(line)
    problems = probe.problems(outcomes)
    if problems:
        logs = f"the probes' logs are under {results}/logs/probe/"
        raise Problems([*problems, logs if only else f"nothing was submitted ({logs})"])


def _cmd_submit(args) -> int:
    from cifarbench.cluster import estimate, inventory, plan, preflight, queue, status
    from cifarbench.store import scan
    from cifarbench.system import local_gpus, usable_cores

    grid = _load_grid(args.grid)
    for logger in sorted({s.logger for s in grid.specs if s.logger}):
        if why := missing_logger(logger):
            raise UsageError(why)
    if args.force and args.retry_failed:
        raise UsageError("--force re-runs everything; --retry-failed only failed runs: pick one")
    specs = list(grid.specs)
    # the records' summaries, read once for both the plan and the time estimates
    summaries = scan.summaries(grid.results, tuple(dict.fromkeys(status.FIELDS + estimate.RECORD_FIELDS)))
    states = status.state_map(grid.results, specs, summaries=summaries)
    todo = plan.plan(specs, states, force=args.force, retry_failed=args.retry_failed)
    probe_only = getattr(args, "probe_only", False)
    print_plan = print if not probe_only else lambda *_: None  # the probes' table says what `probe` has to say
    print_plan(
        f"{args.grid}: {plural(len(specs), 'run')}; {len(todo.skipped_completed)} already completed, "
        f"{len(todo.skipped_active)} pending or running"
        + (f", {len(todo.skipped_other)} not failed" if args.retry_failed else "")
        + f"; {len(todo.submit)} to submit"
    )
    on_slurm = args.executor == "slurm" or (args.executor == "auto" and queue.slurm_available())
    limits = None
    if on_slurm and todo.submit and not args.no_preflight:  # the cluster's limits, read once for the whole grid
        limits = inventory.read_limits()
    asked = grid.resources
    if limits and not grid.gpus_set:  # the default of 1 GPU on a partition that has none: train on its CPUs
        asked, notes = preflight.without_gpus(asked, limits)
        for line in notes:
            print(line)
    for line in preflight.node_notes([asked[s.run_id] for s in todo.submit], limits) if limits else ():
        print(line)
    if on_slurm and todo.submit:  # exclusive: every GPU and CPU of a node, as the partition's nodes have them
        try:
            asked, notes = plan.whole_nodes(asked, limits)
        except ValueError as e:
            raise UsageError(str(e)) from None
        for line in notes:
            print(line)
    if limits:  # no more tasks at once than the QOS lets run (of the sizes tasks have, whole nodes included)
        asked, notes = preflight.throttle(asked, limits)
        for line in notes:
            print(line)
    max_time = preflight.max_times(limits, [asked[s.run_id] for s in todo.submit]) if limits else None
    if not on_slurm:  # what local execution gives each task: one of this machine's devices and its share of cores
        gpus = local_gpus()
        whole = any(asked[s.run_id].exclusive for s in todo.submit)
        cores = plan.local_cpus(gpus, usable_cores(), len(todo.submit), whole=whole)
        try:
            local = {r: plan.local_resources(r, gpus=gpus, cpus=cores) for r in set(asked.values())}
        except ValueError as e:
            raise UsageError(str(e)) from None
        asked = {run_id: local[r] for run_id, r in asked.items()}
    planned = {r for r in asked.values() if AUTO in (r.mem_gb, r.pack)}  # memory evidence is read only for these
    evidence = estimate.read_evidence(grid.results, summaries, memory=bool(planned))
    data = {key: image_counts(*key) for key in {(s.dataset, s.data_root) for s in todo.submit}}
    tasks = plan.make_tasks(todo.submit, asked, grid.fuse, evidence, max_time, data)
    size = queue.max_array_size() if on_slurm else len(tasks) or 1
    for line in plan.describe(tasks, max_array_size=size, local=not on_slurm) if tasks else ():
        print_plan(line)
    fused = [task.specs for task in tasks if task.fused]
    if fused:
        print_plan(
            f"fused: {plural(sum(map(len, fused)), 'run')} in {plural(len(fused), 'group')} of up to "
            f"{max(map(len, fused))} (one array task each)"
        )
    if args.strict and (short := plan.short_limits(tasks)):
        raise Problems([*short, "nothing was submitted (--strict refuses time limits below the estimates)"])
    if not args.no_preflight:
        problems = preflight.problems(tasks, limits)
        if problems:
            raise Problems([*problems, "nothing was submitted (--no-preflight skips these checks)"])
    if getattr(args, "probe", False) and tasks:
        _probe(tasks, grid.results, on_slurm=on_slurm, timeout_s=args.probe_timeout, only=probe_only)
    if probe_only:
        return 0
    if todo.submit:
        _note_missing_flock(grid.results)
    if args.dry_run:
        if todo.submit:  # what `submit` refuses before it queues anything, checked without making the folder
            from cifarbench.store.atomic import check_results_writable

            check_results_writable(grid.results, create=False)
        skipped = {
            s.run_id: why
            for why, group in (
                ("completed", todo.skipped_completed),
                ("active", todo.skipped_active),
                ("not failed", todo.skipped_other),
            )
            for s in group
        }
        task_of = {s.run_id: t for t in tasks for s in t.specs}
        for spec in specs:
            mark = f"skip ({skipped[spec.run_id]})" if spec.run_id in skipped else "submit"
            t = task_of.get(spec.run_id)
            shared = "" if t is None or len(t.specs) == 1 else f" of its {'group' if t.fused else 'pack'}"
            estimated = f"  est {t.estimate.seconds / 60:.0f} min{shared} ({t.estimate.source})" if t else ""
            print(
                f"  {mark:<18} {spec.run_id}  {spec.model} {spec.dataset} {spec.recipe.name} "
                f"bs={spec.batch_size} seed={spec.seed} epochs={spec.schedule.epochs}{estimated}"
            )
        return 0
    if todo.submit:
        from cifarbench.cluster import submit  # submitit: only when something is submitted

        manifest = submit.submit(tasks, grid.results, executor=args.executor, grid_source=str(args.grid))
        jobs = sorted({e["array_job_id"] for e in manifest["runs"]})
        job_word = "job" if len(jobs) == 1 else "jobs"
        print(f"submitted {plural(len(todo.submit), 'run')} ({manifest['executor']}) as {job_word} {', '.join(jobs)}")
        print(f"logs: {grid.results}/logs/  manifest: {manifest['path']}")
        if args.collect:
            from cifarbench.cluster import after

            queued = after.queue_collect(manifest, grid=str(args.grid))
            print(
                f"collect: job {queued['job_id']} writes tables.md and report.html once {job_word} "
                f"{', '.join(queued['after'])} {'has' if len(jobs) == 1 else 'have'} ended; log: {queued['log']}"
            )
    elif args.collect:
        print(f"collect: nothing was submitted, so no collect job was queued (`cifarbench collect {grid.results}`)")
    if args.wait:
        final = status.wait(grid.results, specs)
        print(status.render(final))
        return 0 if all(s.status == "completed" for s in final) else 1
    return 0


def _cmd_status(args) -> int:
    from cifarbench.cluster import status

    if not Path(args.results).is_dir():
        raise UsageError(f"results folder {args.results} does not exist or is not a folder")
    specs = None
    if args.grid:
        specs = list(_load_grid(args.grid).specs)
    statuses = status.collect_status(args.results, specs)
    if not statuses:
        raise UsageError(status.no_runs(args.results))
    if args.json:
        print(json.dumps(status.as_json(statuses), indent=1))
    else:
        print(status.render(statuses))
    return 0


def _cmd_collect(args) -> int:
    from cifarbench.report import collect

    specs = None
    if args.grid:
        specs = list(_load_grid(args.grid).specs)
    report = collect.collect(
        args.results,
        out=args.out,
        rows=args.rows,
        cols=args.cols,
        value=args.value,
        where=args.where,
        source=args.reference,
        expected=specs,
        plots=not args.no_plots,
        report=not args.no_report,
        ci=None if args.no_ci else args.ci,
        compare=args.compare,
        target_ci=args.target_ci,
    )
    for line in report.warnings:
        print(line, file=sys.stderr)
    print(report.markdown, end="")
    for path in report.written:  # stderr: stdout stays pure Markdown
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _cmd_bench(args) -> int:
    check_name(args.model, ARCHS, "model")  # fail before the measurements, not after minutes of them
    from cifarbench.bench import ddp, fuse, pack, pipeline, rows, train
    from cifarbench.train.fit import default_device, resolve_precision

    device = default_device()
    resolve_precision(args.precision, device)
    if pipeline.prepare_data(args.dataset, args.data_root):
        print(f"{args.dataset}: not found in {args.data_root}, wrote a synthetic copy there", file=sys.stderr)
    timing = {key: getattr(args, key) for key in ("steps", "warmup", "repeats") if getattr(args, key) is not None}
    common = dict(dataset=args.dataset, root=args.data_root, batch_size=args.batch_size, device=device, **timing)
    measured = []
    if args.what == "pack":
        measured.append(
            pack.bench_pack(
                model=args.model,
                packs=args.pack,
                precision=args.precision,
                mps=args.mps,
                isolation=args.isolation,
                **common,
            )
        )
    if args.what in ("pipeline", "all"):
        measured.append(pipeline.bench_pipeline(**common))
    if args.what in ("train", "all"):
        measured.append(
            train.bench_train(
                model=args.model, precision=args.precision, compile=args.compile, with_levers=args.levers, **common
            )
        )
    if args.what == "fuse":  # not part of "all": K models at once is a measurement of its own
        measured.append(fuse.bench_fuse(model=args.model, precision=args.precision, sizes=tuple(args.fuse), **common))
    if args.what == "ddp":
        if args.processes < 2:
            raise UsageError(f"--processes: {args.processes}; the benchmark compares 2 or more with 1")
        if args.batch_size % args.processes:
            raise UsageError(f"--batch-size {args.batch_size} does not divide among {args.processes} processes")
        measured.append(ddp.bench_ddp(model=args.model, precision=args.precision, processes=args.processes, **common))
    table = rows.Table(args.results)
    for benchmark in measured:
        for row in benchmark:  # each row on disk as soon as it is measured: a benchmark cut off keeps what it had
            table.add(row)
    print(rows.render_pack(table.rows) if args.what == "pack" else rows.render(table.rows))
    print(f"wrote {table.path}", file=sys.stderr)
    return 0


def _fields(text: str) -> list[str]:
    return [f.strip() for f in text.split(",") if f.strip()]


def _note_missing_flock(results) -> None:
    """Say where the results folder's filesystem has no flock, so that runs lock themselves with lease files."""
    from cifarbench.store import locks

    folder = next(p for p in (Path(results), *Path(results).absolute().parents) if p.exists())
    try:
        works = locks.flock_works(folder)
    except OSError:  # not writable: submit refuses it in one line of its own
        return
    if not works:
        print(
            f"note: {results} is on a filesystem without flock: each run locks itself with a lease file "
            f"(locks/<run_id>.lease), renewed every {locks.HEARTBEAT_S:.0f} s and broken by a later job once "
            f"{locks.STALE_S / 60:.0f} minutes stale",
            file=sys.stderr,
        )


def _level(text: str) -> float:
    """An argparse type: a confidence level, 0 < level < 1."""
    from cifarbench.report.stats import check_level

    try:
        return check_level(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a confidence level between 0 and 1 (e.g. 0.9), got {text!r}"
        ) from None


def _int_at_least(lo: int):
    """An argparse type: an integer >= lo."""

    def parse(text: str) -> int:
        try:
            return check_int(int(text), "value", lo)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text!r}") from None

    return parse


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)


def _sizes(text: str) -> tuple[int, ...]:
    """An argparse type: a comma-separated list of integers >= 1."""
    return tuple(_positive_int(f.strip()) for f in text.split(","))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cifarbench", description="CIFAR ResNet benchmarks on SLURM.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("models", help="the model registry: parameters and multiply-adds")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("run", help="train one run in this process and write its record")
    p.add_argument("--model", required=True, help="e.g. resnet56 (`cifarbench models` lists them)")
    p.add_argument("--dataset", required=True, choices=list(DATASETS))
    p.add_argument("--opt", required=True, choices=list(RECIPES), help="optimisation recipe")
    p.add_argument("--batch-size", required=True, type=_positive_int)
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--epochs", type=_positive_int, help="shorten the recipe (milestones / T_max scale with it)")
    p.add_argument(
        "--val-split",
        type=_non_negative_int,
        metavar="N",
        help="hold N training images out for validation (the same ones for every run); default: the recipe's own "
        "(he2016: 5000, others 0)",
    )
    p.add_argument("--data-root", default="data")
    p.add_argument("--no-verify", action="store_true", help="accept a copy of the data that fails the checksums")
    p.add_argument("--loader", choices=LOADERS, default="device")
    p.add_argument("--precision", choices=PRECISIONS, default="auto")
    p.add_argument("--deterministic", action="store_true")
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        choices=COMPILE_MODES,
        metavar="MODE",
        help="torch.compile the model (MODE: default, or reduce-overhead for CUDA graphs, ...); "
        "trains eagerly, and records why, where compiling fails",
    )
    p.add_argument("--workers", type=_non_negative_int, help="DataLoader workers for --loader torchvision")
    p.add_argument("--results", default="results")
    p.add_argument("--logger", choices=LOGGERS, help="also log the curves live, under the run's folder")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("data", help="download CIFAR or write synthetic copies")
    dsub = p.add_subparsers(dest="data_cmd", required=True, parser_class=_Parser)
    d = dsub.add_parser("download", help="download and verify CIFAR with torchvision (on a login node)")
    d.add_argument("--root", required=True)
    d.add_argument("--dataset", choices=[*REAL_DATASETS, "all"], default="all")
    d = dsub.add_parser("synthetic", help="write synthetic datasets in the CIFAR layout")
    d.add_argument("--root", required=True, help="the data root (a dataset goes to ROOT/<dataset>/)")
    d.add_argument(
        "--dataset", choices=[*SYNTHETIC_DATASETS, "all"], default="all", help="which to write (default: %(default)s)"
    )
    d.add_argument(
        "--train-size",
        type=_positive_int,
        default=SYNTHETIC_SIZES["train_size"],
        help="training images (default: %(default)s)",
    )
    d.add_argument(
        "--test-size",
        type=_positive_int,
        default=SYNTHETIC_SIZES["test_size"],
        help="test images (default: %(default)s)",
    )
    d.add_argument(
        "--force", action="store_true", help="replace a dataset of another size (runs on it no longer match it)"
    )
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser("submit", help="submit a grid as SLURM job arrays (or run it locally); returns at once")
    p.add_argument("grid", help="a grid file, e.g. jobs/smoke.yaml")
    p.add_argument("--dry-run", action="store_true", help="print the runs and what would be skipped")
    p.add_argument(
        "--executor",
        choices=["auto", "slurm", "local"],
        default="auto",
        help="auto: SLURM when sbatch is available, else local",
    )
    p.add_argument("--force", action="store_true", help="re-run runs that already completed")
    p.add_argument("--retry-failed", action="store_true", help="re-run only failed, cancelled or lost runs")
    p.add_argument(
        "--wait",
        action="store_true",
        help="follow the grid's runs until all have ended; exit code 0 when all completed, 1 when any did not",
    )
    p.add_argument(
        "--collect",
        action="store_true",
        help="also queue a small job that runs `collect` (tables.md, report.html) once every run has ended",
    )
    p.add_argument(
        "--no-preflight",
        action="store_true",
        help="skip the checks of data and cluster limits (for data that only exists on the compute nodes)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse a fixed time limit below a task's estimate x time_margin (a warning without it)",
    )
    _probe_arguments(p, "--probe-timeout")
    p.add_argument(
        "--probe",
        action="store_true",
        help="first run one short job per environment and partition that checks the nodes (`cifarbench probe`); "
        "submit only if every probe passes",
    )
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser(
        "probe",
        help="one short job per environment and partition of a grid: Python, torch, GPU, data and results folder "
        "as the compute nodes see them",
    )
    p.add_argument("grid", help="a grid file, e.g. jobs/smoke.yaml")
    p.add_argument("--executor", choices=["auto", "slurm", "local"], default="auto", help="as for submit")
    _probe_arguments(p, "--timeout")
    p.set_defaults(func=_cmd_probe)

    p = sub.add_parser("status", help="what became of every run in a results folder")
    p.add_argument("results", nargs="?", default="results")
    p.add_argument("--grid", help="also list the grid's runs that were never submitted")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("collect", help="records -> tables (Markdown, CSV), merged runs.parquet and plots")
    p.add_argument("results", help="the results folder (the one holding runs/)")
    p.add_argument(
        "--out", help="where tables.md, summary.csv, runs.parquet, report.html and plots/ go (default: RESULTS)"
    )
    p.add_argument("--rows", type=_fields, default=[], help="one pivot instead of the default tables, e.g. model")
    p.add_argument("--cols", type=_fields, default=[], help="columns of that pivot, e.g. dataset or recipe,batch_size")
    p.add_argument(
        "--value",
        default="final_test_acc",
        help="final_test_acc (default), test_acc_at_best_val (runs with a validation split), best_test_acc (the "
        "epoch selected on the test set), images_per_s or train_minutes",
    )
    p.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keep runs with KEY=VALUE (repeat: values of one key are alternatives)",
    )
    p.add_argument("--reference", help="published figures to compare with: seed-notebook (default), he2016, akamaster")
    p.add_argument("--grid", help="also list the grid's runs that were never submitted")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument(
        "--no-report",
        action="store_true",
        help="skip report.html (which reads every record's environment columns, not only its footer)",
    )
    p.add_argument(
        "--ci",
        type=_level,
        default=0.95,
        metavar="LEVEL",
        help="the confidence level of each cell's interval of the mean over seeds (default 0.95)",
    )
    p.add_argument("--no-ci", action="store_true", help="cells without intervals: mean ± std (n) only")
    p.add_argument(
        "--compare",
        metavar="FIELD=A,B",
        help="A against B for every configuration that has both, the other fields equal, e.g. recipe=cos-200,step-200: "
        "the difference of means with its interval, the probability of improvement, a verdict, the seeds needed",
    )
    p.add_argument(
        "--target-ci",
        type=float,
        default=0.002,
        metavar="HALF_WIDTH",
        help="the interval half-width the comparison's 'seeds needed' aims at, in the value's units (default 0.002)",
    )
    p.set_defaults(func=_cmd_collect)

    p = sub.add_parser("bench", help="images/s of the input pipeline and of training steps: fast path vs baseline")
    p.add_argument(
        "--what",
        choices=["pipeline", "train", "all", "pack", "fuse", "ddp"],
        default="all",
        help="all: pipeline and train; pack: K runs at once on the device against one alone (--pack); "
        "fuse: fused groups of --fuse sizes against one unfused run; ddp: one run's global batch on --processes "
        "processes (one device each) against one process",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=2,
        help="with --what ddp: how many processes train the global batch (default 2)",
    )
    p.add_argument(
        "--pack",
        type=_sizes,
        default=(1, 2, 4, 8),
        help="with --what pack: how many runs at once, e.g. 1,2,4,8 (one run alone is always measured)",
    )
    p.add_argument(
        "--mps",
        choices=MPS_MODES,
        default="auto",
        help="with --what pack on a GPU: share it through a CUDA MPS server (auto: where one can be started)",
    )
    p.add_argument(
        "--isolation",
        action="store_true",
        help="with --what pack: also run the largest pack with one run given a batch too big for the GPU's memory, "
        "and check that it fails alone (on a CPU a labelled error stands in: no huge batch is allocated)",
    )
    p.add_argument("--model", default="resnet56", help="a model name (`cifarbench models`)")
    p.add_argument(
        "--dataset",
        choices=list(DATASETS),
        default="synthetic100",
        help="a missing synthetic dataset is written; a real one must be downloaded first",
    )
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--data-root", default="data")
    p.add_argument("--steps", type=_positive_int, help="batches per timed window (default: 200 pipeline, 20 train)")
    p.add_argument("--warmup", type=_positive_int, help="untimed batches first (default: 20 pipeline, 5 train)")
    p.add_argument("--repeats", type=_positive_int, help="timed windows; the median counts (default: 5, 3)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="of the fast path (auto: as a run)")
    p.add_argument(
        "--levers",
        action="store_true",
        help="also time the fast path with each speed setting flipped (precision, channels_last, ...)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time the fast path under torch.compile (and with CUDA graphs on a GPU)",
    )
    p.add_argument(
        "--fuse",
        type=_sizes,
        default=(1, 2, 4, 8, 16),
        metavar="K,K,...",
        help="--what fuse: the group sizes to time (default 1,2,4,8,16)",
    )
    p.add_argument("--results", default="results", help="the table goes to RESULTS/bench/")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UsageError as exc:
        for line in str(exc).splitlines() or [""]:  # several problems: one line each
            print(f"cifarbench: error: {line}", file=sys.stderr)
        return 2
