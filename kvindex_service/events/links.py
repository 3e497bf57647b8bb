"""The subscriber's sockets: SUB links to pods, replay DEALERs, and the wake-up mailbox.

``Links`` owns the context, the poller and every socket. It is used from the loop thread only
(or from ``Subscriber.start`` before the loop exists), except ``Mailbox.call``/``wake``, which
other threads use to run work on the loop thread: ZMQ sockets are not thread-safe, so the
thread that polls them is the only one that touches them.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from kvindex_service.events.replay import ReplaySettings, build_request
from kvindex_service.events.topic import PodEndpoint

__all__ = ["Conn", "Dealer", "Links", "Mailbox", "Monitor", "disconnected", "open_dealer", "sub_socket"]

Ctx = zmq.Context[zmq.Socket[bytes]]
Sock = zmq.Socket[bytes]


@dataclass(eq=False, slots=True)
class Conn:
    """A connect-mode SUB socket and the pod ids seen through it."""

    spec: PodEndpoint
    socket: Sock | None = None
    monitor: Sock | None = None
    """PAIR receiving the SUB's disconnect events (see ``Links.redial_if_dropped``)."""
    pods: set[str] = field(default_factory=set)


@dataclass(eq=False, slots=True)
class Monitor:
    conn: Conn


@dataclass(eq=False, slots=True)
class Dealer:
    """The DEALER of one attempt of a pod's replay."""

    pod: str
    socket: Sock


def sub_socket(ctx: Ctx, *, rcvhwm: int, max_message_bytes: int, prefix: bytes) -> Sock:
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, rcvhwm)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
    sock.setsockopt(zmq.SUBSCRIBE, prefix)
    return sock


def open_dealer(ctx: Ctx, endpoint: str, start_seq: int, settings: ReplaySettings) -> Sock:
    """A fresh DEALER that has asked ``endpoint`` for ``start_seq`` onwards (a fresh socket per
    attempt, so late replies to an abandoned attempt never reach the next one)."""
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, settings.rcvhwm)
        sock.setsockopt(zmq.MAXMSGSIZE, settings.max_message_bytes)
        sock.connect(endpoint)
        sock.send_multipart(build_request(start_seq), zmq.NOBLOCK)
    except zmq.ZMQError:
        sock.close(linger=0)
        raise
    return sock


def disconnected(monitor: Sock) -> bool:
    """Drain a monitor socket; True if it reported a dropped link."""
    dropped = False
    while True:
        try:
            event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:
            return dropped
        dropped = dropped or event["event"] == zmq.EVENT_DISCONNECTED


