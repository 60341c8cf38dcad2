"""A device written from docs/serial-protocol.md alone, talking to the agent over a
pseudo-terminal it creates (standard library only).

    python3 tests/python/device.py --frames 40

Prints the pty's path on the first line of stdout, waits for a line `go` on stdin (the
agent has opened the port), then, following section 7:
  - sends a lone 0x00, then FRAMES data frames of device `py-1` (stop-and-wait, window 1),
    each with three readings; ACK timeout 1 s doubling to 8 s, byte-for-byte retransmission;
  - sends frame 5 a second time, as after a lost ACK (expects an ACK again);
  - sends a frame whose CRC is damaged (expects NACK 1 naming nobody), then retransmits it;
  - sends a frame with a NaN value (expects NACK 18 naming py-1 and its seq; drops it);
  - sends a frame with an empty device id (the port's id is used; expects an ACK "");
and prints one JSON line with what it saw. Exit status 0 when every answer was as the
document says.
"""

import argparse
import json
import os
import select
import struct
import sys
import time
import tty

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import edgecase_serial as es  # noqa: E402


class Line:
    def __init__(self):
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)
        self.deframer = es.Deframer()
        self.pending = []

    def send(self, wire: bytes):
        view = memoryview(wire)
        while view:
            n = os.write(self.master, view)
            view = view[n:]

    def answer(self, timeout: float):
        """The next decodable answer within `timeout` seconds, or None."""
        deadline = time.monotonic() + timeout
        while not self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                for f in self.deframer.push(os.read(self.master, 4096)):
                    try:
                        self.pending.append(es.unframe(f))
                    except es.ProtocolError:
                        pass  # section 7.3: frames that do not decode are discarded
        return self.pending.pop(0)


class Device:
    """Section 7: sequence numbers, stop-and-wait, retransmission with backoff."""

    def __init__(self, line: Line, device_id: str, first_seq: int):
        self.line = line
        self.device_id = device_id
        self.seq = first_seq
        self.retransmissions = 0

    def next_seq(self):
        s = self.seq
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        return s

    def transact(self, wire: bytes, seq: int, expect_kind="ack", max_wait=60.0):
        """Sends a frame and retransmits it until answered; returns the answer."""
        timeout = 1.0
        started = time.monotonic()
        self.line.send(wire)
        while time.monotonic() - started < max_wait:
            msg = self.line.answer(timeout)
            if msg is None:
                self.retransmissions += 1
                timeout = min(timeout * 2, 8.0)
                self.line.send(wire)
                continue
            if msg["kind"] == "ack" and msg["device_id"] in (self.device_id, "") and msg["seq"] == seq:
                return msg
            if msg["kind"] == "nack":
                if msg["device_id"] not in (None, self.device_id):
                    continue
                if msg["reason"] < 16:
                    if expect_kind == "nack-damage":
                        return msg
                    self.retransmissions += 1
                    self.line.send(wire)
                    continue
                return msg
        raise SystemExit("no answer to seq %d within %.0f s" % (seq, max_wait))


def readings(seq):
    return [("temp", 20.0 + seq / 4, "C", 0), ("humidity", 40.0 + seq, "%", 250), ("door", float(seq % 2), None, 0)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--first-seq", type=int, default=4294967290, help="near the top, to cross the wrap to 0")
    args = ap.parse_args()
    line = Line()
    print(line.path, flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("expected `go` on stdin")
    dev = Device(line, "py-1", args.first_seq)
    report = {"acked": [], "nacks": [], "problems": []}

    def check(cond, what):
        if not cond:
            report["problems"].append(what)

    line.send(b"\x00")
    ts = int(time.time() * 1000)
    sent = {}
    for i in range(args.frames):
        seq = dev.next_seq()
        wire = es.frame(es.data_body(dev.device_id, seq, ts + i * 1000, readings(seq)))
        sent[seq] = wire
        a = dev.transact(wire, seq)
        check(a["kind"] == "ack", "frame %d answered %r" % (seq, a))
        report["acked"].append(seq)
        if i == 5:
            a = dev.transact(wire, seq)  # a retransmission after a lost ACK
            check(a == {"kind": "ack", "device_id": "py-1", "seq": seq}, "duplicate answered %r" % a)

    # Line noise in the CRC: NACK 1, naming nobody; then the device retransmits.
    seq = dev.next_seq()
    body = es.data_body(dev.device_id, seq, ts, readings(seq))
    good = es.frame(body)
    raw = bytearray(body + struct.pack("<I", es.crc32(body) ^ 0x00010000))
    damaged = es.cobs_encode(bytes(raw)) + b"\x00"
    n = dev.transact(damaged, seq, expect_kind="nack-damage")
    check(n == {"kind": "nack", "reason": es.CRC, "device_id": None, "seq": None}, "damaged frame answered %r" % n)
    report["nacks"].append(n)
    report["damaged_hex"] = damaged[:-1].hex()
    a = dev.transact(good, seq)
    check(a["kind"] == "ack", "retransmitted frame answered %r" % a)
    report["acked"].append(seq)

    # An intact frame that breaks a limit (NaN): NACK 18 naming it; the device drops it.
    seq = dev.next_seq()
    bad = es.frame(es.data_body(dev.device_id, seq, ts, [("temp", float("nan"), "C", 0)]))
    n = dev.transact(bad, seq)
    check(n == {"kind": "nack", "reason": es.INVALID, "device_id": "py-1", "seq": seq}, "NaN frame answered %r" % n)
    report["nacks"].append(n)
    report["invalid_seq"] = seq

    # No device id in the frame: the port's.
    a = dev.transact(es.frame(es.data_body("", 77, ts, [("level", 12.5, "%", 0)])), 77)
    check(a == {"kind": "ack", "device_id": "", "seq": 77}, "anonymous frame answered %r" % a)

    report["retransmissions"] = dev.retransmissions
    print(json.dumps(report), flush=True)
    sys.exit(1 if report["problems"] else 0)


if __name__ == "__main__":
    main()
