"""Reaching a device over TVM RPC: addresses, a direct server or a tracker and key, timeouts, the device's
architecture. Deploying (edgeq.deploy.rpc) and tuning on the device (schedules.tune) both connect through it.

A TVM RPC server runs whatever is uploaded to it, without authentication: edgeq connects to loopback
unless the user names another address.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from .errors import EdgeqError, one_line

_ARCH_OF_TRIPLE = {"aarch64": "aarch64", "arm64": "aarch64", "x86_64": "x86_64", "arm": "arm", "armv7": "arm"}


def parse_address(text: str) -> tuple[str, int]:
    """'HOST:PORT' (or ':PORT' / 'PORT' for loopback) -> (host, port)."""
    host, _, port = text.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 < number < 65536:
        raise EdgeqError(f"bad address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9090")
    return host or "127.0.0.1", number


def with_timeout(seconds: float, what: str, fn, *args):
    """Call fn in a helper thread; a call that outlives `seconds` becomes an EdgeqError (it is abandoned)."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn(*args)
        except BaseException as e:  # handed to the caller's thread
            result["error"] = e

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise EdgeqError(f"{what} timed out after {seconds:g} s")
    if "error" in result:
        raise result["error"]
    return result.get("value")


@dataclass
class Device:
    """How to reach a device: a direct RPC server or a tracker + key."""

    rpc: str | None = None
    tracker: str | None = None
    key: str | None = None
    timeout: float = 60.0

    def __post_init__(self):
        if bool(self.rpc) == bool(self.tracker):
            raise EdgeqError("name the device with either --rpc HOST:PORT or --tracker HOST:PORT --key KEY")
        if self.tracker and not self.key:
            raise EdgeqError("--tracker needs --key (the device key the server registered with)")

    @property
    def name(self) -> str:
        return self.rpc if self.rpc else f"{self.key}@{self.tracker}"

    def connect(self):
        """An RPC session, or a one-line EdgeqError saying why there is none."""
        from tvm import rpc

        if self.rpc:
            host, port = parse_address(self.rpc)
            try:
                return with_timeout(self.timeout, f"connecting to {host}:{port}", rpc.connect, host, port, "",
                                    int(self.timeout) * 10)
            except RuntimeError as e:
                raise EdgeqError(f"cannot connect to {host}:{port}: {_connection_reason(e)} "
                                 "(is an RPC server running there? `edgeq device emulate rpi4` starts one)") from None
        host, port = parse_address(self.tracker)
        keys = tracker_keys(self.tracker, self.timeout)
        if self.key not in keys:
            raise EdgeqError(f"tracker {host}:{port} has no device registered under key {self.key!r} "
                             f"(keys: {', '.join(sorted(keys)) or 'none'})")
        try:
            tracker = rpc.connect_tracker(host, port)
            return with_timeout(self.timeout, f"waiting for a free {self.key!r} device from tracker {host}:{port}",
                                tracker.request, self.key, 1, int(self.timeout) * 10, 1)
        except RuntimeError as e:
            raise EdgeqError(f"tracker {host}:{port} gave no {self.key!r} device: {_connection_reason(e)}") from None


def _connection_reason(error: Exception) -> str:
    text = one_line(error, limit=10_000)
    if "Connect to" in text and "failed" in text or "refused" in text.lower():
        return "connection refused"
    return text.split("Check failed:")[-1].strip()[-200:]


def tracker_keys(tracker: str, timeout: float = 10.0) -> dict[str, dict]:
    """{key: {"free": n, "pending": n}} of the devices a tracker knows."""
    from tvm import rpc

    host, port = parse_address(tracker)
    try:
        summary = with_timeout(timeout, f"asking tracker {host}:{port}", lambda: rpc.connect_tracker(host, port).summary())
    except (OSError, RuntimeError) as e:
        raise EdgeqError(f"cannot reach tracker {host}:{port}: {one_line(e, 200)}") from None
    return dict(summary.get("queue_info", {}))


def remote_arch(session) -> str:
    """The device's CPU architecture, as the names in a manifest's `arch`."""
    triple = session.get_function("target.llvm_get_system_triple")()
    return _ARCH_OF_TRIPLE.get(triple.split("-")[0], triple.split("-")[0])
