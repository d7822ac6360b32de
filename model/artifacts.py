"""Versioned artefacts on disk: a directory of files plus `manifest.json` with their sha256.

A version is written into a staging directory, sealed with `seal()`, then moved into place by
the registry with one atomic rename. `verify()` re-hashes every file before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from freshrec.errors import ArtifactError

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Manifest:
    """What a version is, where it came from and what it cost."""

    kind: str  # "reranker" | "index"
    version: str
    parent: str | None = None
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    data_window: dict[str, str] = field(default_factory=dict)  # {"start": iso, "end": iso}
    metrics: dict[str, float] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)  # examples, seconds, device, ...
    reason: str = ""
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        return cls(**data)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def seal(directory: Path, manifest: Manifest) -> Manifest:
    """Hash every file in `directory` (flat) and write the manifest; return it with hashes."""
    files = {
        p.name: sha256_file(p)
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    sealed = Manifest(**{**asdict(manifest), "files": files})
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(sealed.to_json())
    tmp.replace(directory / MANIFEST)
    return sealed


def read_manifest(directory: Path) -> Manifest:
    """The manifest without checking the files (cheap; for listings).

    Raises:
        ArtifactError: missing or unreadable manifest.
    """
    path = directory / MANIFEST
    try:
        return Manifest.from_json(path.read_text())
    except (OSError, ValueError, TypeError) as exc:
        raise ArtifactError(f"{directory.name}: unreadable {MANIFEST}: {exc}") from exc


def verify(directory: Path, kind: str | None = None) -> Manifest:
    """Check that every file the manifest lists is present with its sha256.

    Raises:
        ArtifactError: naming the version and the first problem found.
    """
    manifest = read_manifest(directory)
    if kind is not None and manifest.kind != kind:
        raise ArtifactError(f"{directory.name}: expected a {kind}, manifest says {manifest.kind}")
    if not manifest.files:
        raise ArtifactError(f"{directory.name}: manifest lists no files")
    for name, expected in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{directory.name}: file {name} is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(
                f"{directory.name}: sha256 of {name} is {actual[:12]}…, manifest says "
                f"{expected[:12]}…"
            )
    return manifest
