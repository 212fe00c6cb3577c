"""A small threaded TCP proxy for fault-injection tests: put it between the service and RabbitMQ or PostgreSQL,
`stop()` it to make the server "go away" (every open connection is cut, new ones are refused), `start()` it again
on the same port to bring the server back.

    proxy = TcpProxy(("127.0.0.1", 5672)).start()   # listens on 127.0.0.1:<free port>
    url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/vhost"
    proxy.stop()                                    # connections closed, connect() -> ECONNREFUSED
    proxy.start()                                   # same port again

Stdlib only; one accept thread plus two pump threads per connection. Not for production traffic.
"""
from __future__ import annotations

import socket
import threading
import time
from types import TracebackType

_CHUNK = 64 * 1024


class TcpProxy:
    def __init__(self, upstream: tuple[str, int], *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream = upstream
        self.host = host
        self.port = port  # 0: pick a free one on the first start, then keep it
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._sockets: set[socket.socket] = set()
        self._running = False
        self.connections_total = 0  # accepted connections since construction (for tests)

    # -- control ------------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._running

    def start(self, timeout: float = 10.0) -> TcpProxy:
        """Listen (again) on `self.port`. Retries the bind for a while if the port is still in TIME_WAIT use."""
        with self._lock:
            if self._running:
                return self
            deadline = time.monotonic() + timeout
            while True:
                listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    listener.bind((self.host, self.port))
                    break
                except OSError:
                    listener.close()
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            listener.listen(128)
            self.port = listener.getsockname()[1]
            self._listener = listener
            self._running = True
            self._accept_thread = threading.Thread(target=self._accept, args=(listener,),
                                                   name=f"proxy-accept-{self.port}", daemon=True)
            self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Refuse new connections and cut every open one (both sides see the connection drop)."""
        with self._lock:
            if not self._running:
                return
            self._running = False
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, set()
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        for sock in sockets:
            _kill(sock)
        if self._accept_thread is not None:
            self._accept_thread.join(5)
            self._accept_thread = None

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- plumbing -----------------------------------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # listener closed by stop()
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                _kill(client)
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if not self._running or listener is not self._listener:
                    _kill(client)
                    _kill(server)
                    return
                self._sockets.update((client, server))
                self.connections_total += 1
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), name=f"proxy-pump-{self.port}",
                                 daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(_CHUNK)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._sockets.discard(src)
                self._sockets.discard(dst)
            _kill(src)
            _kill(dst)


def _kill(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


__all__ = ["TcpProxy"]
