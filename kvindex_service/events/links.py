"""The subscriber's sockets: SUB links to pods, replay DEALERs, and the wake-up mailbox.

``Links`` owns the context, the poller and every socket. It is used from the loop thread only
(or from ``Subscriber.start`` before the loop exists), except ``Mailbox.call``/``wake``, which
other threads use to run work on the loop thread: ZMQ sockets are not thread-safe, so the
thread that polls them is the only one that touches them.
"""

from __future__ import annotations

import resource
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from kvindex_service.events.admission import SubscribeError
from kvindex_service.events.replay import ReplaySettings, build_request
from kvindex_service.events.topic import PodEndpoint

__all__ = ["Conn", "Dealer", "Links", "Mailbox", "Monitor", "Reconnect", "disconnected", "open_dealer", "sub_socket"]

Ctx = zmq.Context[zmq.Socket[bytes]]
Sock = zmq.Socket[bytes]


@dataclass(eq=False, slots=True)
class Conn:
    """A connect-mode SUB socket and the pod ids seen through it."""

    spec: PodEndpoint
    socket: Sock | None = None
    monitor: Sock | None = None
    """PAIR receiving the SUB's disconnect events (see ``Links.on_dropped``)."""
    pods: set[str] = field(default_factory=set)
    heard: bool = False
    """A message arrived since the link was last dialled (resets the re-dial backoff)."""
    backoff: float = 0.0
    """Delay before the next re-dial after a drop (seconds; doubles up to the cap)."""
    redial_at: float | None = None
    """When the dropped link is dialled again (monotonic), or None."""


@dataclass(frozen=True, slots=True)
class Reconnect:
    """Reconnect backoff of every SUB and DEALER socket: libzmq's own (``ZMQ_RECONNECT_IVL``,
    doubling up to ``ZMQ_RECONNECT_IVL_MAX``) and the subscriber's explicit re-dials."""

    ivl: float = 0.1
    ivl_max: float = 5.0

    def __post_init__(self) -> None:
        if not 0 < self.ivl <= self.ivl_max:
            raise ValueError("reconnect intervals must satisfy 0 < reconnect_ivl <= reconnect_ivl_max")

    def apply(self, sock: Sock) -> None:
        sock.setsockopt(zmq.RECONNECT_IVL, max(1, round(self.ivl * 1000)))
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, max(1, round(self.ivl_max * 1000)))


@dataclass(eq=False, slots=True)
class Monitor:
    conn: Conn


@dataclass(eq=False, slots=True)
class Dealer:
    """The DEALER of one attempt of a pod's replay."""

    pod: str
    socket: Sock


def sub_socket(
    ctx: Ctx, *, rcvhwm: int, max_message_bytes: int, prefix: bytes, reconnect: Reconnect = Reconnect()
) -> Sock:
    """A configured SUB socket; ``SubscribeError`` if libzmq cannot make one (out of sockets or
    file descriptors). Closed again if configuring it fails."""
    try:
        sock = ctx.socket(zmq.SUB)
    except zmq.ZMQError as exc:
        raise SubscribeError(f"cannot create a ZMQ socket: {exc}") from exc
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        reconnect.apply(sock)
        sock.setsockopt(zmq.SUBSCRIBE, prefix)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


def open_dealer(
    ctx: Ctx, endpoint: str, start_seq: int, settings: ReplaySettings, reconnect: Reconnect = Reconnect()
) -> Sock:
    """A fresh DEALER that has asked ``endpoint`` for ``start_seq`` onwards (a fresh socket per
    attempt, so late replies to an abandoned attempt never reach the next one)."""
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, settings.rcvhwm)
        sock.setsockopt(zmq.MAXMSGSIZE, settings.max_message_bytes)
        reconnect.apply(sock)
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

    def __init__(
        self,
        *,
        lock: threading.Lock,
        rcvhwm: int,
        replay: ReplaySettings,
        prefix: bytes,
        timeout: float,
        reconnect: Reconnect = Reconnect(),
        max_pods: int = 1024,
    ):
        self.lock = lock
        self.rcvhwm = rcvhwm
        self.replay = replay
        self.prefix = prefix
        self.reconnect = reconnect
        self.max_pods = max_pods
        self.ctx: Ctx | None = None
        self.poller = zmq.Poller()
        self.owners: dict[Any, Owner] = {}
        self.mailbox = Mailbox(timeout)
        self.bound_endpoint: str | None = None
        self._bind_socket: Sock | None = None
        self.conns: dict[str, Conn] = {}
        self.dealers: dict[str, Dealer] = {}

    def open(self, bind: str | None) -> None:
        """Create the context and the mailbox, and bind (``OSError`` if the bind fails).

        libzmq caps a context at 1023 sockets by default, and each connect-mode pod takes
        three (SUB, monitor PAIR and libzmq's end of it) plus a DEALER during a replay: the
        cap is raised to fit ``max_pods``, and so is the soft file-descriptor limit (up to
        the hard one), so that ``max_pods`` subscriptions fit before anything runs out."""
        need = _SOCKETS_PER_POD * self.max_pods + _SPARE_SOCKETS
        _raise_nofile(need * _FDS_PER_SOCKET)
        self.ctx = zmq.Context()
        self.ctx.set(zmq.MAX_SOCKETS, min(need, self.ctx.get(zmq.SOCKET_LIMIT)))
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
            self.ctx,
            rcvhwm=self.rcvhwm,
            max_message_bytes=self.replay.max_message_bytes,
            prefix=self.prefix,
            reconnect=self.reconnect,
        )

    def _add(self, sock: Sock, owner: Owner) -> None:
        self.poller.register(sock, zmq.POLLIN)
        self.owners[sock] = owner

    def _drop(self, sock: Sock) -> None:
        self.poller.unregister(sock)
        self.owners.pop(sock, None)
        sock.close(linger=0)

    def connect(self, spec: PodEndpoint) -> Conn:
        """SUB-connect to a pod, watching the link for drops. ``ValueError`` if libzmq refuses
        the endpoint, ``SubscribeError`` if it runs out of sockets; either way every socket
        made on the way is closed again and nothing is left registered."""
        sock = self._sub_socket()
        monitor: Sock | None = None
        try:
            try:
                sock.connect(spec.endpoint)
            except zmq.ZMQError as exc:
                raise ValueError(f"cannot connect to {spec.endpoint}: {exc}") from exc
            try:
                monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            except zmq.ZMQError as exc:
                raise SubscribeError(f"cannot watch the link to {spec.endpoint}: {exc}") from exc
        except BaseException:
            if monitor is not None:
                monitor.close(linger=0)
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            sock.close(linger=0)
            raise
        conn = Conn(spec=spec, socket=sock, monitor=monitor, backoff=self.reconnect.ivl)
        self._add(sock, conn)
        self._add(monitor, Monitor(conn))
        with self.lock:
            self.conns[spec.endpoint] = conn
        return conn

    def on_dropped(self, conn: Conn, now: float) -> bool:
        """The monitor reported a dropped link: hang up and schedule a re-dial after the
        link's backoff (doubling per drop without a message in between, up to the cap).

        libzmq reconnects by itself after an I/O error, but not after a protocol error (a
        message over ``max_message_bytes``, a peer speaking garbage), which would silently end
        the pod's subscription: so the subscriber re-dials explicitly either way, but never
        at once, so that a peer that accepts and closes cannot make it spin. True if a
        re-dial was scheduled."""
        monitor, sock = conn.monitor, conn.socket
        if monitor is None or sock is None or not disconnected(monitor):
            return False
        if conn.heard:
            conn.backoff = self.reconnect.ivl
        conn.heard = False
        try:
            sock.disconnect(conn.spec.endpoint)
        except zmq.ZMQError:
            pass  # libzmq already forgot the endpoint (protocol error)
        if conn.redial_at is None:
            conn.redial_at = now + conn.backoff
            conn.backoff = min(conn.backoff * 2, self.reconnect.ivl_max)
        return True

    def next_redial(self) -> float | None:
        due = [c.redial_at for c in self.conns.values() if c.redial_at is not None]
        return min(due) if due else None

    def redial_due(self, now: float) -> list[Conn]:
        """Dial again every dropped link whose backoff has passed; the links re-dialled."""
        done = []
        for conn in list(self.conns.values()):
            if conn.redial_at is None or conn.redial_at > now or conn.socket is None:
                continue
            conn.redial_at = None
            try:
                conn.socket.connect(conn.spec.endpoint)
            except zmq.ZMQError:
                conn.redial_at = now + conn.backoff
                continue
            done.append(conn)
        return done

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
        dealer = self.dealers[pod] = Dealer(
            pod, open_dealer(self.ctx, endpoint, start_seq, self.replay, self.reconnect)
        )
        self._add(dealer.socket, dealer)

    def close_dealer(self, pod: str) -> None:
        dealer = self.dealers.pop(pod, None)
        if dealer is not None:
            self._drop(dealer.socket)

    def close(self) -> None:
        """Close every socket and the context. ``ctx.destroy`` also closes any socket a
        failure path could have missed, so that terminating the context can never hang."""
        for dealer in list(self.dealers.values()):
            dealer.socket.close(linger=0)
        self.dealers.clear()
        for conn in list(self.conns.values()):
            self._close_monitor(conn)
            if conn.socket is not None:
                conn.socket.close(linger=0)
                conn.socket = None
        if self._bind_socket is not None:
            self._bind_socket.close(linger=0)
            self._bind_socket = None
        if self.ctx is not None:
            self.ctx.destroy(linger=0)
            self.ctx = None
        self.mailbox.close()


_SOCKETS_PER_POD = 4
_SPARE_SOCKETS = 64
_FDS_PER_SOCKET = 2
"""A socket's mailbox plus, roughly, its TCP connection."""


def _raise_nofile(want: int) -> None:
    """Raise the soft ``RLIMIT_NOFILE`` towards ``want`` (never above the hard limit, never
    down)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        pass  # not permitted here: the subscriber answers 503 when descriptors run out
