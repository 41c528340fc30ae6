"""Command line: `python -m loadtest <command>`."""

from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_bench(args: argparse.Namespace) -> None:
    from loadtest.bench import run_bench

    run_bench(Path(args.repo), Path(args.out), args.requests)
    print(f"[bench] results in {Path(args.out) / 'results.md'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="latency of in-process ORT vs Triton vs gateway, one run")
    bench.add_argument("--repo", default="model_repository")
    bench.add_argument("--out", default="benchmarks")
    bench.add_argument("--requests", type=int, default=300)
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0
