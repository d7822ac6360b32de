"""The model registry: versioned artefacts on a shared filesystem and a champion pointer per kind.

Layout under `root/<kind>/` (kind = "reranker" | "index"):
    v0001/ ... manifest.json     immutable, sealed versions (model.artifacts)
    .staging-<uuid>/             work in progress; never read by anyone
    CHAMPION                     the served version's name, replaced atomically
    history.jsonl                every champion change, append-only (promote, rollback)
    decisions.jsonl              gate decisions (promoted/rejected and why)

Publishing is `rename(staging, vNNNN)`: a reader sees a whole version or none. The champion
pointer is written to a temp file, fsynced and `os.replace`d, so it never names a partial one.

`open_registry(config)` picks the backend: this filesystem registry, or, for a
`registry_url` of `s3://bucket/prefix`, `services.registry_s3.S3ModelRegistry` (same interface,
the bucket is the truth and `config.registry_dir` its local cache).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from freshrec.errors import ArtifactError, FailedPrecondition, InvalidArgument, NotFound
from model.artifacts import Manifest, read_manifest, seal, verify

if TYPE_CHECKING:
    from freshrec.config import FreshRecConfig

KINDS = ("reranker", "index")
CHAMPION = "CHAMPION"
HISTORY = "history.jsonl"
DECISIONS = "decisions.jsonl"
VERSION_NAME = re.compile(r"v[0-9]{1,9}")


@dataclass(frozen=True)
class VersionEntry:
    manifest: Manifest
    status: str  # champion | published | rejected | retired


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _append_line(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a torn last line after a crash: ignore it, earlier lines are intact
    return out


class ModelRegistry:
    """Versions, champion pointers and their history on a (shared) filesystem."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _kind_dir(self, kind: str) -> Path:
        if kind not in KINDS:
            raise InvalidArgument(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        path = self.root / kind
        path.mkdir(parents=True, exist_ok=True)
        return path

    def path(self, kind: str, version: str) -> Path:
        """The directory of `version`.

        Raises:
            InvalidArgument: `version` is not a version name (`v` and digits), so that no
                caller can make a path outside the registry (`../x`, `/abs`, `v0001/`).
        """
        if not VERSION_NAME.fullmatch(version):
            raise InvalidArgument(
                f"version must be 'v' followed by 1..9 digits, e.g. v0002, got {version[:40]!r}"
            )
        return self._kind_dir(kind) / version

    def versions(self, kind: str) -> list[str]:
        """Published version names, oldest first."""
        base = self._kind_dir(kind)
        return sorted(
            p.name
            for p in base.iterdir()
            if p.is_dir() and p.name.startswith("v") and (p / "manifest.json").exists()
        )

    def staging_dir(self, kind: str) -> Path:
        """A fresh private directory to write a version into before `publish`."""
        path = self._kind_dir(kind) / f".staging-{uuid.uuid4().hex}"
        path.mkdir()
        return path

    def publish_written(
        self, kind: str, write: Callable[[Path], object], manifest: Manifest
    ) -> Manifest:
        """`write(staging)` a version into a fresh staging directory, then `publish` it; the
        staging directory never outlives the call (published versions are moved out of it)."""
        staging = self.staging_dir(kind)
        try:
            write(staging)
            return self.publish(kind, staging, manifest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def clean_staging(self, kind: str) -> int:
        """Remove staging directories left by a killed writer; return how many."""
        removed = 0
        for p in self._kind_dir(kind).glob(".staging-*"):
            shutil.rmtree(p, ignore_errors=True)
            removed += 1
        return removed

    def next_version(self, kind: str) -> str:
        existing = [int(v[1:]) for v in self.versions(kind) if v[1:].isdigit()]
        return f"v{(max(existing) + 1) if existing else 1:04d}"

    def publish(self, kind: str, staging: Path, manifest: Manifest) -> Manifest:
        """Seal `staging` (hash its files, write the manifest) and move it into place atomically.

        The manifest's `version` is assigned here. Returns the sealed manifest.
        """
        base = self._kind_dir(kind)
        for _ in range(100):
            version = self.next_version(kind)
            sealed = seal(
                staging, Manifest(**{**manifest.__dict__, "version": version, "kind": kind})
            )
            for f in staging.iterdir():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
            try:
                os.rename(staging, base / version)
            except OSError:
                continue  # another writer took this number; take the next
            _fsync_dir(base)
            return sealed
        raise FailedPrecondition(f"could not allocate a version name under {base}")

    def manifest(self, kind: str, version: str) -> Manifest:
        path = self.path(kind, version)
        if not path.is_dir():
            raise NotFound(f"version {version!r} of {kind} does not exist")
        return read_manifest(path)

    def verify(self, kind: str, version: str) -> Manifest:
        """Re-hash a version's files. Raises NotFound or ArtifactError."""
        path = self.path(kind, version)
        if not path.is_dir():
            raise NotFound(f"version {version!r} of {kind} does not exist")
        return verify(path, kind)

    def champion(self, kind: str) -> str | None:
        """The current champion's version name, or None before the first promote."""
        path = self._kind_dir(kind) / CHAMPION
        try:
            name = path.read_text().strip()
        except FileNotFoundError:
            return None
        return name or None

    # Storage hooks: the champion pointer and the append-only records. S3ModelRegistry overrides
    # these (and the version I/O) and inherits the champion/rollback/status logic unchanged.
    def _write_champion(self, kind: str, version: str) -> None:
        base = self._kind_dir(kind)
        tmp = base / f".{CHAMPION}.{uuid.uuid4().hex}"
        with tmp.open("w") as fh:
            fh.write(version + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, base / CHAMPION)
        _fsync_dir(base)

    def _append_record(self, kind: str, log_name: str, record: dict[str, Any]) -> None:
        _append_line(self._kind_dir(kind) / log_name, record)

    def _read_records(self, kind: str, log_name: str) -> list[dict[str, Any]]:
        return _read_lines(self._kind_dir(kind) / log_name)

    def _set_champion(self, kind: str, version: str, action: str, reason: str) -> str | None:
        previous = self.champion(kind)
        if previous is not None and self._history_chain(kind)[-1:] != [previous]:
            # A writer was killed after replacing CHAMPION and before its history line: write
            # that line now, or the version would be missing from the chain rollback walks.
            self._append_record(
                kind,
                HISTORY,
                {
                    "at": datetime.now(UTC).isoformat(),
                    "action": "promote",
                    "version": previous,
                    "previous": None,
                    "reason": "recovered: CHAMPION was set but its history line was lost",
                },
            )
        self._write_champion(kind, version)
        self._append_record(
            kind,
            HISTORY,
            {
                "at": datetime.now(UTC).isoformat(),
                "action": action,
                "version": version,
                "previous": previous,
                "reason": reason,
            },
        )
        return previous

    def promote(self, kind: str, version: str, reason: str = "") -> str | None:
        """Make a verified version the champion; return the previous champion.

        Raises:
            NotFound: no such version. ArtifactError: it fails verification.
        """
        self.verify(kind, version)
        return self._set_champion(kind, version, "promote", reason)

    def rollback(self, kind: str, reason: str = "") -> tuple[str, str | None]:
        """Return to the champion before the current one; (new champion, previous).

        Raises:
            FailedPrecondition: there is no earlier champion to return to.
        """
        current = self.champion(kind)
        chain = self.champion_chain(kind)
        for candidate in reversed(chain[:-1]):
            if candidate == current:
                continue
            try:
                self.verify(kind, candidate)
            except (NotFound, ArtifactError):
                continue
            previous = self._set_champion(kind, candidate, "rollback", reason)
            return candidate, previous
        raise FailedPrecondition(f"no earlier {kind} champion to roll back to (current {current})")

    def champion_chain(self, kind: str) -> list[str]:
        """Champions in the order they were promoted, with rolled-back ones removed; it always
        ends at the current champion."""
        chain = self._history_chain(kind)
        current = self.champion(kind)
        if current is not None and chain[-1:] != [current]:
            # Killed after CHAMPION was replaced but before history.jsonl was appended: the
            # pointer is the truth, so it tops the chain (the next change writes the line).
            chain.append(current)
        return chain

    def _history_chain(self, kind: str) -> list[str]:
        chain: list[str] = []
        for rec in self._read_records(kind, HISTORY):
            if rec.get("action") == "rollback":
                while chain and chain[-1] != rec["version"]:
                    chain.pop()
                if not chain:
                    chain.append(rec["version"])
            else:
                chain.append(rec["version"])
        return chain

    def champion_periods(self, kind: str) -> list[tuple[datetime, str]]:
        """(since, version) for every champion change, oldest first (promotes and rollbacks)."""
        return [
            (datetime.fromisoformat(rec["at"]), str(rec["version"]))
            for rec in self._read_records(kind, HISTORY)
            if "at" in rec and "version" in rec
        ]

    def record_decision(
        self, kind: str, version: str, decision: str, detail: dict[str, Any]
    ) -> None:
        self._append_record(
            kind,
            DECISIONS,
            {
                "at": datetime.now(UTC).isoformat(),
                "version": version,
                "decision": decision,
                **detail,
            },
        )

    def list_versions(self, kind: str) -> list[VersionEntry]:
        """Every published version with its status, oldest first."""
        champion = self.champion(kind)
        ever = {rec["version"] for rec in self._read_records(kind, HISTORY)}
        rejected = {
            rec["version"]
            for rec in self._read_records(kind, DECISIONS)
            if rec.get("decision") == "rejected"
        }
        out = []
        for version in self.versions(kind):
            try:
                manifest = self.manifest(kind, version)
            except ArtifactError:
                continue
            if version == champion:
                status = "champion"
            elif version in rejected:
                status = "rejected"
            elif version in ever:
                status = "retired"
            else:
                status = "published"
            out.append(VersionEntry(manifest, status))
        return out


def open_registry(config: FreshRecConfig) -> ModelRegistry:
    """The registry `config` names: `registry_url` empty = the filesystem at
    `config.registry_dir`; `s3://bucket/prefix` = that object store, cached in `registry_dir`.

    No I/O happens here; the first call that needs the store connects.
    """
    if not config.registry_url:
        return ModelRegistry(config.registry_dir)
    from services.registry_s3 import S3ModelRegistry  # boto3 is only needed for S3

    return S3ModelRegistry.from_url(
        config.registry_url, config.registry_dir, endpoint_url=config.s3_endpoint_url or None
    )


def required_champion(registry: ModelRegistry, kind: str, where: str, hint: str) -> str:
    """`registry`'s champion of `kind`; FailedPrecondition ("no champion <kind> in <where>:
    <hint>") before the first promote."""
    version = registry.champion(kind)
    if version is None:
        name = "re-ranker" if kind == "reranker" else kind
        raise FailedPrecondition(f"no champion {name} in {where}: {hint}")
    return version
