"""A bandwidth-limited link for benchmarks: a private network namespace whose loopback ``tc`` shapes.

``enter(link)`` moves this process into a new network namespace (``unshare(CLONE_NEWNET)``,
what ``unshare -n`` does), brings its loopback up and shapes it with ``tc``: a ``tbf`` at the
link's rate, under a ``netem`` delay when one is given. Processes started afterwards (gloo ranks
on ``127.0.0.1``) inherit the namespace, so all their traffic crosses that one shaped device and
nothing else shares it. It needs root or ``CAP_NET_ADMIN``; without it ``enter`` returns the
reason in one line and the caller runs unshaped.

The loopback is one device for every rank: a rate of R bits/s is shared by all of them (both
directions of every connection cross it once). Two ranks on it move what two machines on
full-duplex links of R/2 each move; a ring all-reduce of B bytes puts ``2 (N-1) B`` bytes on it.

Bytes on the wire are read from ``/proc/thread-self/net/dev`` (the reading thread's namespace):
``/sys/class/net`` shows the devices of the namespace that mounted ``/sys``, not this one's.

Shell use (``launch/slow_link.sh``): ``unshare -n sh -c 'python -m dropgrad_dist.bench.link 1gbit && ...'``
shapes the namespace the command runs in; it refuses the machine's own namespace.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

__all__ = ["Link", "enter", "lo_tx_bytes", "parse_link", "private_namespace", "shape_loopback"]

CLONE_NEWNET = 0x40000000
_INIT_NET_INODE = 0xEFFFFFF9  # PROC_NET_INIT_INO: the inode of the kernel's initial network namespace
_RATE = re.compile(r"^(?P<value>\d+(?:\.\d+)?)(?P<unit>[kmg]?)(?:bit|bps)?$")
_DELAY = re.compile(r"^(?P<value>\d+(?:\.\d+)?)(?P<unit>us|ms|s)$")
_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}
_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
UNSHAPED = ("none", "unshaped")


@dataclass(frozen=True)
class Link:
    """A loopback link: ``rate_bit_s`` bits per second shared by all ranks (None: unshaped), one-way ``delay_s``."""

    spec: str
    rate_bit_s: float | None
    delay_s: float = 0.0

    @property
    def rate_bytes_s(self) -> float | None:
        return None if self.rate_bit_s is None else self.rate_bit_s / 8.0

    def tc_commands(self) -> list[list[str]]:
        """The ``tc`` commands that shape ``lo``: ``netem delay`` at the root (if any), ``tbf`` below it.

        ``tbf``'s bucket holds at least two 64 KiB loopback packets and 1 ms at the rate (a bucket
        smaller than a packet would drop it); its queue holds 50 ms at the rate, so TCP sees
        queueing, not loss.
        """
        commands: list[list[str]] = []
        parent = ["root"]
        if self.delay_s > 0:
            commands.append(["tc", "qdisc", "add", "dev", "lo", "root", "handle", "1:", "netem",
                             "delay", f"{self.delay_s * 1e6:.0f}us", "limit", "100000"])
            parent = ["parent", "1:1"]
        if self.rate_bit_s is not None:
            burst = max(128 * 1024, int(self.rate_bit_s / 8 * 1e-3))
            commands.append(["tc", "qdisc", "add", "dev", "lo", *parent, "handle", "10:", "tbf",
                             "rate", f"{self.rate_bit_s:.0f}bit", "burst", str(burst), "latency", "50ms"])
        return commands


def parse_link(text: str) -> Link:
    """``RATE[,DELAY]``: ``1gbit``, ``500mbit``, ``10gbit,1ms``; ``none``/``unshaped`` (a namespace, no rate).

    RATE is bits per second with an optional k/m/g prefix and ``bit`` suffix; DELAY a one-way
    delay in ``us``, ``ms`` or ``s``.

    Raises:
        ValueError: naming ``--link`` and the accepted forms.
    """
    if not isinstance(text, str):
        raise TypeError(f"--link must be a string like '1gbit' or '10gbit,1ms', got {type(text).__name__}")
    rate_text, _, delay_text = text.strip().lower().partition(",")
    usage = f"--link must be RATE[,DELAY] like '1gbit', '500mbit' or '10gbit,1ms' (or 'none'), got {text!r}"
    if rate_text in UNSHAPED:
        rate = None
    else:
        match = _RATE.match(rate_text)
        if match is None or float(match["value"]) <= 0:
            raise ValueError(usage)
        rate = float(match["value"]) * _UNITS[match["unit"]]
    delay = 0.0
    if delay_text:
        match = _DELAY.match(delay_text)
        if match is None:
            raise ValueError(usage)
        delay = float(match["value"]) * _SECONDS[match["unit"]]
    return Link(text.strip(), rate, delay)


def private_namespace() -> bool:
    """Whether this thread's network namespace differs from PID 1's (the machine's, or the container's).

    Where PID 1's namespace cannot be read (a sandbox), the kernel's initial namespace stands in
    for it: its inode number is fixed (``PROC_NET_INIT_INO``).
    """
    try:
        mine = os.stat("/proc/thread-self/ns/net").st_ino
    except OSError:
        return False
    try:
        return mine != os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return mine != _INIT_NET_INODE


def lo_tx_bytes() -> int:
    """Bytes the loopback of this thread's network namespace has transmitted."""
    with open("/proc/thread-self/net/dev") as f:
        for line in f:
            name, _, fields = line.partition(":")
            if name.strip() == "lo":
                return int(fields.split()[8])
    raise RuntimeError("no 'lo' in /proc/thread-self/net/dev")


