"""Fixtures of the integration tests: an engine per store, a unit-of-work factory."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy.engine import Engine

from ledger_service.storage.uow import SqlUnitOfWork, create_engine


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = create_engine(db_url, pool_size=40)
    yield engine
    engine.dispose()


@pytest.fixture
def uow(engine: Engine) -> Callable[..., SqlUnitOfWork]:
    return functools.partial(SqlUnitOfWork, engine)
