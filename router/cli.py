"""Command line: `router serve | check-config | token | keys | bench`. Errors go to stderr, never a
traceback."""

from __future__ import annotations

import argparse
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

    token = sub.add_parser("token", help="router JWTs")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    issue = token_sub.add_parser("issue", help="print a router JWT signed with auth.jwt")
    issue.add_argument("--config", required=True, help="YAML config file")
    issue.add_argument("--sub", required=True, help="the token's subject (user)")
    issue.add_argument("--ttl", type=int, help="lifetime in seconds (at most auth.jwt.ttl_s)")
    issue.add_argument("--scope", default="", help="space-separated scopes")
    issue.add_argument("--admin", action="store_true", help="an admin token")

    keys = sub.add_parser("keys", help="managed API keys in the configured store (redis://)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key; prints it once, on stdout")
    create.add_argument("--config", required=True, help="YAML config file")
    create.add_argument("--user", required=True, help="the key's owner")
    create.add_argument("--models", default="*", help="comma-separated routes, or * (default)")
    create.add_argument("--rpm", type=int, help="requests per minute")
    create.add_argument("--tpm", type=int, help="tokens per minute")
    create.add_argument("--concurrency", type=int, help="requests in flight")
    create.add_argument("--tokens-per-day", type=int, help="daily token budget")
    create.add_argument("--admin", action="store_true", help="may call the admin API")
    create.add_argument("--expires-at", help="ISO 8601 expiry, e.g. 2027-01-31T00:00:00Z")
    listing = keys_sub.add_parser("list", help="list keys (never a key or its hash)")
    listing.add_argument("--config", required=True, help="YAML config file")
    listing.add_argument("--json", action="store_true", help="one JSON document")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("--config", required=True, help="YAML config file")
    revoke.add_argument("id", help="the key's id (key_...)")

    sub.add_parser("bench", help="direct-vs-router benchmark (--help for its flags)")
    return parser


def _issue_token(args: argparse.Namespace) -> int:
    from router.auth import Principal, RouterTokens
    from router.auth.principal import jwt_identity

    config = load_config(args.config)
    if config.auth.jwt is None:
        print(f"router token issue: {args.config} has no auth.jwt section", file=sys.stderr)
        return 1
    if args.ttl is not None and args.ttl < 1:
        print("router token issue: --ttl must be at least 1 second", file=sys.stderr)
        return 1
    try:
        tokens = RouterTokens(config.auth.jwt, config.auth.default_limits)
    except (ValueError, TypeError) as exc:
        print(f"router token issue: cannot use the key in auth.jwt: {exc}", file=sys.stderr)
        return 1
    if not tokens.can_issue:
        print("router token issue: auth.jwt has no private_key_file to sign with",
              file=sys.stderr)
        return 1
    # The token's subject is its own namespace (`jwt:<sub>`), never an API key's user.
    principal = Principal(id=jwt_identity(args.sub), kind="router_jwt", user=args.sub,
                          limits=config.auth.default_limits, models=None, admin=args.admin,
                          scopes=frozenset(args.scope.split()), origin="router_jwt")
    token, _ = tokens.issue(principal, args.ttl)
    print(token)
    return 0


def _keys(args: argparse.Namespace) -> int:
    import asyncio
    import time

    import orjson

    from router import admin
    from router.errors import ValidationFailed
    from router.store import StoreError, is_shared

    command = f"router keys {args.keys_command}"
    config = load_config(args.config)
    if not is_shared(config.store):
        print(f"{command}: store.url is memory:// (one process's memory): managed keys need a "
              "shared store such as redis://host:6379", file=sys.stderr)
        return 1
    try:
        if args.keys_command == "create":
            limits = {name: getattr(args, name) for name in
                      ("rpm", "tpm", "concurrency", "tokens_per_day")
                      if getattr(args, name) is not None}
            fields = {"user": args.user, "admin": args.admin, "expires_at": args.expires_at,
                      "models": [m.strip() for m in args.models.split(",") if m.strip()],
                      "limits": limits or None}
            now = time.time()
            spec = admin.parse_new_key(orjson.dumps(fields), config.routes)
            key, record = admin.new_record(spec, now)
            asyncio.run(admin.with_store(config.store, lambda s: s.create_key(record)))
            print(key)
            print(f"{command}: created {record.id} for {record.user}; the key is shown only "
                  "this once", file=sys.stderr)
        elif args.keys_command == "list":
            records = asyncio.run(admin.with_store(config.store, lambda s: s.list_keys()))
            rows = [admin.public(r) for r in records]
            if args.json:
                print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
            else:
                _print_keys(rows)
        else:
            if not asyncio.run(admin.with_store(config.store,
                                                lambda s: s.revoke_key(args.id))):
                print(f"{command}: no key with id {args.id!r}", file=sys.stderr)
                return 1
            print(f"revoked {args.id}")
    except ValidationFailed as exc:
        for entry in exc.detail:
            where = ".".join(str(p) for p in entry["loc"][1:]) or "input"
            print(f"{command}: {where}: {entry['msg']}", file=sys.stderr)
        return 1
    except StoreError as exc:
        print(f"{command}: {exc}; is the store at store.url reachable?",
              file=sys.stderr)
        return 1
    return 0


def _print_keys(rows: list[dict[str, object]]) -> None:
    header = ("ID", "USER", "ADMIN", "MODELS", "LIMITS", "CREATED", "LAST USED", "EXPIRES")
    table = [header] + [(
        str(r["id"]), str(r["user"]), "yes" if r["admin"] else "no",
        ",".join(r["models"]) if isinstance(r["models"], list) else "*",
        ",".join(f"{k}={v}" for k, v in r["limits"].items())
        if isinstance(r["limits"], dict) else "default",
        str(r["created_at"]), str(r["last_used_at"] or "-"), str(r["expires_at"] or "never"),
    ) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _bench(argv: list[str]) -> int:
    from router.bench.runner import main as bench

    return bench(argv)


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
        if args.command == "token":
            return _issue_token(args)
        if args.command == "keys":
            return _keys(args)
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
