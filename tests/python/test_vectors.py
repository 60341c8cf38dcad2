"""Checks the independent Python implementation against docs/serial-protocol.md: its
worked examples (section 9), the CRC check value (section 4), the COBS examples (3.1) and
the varint examples (5). Run: python3 -m unittest tests/python/test_vectors.py
"""

import os
import re
import struct
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import edgecase_serial as es  # noqa: E402

DOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs", "serial-protocol.md")


def hexbytes(text):
    return bytes.fromhex(text.replace(" ", ""))


def vectors():
    """The `body`, `crc` and `wire` lines of each ```text block of section 9."""
    doc = open(DOC, encoding="utf-8").read()
    section = doc.split("## 9. Worked examples", 1)[1]
    out = []
    for block in re.findall(r"```text\n(.*?)```", section, re.S):
        fields, last = {}, None
        for line in block.splitlines():
            if line.startswith("      ") and last and re.fullmatch(r"[0-9a-f ]+", line.strip()):
                fields[last] += " " + line.strip()
            elif re.match(r"^(body|crc|wire)  ", line):
                last, value = line.split(None, 1)
                fields[last] = value.strip()
            else:
                last = None
        if {"body", "crc", "wire"} <= fields.keys():
            out.append((hexbytes(fields["body"]), int(fields["crc"], 16), hexbytes(fields["wire"])))
    return out


class DocumentVectors(unittest.TestCase):
    def test_there_are_five(self):
        self.assertEqual(len(vectors()), 5)

    def test_crc_and_wire_bytes(self):
        for body, crc, wire in vectors():
            self.assertEqual(es.crc32(body), crc, body.hex(" "))
            self.assertEqual(es.frame(body), wire, body.hex(" "))
            self.assertEqual(es.parse_body(body), es.unframe(wire[:-1]))

    def test_example_9_1_from_its_fields(self):
        body = es.data_body("boiler-1", 7, 1764000000000, [("temp", 21.5, "C", 0)])
        self.assertEqual(body, vectors()[0][0])
        self.assertEqual(es.ack_body("boiler-1", 7), vectors()[1][0])

    def test_example_9_2_from_its_fields(self):
        body = es.data_body("", 300, 0, [("level", 61.25, "%", 1000), ("level", 0.0, "%", 0), ("pump", -1.0, None, 0)])
        self.assertEqual(body, vectors()[2][0])

    def test_nacks(self):
        self.assertEqual(es.nack_body(1), vectors()[3][0])
        self.assertEqual(es.nack_body(18, "boiler-1", 8), vectors()[4][0])

    def test_damaged_frame_of_9_3(self):
        wire = bytearray(vectors()[0][2])
        self.assertEqual(wire[7], 0x6C)
        wire[7] = 0x6D
        raw = es.cobs_decode(bytes(wire[:-1]))
        self.assertEqual(es.crc32(raw[:-4]), 0x0D924C04)
        self.assertEqual(struct.unpack("<I", raw[-4:])[0], 0x31F2AF0C)
        with self.assertRaises(es.ProtocolError):
            es.unframe(bytes(wire[:-1]))


class Primitives(unittest.TestCase):
    def test_crc_check_value(self):
        self.assertEqual(es.crc32(b"123456789"), 0xCBF43926)

    def test_cobs_examples(self):
        b254 = bytes(range(1, 255))
        for raw, enc in [
            (b"\x00", "01 01"),
            (bytes([0x11, 0x22, 0x00, 0x33]), "03 11 22 02 33"),
            (bytes([0x11, 0x00, 0x00]), "02 11 01 01"),
            (b254, "ff" + b254.hex()),
            (b254 + b"\x07", "ff" + b254.hex() + "02 07"),
        ]:
            self.assertEqual(es.cobs_encode(raw), hexbytes(enc))
            self.assertEqual(es.cobs_decode(hexbytes(enc)), raw)

    def test_varint_examples(self):
        for n, enc in [(0, "00"), (7, "07"), (127, "7f"), (128, "80 01"), (300, "ac 02"),
                       (1764000000000, "80 d0 df b4 ab 33"), (4294967295, "ff ff ff ff 0f")]:
            self.assertEqual(es.varint(n), hexbytes(enc))
            self.assertEqual(es.Reader(hexbytes(enc)).u64(), n)


if __name__ == "__main__":
    unittest.main()
