"""Command line: ``python -m dropgrad_dist bench NAME [--json]``, one benchmark per NAME."""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from .bench import BENCHMARKS, print_report


def _summary(module: ModuleType) -> str:
    """The first line of a benchmark module's docstring: what it measures."""
    return (module.__doc__ or "").strip().splitlines()[0]


def build_parser() -> argparse.ArgumentParser:
    """The parser; its top-level help lists every benchmark in ``BENCHMARKS`` with what it measures."""
    modules = {name: importlib.import_module(module_name) for name, module_name in BENCHMARKS.items()}
    listing = "\n".join(f"  {name:<6} {_summary(module)}" for name, module in modules.items())
    parser = argparse.ArgumentParser(
        prog="python -m dropgrad_dist", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"benchmarks (python -m dropgrad_dist bench NAME --help for a benchmark's options):\n{listing}")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help=f"run a benchmark ({', '.join(modules)}) and print a table (or --json)")
    benches = bench.add_subparsers(dest="benchmark", required=True)
    for name, module in modules.items():
        sub = benches.add_parser(name, help=_summary(module))
        sub.add_argument("--json", action="store_true", help="print machine-readable results")
        module.add_arguments(sub)
        sub.set_defaults(module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check = getattr(args.module, "check_arguments", None)  # what argparse cannot see: one flag against another
    if check is not None:
        try:
            check(args)
        except ValueError as err:
            parser.error(f"bench {args.benchmark}: {err}")
    print_report(args.module.run(args), as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
