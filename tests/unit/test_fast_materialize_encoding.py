"""The fast materialiser's encoders give Feast's bytes exactly (no Redis needed)."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from feast.type_map import python_values_to_proto_values
from feast.value_type import ValueType

from services.features.fast_materialize import (
    encode_column,
    encode_event_timestamps,
    latest_rows_in_window,
)


def _feast_bytes(values: np.ndarray, value_type: ValueType) -> list[bytes]:
    return [p.SerializeToString() for p in python_values_to_proto_values(values, value_type)]


def _column(array: pa.Array) -> np.ndarray:
    """A column as Feast's materialisation hands it to the converter."""
    return pa.table({"c": array}).column("c").to_numpy(zero_copy_only=False)


COLUMNS = {
    "string": (pa.array(["a", None, "", "é ünïcode", "a", "x" * 300]), ValueType.STRING),
    "int64": (pa.array([0, 1, -2, 2**40, 1, 127, 128], pa.int64()), ValueType.INT64),
    "int64_nulls": (pa.array([0, None, 5], pa.int64()), ValueType.INT64),
    "float32": (
        pa.array([1.5, float("nan"), 0.0, -0.0, 3.4e38, 1e-45, 49.5], pa.float32()),
        ValueType.FLOAT,
    ),
    "float32_nulls": (pa.array([1.25, None, 2.0], pa.float32()), ValueType.FLOAT),
    "float64_as_float": (pa.array([0.1, 2.5, -7.25], pa.float64()), ValueType.FLOAT),
    "double": (pa.array([0.1, float("nan"), -7.25], pa.float64()), ValueType.DOUBLE),
    "bool": (pa.array([True, False, True]), ValueType.BOOL),
    "bool_nulls": (pa.array([True, None, False]), ValueType.BOOL),
    "timestamp": (
        pa.array(
            pd.to_datetime(
                ["2024-03-01T00:00:01.5", None, "1969-12-31T23:59:59.25", "2024-03-01T00:00:01"],
                utc=True,
                format="ISO8601",
            )
        ),
        ValueType.UNIX_TIMESTAMP,
    ),
    "string_list": (pa.array([["a", "b"], [], None, ["é"]]), ValueType.STRING_LIST),
    "float_list": (
        pa.array([[0.5, 0.25], [], None, [1e-3]], pa.list_(pa.float32())),
        ValueType.FLOAT_LIST,
    ),
    "int64_list": (pa.array([[1, -1], [], None], pa.list_(pa.int64())), ValueType.INT64_LIST),
    "fallback_int32": (pa.array([1, -5, 0], pa.int32()), ValueType.INT32),
}


@pytest.mark.parametrize("name", sorted(COLUMNS))
def test_encode_column_matches_feast_byte_for_byte(name: str) -> None:
    array, value_type = COLUMNS[name]
    values = _column(array)
    assert encode_column(values, value_type) == _feast_bytes(_column(array), value_type)


def test_encode_column_does_not_mutate_its_input() -> None:
    values = _column(pa.array([1.5, float("nan")], pa.float32()))
    before = values.copy()
    encode_column(values, ValueType.FLOAT)
    np.testing.assert_array_equal(values, before)


def test_event_timestamps_match_feasts_datetime_path() -> None:
    from feast import utils
    from google.protobuf.timestamp_pb2 import Timestamp

    stamps = pd.to_datetime(
        ["2024-03-01T00:00:01.123456789", "2024-03-01T00:00:00", "2023-01-01T12:00:00.5"],
        utc=True,
        format="ISO8601",
    )
    values = stamps.tz_convert(None).to_numpy(dtype="datetime64[ns]")
    expected = []
    for stamp in stamps:
        ts = Timestamp()
        ts.FromDatetime(utils.make_tzaware(stamp.to_pydatetime(warn=False)))
        expected.append(ts.SerializeToString())
    assert encode_event_timestamps(values) == expected


def test_latest_rows_in_window_keeps_the_newest_row_per_entity_inclusive() -> None:
    day = [datetime(2024, 3, d, tzinfo=UTC) for d in range(1, 6)]
    table = pa.table(
        {
            "user_id": ["a", "b", "a", "c", "b", "d"],
            "v": [1, 2, 3, 4, 5, 6],
            "event_timestamp": pd.to_datetime(
                [day[0], day[1], day[2], day[4], day[3], day[0]], utc=True
            ),
        }
    )
    got = latest_rows_in_window(table, "user_id", "event_timestamp", day[1], day[3])
    pairs = zip(got.column("user_id").to_pylist(), got.column("v").to_pylist(), strict=True)
    assert dict(pairs) == {
        "b": 5,  # newest of b's two rows; the window's end is inclusive
        "a": 3,
    }
