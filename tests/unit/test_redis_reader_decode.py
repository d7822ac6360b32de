"""The fast value decoder of services/features/redis_reader.py equals Feast's own."""

from __future__ import annotations

import pytest
from feast.protos.feast.types.Value_pb2 import (
    BoolList,
    DoubleList,
    FloatList,
    Int64List,
    StringList,
    Value,
)
from feast.type_map import NULL_TIMESTAMP_INT_VALUE, feast_value_type_to_python_type

from services.features.redis_reader import decode_value

VALUES = [
    Value(),
    Value(string_val="Toy Story"),
    Value(string_val=""),
    Value(int64_val=-7),
    Value(int32_val=3),
    Value(double_val=12.5),
    Value(float_val=0.25),
    Value(bool_val=False),
    Value(bool_val=True),
    Value(bytes_val=b"\x00\x01"),
    Value(string_list_val=StringList(val=["a", "b"])),
    Value(string_list_val=StringList(val=[])),
    Value(double_list_val=DoubleList(val=[0.5, 0.25])),
    Value(float_list_val=FloatList(val=[1.5])),
    Value(int64_list_val=Int64List(val=[1, 2, 3])),
    Value(bool_list_val=BoolList(val=[True, False])),
    Value(unix_timestamp_val=1_700_000_000),
    Value(unix_timestamp_val=NULL_TIMESTAMP_INT_VALUE),
    Value(json_val='{"a": 1}'),  # not on the fast path: Feast's own function
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: v.WhichOneof("val") or "empty")
def test_decode_value_equals_feasts_conversion(value: Value) -> None:
    wire = Value.FromString(value.SerializeToString())
    ours, theirs = decode_value(wire), feast_value_type_to_python_type(wire)
    assert ours == theirs
    assert type(ours) is type(theirs)


def test_online_client_connects_one_node_and_refuses_sentinel() -> None:
    import redis

    from freshrec.errors import FailedPrecondition
    from services.features.redis_reader import online_client

    node = online_client({"connection_string": "10.0.0.5:6380,db=2,password=pw"}, 1.5)
    assert isinstance(node, redis.Redis)
    kwargs = node.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["password"]) == (
        "10.0.0.5",
        6380,
        2,
        "pw",
    )
    assert kwargs["socket_timeout"] == 1.5
    with pytest.raises(FailedPrecondition, match="redis_sentinel"):
        online_client({"redis_type": "redis_sentinel", "connection_string": "s:26379"})
