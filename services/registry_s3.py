"""The model registry on an S3-compatible object store, with a local directory as its cache.

Layout under `s3://bucket/prefix/<kind>/`:
    vNNNN/<file> ...          a version's files, uploaded first
    vNNNN/manifest.json       uploaded LAST: its presence marks a complete version
    vNNNN/.claim              the version number's owner (conditional PUT, If-None-Match: *)
    CHAMPION                  the champion's name; one PUT replaces it atomically
    history/<ts>-<uuid>.json  one object per champion change (no read-modify-write to race)
    decisions/<ts>-<uuid>.json  one object per gate decision

Readers list only versions whose manifest exists, so an upload killed half way is never seen.
A version is downloaded into a temporary directory of the cache, every file's sha256 checked
against the manifest, and only then renamed to `<cache>/<kind>/vNNNN`: what the ranking service
loads has always been verified. `S3ModelRegistry` keeps `ModelRegistry`'s interface and
champion/rollback logic; only the storage underneath changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from freshrec.errors import ArtifactError, FailedPrecondition, NotFound, Unavailable
from model.artifacts import MANIFEST, Manifest, seal, verify
from services.registry import CHAMPION, DECISIONS, HISTORY, VERSION_NAME, ModelRegistry

CLAIM = ".claim"
# history.jsonl / decisions.jsonl of the filesystem layout -> one folder of records each.
_RECORD_DIRS = {HISTORY: "history", DECISIONS: "decisions"}
_MISSING = {"404", "NoSuchKey", "NotFound"}


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix/"); the prefix may be empty."""
    if not url.startswith("s3://"):
        raise FailedPrecondition(f"registry_url must start with s3://, got {url[:80]!r}")
    bucket, _, prefix = url[5:].partition("/")
    if not bucket:
        raise FailedPrecondition(f"registry_url names no bucket: {url[:80]!r}")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3RegistryStore:
    """Objects of one registry in one bucket under one prefix; keys are relative to it.

    Every boto3 error is translated where it enters: a missing object is NotFound, anything
    else Unavailable (the store could not be reached or refused us).
    """

    def __init__(self, client: Any, bucket: str, prefix: str = "") -> None:
        self.client = client  # a boto3 S3 client; it connects on its first request
        self.bucket = bucket
        self.prefix = prefix

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _fail(self, exc: Exception, what: str) -> Exception:
        if isinstance(exc, ClientError) and _code(exc) in _MISSING:
            return NotFound(f"s3://{self.bucket}/{self._key(what)} does not exist")
        return Unavailable(f"object store s3://{self.bucket}: {what}: {exc}")

    def get(self, key: str) -> bytes:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            return bytes(body.read())
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(exc, key) from exc

    def put(self, key: str, data: bytes, *, only_if_absent: bool = False) -> bool:
        """One PUT (atomic for readers). With `only_if_absent`, False if the key existed."""
        extra = {"IfNoneMatch": "*"} if only_if_absent else {}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **extra)
        except ClientError as exc:
            if only_if_absent and _code(exc) in {"PreconditionFailed", "412"}:
                return False
            raise self._fail(exc, key) from exc
        except BotoCoreError as exc:
            raise self._fail(exc, key) from exc
        return True

    def upload(self, key: str, path: Path) -> None:
        try:
            self.client.upload_file(str(path), self.bucket, self._key(key))
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(exc, key) from exc

    def download(self, key: str, path: Path) -> None:
        try:
            self.client.download_file(self.bucket, self._key(key), str(path))
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(exc, key) from exc

    def keys(self, prefix: str) -> Iterator[str]:
        """Keys under `prefix` (relative to the store), in lexicographic order."""
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix)
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    yield str(obj["Key"])[len(self.prefix) :]
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(exc, prefix) from exc


