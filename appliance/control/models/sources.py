"""Where a model's files come from: a directory on this box (local disk or an NFS mount) or an S3
prefix, read through boto3. Blocking: call from threads. Every problem a user can fix (a missing
path, an unknown bucket, refused credentials) is a 422 naming it; credentials never appear in one."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import SecretStr

from appliance.domain.models import FileEntry, S3Credentials, SourceRef, check_relative
from appliance.errors import ApplianceError
from appliance.security.vault import SEALED

# Bytes per read: each chunk is written and hashed while it is still in the CPU's cache (measured: 4 MiB
# chunks cost twice the system time of 256 KiB ones on the same copy, and 64 KiB ones more calls).
CHUNK = 256 << 10
MAX_FILES = 100_000  # a model folder has tens of files; a source with more is a mistake (a home directory, /)


class SourceBroken(Exception):
    """A read that broke off (a dropped connection, an I/O error): the file resumes where it stopped."""


class Source(Protocol):
    def list(self) -> list[FileEntry]: ...

    def read(self, path: str, offset: int) -> Iterator[bytes | memoryview]: ...

    def close(self) -> None: ...


def _problem(message: str, code: str) -> ApplianceError:
    return ApplianceError(message, status=422, code=code, param="source")


class PathSource:
    """A directory on this box. Symbolic links to files are followed (a Hugging Face snapshot is made of
    them); links to directories are not, so a loop cannot make the listing endless."""

    def __init__(self, root: str, forbidden: Path | None = None) -> None:
        self.root = Path(root)
        self._forbidden = forbidden  # the state directory: never a source, nor inside one

    def list(self) -> list[FileEntry]:
        root = self.root
        if self._forbidden is not None:
            state = self._forbidden.resolve()
            real = root.resolve()
            if real == state or state.is_relative_to(real) or real.is_relative_to(state):
                raise _problem(f"source {root} overlaps the appliance's state directory {state}", "source_forbidden")
        if not root.exists():
            raise _problem(f"source {root} does not exist", "source_not_found")
        if not root.is_dir():
            raise _problem(f"source {root} is not a directory", "source_not_a_directory")
        entries: list[FileEntry] = []

        def failed(exc: OSError) -> None:
            raise _problem(f"cannot read {exc.filename}: {exc.strerror or exc}", "source_unreadable")

        for folder, dirs, files in os.walk(root, onerror=failed):
            dirs.sort()
            for name in sorted(files):
                full = Path(folder) / name
                try:
                    st = full.stat()
                except OSError as exc:
                    raise _problem(f"cannot read {full}: {exc.strerror or exc} (a broken link?)", "source_unreadable") from None
                if not stat.S_ISREG(st.st_mode):
                    continue  # sockets, fifos, devices: not model files
                entries.append(FileEntry(full.relative_to(root).as_posix(), st.st_size, None, str(st.st_mtime_ns)))
                if len(entries) > MAX_FILES:
                    raise _problem(f"source {root} has more than {MAX_FILES} files: is it really one model's folder?", "source_too_large")
        if not entries:
            raise _problem(f"source {root} has no files", "source_empty")
        return entries

    def read(self, path: str, offset: int) -> Iterator[memoryview]:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        try:
            with open(self.root / path, "rb") as f:
                f.seek(offset)
                while n := f.readinto(buf):
                    yield view[:n]  # the caller writes and hashes it before asking for the next
        except FileNotFoundError:
            raise ApplianceError(f"{self.root / path} is gone from the source: register the model again", status=422, code="source_changed") from None
        except OSError as exc:
            raise SourceBroken(f"{self.root / path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class S3Access:
    """Resolved S3 settings of one model; `secret_access_key` and `session_token` are plain here and go
    only to boto3."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    profile: str | None = None

    def __repr__(self) -> str:  # never print a secret, even in a traceback's locals
        return f"S3Access(endpoint_url={self.endpoint_url!r}, region={self.region!r}, profile={self.profile!r})"


def s3_access(row: Mapping[str, Any], credentials: Mapping[str, S3Credentials], unseal: Callable[[str], str]) -> S3Access:
    """A model's S3 settings (a row or a spec) with its named credentials' secrets opened; only the name is stored."""
    name = row.get("credentials")
    if not name:
        return S3Access(endpoint_url=row.get("endpoint_url"), region=row.get("region"))
    creds = credentials.get(name)
    if creds is None:
        raise ApplianceError(f"credentials {name!r}: no [models.credentials.{name}] in the config", status=422, code="unknown_credentials", param="credentials")

    def plain(secret: SecretStr | None) -> str | None:
        value = secret.get_secret_value() if secret is not None else None
        return unseal(value) if value and value.startswith(SEALED) else value

    return S3Access(
        endpoint_url=row.get("endpoint_url"), region=row.get("region"), access_key_id=creds.access_key_id,
        secret_access_key=plain(creds.secret_access_key), session_token=plain(creds.session_token), profile=creds.profile,
    )


_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "AuthorizationHeaderMalformed",
           "InvalidClientTokenId", "TokenRefreshRequired", "AllAccessDisabled", "UnrecognizedClientException", "403"}