def _run(command: list[str]) -> str | None:
    """Run ``command``; None on success, else one line saying why not."""
    if shutil.which(command[0]) is None:
        return f"'{command[0]}' is not installed"
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode == 0:
        return None
    message = (done.stderr or done.stdout).strip().splitlines()
    return f"'{' '.join(command)}' failed: {message[0] if message else f'exit {done.returncode}'}"


def shape_loopback(link: Link) -> tuple[Link | None, str | None]:
    """Bring ``lo`` up and shape it in this (private) namespace.

    Returns the link in place and None, or what could be applied and why the rest could not:
    without ``netem`` (a kernel without ``sch_netem``) the rate alone; without ``tbf`` an
    unshaped loopback; None if ``lo`` is not up (or this is the machine's own namespace).
    """
    unshaped = Link("unshaped", None)
    if not private_namespace():
        return None, "refusing to shape the loopback of the machine's own network namespace (others use it)"
    reason = _run(["ip", "link", "set", "lo", "up"])
    if reason is not None:
        return None, reason
    reason = _apply(link)
    if reason is None or link.delay_s == 0 or link.rate_bit_s is None:
        return (link, None) if reason is None else (unshaped, reason)
    _run(["tc", "qdisc", "del", "dev", "lo", "root"])
    rate_only = Link(link.spec.partition(",")[0], link.rate_bit_s)
    if _apply(rate_only) is None:
        return rate_only, f"no delay applied: {reason}"
    return unshaped, reason


def _apply(link: Link) -> str | None:
    for command in link.tc_commands():
        reason = _run(command)
        if reason is not None:
            return reason
    return None


def enter(link: Link) -> tuple[Link | None, str | None]:
    """Move this thread into a new network namespace with ``lo`` shaped as ``link``.

    Returns the link in place (None: still in the original namespace) and None, or with the
    reason in one line why the link is not (wholly) what was asked. Without a namespace the
    caller runs unshaped on the machine's loopback. Call it from the main thread before
    starting the ranks: processes it starts afterwards inherit the namespace.
    """
    if not sys.platform.startswith("linux"):
        return None, f"a shaped link needs Linux network namespaces (this is {sys.platform})"
    libc = ctypes.CDLL(None, use_errno=True)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if libc.unshare(CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            why = "needs root or CAP_NET_ADMIN" if code == errno.EPERM else os.strerror(code)
            return None, f"unshare(CLONE_NEWNET) failed: {errno.errorcode.get(code, code)} ({why})"
        applied, reason = shape_loopback(link)
        if applied is None:
            libc.setns(original, CLONE_NEWNET)  # no loopback there: back on the machine's
        return applied, reason
    finally:
        os.close(original)


def main(argv: list[str] | None = None) -> int:
    """``python -m dropgrad_dist.bench.link RATE[,DELAY]``: shape the private namespace this runs in."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m dropgrad_dist.bench.link RATE[,DELAY]   (inside 'unshare -n')", file=sys.stderr)
        return 2
    try:
        link = parse_link(args[0])
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    link, reason = shape_loopback(link)
    if reason is not None:
        print(f"[link] {reason}", file=sys.stderr)
        if link is None or link.rate_bit_s is None:
            return 1
    shown = "unshaped" if link.rate_bit_s is None else f"{link.rate_bit_s / 1e9:g} Gbit/s"
    print(f"[link] loopback of this namespace: {shown}, one-way delay {link.delay_s * 1e3:g} ms", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
