"""Command line: ``python -m dropgrad_dist bench {mask,ddp,fsdp} [--json]``."""

from __future__ import annotations

import argparse
import importlib
import sys

from .bench import BENCHMARKS, print_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dropgrad_dist", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="run a benchmark and print a table (or --json)")
    benches = bench.add_subparsers(dest="benchmark", required=True)
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        sub = benches.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        sub.add_argument("--json", action="store_true", help="print machine-readable results")
        module.add_arguments(sub)
        sub.set_defaults(module=module)
    args = parser.parse_args(argv)
    print_report(args.module.run(args), as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
