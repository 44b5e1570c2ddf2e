"""Registered models (pure): what a user states about one, where it comes from, its file manifest,
warm progress, and which cached models make room when the cache is full.

The stateful part (listing a source, copying, verifying, the models table) lives in
control.registry, control.warm and control.model_sources; everything here is arithmetic on values.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from appliance.domain.definitions import DEFINITION_NAMES, SERVICE_DEFINITION_NAME
from appliance.domain.specs import Model, Name

REVISION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# S3's bucket naming rule (the part an endpoint must accept): 3–63 lowercase letters, digits, dots, hyphens.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_URL_RE = re.compile(r"^https?://[^\s/?#@]+/?$")  # no user:password@: credentials go in [models.credentials]
DEFINITION_MAX_BYTES = 1 << 20  # definition files are text: a larger .yaml is data, not a definition
DEFINITION_SUFFIXES = (".yaml", ".yml", ".toml")
DEFINITIONS_DIR = ".definitions"  # under state_dir/models/<name>: the definition files, read at registration


class ModelState(StrEnum):
    REGISTERED = "REGISTERED"  # known, nothing on local disk yet
    WARMING = "WARMING"  # being copied (or verified) into state_dir/models
    READY = "READY"  # complete and verified on local disk
    FAILED = "FAILED"  # the last warm failed; last_error says why
    EVICTED = "EVICTED"  # its local copy was removed to make room; a warm brings it back


@dataclass(frozen=True)
class SourceRef:
    """Where a model's files come from: a directory on this box (local disk or an NFS mount) or an S3 prefix."""

    kind: Literal["path", "s3"]
    path: str = ""  # kind path: an absolute, normalised directory
    bucket: str = ""
    prefix: str = ""  # kind s3: '' (the whole bucket) or ending in '/'

    def __str__(self) -> str:
        return self.path if self.kind == "path" else f"s3://{self.bucket}/{self.prefix}"


def parse_source(text: str) -> SourceRef:
    """'s3://bucket/prefix' or an absolute path; ValueError with the rule otherwise."""
    if text.startswith("s3://"):
        bucket, _, prefix = text[len("s3://"):].partition("/")
        if not _BUCKET_RE.match(bucket) or ".." in bucket:
            raise ValueError(f"{bucket!r} is not a valid S3 bucket name (3–63 characters of a–z, 0–9, '.', '-')")
        prefix = prefix.strip("/")
        if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
            raise ValueError(f"the S3 prefix {prefix!r} has an empty, '.' or '..' part")
        return SourceRef("s3", bucket=bucket, prefix=f"{prefix}/" if prefix else "")
    if "://" in text:
        raise ValueError(f"only s3:// URLs and absolute paths are sources (got {text!r})")
    if not text.startswith("/"):
        raise ValueError(f"must be an absolute path or s3://bucket/prefix (got {text!r})")
    if "\x00" in text:
        raise ValueError("must not contain a NUL character")
    return SourceRef("path", path=posixpath.normpath("/" + text.lstrip("/")))  # '//x' is '/x' (POSIX keeps a leading '//')


