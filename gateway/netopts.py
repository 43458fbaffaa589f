"""TCP keep-alive on every socket the gateway owns.

Linux waits 7200 s before its first keep-alive probe, so NAT tables and load balancers forget a
silent multi-minute generation long before the OS notices. Short per-socket timers keep both legs
(caller and upstream) alive and detect a dead peer in idle + interval x count seconds.
"""

from __future__ import annotations

import socket

from gateway.config import TcpKeepaliveConfig


def set_keepalive(sock: socket.socket, cfg: TcpKeepaliveConfig) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):  # Linux; macOS names the idle timer differently
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, cfg.idle_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, cfg.interval_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, cfg.count)


def listening_socket(host: str, port: int, cfg: TcpKeepaliveConfig) -> socket.socket:
    """A bound, listening socket whose accepted connections inherit the keep-alive options."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    set_keepalive(sock, cfg)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock
