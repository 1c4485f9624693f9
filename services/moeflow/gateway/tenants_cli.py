"""``moeflow tenants``: edit a tenants file (``moeflow.gateway.tenants``) without ever storing a
key in clear.

    moeflow tenants add-key FILE TENANT [--tokens-per-minute N ...] [--admin]
        make a key, print it once (stdout), write only its sha256 (creates the tenant/file)
    moeflow tenants revoke-key FILE TENANT (--key KEY | --hash sha256:...)
    moeflow tenants set-limits FILE TENANT [--requests-per-minute N ...]
    moeflow tenants list FILE        names, limits and key digests (never keys)

A running gateway picks the change up within ``tenants_reload_interval_s``; on a cluster,
write the file into the Secret (``kubectl create secret generic ... --from-file=tenants.yaml
--dry-run=client -o yaml | kubectl apply -f -``): the kubelet refreshes the mounted file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from moeflow.gateway.tenants import (
    TenantSpec,
    hash_key,
    new_key,
    read_tenants_file,
    write_tenants_file,
)

_LIMITS = {"requests_per_minute": "requests per minute",
           "tokens_per_minute": "prompt + completion tokens per minute",
           "concurrent_requests": "requests in flight at once",
           "max_tokens": "ceiling of one request's max_tokens"}
# Unset flags leave a tenant as it is (a new one gets the defaults), so that is the default.
_UNCHANGED = "default: unchanged; a new tenant: 0"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeflow tenants", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_limits(p: argparse.ArgumentParser) -> None:
        for name, what in _LIMITS.items():
            p.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=None,
                           help=f"{what}, 0 = no limit ({_UNCHANGED})")
        p.add_argument("--model", dest="models", action="append", default=None,
                       help="a model the tenant may use (repeat; default: unchanged; a new"
                            " tenant: every model)")
        p.add_argument("--admin", action="store_true", default=None,
                       help="may read /metrics, /status and /admin/usage (default:"
                            " unchanged; a new tenant: not admin)")

    def file_and_tenant(p: argparse.ArgumentParser) -> None:
        p.add_argument("file", type=Path, help="the tenants YAML file (created by add-key)")
        p.add_argument("tenant", help="the tenant's name")

    add = sub.add_parser("add-key", help="make a key, print it once, store its hash")
    file_and_tenant(add)
    with_limits(add)
    revoke = sub.add_parser("revoke-key", help="remove a key (by the key or its hash)")
    file_and_tenant(revoke)
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--key", help="the key itself (required: this or --hash)")
    which.add_argument("--hash", help="its digest, sha256:... as `list` shows it (required:"
                                      " this or --key)")
    limits = sub.add_parser("set-limits", help="change a tenant's limits")
    file_and_tenant(limits)
    with_limits(limits)
    listing = sub.add_parser("list", help="tenants, limits and key digests")
    listing.add_argument("file", type=Path, help="the tenants YAML file")
    return parser


def _updated(spec: TenantSpec, args: argparse.Namespace) -> TenantSpec:
    changes = {name: getattr(args, name) for name in (*_LIMITS, "models", "admin")
               if getattr(args, name, None) is not None}
    if "models" in changes:
        changes["models"] = tuple(changes["models"])
    return spec.model_copy(update=changes) if changes else spec


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path: Path = args.file
    specs = read_tenants_file(path) if path.exists() else {}
    if args.command == "list":
        for name, listed in sorted(specs.items()):
            sys.stdout.write(f"{name} {listed.model_dump_json(exclude_defaults=True)}\n")
        return 0
    spec = specs.get(args.tenant)
    if args.command == "add-key":
        key = new_key()
        spec = _updated(spec or TenantSpec(), args)
        specs[args.tenant] = spec.model_copy(update={"keys": (*spec.keys, hash_key(key))})
        write_tenants_file(path, specs)
        sys.stdout.write(f"{key}\n")  # the only time the key exists outside its holder
        sys.stderr.write(f"added a key to tenant {args.tenant!r} in {path}; it is shown only "
                         "now\n")
        return 0
    if spec is None:
        sys.stderr.write(f"no tenant {args.tenant!r} in {path}\n")
        return 1
    if args.command == "revoke-key":
        digest = hash_key(args.key) if args.key else args.hash
        if digest not in spec.keys:
            sys.stderr.write(f"tenant {args.tenant!r} has no such key\n")
            return 1
        specs[args.tenant] = spec.model_copy(
            update={"keys": tuple(k for k in spec.keys if k != digest)})
    else:
        specs[args.tenant] = _updated(spec, args)
    write_tenants_file(path, specs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
