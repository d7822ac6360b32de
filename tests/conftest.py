"""Shared fixtures about the services the tests need (Redis for now). Keep this file small."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis for the whole run: $FRESHREC_TEST_REDIS_URL, else a redis-server started here.

    Never flush it: a Redis given by URL may be shared. Tests keep their keys apart by giving
    each Feast store its own project name (Feast's keys end with the project).
    """
    external = os.environ.get("FRESHREC_TEST_REDIS_URL")
    if external:
        yield external
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not on PATH: install Redis 7 (apt-get install redis-server) "
            "or set FRESHREC_TEST_REDIS_URL; integration tests do not skip",
            pytrace=False,
        )
    port = _free_port()
    data_dir = tmp_path_factory.mktemp("redis")
    # fmt: off
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(data_dir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    # fmt: on
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
    deadline = time.monotonic() + 10
    try:
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"redis-server on port {port} did not start", pytrace=False)
                time.sleep(0.05)
        yield url
    finally:
        client.close()
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture(scope="module")
def shop_workdir(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A tiny shop bootstrapped into its own workdir and Feast project (4 gRPC workers), for a
    test module that starts `freshrec serve` as a process of its own; its keys go afterwards
    (live_stack.prepared_shop)."""
    from live_stack import prepared_shop

    with prepared_shop(tmp_path_factory.mktemp("shop") / "work", redis_url, workers=4) as config:
        yield config


@pytest.fixture(scope="session")
def tiny_reranker_session() -> Iterator[object]:
    """One tiny random BERT re-ranker (real tokenizer) for the run; tests take copies.

    torch runs single-threaded while it lives: a 32-wide model gains nothing from intra-op
    threads, and on a busy 2-core box oversubscribed threads spin (measured ~100x slower).
    """
    import torch

    from model.reranker import CrossEncoderReranker

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield CrossEncoderReranker.tiny(seed=0)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def tiny_reranker(tiny_reranker_session: object) -> object:
    """A private deep copy of the session's tiny re-ranker (safe to train or mutate)."""
    import copy

    return copy.deepcopy(tiny_reranker_session)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """torch at one intra-op thread for the test (tiny models gain nothing from more)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
