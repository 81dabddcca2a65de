#!/usr/bin/env python3
"""Holds many idle SMTP sessions open (for scripts/soak.sh).

Opens --sessions connections to --target in batches (spread over source addresses
127.0.0.2.. so each has its own ephemeral port range), reads each banner, sends EHLO and
waits for its 250: that session is "held". Writes {"phase": "holding", "held": N, ...} to
--status once the opening phase is over, then keeps every session alive (a NOOP every
--noop-every seconds) until --stop-file appears or --max-seconds pass. At the end every
session is asked NOOP once more ("alive" counts the 250 answers), QUIT is sent, and the
final JSON is written to --status and printed.

Loopback only; bounded in count and time. Standard library only.
"""

import argparse
import errno
import json
import os
import selectors
import socket
import sys
import time


class Sess:
    __slots__ = ("sock", "state", "buf", "want")

    def __init__(self, sock):
        self.sock = sock
        self.state = "connecting"  # -> banner -> ehlo -> held / failed
        self.buf = b""
        self.want = 0  # replies still expected (NOOP rounds)


def reply_complete(buf):
    """Returns (code, rest) when buf holds one whole reply, else None."""
    pos = 0
    while True:
        nl = buf.find(b"\n", pos)
        if nl < 0:
            return None
        line = buf[pos:nl]
        pos = nl + 1
        if len(line) >= 4 and line[3:4] == b"-":
            continue
        try:
            code = int(line[:3])
        except ValueError:
            code = 0
        return code, buf[pos:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--sessions", type=int, default=10000)
    ap.add_argument("--sources", type=int, default=10)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--open-seconds", type=float, default=180)
    ap.add_argument("--noop-every", type=float, default=60)
    ap.add_argument("--max-seconds", type=float, default=900)
    ap.add_argument("--stop-file", required=True)
    ap.add_argument("--status", required=True)
    a = ap.parse_args()
    if a.sessions > 60000:
        sys.exit("at most 60000 sessions")
    host, port = a.target.rsplit(":", 1)
    if not (host.startswith("127.") or host in ("::1", "[::1]", "localhost")):
        sys.exit("loopback targets only")
    target = (host, int(port))

    sel = selectors.DefaultSelector()
    sessions = []
    errors = {}
    t0 = time.time()

    def note(what):
        errors[what] = errors.get(what, 0) + 1

    def fail(s, what):
        if s.state != "failed":
            note(what)
            s.state = "failed"
            try:
                sel.unregister(s.sock)
            except (KeyError, ValueError):
                pass
            s.sock.close()

    def pump(timeout):
        for key, mask in sel.select(timeout):
            s = key.data
            if s.state == "connecting":
                err = s.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    fail(s, "connect: " + os.strerror(err))
                    continue
                s.state = "banner"
                sel.modify(s.sock, selectors.EVENT_READ, s)
                continue
            try:
                data = s.sock.recv(4096)
            except OSError as e:
                fail(s, "recv: " + (e.strerror or str(e)))
                continue
            if not data:
                fail(s, "closed by the guard in state " + s.state)
                continue
            s.buf += data
            while True:
                r = reply_complete(s.buf)
                if r is None:
                    break
                code, s.buf = r
                if s.state == "banner":
                    if code != 220:
                        fail(s, "banner %d" % code)
                        break
                    s.state = "ehlo"
                    s.sock.send(b"EHLO soak.test\r\n")
                elif s.state == "ehlo":
                    if code != 250:
                        fail(s, "EHLO %d" % code)
                        break
                    s.state = "held"
                elif s.state == "held" and s.want > 0:
                    s.want -= 1
                    if code != 250:
                        fail(s, "NOOP %d" % code)
                        break

    def count(state):
        return sum(1 for s in sessions if s.state == state)

    # Opening phase, in batches.
    opened = 0
    deadline = t0 + a.open_seconds
    while opened < a.sessions and time.time() < deadline:
        n = min(a.batch, a.sessions - opened)
        for i in range(n):
            src = "127.0.0.%d" % (2 + (opened + i) % a.sources)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.bind((src, 0))
                rc = sock.connect_ex(target)
            except OSError as e:
                note("socket: " + (e.strerror or str(e)))
                sock.close()
                continue
            s = Sess(sock)
            sessions.append(s)
            if rc not in (0, errno.EINPROGRESS):
                fail(s, "connect: " + os.strerror(rc))
                continue
            sel.register(sock, selectors.EVENT_WRITE, s)
        opened += n
        # Let this batch get its banners and EHLO replies before the next one.
        batch_deadline = time.time() + 10
        while time.time() < batch_deadline and any(
            s.state in ("connecting", "banner", "ehlo") for s in sessions[-n:]
        ):
            pump(0.05)
    while time.time() < deadline and any(
        s.state in ("connecting", "banner", "ehlo") for s in sessions
    ):
        pump(0.05)
    open_s = time.time() - t0
    status = {
        "phase": "holding",
        "attempted": opened,
        "held": count("held"),
        "open_seconds": round(open_s, 1),
        "errors": errors,
    }
    with open(a.status, "w") as f:
        json.dump(status, f)

    # Holding phase.
    next_noop = time.time() + a.noop_every
    end = t0 + a.max_seconds
    while not os.path.exists(a.stop_file) and time.time() < end:
        pump(0.2)
        if time.time() >= next_noop:
            for s in sessions:
                if s.state == "held":
                    try:
                        s.sock.send(b"NOOP\r\n")
                        s.want += 1
                    except OSError as e:
                        fail(s, "send: " + (e.strerror or str(e)))
            next_noop = time.time() + a.noop_every

    # Final check: every held session answers one more NOOP.
    for s in sessions:
        if s.state == "held":
            try:
                s.sock.send(b"NOOP\r\n")
                s.want += 1
            except OSError as e:
                fail(s, "send: " + (e.strerror or str(e)))
    check_deadline = time.time() + 60
    while time.time() < check_deadline and any(
        s.state == "held" and s.want > 0 for s in sessions
    ):
        pump(0.1)
    alive = sum(1 for s in sessions if s.state == "held" and s.want == 0)
    for s in sessions:
        if s.state == "held":
            try:
                s.sock.send(b"QUIT\r\n")
            except OSError:
                pass
            s.sock.close()
    status.update(
        {
            "phase": "done",
            "alive_at_end": alive,
            "failed": count("failed"),
            "held_seconds": round(time.time() - t0 - open_s, 1),
            "errors": errors,
        }
    )
    with open(a.status, "w") as f:
        json.dump(status, f)
    print(json.dumps(status))


if __name__ == "__main__":
    main()
