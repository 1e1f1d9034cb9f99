"""Ports for private clusters: a port handed out must stay clear of the ranges Ray's own processes
take after it was chosen, or Serve's proxy can find it gone ("Failed to bind to address")."""

import socket

import pytest

from tests.support import cluster as support


def test_free_ports_lie_between_rays_worker_ports_and_the_kernels_ephemeral_ports() -> None:
    ports = {support.free_port() for _ in range(50)}
    ephemeral_low = support._ephemeral_low()
    assert all(20000 <= port < min(32768, ephemeral_low) for port in ports)
    assert len(ports) > 1


def test_a_port_that_is_listened_on_is_not_handed_out(monkeypatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        monkeypatch.setattr(support, "_PORT_RANGE", (busy, busy))
        monkeypatch.setattr(support, "_ephemeral_low", lambda: busy + 1)
        with pytest.raises(RuntimeError, match=str(busy)):
            support.free_port()