class S3Source:
    """An S3 prefix (AWS, or any S3-compatible endpoint: MinIO, Ceph RGW, …). Credentials: the ones given,
    else boto3's standard chain (environment, ~/.aws profiles, SSO, instance metadata)."""

    def __init__(self, ref: SourceRef, access: S3Access, parallel: int) -> None:
        import boto3
        from botocore.config import Config as BotoConfig
        from botocore.exceptions import BotoCoreError

        self._etags: dict[str, str] = {}  # path -> ETag as last listed: reads ask for that version
        for name in ("boto3", "botocore", "s3transfer", "urllib3"):  # their DEBUG lines carry request signatures
            logging.getLogger(name).setLevel(max(logging.getLogger(name).level, logging.INFO))
        self.ref = ref
        self._where = f" at {access.endpoint_url}" if access.endpoint_url else ""
        config = BotoConfig(
            connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"}, max_pool_connections=max(10, parallel + 2),
            s3={"addressing_style": "path"} if access.endpoint_url else None, user_agent_extra="appliance",
        )
        try:
            session = boto3.session.Session(
                aws_access_key_id=access.access_key_id, aws_secret_access_key=access.secret_access_key, aws_session_token=access.session_token,
                profile_name=access.profile, region_name=access.region,
            )
            self._client: Any = session.client("s3", endpoint_url=access.endpoint_url, config=config)
        except BotoCoreError as exc:  # a profile that does not exist, a malformed setting
            raise _problem(f"S3 settings for {ref}: {exc}", "s3_settings") from None

    def _error(self, exc: Exception, key: str | None = None) -> ApplianceError:
        from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError
        from botocore.exceptions import ConnectionError as Unreachable

        ref = self.ref
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code, message = str(err.get("Code", "")), str(err.get("Message", "")) or str(exc)
            if code == "NoSuchBucket":
                return _problem(f"bucket {ref.bucket!r} does not exist{self._where}", "bucket_not_found")
            if code in ("NoSuchKey", "404") and key is not None:
                return ApplianceError(f"s3://{ref.bucket}/{key} is gone from the source: register the model again", status=422, code="source_changed")
            if code in ("PreconditionFailed", "412") and key is not None:
                return ApplianceError(f"s3://{ref.bucket}/{key} was rewritten while the model was copied: register the model again", status=409,
                                      code="source_changed")
            if code in _DENIED:
                return _problem(f"S3 refused access to {ref}{self._where}: {code} ({message}); check the model's credentials", "s3_access_denied")
            return _problem(f"S3 error for {ref}{self._where}: {code}: {message}", "s3_error")
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return _problem(
                f"no AWS credentials for {ref}: name a [models.credentials.<name>] entry as `credentials`, or set the standard AWS environment or profile",
                "s3_no_credentials",
            )
        if isinstance(exc, Unreachable):  # refused, timed out, no route
            return _problem(f"cannot reach S3{self._where or ' (AWS)'} for {ref}: {exc}", "s3_unreachable")
        return _problem(f"S3 request for {ref}{self._where} failed: {exc}", "s3_error")

    def list(self) -> list[FileEntry]:
        from botocore.exceptions import BotoCoreError, ClientError

        ref = self.ref
        entries: list[FileEntry] = []
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=ref.bucket, Prefix=ref.prefix):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(ref.prefix):]
                    if not rel or rel.endswith("/"):
                        continue  # the markers some tools write for folders
                    try:
                        check_relative(rel)
                    except ValueError as exc:
                        raise _problem(f"object {obj['Key']!r} cannot be a file of a model folder: {exc}", "source_unsafe_key") from None
                    entries.append(FileEntry(rel, int(obj["Size"]), None, str(obj.get("ETag", "")).strip('"')))
                    self._etags[rel] = entries[-1].tag
                    if len(entries) > MAX_FILES:
                        raise _problem(f"{ref} has more than {MAX_FILES} objects: is it really one model's folder?", "source_too_large")
        except (BotoCoreError, ClientError) as exc:
            raise self._error(exc) from None
        if not entries:
            raise _problem(f"no objects under {ref}{self._where}", "source_empty")
        return entries

    def read(self, path: str, offset: int) -> Iterator[bytes]:
        from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, ResponseStreamingError
        from urllib3.exceptions import HTTPError

        key = self.ref.prefix + path
        try:
            extra: dict[str, str] = {"Range": f"bytes={offset}-"} if offset else {}
            if etag := self._etags.get(path):
                extra["IfMatch"] = etag  # the object as listed, or nothing: a resumed part never mixes two versions
            body = self._client.get_object(Bucket=self.ref.bucket, Key=key, **extra)["Body"]
        except (ConnectionError, ResponseStreamingError) as exc:
            raise SourceBroken(f"s3://{self.ref.bucket}/{key}: {exc}") from None
        except (BotoCoreError, ClientError) as exc:
            raise self._error(exc, key) from None
        try:
            while chunk := body.read(CHUNK):
                yield chunk
        except (BotoCoreError, HTTPError, OSError) as exc:  # the stream broke off: resumed from here
            raise SourceBroken(f"s3://{self.ref.bucket}/{key}: {exc}") from None
        finally:
            body.close()

    def close(self) -> None:
        self._client.close()


def open_source(ref: SourceRef, access: S3Access | None, parallel: int, forbidden: Path | None = None) -> Source:
    if ref.kind == "path":
        return PathSource(ref.path, forbidden)
    return S3Source(ref, access or S3Access(), parallel)
