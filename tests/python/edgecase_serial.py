"""An independent implementation of the Edgecase binary serial protocol, written from
docs/serial-protocol.md alone (no Rust code consulted), with the Python standard library
only: COBS, CRC-32/ISO-HDLC, varints and the postcard subset of section 5 are written out
here by hand. The tests use it to check that the document suffices: test_vectors.py checks
it against the document's worked examples, and device.py plays a device against the agent
over a pseudo-terminal.
"""

import math
import struct

VERSION = 1
KIND_DATA, KIND_ACK, KIND_NACK = 0, 1, 2
MAX_FRAME = 1024  # body + CRC, before COBS (section 3.2)
MAX_WIRE = 1029  # after COBS, delimiter not counted

# NACK reason codes (section 6.3)
CRC, COBS, TOO_SHORT, TOO_LONG = 1, 2, 3, 4
VERSION_ERR, MALFORMED, INVALID, UNEXPECTED_KIND = 16, 17, 18, 19


class ProtocolError(Exception):
    pass


# --- section 4: CRC-32/ISO-HDLC, reflected, bit by bit --------------------------------

def crc32(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            if crc & 1:
                crc = (crc >> 1) ^ 0xEDB88320
            else:
                crc >>= 1
    return crc ^ 0xFFFFFFFF


# --- section 3.1: COBS ----------------------------------------------------------------

def cobs_encode(data: bytes) -> bytes:
    pieces = []
    for block in data.split(b"\x00"):
        # Cut into 254-byte pieces, the last piece holding the rest (possibly 0 bytes).
        cut = [block[i:i + 254] for i in range(0, len(block), 254)]
        if len(block) % 254 == 0:
            cut.append(b"")
        pieces.extend(cut)
    # A piece of exactly 254 bytes at the very end ends the encoding: no extra code byte.
    if len(pieces) >= 2 and len(pieces[-2]) == 254 and pieces[-1] == b"" and not data.endswith(b"\x00"):
        pieces.pop()
    return b"".join(bytes([len(p) + 1]) + p for p in pieces)


def cobs_decode(enc: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(enc):
        code = enc[i]
        if code == 0:
            raise ProtocolError("0x00 inside a frame")
        if i + code > len(enc):
            raise ProtocolError("COBS code byte points past the end")
        out += enc[i + 1:i + code]
        i += code
        if code < 0xFF and i < len(enc):
            out.append(0)
    return bytes(out)


# --- section 5: varints and the postcard subset ---------------------------------------

def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


class Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise ProtocolError("message ends early")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def varint(self, max_bytes: int, bits: int) -> int:
        n = 0
        for i in range(max_bytes):
            b = self.byte()
            n |= (b & 0x7F) << (7 * i)
            if not b & 0x80:
                if n >= 1 << bits:
                    raise ProtocolError("varint overflows its type")
                return n
        raise ProtocolError("varint too long")

    def u32(self) -> int:
        return self.varint(5, 32)

    def u64(self) -> int:
        return self.varint(10, 64)

    def f64(self) -> float:
        if self.pos + 8 > len(self.data):
            raise ProtocolError("message ends early")
        (v,) = struct.unpack_from("<d", self.data, self.pos)
        self.pos += 8
        return v

    def string(self) -> str:
        n = self.u32()
        if self.pos + n > len(self.data):
            raise ProtocolError("string runs past the end")
        s = self.data[self.pos:self.pos + n]
        self.pos += n
        try:
            return s.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError("invalid UTF-8") from e

    def option(self, read):
        tag = self.byte()
        if tag == 0:
            return None
        if tag == 1:
            return read()
        raise ProtocolError("option tag is neither 0 nor 1")


def w_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return varint(len(b)) + b


def w_option(v, write) -> bytes:
    return b"\x00" if v is None else b"\x01" + write(v)


# --- section 6: messages ----------------------------------------------------------------

def data_body(device_id: str, seq: int, timestamp_ms: int, readings) -> bytes:
    """readings: list of (sensor, value, unit or None, age_ms)."""
    out = bytearray([VERSION]) + varint(KIND_DATA)
    out += w_string(device_id) + varint(seq) + varint(timestamp_ms)
    out += varint(len(readings))
    for sensor, value, unit, age_ms in readings:
        out += w_string(sensor) + struct.pack("<d", value) + w_option(unit, w_string) + varint(age_ms)
    return bytes(out)


def ack_body(device_id: str, seq: int) -> bytes:
    return bytes([VERSION]) + varint(KIND_ACK) + w_string(device_id) + varint(seq)


def nack_body(reason: int, device_id=None, seq=None) -> bytes:
    return (bytes([VERSION]) + varint(KIND_NACK) + bytes([reason])
            + w_option(device_id, w_string) + w_option(seq, varint))


def frame(body: bytes) -> bytes:
    """Section 3: COBS(body ‖ CRC little-endian) ‖ 0x00."""
    return cobs_encode(body + struct.pack("<I", crc32(body))) + b"\x00"


def parse_body(body: bytes):
    """Decodes a body (version byte first) into a dict; raises ProtocolError."""
    r = Reader(body)
    if r.byte() != VERSION:
        raise ProtocolError("version")
    kind = r.u32()
    if kind == KIND_DATA:
        msg = {"kind": "data", "device_id": r.string(), "seq": r.u32(), "timestamp_ms": r.u64()}
        n = r.u32()
        readings = []
        for _ in range(n):
            readings.append((r.string(), r.f64(), r.option(r.string), r.u32()))
        msg["readings"] = readings
    elif kind == KIND_ACK:
        msg = {"kind": "ack", "device_id": r.string(), "seq": r.u32()}
    elif kind == KIND_NACK:
        msg = {"kind": "nack", "reason": r.byte(), "device_id": r.option(r.string), "seq": r.option(r.u32)}
    else:
        raise ProtocolError("unknown kind %d" % kind)
    if r.pos != len(body):
        raise ProtocolError("bytes left over")
    return msg


def unframe(wire: bytes):
    """Decodes the bytes between two delimiters; raises ProtocolError."""
    if len(wire) > MAX_WIRE:
        raise ProtocolError("too long")
    raw = cobs_decode(wire)
    if len(raw) < 6:
        raise ProtocolError("too short")
    body, crc = raw[:-4], struct.unpack("<I", raw[-4:])[0]
    if crc32(body) != crc:
        raise ProtocolError("CRC mismatch")
    return parse_body(body)


class Deframer:
    """Splits a byte stream at 0x00; empty frames are skipped (section 3.3)."""

    def __init__(self):
        self.buf = bytearray()

    def push(self, data: bytes):
        frames = []
        for b in data:
            if b == 0:
                if self.buf:
                    frames.append(bytes(self.buf))
                self.buf.clear()
            elif len(self.buf) <= MAX_WIRE:
                self.buf.append(b)
        return frames


def valid_value(v: float) -> bool:
    return math.isfinite(v)
