"""The `maml-serve` command: serve, worker, keys, migrate, storage (train and evaluate come from
fewshot).

Every import beyond the standard library happens inside a handler, so `--help` and `--version`
answer without loading torch, FastAPI or SQLAlchemy.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from app.core import ml


def _share_metrics(processes: int) -> None:
    """Point several processes at one fresh metrics folder (before prometheus_client loads)."""
    import os

    if processes > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        import atexit
        import shutil
        import tempfile

        folder = tempfile.mkdtemp(prefix="maml-serve-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        atexit.register(shutil.rmtree, folder, ignore_errors=True)


def _console_link(args: argparse.Namespace) -> str:
    """A console URL carrying a new admin key of tenant "local" that expires in a day."""
    from datetime import timedelta

    from app.core.config import get_settings
    from app.keys import service as keys
    from app.models import utcnow

    if get_settings().environment == "production":
        raise SystemExit("--console-key is for development; use `maml-serve keys create`")
    runtime = _keys_runtime()
    try:
        with runtime.sessions() as session:
            _, key = keys.create_api_key(
                session=session,
                tenant=keys.get_or_create_tenant(session=session, name="local"),
                admin=True,
                pepper=runtime.settings.api_key_pepper.get_secret_value(),
                name="console link",
                expires_at=utcnow() + timedelta(days=1),
            )
            session.commit()
    finally:
        runtime.close()
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    # The key rides in the fragment, which the browser never sends; the console keeps it.
    return f"http://{host}:{args.port}/#key={key}"


def _serve(args: argparse.Namespace) -> int:
    if args.console_key:
        sys.stderr.write(f"console (signed in as tenant 'local'): {_console_link(args)}\n")
        sys.stderr.flush()
    _share_metrics(args.workers)
    import uvicorn

    from app.main import create_app

    if args.workers > 1:
        from app.core.config import get_settings
        from app.core.migrate import upgrade

        settings = get_settings()
        if settings.is_embedded_database:
            # Once, here: processes that each migrate a fresh file race to create the same tables.
            upgrade(settings)
        # Several processes need an import string, each building its own app.
        uvicorn.run(
            "app.main:create_app",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_level=args.log_level,
        )
    else:
        uvicorn.run(create_app(), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def worker_queues(value: str) -> list[str]:
    """The queues a worker consumes; "predict" (older deployments) is dropped with a notice."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    if "predict" in names:
        sys.stderr.write(
            "worker: the predict queue is gone (predictions run in the API processes); ignored\n"
        )
    return [name for name in names if name != "predict"]


def _worker(args: argparse.Namespace) -> int:
    # Prefork children run the jobs; the metrics server in the parent must see their values.
    _share_metrics(2 if args.pool == "prefork" else 1)
    from app.core.config import get_settings

    if get_settings().broker_url is None:
        from worker.celery_app import NO_BROKER

        sys.stderr.write(NO_BROKER + "\n")
        return 2
    from worker.celery_app import celery_app

    queues = worker_queues(args.queues)
    if not queues:
        sys.stderr.write("worker: no queue to consume (choose from adapt,train)\n")
        return 2
    argv = ["worker", "-Q", ",".join(queues), "--pool", args.pool, "--loglevel", args.log_level]
    if args.concurrency:
        argv += ["--concurrency", str(args.concurrency)]
    celery_app.worker_main(argv)
    return 0


def _keys_runtime() -> Any:
    from app.core.config import get_settings
    from app.core.migrate import upgrade
    from app.core.runtime import Runtime

    settings = get_settings()
    if settings.is_embedded_database:
        upgrade(settings)
    return Runtime.build(settings)


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> float:
    """Seconds in '90d', '12h', '30m', '45s' or a plain number of seconds."""
    unit = text[-1:].lower()
    number = text[:-1] if unit in _DURATION_UNITS else text
    try:
        seconds = float(number) * _DURATION_UNITS.get(unit, 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90d, 12h, 30m)") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError("the duration must be positive")
    return seconds


