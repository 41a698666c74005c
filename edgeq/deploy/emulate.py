"""An emulated Raspberry Pi: the stock TVM RPC server running on an arm64 Debian rootfs under qemu-user.

Why this shape:
- The rootfs is built without emulating anything (debootstrap --foreign only downloads; the .debs are unpacked
  on the host with dpkg-deb; TVM's aarch64 wheels come from the host's pip with --platform), so a cold build
  takes about a minute instead of the ~7 minutes of an emulated second stage. It is cached as a zstd tarball
  outside the repository and restored in seconds.
- The server runs as `qemu-aarch64-static -L ROOTFS ROOTFS/usr/bin/python3 -c LAUNCHER`: no binfmt_misc
  registration, no chroot and no mounts, so nothing global on the host changes, it works in unprivileged
  containers, and deleting the cache can never walk into a mounted /proc. The launcher calls the stock server's
  own entry point in-process, because `python -m tvm.exec.rpc_server` re-execs python for its worker, which an
  aarch64 binary can only do with binfmt registered. QEMU_CPU makes qemu enforce the board's core (a Pi 4
  has no dotprod: `sdot` raises SIGILL under cortex-a72, runs under cortex-a76).
- Servers and trackers are started in their own session so they outlive the caller; a JSON state file in the
  cache remembers them, so `stop()` from another process (the CLI) can find and kill their process groups.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from targets.atomic import write_atomic

from ..errors import EdgeqError

BOARDS = {"rpi3": "cortex-a53", "rpi4": "cortex-a72", "rpi5": "cortex-a76"}  # board -> QEMU_CPU
SUITE = "bookworm"  # Debian release of the rootfs; its python3 (3.11) must have cp311 wheels of TVM
HOST = "127.0.0.1"  # the RPC server executes whatever it is sent: never expose it beyond loopback
SITE = "opt/tvm-site"  # where the aarch64 wheels go inside the rootfs (PYTHONPATH)
HOST_PACKAGES = {"qemu-aarch64-static": "qemu-user-static", "debootstrap": "debootstrap", "zstd": "zstd"}

# Runs inside the emulated python: the body of the stock server (the part `rpc.Server` would run in its
# re-exec'd popen worker), bound to exactly one port, kept in the foreground.
_LAUNCHER = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
from tvm.rpc.server import PopenRPCServerState, _popen_start_rpc_server
host, port, tracker, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
tracker_addr = (tracker.rsplit(":", 1)[0], int(tracker.rsplit(":", 1)[1])) if tracker else None
_popen_start_rpc_server(host, port, port + 1, tracker_addr=tracker_addr, key=key)
logging.info("edgeq: rpc server listening on %s:%d", host, port)
PopenRPCServerState.current.thread.join()
"""
_SERVER_MARK = b"_popen_start_rpc_server"  # in /proc/PID/cmdline: guards against killing a recycled pid
_TRACKER_MARK = b"tvm.exec.rpc_tracker"
_children: dict[int, subprocess.Popen] = {}  # processes this interpreter started, so they can be reaped


@dataclass
class EmulatedDevice:
    board: str
    host: str
    port: int
    pid: int
    tracker: str | None = None
    key: str | None = None


# ---------------------------------------------------------------- cache, locks, state


def cache_dir() -> Path:
    """EDGEQ_CACHE, else /var/cache/edgeq, else ~/.cache/edgeq: the rootfs is ~600 MB, never inside the repo."""
    candidates = [Path(os.environ["EDGEQ_CACHE"])] if os.environ.get("EDGEQ_CACHE") else [
        Path("/var/cache/edgeq"), Path.home() / ".cache" / "edgeq"]
    for path in candidates:
        with contextlib.suppress(OSError):
            path.mkdir(parents=True, exist_ok=True)
            if os.access(path, os.W_OK):
                return path
    raise EdgeqError(f"no writable cache directory ({', '.join(map(str, candidates))}); set EDGEQ_CACHE")