class Mailbox:
    """Commands from other threads to the loop thread, with a socketpair to wake its poll."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._commands: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._lock = threading.Lock()
        self._r: socket.socket | None = None
        self._w: socket.socket | None = None
        self.fd = -1
        """zmq.Poller reports plain sockets by file descriptor."""

    def open(self) -> socket.socket:
        """Create the socketpair; returns the end to poll."""
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self.fd = self._r.fileno()
        return self._r

    def call(self, fn: Callable[[], Any], loop_thread: threading.Thread | None) -> Any:
        """Run ``fn`` on the loop thread and return its result (or raise its exception)."""
        if threading.current_thread() is loop_thread:
            return fn()
        fut: Future[Any] = Future()
        with self._lock:
            self._commands.append((fn, fut))
        self.wake()
        try:
            return fut.result(self.timeout)
        except FutureTimeout:
            raise TimeoutError("event subscriber thread did not answer") from None

    def wake(self) -> None:
        w = self._w
        if w is None:
            return
        try:
            w.send(b"\x01")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or we are shutting down

    def run_pending(self) -> None:
        """Loop thread: clear the wake-ups and run every queued command."""
        assert self._r is not None
        try:
            while self._r.recv(4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            commands, self._commands = self._commands, []
        for fn, fut in commands:
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed back to the calling thread
                fut.set_exception(exc)

    def fail_pending(self, exc: BaseException) -> None:
        with self._lock:
            commands, self._commands = self._commands, []
        for _, fut in commands:
            if not fut.done():
                fut.set_exception(exc)

    def close(self) -> None:
        for s in (self._r, self._w):
            if s is not None:
                s.close()
        self._r = self._w = None


Owner = Conn | Monitor | Dealer | None
"""What a polled socket belongs to: None is the bound SUB."""


class Links:
    """Every socket of the subscriber loop and the poller over them.

    ``conns`` is also read by other threads: it changes only under ``lock``."""

    def __init__(self, *, lock: threading.Lock, rcvhwm: int, replay: ReplaySettings, prefix: bytes, timeout: float):
        self.lock = lock
        self.rcvhwm = rcvhwm
        self.replay = replay
        self.prefix = prefix
        self.ctx: Ctx | None = None
        self.poller = zmq.Poller()
        self.owners: dict[Any, Owner] = {}
        self.mailbox = Mailbox(timeout)
        self.bound_endpoint: str | None = None
        self._bind_socket: Sock | None = None
        self.conns: dict[str, Conn] = {}
        self.dealers: dict[str, Dealer] = {}

    def open(self, bind: str | None) -> None:
        """Create the context and the mailbox, and bind (``OSError`` if the bind fails)."""
        self.ctx = zmq.Context()
        self.poller.register(self.mailbox.open(), zmq.POLLIN)
        if bind is None:
            return
        sock = self._sub_socket()
        try:
            sock.bind(bind)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise OSError(exc.errno, f"cannot bind {bind}: {exc}") from exc
        self._bind_socket = sock
        self.bound_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._add(sock, None)

    def poll(self, timeout_ms: int | None) -> list[tuple[Any, Any]]:
        return self.poller.poll(timeout_ms)

    def _sub_socket(self) -> Sock:
        assert self.ctx is not None
        return sub_socket(
            self.ctx, rcvhwm=self.rcvhwm, max_message_bytes=self.replay.max_message_bytes, prefix=self.prefix
        )

    def _add(self, sock: Sock, owner: Owner) -> None:
        self.poller.register(sock, zmq.POLLIN)
        self.owners[sock] = owner

    def _drop(self, sock: Sock) -> None:
        self.poller.unregister(sock)
        self.owners.pop(sock, None)
        sock.close(linger=0)

    def connect(self, spec: PodEndpoint) -> Conn:
        """SUB-connect to a pod, watching the link for drops. ``ValueError`` if libzmq refuses."""
        sock = self._sub_socket()
        try:
            sock.connect(spec.endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise ValueError(f"cannot connect to {spec.endpoint}: {exc}") from exc
        conn = Conn(spec=spec, socket=sock)
        self._add(sock, conn)
        conn.monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._add(conn.monitor, Monitor(conn))
        with self.lock:
            self.conns[spec.endpoint] = conn
        return conn

    def redial_if_dropped(self, conn: Conn) -> bool:
        """libzmq reconnects by itself after an I/O error, but not after a protocol error (a
        message over ``max_message_bytes``, a peer speaking garbage), which would silently end
        the pod's subscription: so re-dial explicitly either way. True if it re-dialled."""
        monitor, sock = conn.monitor, conn.socket
        if monitor is None or sock is None or not disconnected(monitor):
            return False
        try:
            sock.disconnect(conn.spec.endpoint)
        except zmq.ZMQError:
            pass  # libzmq already forgot the endpoint (protocol error)
        sock.connect(conn.spec.endpoint)
        return True

    def _close_monitor(self, conn: Conn) -> None:
        monitor = conn.monitor
        if monitor is None:
            return
        self.poller.unregister(monitor)
        self.owners.pop(monitor, None)
        if conn.socket is not None:
            conn.socket.disable_monitor()
        monitor.close(linger=0)
        conn.monitor = None

    def disconnect(self, conn: Conn) -> None:
        self._close_monitor(conn)
        if conn.socket is not None:
            self._drop(conn.socket)
            conn.socket = None
        with self.lock:
            self.conns.pop(conn.spec.endpoint, None)

    def open_dealer(self, pod: str, endpoint: str, start_seq: int) -> None:
        """Replace the pod's DEALER by one that asked for ``start_seq`` onwards (``ZMQError``
        if that fails)."""
        assert self.ctx is not None
        self.close_dealer(pod)
        dealer = self.dealers[pod] = Dealer(pod, open_dealer(self.ctx, endpoint, start_seq, self.replay))
        self._add(dealer.socket, dealer)

    def close_dealer(self, pod: str) -> None:
        dealer = self.dealers.pop(pod, None)
        if dealer is not None:
            self._drop(dealer.socket)

    def close(self) -> None:
        for dealer in list(self.dealers.values()):
            dealer.socket.close(linger=0)
        for conn in list(self.conns.values()):
            self._close_monitor(conn)
            if conn.socket is not None:
                conn.socket.close(linger=0)
                conn.socket = None
        if self._bind_socket is not None:
            self._bind_socket.close(linger=0)
            self._bind_socket = None
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None
        self.mailbox.close()
