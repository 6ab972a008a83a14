"""The relay's tests run twice: on SQLite (one process) and on PostgreSQL (replicas).

Every test here gets the ``relay_backend`` fixture, parametrised ``sqlite`` and
``postgresql``; a test (or module) that is about one backend only, or about no database
at all, says so with ``@pytest.mark.backends("sqlite")``.  On ``postgresql`` each relay
the test writes without ``database=`` gets a new database of one throw-away cluster
(:class:`devkit.postgres.Postgres`, started once per session on a free port); the
databases are dropped after the test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devkit.postgres import Postgres
from tests.support.relay import databases_from

BACKENDS = ("sqlite", "postgresql")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "backends(*names): run the relay test on these databases only")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "relay_backend" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("backends")
    names = marker.args if marker is not None else BACKENDS
    unknown = set(names) - set(BACKENDS)
    if unknown:
        raise pytest.UsageError(f"unknown backends {sorted(unknown)} on {metafunc.function}")
    metafunc.parametrize("relay_backend", names, indirect=True)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Postgres]:
    """One PostgreSQL cluster for the session's relay tests."""
    with Postgres() as cluster:
        yield cluster


@pytest.fixture(autouse=True)
def relay_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """The database the test's relays use (see the module docstring)."""
    backend = str(request.param)
    if backend == "sqlite":
        yield backend
        return
    cluster: Postgres = request.getfixturevalue("postgres_cluster")
    made: list[str] = []

    def new() -> str:
        url = cluster.create_database()
        made.append(url.rsplit("/", 1)[1])
        return url

    with databases_from(new):
        yield backend
    for name in made:
        cluster.drop_database(name)