class S3ModelRegistry(ModelRegistry):
    """ModelRegistry whose truth is an object store; `cache` holds staging and downloads.

    `path()` and `verify()` return/check the local copy, downloading and verifying it first
    when the cache lacks it, so ModelHolder and the updater load from a local directory as
    before.
    """

    def __init__(self, store: S3RegistryStore, cache: Path) -> None:
        super().__init__(cache)
        self.store = store
        self._records: dict[str, dict[str, Any]] = {}  # key -> record; records are immutable

    @classmethod
    def from_url(cls, url: str, cache: Path, endpoint_url: str | None = None) -> S3ModelRegistry:
        """Registry for `s3://bucket/prefix`; credentials from the standard AWS variables."""
        bucket, prefix = parse_s3_url(url)
        client = boto3.client("s3", endpoint_url=endpoint_url)  # creates no connection yet
        return cls(S3RegistryStore(client, bucket, prefix), cache)

    # -- versions -------------------------------------------------------------------------
    def versions(self, kind: str) -> list[str]:
        """Complete versions (their manifest was uploaded), oldest first."""
        self._kind_dir(kind)  # validates kind
        out = set()
        for key in self.store.keys(f"{kind}/v"):
            version, _, name = key[len(kind) + 1 :].partition("/")
            if name == MANIFEST and VERSION_NAME.fullmatch(version):
                out.add(version)
        return sorted(out)

    def _claimed_numbers(self, kind: str) -> list[int]:
        numbers = set()
        for key in self.store.keys(f"{kind}/v"):
            version = key[len(kind) + 1 :].split("/", 1)[0]
            if VERSION_NAME.fullmatch(version):
                numbers.add(int(version[1:]))
        return sorted(numbers)

    def publish(self, kind: str, staging: Path, manifest: Manifest) -> Manifest:
        """Claim a version number, upload the files, then the manifest; cache the local copy.

        A version number is taken by a conditional PUT of `vNNNN/.claim`, so two updaters never
        publish the same name; an upload killed before the manifest leaves a claimed number
        that is skipped and never listed.
        """
        self._kind_dir(kind)
        for _ in range(100):
            taken = self._claimed_numbers(kind)
            version = f"v{(taken[-1] + 1) if taken else 1:04d}"
            if self.store.put(f"{kind}/{version}/{CLAIM}", b"", only_if_absent=True):
                break
        else:
            raise FailedPrecondition(f"could not allocate a version name for {kind}")
        sealed = seal(staging, Manifest(**{**manifest.__dict__, "version": version, "kind": kind}))
        for name in sealed.files:
            self.store.upload(f"{kind}/{version}/{name}", staging / name)
        self.store.upload(f"{kind}/{version}/{MANIFEST}", staging / MANIFEST)
        # The staged files are this version's verified bytes: keep them as the cached copy.
        target = super().path(kind, version)
        if not target.exists():
            os.rename(staging, target)
        return sealed

    def manifest(self, kind: str, version: str) -> Manifest:
        """The manifest from the store (cheap; no files are fetched or checked).

        Raises:
            NotFound: no complete version of that name. ArtifactError: unreadable manifest.
        """
        super().path(kind, version)  # validates the name
        data = self.store.get(f"{kind}/{version}/{MANIFEST}")
        try:
            return Manifest.from_json(data.decode())
        except (ValueError, TypeError) as exc:
            raise ArtifactError(f"{version}: unreadable {MANIFEST} in the store: {exc}") from exc

    def _download_verified(self, kind: str, version: str, into: Path) -> Manifest:
        manifest = self.manifest(kind, version)
        for name in manifest.files:
            if "/" in name or name in {"", ".", "..", MANIFEST}:
                raise ArtifactError(f"{version}: manifest names an unsafe file {name!r}")
            self.store.download(f"{kind}/{version}/{name}", into / name)
        (into / MANIFEST).write_text(manifest.to_json())
        return verify(into, kind)

    def sync(self, kind: str, version: str) -> Path:
        """Make sure the cache holds a verified copy of `version`; return its directory.

        Downloads into a temporary directory beside the target, checks every file's sha256
        against the store's manifest and renames it into place, so the cache never holds a
        partial or corrupt version under a version name.

        Raises:
            NotFound: no complete version in the store. ArtifactError: a file fails its hash.
        """
        target = super().path(kind, version)
        if target.is_dir():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
        try:
            self._download_verified(kind, version, tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir():  # not a concurrent sync that got there first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def verify_remote(self, kind: str, version: str) -> Manifest:
        """Download `version` afresh and check it: what every other reader will get.

        Raises:
            NotFound: no complete version in the store. ArtifactError: a file fails its hash.
        """
        base = self._kind_dir(kind)
        super().path(kind, version)  # validates the name
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=base))
        try:
            return self._download_verified(kind, version, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def promote(self, kind: str, version: str, reason: str = "") -> str | None:
        """Make a version the champion after checking the store's bytes, not just the cache's
        (a local copy can be intact while an object in the bucket is not).

        Raises:
            NotFound: no such version. ArtifactError: it fails verification.
        """
        self.verify(kind, version)
        self.verify_remote(kind, version)
        return self._set_champion(kind, version, "promote", reason)

    def path(self, kind: str, version: str) -> Path:
        """The cached, verified directory of `version`, downloaded first if needed.

        Raises:
            InvalidArgument: not a version name. ArtifactError: the download fails its hash.
        """
        target = super().path(kind, version)
        if not target.is_dir():
            # As on the filesystem, the path of a missing version simply does not exist.
            with contextlib.suppress(NotFound):
                self.sync(kind, version)
        return target

    def verify(self, kind: str, version: str) -> Manifest:
        """Sync `version` into the cache and re-hash the local copy.

        Raises:
            NotFound: no complete version in the store. ArtifactError: a file fails its hash.
        """
        return verify(self.sync(kind, version), kind)

    def clean_staging(self, kind: str) -> int:
        """Remove local staging and interrupted downloads left by a killed process."""
        removed = super().clean_staging(kind)
        for p in self._kind_dir(kind).glob(".download-*"):
            shutil.rmtree(p, ignore_errors=True)
            removed += 1
        return removed

    # -- champion and records -------------------------------------------------------------
    def champion(self, kind: str) -> str | None:
        """The champion pointer object's content, or None before the first promote."""
        self._kind_dir(kind)
        try:
            name = self.store.get(f"{kind}/{CHAMPION}").decode().strip()
        except NotFound:
            return None
        return name or None

    def _write_champion(self, kind: str, version: str) -> None:
        self.store.put(f"{kind}/{CHAMPION}", (version + "\n").encode())

    def _append_record(self, kind: str, log_name: str, record: dict[str, Any]) -> None:
        # The key sorts by time, so listing returns records in order (to the writers' clocks).
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        key = f"{kind}/{_RECORD_DIRS[log_name]}/{stamp}-{uuid.uuid4().hex}.json"
        self.store.put(key, json.dumps(record, sort_keys=True).encode())

    def _read_records(self, kind: str, log_name: str) -> list[dict[str, Any]]:
        out = []
        for key in self.store.keys(f"{kind}/{_RECORD_DIRS[log_name]}/"):
            if key not in self._records:
                try:
                    self._records[key] = json.loads(self.store.get(key))
                except (NotFound, ValueError):
                    continue
            out.append(self._records[key])
        return out
