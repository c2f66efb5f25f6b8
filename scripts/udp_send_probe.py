"""What one UDP datagram costs the sender on this host, the floor under a fan-out packet
(docs/benchmarks.md, after section "fanout"):

    .venv/bin/python scripts/udp_send_probe.py

One socket sends a 82-byte datagram to each of N receiving sockets on loopback (as a worker
sends to its subscribers), 10 rounds: once with one `sendto` a datagram, once with
`sendmmsg` (Linux; 1,024 datagrams a call, through ctypes). Prints the sender's thread CPU
per datagram for each. On loopback the receiving side's kernel work (IP and UDP input,
queueing on the socket) runs in the sender's system call and is counted with it."""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.bench.fanout import loopback_sockets  # noqa: E402


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.c_void_p),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p),
                ("controllen", ctypes.c_size_t), ("flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", _Msghdr), ("len", ctypes.c_uint)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--receivers", type=int, default=5000, help="receiving sockets")
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()
    n = args.receivers
    rx = loopback_sockets(n)  # the bench's own receiving sockets
    ports = [s.getsockname()[1] for s in rx]
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.setblocking(False)
    data = b"\x80\x60" + bytes(80)

    def drain() -> None:
        for s in rx:
            try:
                while True:
                    s.recv(2048)
            except BlockingIOError:
                pass

    cpu = 0.0
    for _ in range(args.rounds):
        t = time.thread_time()
        for port in ports:
            tx.sendto(data, ("127.0.0.1", port))
        cpu += time.thread_time() - t
        drain()
    print(f"sendto:   {cpu / (args.rounds * n) * 1e6:.2f} us of sender CPU per datagram ({n} receivers)")

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    addrs = ctypes.create_string_buffer(16 * n)
    for i, port in enumerate(ports):
        sa = struct.pack("<HH4s8x", socket.AF_INET, socket.htons(port), socket.inet_aton("127.0.0.1"))
        ctypes.memmove(ctypes.addressof(addrs) + 16 * i, sa, 16)
    buf = ctypes.create_string_buffer(data, len(data))
    iovs = (_Iovec * n)()
    msgs = (_Mmsghdr * n)()
    for i in range(n):
        iovs[i].base, iovs[i].len = ctypes.addressof(buf), len(data)
        msgs[i].hdr.name, msgs[i].hdr.namelen = ctypes.addressof(addrs) + 16 * i, 16
        msgs[i].hdr.iov, msgs[i].hdr.iovlen = ctypes.addressof(iovs[i]), 1
    cpu = 0.0
    for _ in range(args.rounds):
        t = time.thread_time()
        off = 0
        while off < n:
            k = min(1024, n - off)
            sent = libc.sendmmsg(tx.fileno(), ctypes.byref(msgs, off * ctypes.sizeof(_Mmsghdr)), k, 0)
            if sent != k:
                raise OSError(ctypes.get_errno(), f"sendmmsg sent {sent} of {k}")
            off += k
        cpu += time.thread_time() - t
        drain()
    print(f"sendmmsg: {cpu / (args.rounds * n) * 1e6:.2f} us of sender CPU per datagram ({n} receivers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
