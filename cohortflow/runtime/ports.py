"""Fail early and clearly when a port we are about to listen on is taken."""

from __future__ import annotations

import socket


class PortInUse(Exception):
    """Something already listens on a port a cohortflow process needs."""

    def __init__(self, host: str, port: int, setting: str) -> None:
        super().__init__(f"{host}:{port} is already in use; set {setting} to a free port")
        self.host = host
        self.port = port
        self.setting = setting


def ensure_free(host: str, port: int, setting: str) -> None:
    """Raise :class:`PortInUse` naming ``setting`` when ``host:port`` cannot be bound."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as sock:
        # Servers bind with SO_REUSEADDR too, so a port in TIME_WAIT after a restart counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise PortInUse(host, port, setting) from exc


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just handed out as free on ``host`` (for tests; racy by nature)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
