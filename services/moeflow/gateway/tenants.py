"""Tenants of a gateway: who is calling, and with which limits.

A tenant has a name, one or more API keys (only their sha256 digests are stored: a key is shown
once, when ``moeflow tenants add-key`` makes it), limits (requests per minute, tokens per minute,
concurrent requests, a ``max_tokens`` ceiling; 0 = no limit), optionally the models it may use,
and an ``admin`` flag (admin keys read ``/metrics``, ``/status`` and ``/admin/usage``).

The tenants file (YAML or JSON; on a cluster a Secret mounted as a file)::

    tenants:
      team-a:
        keys: ["sha256:<64 hex digits>"]
        requests_per_minute: 600
        tokens_per_minute: 200000
        concurrent_requests: 16
        max_tokens: 4096
        models: [qwen3-moe]        # optional; absent = every served model
      ops:
        keys: ["sha256:..."]
        admin: true

The flat keys of ``MOEFLOW_API_KEYS`` keep working as the tenant ``default`` (no limits);
``admin_api_keys`` form the tenant ``admin``. With no admin key anywhere, the default tenant is
admin too (a single-team gateway keeps reading its own metrics with its key).

``TenantSource`` re-reads the file when its (mtime, size, inode) changes, checked at most once
per ``reload_interval_s`` on the request path (no thread): a new key works and a removed key
gets 401 within that interval, with no restart. A file that fails to parse keeps the previous
table (logged). Lookup hashes the presented key and finds the digest in a dict: the timing of
that lookup can only reveal digests, never keys.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import time
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

logger = logging.getLogger(__name__)

KEY_PREFIX = "sk-mf-"
HASH_PREFIX = "sha256:"
DEFAULT_TENANT = "default"
ADMIN_TENANT = "admin"


def hash_key(key: str) -> str:
    """The stored form of an API key: ``sha256:<hex digest>``."""
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh API key (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


class Limits(BaseModel):
    """Per-tenant limits; 0 means no limit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_minute: int = Field(0, ge=0)
    tokens_per_minute: int = Field(0, ge=0)
    """Prompt + completion tokens."""
    concurrent_requests: int = Field(0, ge=0)
    max_tokens: int = Field(0, ge=0)
    """Ceiling of one request's ``max_tokens`` (a bigger or absent value is lowered to it)."""


class TenantSpec(Limits):
    """One tenant as the file writes it."""

    keys: tuple[str, ...] = ()
    models: tuple[str, ...] | None = None
    admin: bool = False

    @field_validator("keys")
    @classmethod
    def _hashed(cls, keys: tuple[str, ...]) -> tuple[str, ...]:
        for key in keys:
            digest = key.removeprefix(HASH_PREFIX)
            if not key.startswith(HASH_PREFIX) or len(digest) != 64 or not all(
                    c in "0123456789abcdef" for c in digest):
                raise ValueError("keys are stored hashed: 'sha256:<64 lowercase hex digits>' "
                                 "(moeflow tenants add-key writes them)")
        return keys


class TenantsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenants: dict[str, TenantSpec] = Field(default_factory=dict)


@dataclass(frozen=True)
class Tenant:
    name: str
    limits: Limits = field(default_factory=Limits)
    models: frozenset[str] | None = None
    admin: bool = False

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True)
class TenantTable:
    """Key digests -> tenants. Empty: authentication is off (every request is anonymous)."""

    by_digest: Mapping[str, Tenant] = field(default_factory=dict)
    tenants: Mapping[str, Tenant] = field(default_factory=dict)

    @property
    def is_enabled(self) -> bool:
        return bool(self.by_digest)

    def lookup(self, presented: str) -> Tenant | None:
        return self.by_digest.get(hash_key(presented))


