"""The test suite's own guard: tests marked unit cannot open network connections."""

from __future__ import annotations

import socket

import pytest

pytestmark = pytest.mark.unit


def test_unit_tests_cannot_connect() -> None:
    """A TCP connection attempt from a unit test fails before it leaves the process."""
    with pytest.raises(RuntimeError, match="mark it integration"):
        socket.create_connection(("127.0.0.1", 9), timeout=1)
