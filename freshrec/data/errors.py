"""Errors of the data layer, placed in FreshRec's hierarchy (see `freshrec.errors`)."""

from __future__ import annotations

from freshrec.errors import Unavailable


class DatasetUnavailable(Unavailable):
    """A dataset's files could not be obtained or read (offline, pip failed, corrupt archive)."""