def build_table(specs: Mapping[str, TenantSpec], flat_keys: Iterable[str] = (),
                admin_keys: Iterable[str] = ()) -> TenantTable:
    """The table of the file's tenants plus the flat keys (tenant ``default``) and the plain
    admin keys (tenant ``admin``). A digest listed twice is refused (it would be ambiguous)."""
    flat, admin = list(flat_keys), list(admin_keys)
    has_admin = bool(admin) or any(s.admin for s in specs.values())
    all_specs: dict[str, TenantSpec] = dict(specs)
    if flat:
        all_specs.setdefault(DEFAULT_TENANT, TenantSpec(
            keys=tuple(hash_key(k) for k in flat), admin=not has_admin))
    if admin:
        all_specs.setdefault(ADMIN_TENANT, TenantSpec(
            keys=tuple(hash_key(k) for k in admin), admin=True))
    by_digest: dict[str, Tenant] = {}
    tenants: dict[str, Tenant] = {}
    for name, spec in all_specs.items():
        limits = Limits(**spec.model_dump(include=set(Limits.model_fields)))
        tenant = Tenant(name, limits, frozenset(spec.models) if spec.models is not None else None,
                        spec.admin)
        tenants[name] = tenant
        for digest in spec.keys:
            if digest in by_digest:
                raise ValueError(f"a key of tenant {name!r} is also a key of "
                                 f"{by_digest[digest].name!r}")
            by_digest[digest] = tenant
    return TenantTable(by_digest, tenants)


def read_tenants_file(path: Path) -> dict[str, TenantSpec]:
    """Parse a tenants file (YAML or JSON; an empty file has no tenants)."""
    raw: Any = yaml.safe_load(path.read_text()) or {}
    return TenantsFile.model_validate(raw).tenants


def write_tenants_file(path: Path, specs: Mapping[str, TenantSpec]) -> None:
    """Write atomically (a reader sees the old or the new file, never half of one)."""
    data = {"tenants": {name: spec.model_dump(exclude_defaults=True, mode="json")
                        for name, spec in specs.items()}}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=True))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


class TenantSource:
    """The current tenant table, re-read from ``path`` when it changes (see module doc)."""

    def __init__(self, path: Path | None, *, flat_keys: Iterable[str] = (),
                 admin_keys: Iterable[str] = (), reload_interval_s: float = 2.0) -> None:
        self.path = path
        self._flat = tuple(flat_keys)
        self._admin = tuple(admin_keys)
        self.reload_interval_s = reload_interval_s
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at = -float("inf")
        self._table = build_table({}, self._flat, self._admin)
        if path is not None:
            self._reload(strict=True)

    def _file_stamp(self) -> tuple[int, int, int] | None:
        assert self.path is not None
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _reload(self, *, strict: bool) -> None:
        assert self.path is not None
        stamp = self._file_stamp()
        try:
            specs = read_tenants_file(self.path) if stamp is not None else {}
            table = build_table(specs, self._flat, self._admin)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            if strict:
                raise ValueError(f"tenants file {self.path}: {exc}") from exc
            logger.error("tenants file %s not reloaded, keeping the previous tenants: %s",
                         self.path, exc)
            self._stamp = stamp  # do not retry until it changes again
            return
        if stamp is None:
            logger.warning("tenants file %s is missing: only flat keys are accepted", self.path)
        self._table, self._stamp = table, stamp
        logger.info("tenants loaded: %d tenants, %d keys", len(table.tenants),
                    len(table.by_digest))

    def current(self) -> TenantTable:
        """The table, re-read first when the file changed (checked at most once per interval)."""
        if self.path is not None:
            now = time.monotonic()
            if now - self._checked_at >= self.reload_interval_s:
                self._checked_at = now
                if self._file_stamp() != self._stamp:
                    self._reload(strict=False)
        return self._table


current_tenant: ContextVar[Tenant | None] = ContextVar("moeflow_tenant", default=None)
"""The tenant of the request being served (set by ``ApiKeyMiddleware``; None: auth is off)."""

request_prompts: ContextVar[set[int] | None] = ContextVar("moeflow_request_prompts",
                                                          default=None)
"""Prompts (hashes of their token ids) already charged in this request: the choices of one
prompt (``n`` > 1) share its prompt tokens, as the ``usage`` the client receives does."""
