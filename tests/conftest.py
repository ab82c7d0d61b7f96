"""Shared test helpers: skip rules for root and etcd, and per-run unique name prefixes."""

from __future__ import annotations

import itertools
import os
import secrets
import shutil

import hypothesis  # noqa: F401  # imported before any test: see below
import pytest

# CPython 3.11.7 can fail to compile a module imported late in a session after asyncio tests ran
# ("SystemError: AST constructor recursion depth mismatch", fixed in 3.11.8); hypothesis's pytest plugin
# imports hypothesis only in the terminal summary, so it is imported here, up front.

IS_ROOT = os.geteuid() == 0
HAVE_ETCD = shutil.which("etcd") is not None

_counter = itertools.count()


def unique_prefix(kind: str = "fp") -> str:
    """A short name prefix unique to this run and call, e.g. for namespaces, links and etcd prefixes."""
    return f"{kind}{os.getpid() % 10000}{secrets.token_hex(2)}{next(_counter)}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("root") is not None and not IS_ROOT:
            item.add_marker(pytest.mark.skip(reason="needs root"))
        if item.get_closest_marker("etcd") is not None and not HAVE_ETCD:
            item.add_marker(pytest.mark.skip(reason="needs the etcd binary (Debian package etcd-server)"))


@pytest.fixture
def name_prefix() -> str:
    return unique_prefix()
