"""Command line: `router serve | check-config | bench`. Errors go to stderr, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from router.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="router", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the API from a config file")
    serve.add_argument("--config", required=True, help="YAML config file")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument("--workers", type=int, help="override server.workers")
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)

    check = sub.add_parser("check-config", help="validate a config file; exit 1 on problems")
    check.add_argument("file")

    sub.add_parser("bench", help="direct-vs-router benchmark (tests/bench; --help for its flags)")
    return parser


def _bench(argv: list[str]) -> int:
    sys.path.insert(0, os.getcwd())  # the benchmark lives in the checkout, not the package
    try:
        bench = importlib.import_module("tests.bench.__main__")
    except ImportError:
        print("router bench: run it from a source checkout (it lives in tests/bench)",
              file=sys.stderr)
        return 2
    return int(bench.main(argv))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])  # its own flags: argparse's REMAINDER would eat none of them
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            load_config(args.file)
            print(f"{args.file}: ok")
            return 0
        if args.command == "serve":
            from router.server import Overrides, serve

            overrides = Overrides(args.host, args.port, args.workers)
            return serve(args.config, overrides, worker=args.worker)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem.render(exc.source), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"router: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 2