class ModelSpec(Model):
    """A model as a user registers it (API body, CLI flags or a [[models.declared]] entry)."""

    name: Name = Field(description="1–50 characters of [A-Za-z0-9_-]; endpoints name it in `model`")
    source: str = Field(min_length=1, max_length=4096, description="an absolute path (local disk or an NFS mount) or s3://bucket/prefix")
    revision: str | None = Field(None, description="label of this copy (its folder name); default: a digest of the source's file list")
    endpoint_url: str | None = Field(None, description="S3 only: an S3-compatible endpoint such as http://minio:9000; default AWS")
    region: str | None = Field(None, min_length=1, max_length=64, description="S3 only: the bucket's region")
    credentials: Name | None = Field(None, description="S3 only: a [models.credentials.<name>] entry of the config; default the standard AWS chain")
    warm: bool = Field(True, description="start copying to local disk at once (false: only register)")
    description: str = Field("", max_length=500)

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        return str(parse_source(v))

    @field_validator("revision")
    @classmethod
    def _revision(cls, v: str | None) -> str | None:
        if v is not None and not REVISION_RE.match(v):
            raise ValueError(f"must be 1–64 characters of A–Z, a–z, 0–9, '_', '.' or '-', starting with a letter or digit (got {v!r})")
        return v

    @field_validator("endpoint_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and "@" in v:
            raise ValueError("credentials go in a [models.credentials.<name>] entry, not in the URL")
        if v is not None and not _URL_RE.match(v):
            raise ValueError(f"must be http(s)://host[:port] (got {v!r})")
        return v.rstrip("/") if v else v

    @model_validator(mode="after")
    def _s3_only(self) -> ModelSpec:
        if parse_source(self.source).kind == "path":
            given = [k for k in ("endpoint_url", "region", "credentials") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: only for s3:// sources")
        return self


class S3Credentials(Model):
    """[models.credentials.<name>]: a key pair (the secret may be sealed, fernet:…) or a profile of ~/.aws."""

    access_key_id: str | None = Field(None, min_length=1)
    secret_access_key: SecretStr | None = Field(None, description="plain, or sealed with `appliance model seal-secret` (fernet:…)")
    session_token: SecretStr | None = None
    profile: str | None = Field(None, min_length=1, description="a profile of the AWS config files instead of a key pair")

    @model_validator(mode="after")
    def _one_kind(self) -> S3Credentials:
        pair = (self.access_key_id is None, self.secret_access_key is None)
        if pair[0] != pair[1]:
            raise ValueError("access_key_id and secret_access_key go together")
        if self.profile is not None and self.access_key_id is not None:
            raise ValueError("give a key pair or a profile, not both")
        if self.profile is None and self.access_key_id is None:
            raise ValueError("give access_key_id and secret_access_key, or a profile")
        if self.session_token is not None and self.access_key_id is None:
            raise ValueError("session_token goes with a key pair")
        return self


# --- manifests ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    """One file of a model: its path under the model folder, size, sha256 (None until first fetched) and
    the source's own tag (mtime or ETag): it feeds the default revision, and a file whose tag changed
    since registration changed though its size did not."""

    path: str
    size: int
    sha256: str | None = None
    tag: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256, **({"tag": self.tag} if self.tag else {})}

    @classmethod
    def of(cls, data: dict[str, Any]) -> FileEntry:
        return cls(data["path"], int(data["size"]), data.get("sha256"), str(data.get("tag", "")))


def check_relative(path: str) -> str:
    """A path inside the model folder: relative, no '..', no empty part (an S3 key could try to climb out)."""
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\x00" in path:
        raise ValueError(f"{path!r} is not a plain relative path")
    return path


def revision_of(entries: Iterable[FileEntry]) -> str:
    """The default revision: a digest of the file list (paths, sizes, tags), stable for an unchanged source."""
    h = hashlib.sha256()
    for e in sorted(entries, key=lambda e: e.path):
        h.update(f"{e.path}\0{e.size}\0{e.tag}\n".encode())
    return h.hexdigest()[:12]


@dataclass(frozen=True)
class ManifestDiff:
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    resized: tuple[str, ...] = ()
    rewritten: tuple[str, ...] = ()  # same size, another ETag or mtime

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.resized or self.rewritten)

    def describe(self, limit: int = 3) -> str:
        parts = []
        for what, paths in (("new", self.added), ("gone", self.removed), ("changed size", self.resized), ("rewritten", self.rewritten)):
            if paths:
                shown = ", ".join(paths[:limit]) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")
                parts.append(f"{what}: {shown}")
        return "; ".join(parts)


def compare(manifest: Sequence[FileEntry], listing: Sequence[FileEntry]) -> ManifestDiff:
    """How a source's current listing differs from the manifest it was registered with."""
    old = {e.path: e for e in manifest}
    new = {e.path: e for e in listing}
    both = set(old) & set(new)
    return ManifestDiff(
        added=tuple(sorted(set(new) - set(old))),
        removed=tuple(sorted(set(old) - set(new))),
        resized=tuple(sorted(p for p in both if old[p].size != new[p].size)),
        # a manifest made before tags were kept has none: sizes are all it can compare
        rewritten=tuple(sorted(p for p in both if old[p].size == new[p].size and old[p].tag and new[p].tag and old[p].tag != new[p].tag)),
    )


def total_size(entries: Iterable[FileEntry]) -> int:
    return sum(e.size for e in entries)


def is_definition(path: str, size: int) -> bool:
    """Files read before the warm, so that an endpoint on a model that is still warming resolves now:
    Backend.AI's two files and any other small top-level .yaml/.yml/.toml (a `definition_file`)."""
    if "/" in path or size > DEFINITION_MAX_BYTES:
        return False
    return path in DEFINITION_NAMES or path == SERVICE_DEFINITION_NAME or path.endswith(DEFINITION_SUFFIXES)


@dataclass(frozen=True)
class ModelFolder:
    """What endpoint resolution needs of a model: where replicas will serve it from, where its
    definition files can be read now, and the names at its top level."""

    path: str
    definitions: str
    names: tuple[str, ...]


def top_level(entries: Iterable[FileEntry]) -> tuple[str, ...]:
    return tuple(sorted(e.path for e in entries if "/" not in e.path))


# --- progress -----------------------------------------------------------------------------------


@dataclass
class RateMeter:
    """Bytes per second over the last `window` seconds of samples, and the time left at that rate."""

    window: float = 10.0
    samples: deque[tuple[float, int]] = field(default_factory=deque)

    def add(self, now: float, done: int) -> None:
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()

    def rate(self) -> float | None:
        if len(self.samples) < 2:
            return None
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else None


def eta_seconds(remaining: int, rate: float | None) -> float | None:
    """Seconds until done at `rate`; None when nothing has moved yet (no honest estimate)."""
    if remaining <= 0:
        return 0.0
    if not rate or rate <= 0:
        return None
    return remaining / rate


def percent(done: int, total: int) -> float:
    return 100.0 if total <= 0 else round(min(100.0, 100.0 * done / total), 1)


# --- the cache ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cached:
    """A model with files on local disk, as eviction sees it."""

    name: str
    size: int
    last_used: str  # ISO time; '' for never
    in_use: bool  # an endpoint names it: never evicted
    evictable: bool = True  # READY; a warm in progress is never evicted


def choose_evictions(cached: Sequence[Cached], need: int, cap: int) -> list[str] | None:
    """Which models to evict, least recently used first, so that `need` more bytes fit under `cap`.
    [] when it fits as it is; None when it cannot fit even after evicting every model no endpoint uses
    (nothing is evicted then)."""
    if need > cap:
        return None
    over = sum(c.size for c in cached) + need - cap
    chosen: list[str] = []
    for c in sorted((c for c in cached if c.evictable and not c.in_use), key=lambda c: (c.last_used, c.name)):
        if over <= 0:
            break
        chosen.append(c.name)
        over -= c.size
    return chosen if over <= 0 else None


def size_text(n: float) -> str:
    """Bytes for people: 1.5 GiB, 300 MiB, 12 KiB, 7 B."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