def _keys_create(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from app.keys import service as keys
    from app.models import utcnow

    runtime = _keys_runtime()
    expires_at = None if args.expires_in is None else utcnow() + timedelta(seconds=args.expires_in)
    try:
        with runtime.sessions() as session:
            tenant = keys.get_or_create_tenant(session=session, name=args.tenant)
            row, key = keys.create_api_key(
                session=session,
                tenant=tenant,
                admin=args.admin,
                operator=args.operator,
                pepper=runtime.settings.api_key_pepper.get_secret_value(),
                name=args.name,
                expires_at=expires_at,
            )
            session.commit()
            scopes, key_id, prefix = list(row.scopes), str(row.id), row.prefix
    finally:
        runtime.close()
    if args.json:
        document = {
            "key": key,
            "id": key_id,
            "prefix": prefix,
            "tenant": args.tenant,
            "scopes": scopes,
            "expires_at": None if expires_at is None else expires_at.isoformat(),
        }
        sys.stdout.write(json.dumps(document) + "\n")
    else:
        sys.stdout.write(key + "\n")
        sys.stderr.write(
            f"created key {key_id} ({prefix}...) for tenant {args.tenant!r} with scopes "
            f"{scopes}; it is shown only once\n"
        )
    return 0


def _key_document(row: Any, tenant: str) -> dict[str, Any]:
    from app.keys.schemas import key_public

    return {"tenant": tenant, **key_public(row).model_dump(mode="json")}


def _keys_list(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from app.keys import service as keys
    from app.models import Tenant

    runtime = _keys_runtime()
    try:
        with runtime.sessions() as session:
            tenant_id = None
            if args.tenant is not None:
                tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == args.tenant))
                if tenant_id is None:
                    sys.stderr.write(f"no tenant named {args.tenant!r}\n")
                    return 1
            rows = keys.list_keys(session=session, tenant_id=tenant_id, include_revoked=args.all)
            documents = [_key_document(row, name) for row, name in rows]
    finally:
        runtime.close()
    if args.json:
        sys.stdout.write(json.dumps(documents) + "\n")
        return 0
    columns = ("id", "tenant", "prefix", "scopes", "state", "last_used_at", "expires_at", "name")
    sys.stdout.write("\t".join(columns) + "\n")
    for document in documents:
        cells = [
            ",".join(value) if isinstance(value, list) else "-" if value is None else str(value)
            for value in (document[c] for c in columns)
        ]
        sys.stdout.write("\t".join(cells) + "\n")
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    from app.core.errors import ProblemError
    from app.keys import service as keys

    runtime = _keys_runtime()
    try:
        with runtime.sessions() as session:
            try:
                row = keys.revoke_key(
                    session=session, row=keys.find_key(session=session, ref=args.key)
                )
            except ProblemError as exc:
                sys.stderr.write(exc.detail + "\n")
                return 1
            sys.stderr.write(f"revoked key {row.id} ({row.prefix}...)\n")
    finally:
        runtime.close()
    return 0


