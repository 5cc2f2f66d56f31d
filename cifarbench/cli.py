"""The ``cifarbench`` command: parse, call, print. User errors are one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import sys

from cifarbench.errors import UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2, like every other user error
        raise UsageError(f"{self.prog}: {message}")


def _cmd_models(args) -> int:
    from cifarbench.models import MODELS, describe

    rows = [describe(name) for name in MODELS]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<11} {'family':<8} {'depth':>5} {'params (10)':>12} {'params (100)':>12} {'fwd MACs':>10}")
    for r in rows:
        print(f"{r['name']:<11} {r['family']:<8} {r['depth']:>5} {r['params_10']:>12,} {r['params_100']:>12,} "
              f"{r['macs'] / 1e6:>9.1f}M")
    return 0


def _cmd_run(args) -> int:
    from cifarbench import train
    from cifarbench.spec import RunSpec, get_recipe

    try:
        spec = RunSpec(model=args.model, dataset=args.dataset, recipe=get_recipe(args.opt),
                       batch_size=args.batch_size, seed=args.seed, epochs=args.epochs, precision=args.precision,
                       loader=args.loader, deterministic=args.deterministic, data_root=args.data_root,
                       verify=not args.no_verify, results=args.results)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    path = train.fit(spec, num_workers=args.workers)
    print(f"record: {path}")
    return 0


def _cmd_data(args) -> int:
    from cifarbench import data

    if args.data_cmd == "download":
        names = ["cifar10", "cifar100"] if args.dataset == "all" else [args.dataset]
        for name in names:
            data.download(name, args.root)
            print(f"{name}: downloaded and verified in {args.root}")
    else:
        names = ["synthetic10", "synthetic100"] if args.dataset == "all" else [args.dataset]
        for name in names:
            folder = data.write_synthetic(name, args.root, train_size=args.train_size, test_size=args.test_size)
            print(f"{name}: {args.train_size} train / {args.test_size} test images in {folder}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or positive, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from cifarbench.models import MODELS
    from cifarbench.spec import DATASETS, LOADERS, PRECISIONS, RECIPES

    parser = _Parser(prog="cifarbench", description="CIFAR ResNet benchmarks on SLURM.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("models", help="the model registry: parameters and multiply-adds")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("run", help="train one run in this process and write its record")
    p.add_argument("--model", required=True, choices=list(MODELS), metavar="MODEL")
    p.add_argument("--dataset", required=True, choices=list(DATASETS))
    p.add_argument("--opt", required=True, choices=list(RECIPES), help="optimisation recipe")
    p.add_argument("--batch-size", required=True, type=_positive_int)
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--epochs", type=_positive_int, help="shorten the recipe (milestones / T_max scale with it)")
    p.add_argument("--data-root", default="data")
    p.add_argument("--no-verify", action="store_true", help="accept a copy of the data that fails the checksums")
    p.add_argument("--loader", choices=LOADERS, default="device")
    p.add_argument("--precision", choices=PRECISIONS, default="auto")
    p.add_argument("--deterministic", action="store_true")
    p.add_argument("--workers", type=_non_negative_int, help="DataLoader workers for --loader torchvision")
    p.add_argument("--results", default="results")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("data", help="download CIFAR or write synthetic copies")
    dsub = p.add_subparsers(dest="data_cmd", required=True, parser_class=_Parser)
    d = dsub.add_parser("download", help="download and verify CIFAR with torchvision (on a login node)")
    d.add_argument("--root", required=True)
    d.add_argument("--dataset", choices=["cifar10", "cifar100", "all"], default="all")
    d = dsub.add_parser("synthetic", help="write synthetic datasets in the CIFAR layout")
    d.add_argument("--root", required=True)
    d.add_argument("--dataset", choices=["synthetic10", "synthetic100", "all"], default="all")
    d.add_argument("--train-size", type=_positive_int, default=50_000)
    d.add_argument("--test-size", type=_positive_int, default=10_000)
    p.set_defaults(func=_cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UsageError as exc:
        print(f"cifarbench: error: {exc}", file=sys.stderr)
        return 2