@contextlib.contextmanager
def _locked(name: str):
    """An exclusive flock, so concurrent edgeq processes neither build the rootfs twice nor lose state updates."""
    with open(cache_dir() / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _state_path() -> Path:
    return cache_dir() / "devices.json"


def _load_state() -> dict:
    try:
        state = json.loads(_state_path().read_text())
    except (OSError, ValueError):
        state = {}
    return {"devices": state.get("devices", []), "trackers": state.get("trackers", [])}


def _save_state(state: dict) -> None:
    write_atomic(_state_path(), json.dumps(state, indent=1) + "\n")


def _alive(pid: int, mark: bytes) -> bool:
    """Running (not a zombie) and still the process we started, not a recycled pid.

    A child of this interpreter is asked directly: its pid cannot be recycled before we reap it, and right after
    the start qemu's /proc/PID/cmdline does not always show the mark yet (a just-started board was reported dead
    while its log said it was listening)."""
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and mark in cmdline


def _live_state() -> dict:
    """The state with dead entries dropped (and written back if any were)."""
    state = _load_state()
    live = {"devices": [d for d in state["devices"] if _alive(d["pid"], _SERVER_MARK)],
            "trackers": [t for t in state["trackers"] if _alive(t["pid"], _TRACKER_MARK)]}
    if live != state:
        _save_state(live)
    return live


def _log_path(name: str) -> Path:
    (cache_dir() / "logs").mkdir(exist_ok=True)
    return cache_dir() / "logs" / f"{name}.log"


def _last_line(path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        if lines:
            return lines[-1][-200:]
    return "(empty)"


# ---------------------------------------------------------------- host prerequisites


_apt_updated = False


def _ensure_host_tools(tools: list[str]) -> None:
    """Install the missing Debian packages when we can (root + apt-get); otherwise say exactly what to run."""
    global _apt_updated
    missing = sorted({HOST_PACKAGES[t] for t in tools if shutil.which(t) is None})
    if not missing:
        return
    install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise EdgeqError(f"device emulation needs the packages {', '.join(missing)}; "
                         f"install them with: sudo {' '.join(install)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = _log_path("apt-get")
    _stage(True, f"installing {' '.join(missing)} with apt-get")
    for step in ([["apt-get", "update"]] if not _apt_updated else []) + [install]:
        with open(log, "w") as out:
            if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env=env).returncode:
                raise EdgeqError(f"`{' '.join(step)}` failed: {_last_line(log)} (log: {log})")
        _apt_updated = True


# ---------------------------------------------------------------- the rootfs


def _versions() -> tuple[str, str]:
    """The device gets exactly the host's TVM and tvm-ffi: the RPC protocol and module format must match."""
    import tvm

    return tvm.__version__, importlib.metadata.version("apache-tvm-ffi")


def _mirror() -> str:
    """A Debian mirror for SUITE from apt's own configuration (the host may only reach its usual mirror)."""
    if os.environ.get("EDGEQ_DEBIAN_MIRROR"):
        return os.environ["EDGEQ_DEBIAN_MIRROR"]
    sources = Path("/etc/apt/sources.list.d")
    for path in sorted(sources.glob("*.sources")) if sources.is_dir() else []:
        for stanza in path.read_text(errors="replace").split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
            if SUITE in fields.get("Suites", "").split() and fields.get("URIs"):
                return fields["URIs"].split()[0]
    for path in [Path("/etc/apt/sources.list"), *sorted(sources.glob("*.list"))]:
        with contextlib.suppress(OSError):
            m = re.search(rf"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{SUITE}\s", path.read_text(), re.M)
            if m:
                return m.group(1)
    return "http://deb.debian.org/debian"


def _stage(progress: bool, text: str) -> float:
    if progress:
        print(f"edgeq: {text}", file=sys.stderr, flush=True)
    return time.monotonic()


def _run(cmd: list[str], what: str, log: Path, **kwargs) -> None:
    with open(log, "w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kwargs).returncode
    if code:
        raise EdgeqError(f"building the arm64 rootfs failed at {what}: {_last_line(log)} (log: {log})")


def _build_rootfs(root: Path, tvm_version: str, ffi_version: str, progress: bool) -> None:
    """debootstrap's download stage, then unpack and install on the host: nothing runs emulated."""
    from tqdm import tqdm

    log = _log_path("rootfs-build")
    t = _stage(progress, f"[1/4] debootstrap --foreign {SUITE} arm64 (downloading ~100 packages)")
    keyring = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
    _run(["debootstrap", "--arch=arm64", "--foreign", "--variant=minbase", "--include=python3",
          *([f"--keyring={keyring}"] if keyring.exists() else []), SUITE, str(root), _mirror()],
         "step 1/4 (debootstrap --foreign)", log)

    _stage(progress, f"[2/4] unpacking the packages on the host ({time.monotonic() - t:.0f} s so far)")
    debs = sorted((root / "var/cache/apt/archives").glob("*.deb"))
    for deb in tqdm(debs, desc="dpkg-deb -x", unit="deb", disable=not progress, leave=False):
        # tar's --keep-directory-symlink keeps the merged-/usr links (/bin -> usr/bin) that debootstrap made
        with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as deb_tar:
            untar = subprocess.run(["tar", "-x", "--keep-directory-symlink", "-C", str(root)], stdin=deb_tar.stdout)
        if deb_tar.returncode or untar.returncode:
            raise EdgeqError(f"building the arm64 rootfs failed at step 2/4 (unpacking {deb.name})")
    for name in ("passwd", "group"):  # normally written by base-passwd's postinst, which never runs here
        if not (root / "etc" / name).exists():
            shutil.copy(root / f"usr/share/base-passwd/{name}.master", root / "etc" / name)
    shutil.rmtree(root / "debootstrap", ignore_errors=True)
    for deb in debs:
        deb.unlink()

    pyver = os.readlink(root / "usr/bin/python3").removeprefix("python")  # "3.11"
    _stage(progress, f"[3/4] pip: apache-tvm=={tvm_version} apache-tvm-ffi=={ffi_version} for aarch64 "
                     f"cp{pyver.replace('.', '')} ({time.monotonic() - t:.0f} s so far)")
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-warn-conflicts",
          "--target", str(root / SITE), "--platform", "manylinux_2_28_aarch64", "--python-version", pyver,
          "--implementation", "cp", "--abi", f"cp{pyver.replace('.', '')}", "--only-binary=:all:",
          f"apache-tvm=={tvm_version}", f"apache-tvm-ffi=={ffi_version}", "psutil", "cloudpickle", "tornado"],
         f"step 3/4 (pip install of apache-tvm=={tvm_version} for aarch64)", log)

    if f"{sys.version_info.major}.{sys.version_info.minor}" == pyver:
        # Debian's postinst would byte-compile the stdlib; doing it here (same bytecode version) instead of at
        # every first start under emulation saves the emulated server several seconds.
        _stage(progress, "[3/4] byte-compiling the standard library on the host")
        _run([sys.executable, "-m", "compileall", "-q", "-j0", str(root / f"usr/lib/python{pyver}")],
             "step 3/4 (compileall)", log)


def ensure_rootfs(progress: bool = False) -> Path:
    """Build or restore the cached arm64 Debian rootfs with the aarch64 TVM wheels; returns its directory.

    The tarball is keyed by Debian suite and TVM (+ tvm-ffi) version, so upgrading TVM builds a new one. Both
    the tarball and the unpacked tree appear atomically (temp name, then rename), so an interrupted build
    leaves nothing that looks usable.
    """
    tvm_version, ffi_version = _versions()
    key = f"rootfs-{SUITE}-arm64-tvm{tvm_version}-ffi{ffi_version}"
    parent = cache_dir() / "rootfs"
    root, tarball = parent / key, cache_dir() / f"{key}.tar.zst"
    if (root / ".edgeq-complete").exists():
        return root
    with _locked("rootfs"):
        if (root / ".edgeq-complete").exists():  # another process finished it while we waited
            return root
        needs = ["zstd"] if tarball.exists() else ["zstd", "debootstrap"]
        _ensure_host_tools(needs)
        parent.mkdir(exist_ok=True)
        for stale in parent.glob(".tmp-*"):  # left by an interrupted build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
        try:
            tmp.chmod(0o755)
            start = time.monotonic()
            if tarball.exists():
                _stage(progress, f"restoring the arm64 rootfs from {tarball}")
                _run(["tar", "--zstd", "-xf", str(tarball), "-C", str(tmp)], "restoring the cached tarball",
                     _log_path("rootfs-restore"))
            else:
                _build_rootfs(tmp, tvm_version, ffi_version, progress)
                _stage(progress, f"[4/4] saving {tarball} ({time.monotonic() - start:.0f} s so far)")
                part = tarball.with_name(f".{tarball.name}.{os.getpid()}")
                try:
                    _run(["tar", "--zstd", "-cf", str(part), "-C", str(tmp), "."], "step 4/4 (tar --zstd)",
                         _log_path("rootfs-build"))
                    os.replace(part, tarball)
                finally:
                    part.unlink(missing_ok=True)
            (tmp / ".edgeq-complete").write_text(key + "\n")
            shutil.rmtree(root, ignore_errors=True)  # an incomplete leftover without the marker
            tmp.rename(root)
            _stage(progress, f"arm64 rootfs ready in {time.monotonic() - start:.1f} s: {root}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


# ---------------------------------------------------------------- processes


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # like the server: TIME_WAIT doesn't count
        try:
            s.bind((HOST, port))
        except OSError:
            return True
    return False


def _accepts(host: str, port: int, hello: bytes = b"") -> bool:
    """Whether something accepts connections there. An RPC server is sent a wrong magic number, which it just
    drops; a silent close would look like a network error to it and make it re-register with its tracker."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=2) as s:
        s.sendall(hello)
        return True
    return False


_SERVER_HELLO = struct.pack("<i", 0)


def _spawn(cmd: list[str], env: dict, log: Path) -> int:
    """Start detached (own session = own process group) with output to a log file; return the pid."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd="/", stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    _children[proc.pid] = proc
    return proc.pid


def _kill_group(pid: int, mark: bytes) -> None:
    """SIGTERM the whole process group (the server forks one child per RPC session), SIGKILL what remains."""
    if not _alive(pid, mark):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while _alive(pid, mark) and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    if pid in _children:
        _children.pop(pid).wait()


def _port_error(port: int, state: dict) -> EdgeqError:
    owner = [f"edgeq's emulated {d['board']}" for d in state["devices"] if d["port"] == port]
    owner += ["edgeq's RPC tracker" for t in state["trackers"] if t["port"] == port]
    return EdgeqError(f"port {port} on {HOST} is already used by {owner[0] if owner else 'another process'}; "
                      f"{'stop it first or ' if owner else ''}choose another port")


def start_tracker(port: int = 9190) -> int:
    """Start a loopback TVM RPC tracker (host python), or return the pid of the one edgeq already runs there."""
    with _locked("state"):
        state = _live_state()
        for t in state["trackers"]:
            if t["port"] == port:
                return t["pid"]
        if _port_taken(port):
            raise _port_error(port, state)
        log = _log_path(f"tracker-{port}")
        pid = _spawn([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", HOST, "--port", str(port),
                      "--port-end", str(port + 1)], dict(os.environ), log)
        state["trackers"].append({"port": port, "pid": pid})
        _save_state(state)
    deadline = time.monotonic() + 60
    while not _accepts(HOST, port):
        if not _alive(pid, _TRACKER_MARK) or time.monotonic() > deadline:
            _kill_group(pid, _TRACKER_MARK)
            raise EdgeqError(f"the RPC tracker on port {port} did not start: {_last_line(log)} (log: {log})")
        time.sleep(0.2)
    return pid


def _tracker_lists(tracker: str, key: str, port: int) -> bool:
    """True once the tracker has our server's address under `key` and a free slot for it."""
    from tvm import rpc

    host, tport = tracker.rsplit(":", 1)
    if not _accepts(host, int(tport)):  # connect_tracker itself would retry for a minute
        return False
    try:
        session = rpc.connect_tracker(host, int(tport))
        try:
            summary = session.summary()
        finally:
            session.close()
    except (OSError, RuntimeError):
        return False
    ours = any(s.get("key") == f"server:{key}" and s.get("addr", [None, None])[1] == port
               for s in summary.get("server_info", []))
    return ours and summary.get("queue_info", {}).get(key, {}).get("free", 0) > 0


def emulate(board: str = "rpi4", port: int = 9090, tracker: str | None = None, key: str | None = None,
            timeout: float = 180.0) -> EmulatedDevice:
    """Start (or reuse) the emulated board's RPC server on 127.0.0.1:port and return once it can be used.

    With `tracker` ("host:port") the server registers there under `key` (default: the board name) and this
    returns when the tracker lists it; without, when the port accepts connections. `timeout` covers the server
    start only (a cold rootfs build comes first and takes 1-3 minutes).
    """
    if board not in BOARDS:
        raise EdgeqError(f"unknown board {board!r}; known: {', '.join(BOARDS)}")
    if tracker is not None:
        key = key or board
        if not re.fullmatch(r"[^:\s]+:\d+", tracker):
            raise EdgeqError(f"tracker must be HOST:PORT, got {tracker!r}")
        if not _accepts(tracker.rsplit(":", 1)[0], int(tracker.rsplit(":", 1)[1])):
            raise EdgeqError(f"no RPC tracker answers at {tracker}; start one first")
    root = ensure_rootfs(progress=True)
    _ensure_host_tools(["qemu-aarch64-static"])
    wanted = EmulatedDevice(board, HOST, port, 0, tracker, key)
    log = _log_path(f"{board}-{port}")
    with _locked("state"):
        state = _live_state()
        same = [d for d in state["devices"] if {**d, "pid": 0} == asdict(wanted)]
        if same:
            device = EmulatedDevice(**same[0])
        else:
            if _port_taken(port):
                raise _port_error(port, state)
            env = {"PATH": "/usr/bin:/bin", "HOME": "/root", "PYTHONPATH": str(root / SITE),
                   "TMPDIR": str(root / "tmp"), "QEMU_CPU": BOARDS[board]}
            cmd = [shutil.which("qemu-aarch64-static"), "-L", str(root), str(root / "usr/bin/python3"),
                   "-c", _LAUNCHER, HOST, str(port), tracker or "", key or ""]
            device = EmulatedDevice(board, HOST, port, _spawn(cmd, env, log), tracker, key)
            state["devices"].append(asdict(device))
            _save_state(state)

    deadline = time.monotonic() + timeout
    while not (_tracker_lists(tracker, key, port) if tracker else _accepts(HOST, port, _SERVER_HELLO)):
        if not _alive(device.pid, _SERVER_MARK):
            child = _children.get(device.pid)
            code = f" with code {child.returncode}" if child is not None else ""
            raise EdgeqError(f"the emulated {board} on port {port} exited{code} while starting: "
                             f"{_last_line(log)} (log: {log})")
        if time.monotonic() > deadline:
            stop(port)
            raise EdgeqError(f"the emulated {board} did not {'register with ' + tracker if tracker else 'listen'} "
                             f"on port {port} within {timeout:.0f} s; last log line: {_last_line(log)} (log: {log})")
        time.sleep(0.5)
    return device


def running() -> list[EmulatedDevice]:
    """The emulated devices edgeq started that are still alive (dead entries are dropped from the state)."""
    with _locked("state"):
        return [EmulatedDevice(**d) for d in _live_state()["devices"]]


def stop(port: int | None = None) -> list[EmulatedDevice]:
    """Stop the emulated device or tracker on `port`, or (None) every one edgeq started; returns them.

    Trackers are reported as EmulatedDevice(board="tracker", ...). Each process group is killed, so the
    per-session children of the servers go too.
    """
    with _locked("state"):
        state = _live_state()
        stopped = [EmulatedDevice(**d) for d in state["devices"] if port in (None, d["port"])]
        stopped += [EmulatedDevice("tracker", HOST, t["port"], t["pid"]) for t in state["trackers"]
                    if port in (None, t["port"])]
        for device in stopped:  # devices before trackers, so no server sees its tracker vanish first
            _kill_group(device.pid, _TRACKER_MARK if device.board == "tracker" else _SERVER_MARK)
        _live_state()
    return stopped