def _keys_rotate(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from app.core.errors import ProblemError
    from app.keys import service as keys

    runtime = _keys_runtime()
    try:
        with runtime.sessions() as session:
            try:
                old = keys.find_key(session=session, ref=args.key)
                new, key = keys.rotate_key(
                    session=session,
                    row=old,
                    pepper=runtime.settings.api_key_pepper.get_secret_value(),
                    grace=timedelta(seconds=args.grace or 0),
                )
            except ProblemError as exc:
                sys.stderr.write(exc.detail + "\n")
                return 1
            old_id, new_id, prefix = old.id, str(new.id), new.prefix
            ends = (
                "now"
                if old.expires_at is None or args.grace is None
                else old.expires_at.isoformat()
            )
    finally:
        runtime.close()
    if args.json:
        sys.stdout.write(
            json.dumps({"key": key, "id": new_id, "prefix": prefix, "replaces": str(old_id)}) + "\n"
        )
    else:
        sys.stdout.write(key + "\n")
        sys.stderr.write(
            f"key {old_id} replaced by {new_id} ({prefix}...), shown only once; the old key "
            f"stops working {ends}\n"
        )
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from app.core.config import get_settings
    from app.core.migrate import upgrade

    report = upgrade(get_settings(), args.revision)
    sys.stdout.write(report.describe() + "\n")
    return 0


def _storage_sweep(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from app.core.storage_sweep import sweep_orphans

    runtime = _keys_runtime()
    try:
        report = sweep_orphans(
            runtime.store,
            runtime.sessions,
            grace=timedelta(seconds=args.grace),
            dry_run=args.dry_run,
        )
    finally:
        runtime.close()
    if args.json:
        sys.stdout.write(json.dumps(report.to_dict()) + "\n")
    for prefix in report.orphans:
        sys.stderr.write(f"{'orphan' if args.dry_run else 'deleted'} {prefix}\n")
    sys.stderr.write(
        f"checked {report.checked} prefixes: {len(report.orphans)} orphans "
        f"({report.objects} objects, {report.bytes} bytes) "
        f"{'found (dry run, nothing deleted)' if args.dry_run else 'deleted'}, "
        f"{len(report.too_recent)} without a row but newer than the grace period kept\n"
    )
    return 0


def _storage_migrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from app.core.config import get_settings
    from app.core.storage_local import LocalArtifactStore
    from app.core.storage_migration import migrate_to_s3
    from app.core.storage_s3 import S3ArtifactStore

    settings = get_settings()
    source = Path(args.source) if args.source else settings.artifact_dir
    if not source.is_dir():
        sys.stderr.write(f"no local artifact folder at {source}\n")
        return 2
    if not settings.s3_bucket:
        sys.stderr.write("set MAML_SERVE_S3_BUCKET (and _S3_ENDPOINT_URL for a non-AWS server)\n")
        return 2
    report = migrate_to_s3(LocalArtifactStore(source), S3ArtifactStore.from_settings(settings))
    if args.json:
        sys.stdout.write(json.dumps(report.to_dict()) + "\n")
    for key in report.failed:
        sys.stderr.write(f"FAILED to verify {key}\n")
    sys.stderr.write(
        f"{report.objects} objects ({report.bytes} bytes): {report.copied} copied, "
        f"{report.already_there} already in the bucket, {report.verified} verified by reading "
        f"back, {len(report.failed)} failed\n"
    )
    return 1 if report.failed else 0


def _add_storage_commands(sub: Any) -> None:
    """`maml-serve storage sweep|migrate-to-s3`."""
    storage = sub.add_parser("storage", help="maintain the artifact store (local folder or S3)")
    storage_sub = storage.add_subparsers(dest="storage_command", required=True, metavar="ACTION")
    sweep = storage_sub.add_parser(
        "sweep", help="delete stored objects of tasks and datasets whose rows are gone"
    )
    sweep.add_argument("--dry-run", action="store_true", help="list the orphans, delete nothing")
    sweep.add_argument(
        "--grace",
        type=_duration,
        default=3600.0,
        help="leave prefixes with an object newer than this (default 1h: a create in flight)",
    )
    sweep.add_argument("--json", action="store_true", help="print the report as JSON")
    sweep.set_defaults(handler=_storage_sweep)

    migrate = storage_sub.add_parser(
        "migrate-to-s3",
        help="copy the local artifact folder into the S3 bucket of the settings and verify it",
    )
    migrate.add_argument(
        "--source", default=None, help="the local artifact folder (default: DATA_DIR/artifacts)"
    )
    migrate.add_argument("--json", action="store_true", help="print the report as JSON")
    migrate.set_defaults(handler=_storage_migrate)


# The few-shot core's commands; their parsers (and torch) load only when one of them is run.
CORE_COMMANDS = {
    "train": "meta-train an initialization (MAML) from an image dataset",
    "evaluate": "mean accuracy of an initialization over sampled episodes",
    "calibrate": 'calibrate the "unknown" score of an initialization on held-out groups',
    "pretrain": "pre-train a backbone as an all-classes cosine classifier (resumes its run folder)",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("maml-serve")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _core_command(args: argparse.Namespace) -> int:
    # Reached only through a parser built with core=False; main() never builds one for these.
    return main([args.command, *args.rest])


def _add_keys_commands(sub: Any) -> None:
    """`maml-serve keys create|list|revoke|rotate`."""
    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = keys_sub.add_parser(
        "create", help="create a key for a tenant (created if new) and print it"
    )
    create.add_argument("--tenant", required=True)
    create.add_argument("--admin", action="store_true", help="add the admin scope")
    create.add_argument(
        "--operator",
        action="store_true",
        help="add the operator scope (and admin): change the global default version, read "
        "every tenant's promotions",
    )
    create.add_argument("--name", default=None, help="a note to tell keys apart")
    create.add_argument(
        "--expires-in", type=_duration, default=None, help="e.g. 90d, 12h (default: never)"
    )
    create.add_argument("--json", action="store_true", help='print {"key": ..., "tenant": ...}')
    create.set_defaults(handler=_keys_create)

    listing = keys_sub.add_parser("list", help="list keys (prefixes, never the keys or hashes)")
    listing.add_argument("--tenant", default=None, help="one tenant's keys (default: all)")
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    listing.add_argument("--json", action="store_true", help="print a JSON list")
    listing.set_defaults(handler=_keys_list)

    revoke = keys_sub.add_parser("revoke", help="revoke a key at once (by id or prefix)")
    revoke.add_argument("key", help="the key's id or its shown prefix (msk_...)")
    revoke.set_defaults(handler=_keys_revoke)

    rotate = keys_sub.add_parser(
        "rotate", help="replace a key by a new one with the same tenant, scopes and name"
    )
    rotate.add_argument("key", help="the key's id or its shown prefix (msk_...)")
    rotate.add_argument(
        "--grace",
        type=_duration,
        default=None,
        help="let the old key work this long (e.g. 1h); default: revoked at once",
    )
    rotate.add_argument("--json", action="store_true", help='print {"key": ..., "id": ...}')
    rotate.set_defaults(handler=_keys_rotate)


def build_parser(core: bool = True) -> argparse.ArgumentParser:
    """Every subcommand's parser; with core=False, train and evaluate are listed, not loaded."""
    parser = argparse.ArgumentParser(
        prog="maml-serve", description="Serve few-shot image classifiers meta-learned with MAML."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve", help="run the HTTP API (embedded default: SQLite + in-process jobs)"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1, help="HTTP worker processes")
    serve.add_argument("--log-level", default="info")
    serve.add_argument(
        "--console-key",
        action="store_true",
        help="print a console link with a new admin key (tenant 'local', one day; not in production)",
    )
    serve.set_defaults(handler=_serve)

    worker = sub.add_parser("worker", help="run a Celery worker (needs MAML_SERVE_BROKER_URL)")
    worker.add_argument("--queues", default="adapt", help="comma-separated: adapt,train")
    worker.add_argument("--pool", default="solo", help="Celery pool; solo runs one job at a time")
    worker.add_argument("--concurrency", type=int, default=None)
    worker.add_argument("--log-level", default="INFO")
    worker.set_defaults(handler=_worker)

    _add_keys_commands(sub)
    _add_storage_commands(sub)

    migrate = sub.add_parser("migrate", help="apply database migrations (alembic upgrade)")
    migrate.add_argument("revision", nargs="?", default="head")
    migrate.set_defaults(handler=_migrate)

    if core:
        ml.add_subcommands(sub)
    else:
        for name, text in CORE_COMMANDS.items():
            stub = sub.add_parser(name, help=text, add_help=False)
            stub.add_argument("rest", nargs=argparse.REMAINDER)
            stub.set_defaults(handler=_core_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `maml-serve` console script."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(core=command in CORE_COMMANDS).parse_args(argv)
    if from_command_line and args.command in ("serve", "worker"):
        from app.core.allocator import use_configured
        from app.core.config import get_settings

        # First, before anything else runs: this may start the process again.
        use_configured(get_settings().allocator)
    result = args.handler(args)
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
