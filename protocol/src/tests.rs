use super::*;
use proptest::prelude::*;

const DOC: &str = include_str!("../../docs/serial-protocol.md");

/// One test vector of the protocol document: the hex after `body`, `crc` and `wire`.
#[derive(Debug, Default)]
struct Vector {
    body: Vec<u8>,
    crc: u32,
    wire: Vec<u8>,
}

/// Reads the ```text blocks of section 9 that hold `body`, `crc` and `wire` lines
/// (continuation lines are indented hex).
fn doc_vectors() -> Vec<Vector> {
    let section = DOC.split("## 9. Worked examples").nth(1).expect("section 9");
    let mut out = Vec::new();
    for block in section.split("```text").skip(1) {
        let block = block.split("```").next().unwrap_or("");
        let mut fields: Vec<(String, String)> = Vec::new();
        for line in block.lines() {
            if let Some(rest) = line.strip_prefix("      ") {
                if let Some(last) = fields.last_mut()
                    && parse_hex(rest).is_some()
                {
                    last.1.push(' ');
                    last.1.push_str(rest);
                }
            } else if let Some((key, value)) = line.split_once("  ") {
                fields.push((key.trim().to_string(), value.trim().to_string()));
            }
        }
        let get = |k: &str| fields.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        let (Some(body), Some(crc), Some(wire)) = (get("body"), get("crc"), get("wire")) else {
            continue;
        };
        out.push(Vector {
            body: parse_hex(&body).expect("body hex"),
            crc: u32::from_str_radix(crc.trim(), 16).expect("crc hex"),
            wire: parse_hex(&wire).expect("wire hex"),
        });
    }
    out
}

fn example_1() -> Data {
    Data {
        device_id: "boiler-1".into(),
        seq: 7,
        timestamp_ms: 1_764_000_000_000,
        readings: vec![Reading {
            sensor: "temp".into(),
            value: 21.5,
            unit: Some("C".into()),
            age_ms: 0,
        }],
    }
}

#[test]
fn the_documents_worked_examples_are_what_the_codec_does() {
    let vectors = doc_vectors();
    assert_eq!(vectors.len(), 5, "section 9 has five test vectors: {vectors:?}");
    for v in &vectors {
        assert_eq!(CRC32.checksum(&v.body), v.crc, "crc of {}", hex(&v.body));
        assert_eq!(frame(&v.body), v.wire, "wire of {}", hex(&v.body));
        let msg = decode(&v.wire[..v.wire.len() - 1]).expect("decodes");
        assert_eq!(body(&msg), v.body, "re-encodes to the same body");
    }
    assert_eq!(
        decode(&vectors[0].wire[..vectors[0].wire.len() - 1]),
        Ok(Message::Data(example_1()))
    );
    let Ok(Message::Data(ex2)) = decode(&vectors[2].wire[..vectors[2].wire.len() - 1]) else {
        panic!("example 9.2 is a DATA frame")
    };
    assert_eq!((ex2.device_id.as_str(), ex2.seq, ex2.timestamp_ms), ("", 300, 0));
    assert_eq!(ex2.readings.len(), 3);
    assert_eq!(ex2.measured_at_ms(&ex2.readings[0], 5000), 4000);
    assert_eq!(
        decode(&vectors[3].wire[..vectors[3].wire.len() - 1]),
        Ok(Message::Nack(Nack {
            reason: 1,
            device_id: None,
            seq: None
        }))
    );
}

#[test]
fn the_documents_damaged_frame_is_a_crc_error() {
    let mut w = encode(&Message::Data(example_1())).expect("encodes");
    assert_eq!(w[7], 0x6c);
    w[7] = 0x6d;
    let e = decode(&w[..w.len() - 1]).expect_err("damaged");
    assert_eq!(e.reason, NackReason::Crc);
    assert!(
        e.detail.contains("0x31F2AF0C") && e.detail.contains("0x0D924C04"),
        "{e}"
    );
    assert_eq!(
        e.nack(),
        Message::Nack(Nack {
            reason: 1,
            device_id: None,
            seq: None
        })
    );
}

#[test]
fn crc_is_crc32_iso_hdlc() {
    assert_eq!(CRC32.checksum(b"123456789"), 0xCBF4_3926);
}

#[test]
fn cobs_as_the_document_describes() {
    let enc = |b: &[u8]| cobs::encode_vec(b);
    assert_eq!(enc(&[0]), [1, 1]);
    assert_eq!(enc(&[0x11, 0x22, 0, 0x33]), [3, 0x11, 0x22, 2, 0x33]);
    assert_eq!(enc(&[0x11, 0, 0]), [2, 0x11, 1, 1]);
    let b254: Vec<u8> = (1..=254).collect();
    let mut want = vec![0xFF];
    want.extend(&b254);
    assert_eq!(enc(&b254), want);
    let mut b255 = b254.clone();
    b255.push(7);
    want.extend([2, 7]);
    assert_eq!(enc(&b255), want);
}

#[test]
fn each_failure_has_its_reason() {
    let good = encode(&Message::Data(example_1())).expect("encodes");
    let good = &good[..good.len() - 1];
    let reason = |wire: &[u8]| decode_data(wire).expect_err("rejected").reason;
    // A code byte pointing past the end: a frame cut short.
    assert_eq!(reason(&good[..10]), NackReason::Cobs);
    assert_eq!(reason(&[0x02, 0x01, 0x01]), NackReason::TooShort);
    assert_eq!(reason(&vec![0x01; MAX_WIRE_BYTES + 1]), NackReason::TooLong);
    let mut crc = good.to_vec();
    let last = crc.len() - 1;
    crc[last] ^= 0x40;
    assert_eq!(reason(&crc), NackReason::Crc);

    let framed = |body: &[u8]| {
        let f = frame(body);
        f[..f.len() - 1].to_vec()
    };
    let mut v2 = body(&Message::Data(example_1()));
    v2[0] = 2;
    let e = decode_data(&framed(&v2)).expect_err("version 2");
    assert_eq!(
        (e.reason, e.device_id.as_deref(), e.seq),
        (NackReason::Version, Some("boiler-1"), Some(7))
    );
    assert_eq!(reason(&framed(&[1, 9])), NackReason::Malformed, "unknown kind");
    let mut trailing = body(&Message::Data(example_1()));
    trailing.push(0);
    let e = decode_data(&framed(&trailing)).expect_err("trailing byte");
    assert_eq!((e.reason, e.seq), (NackReason::Malformed, Some(7)));
    let mut nan = example_1();
    nan.readings[0].value = f64::NAN;
    let e = decode_data(&framed(&body(&Message::Data(nan)))).expect_err("NaN");
    assert_eq!((e.reason, e.seq), (NackReason::Invalid, Some(7)));
    let mut none = example_1();
    none.readings.clear();
    assert_eq!(reason(&framed(&body(&Message::Data(none)))), NackReason::Invalid);
    let ack = encode(&Message::Ack(Ack {
        device_id: "d".into(),
        seq: 1,
    }))
    .expect("encodes");
    assert_eq!(reason(&ack[..ack.len() - 1]), NackReason::UnexpectedKind);
    assert!(
        encode(&Message::Data(Data {
            readings: vec![example_1().readings[0].clone(); MAX_READINGS + 1],
            ..example_1()
        }))
        .is_err()
    );
}

#[test]
fn deframer_resynchronises_after_garbage() {
    let good = encode(&Message::Data(example_1())).expect("encodes");
    let mut d = Deframer::default();
    let mut stream = b"\x13\x37garbage".to_vec();
    stream.push(0);
    stream.push(0);
    stream.extend(&good[..20]); // truncated by a reset...
    stream.push(0); // ...whose lone 0x00 ends it
    stream.extend(&good);
    let frames = d.push(&stream);
    assert_eq!(frames.len(), 3, "{frames:?}");
    assert!(matches!(&frames[0], RawFrame::Frame(f) if decode(f).is_err()));
    assert!(matches!(&frames[1], RawFrame::Frame(f) if decode(f).is_err()));
    assert!(matches!(&frames[2], RawFrame::Frame(f) if decode(f) == Ok(Message::Data(example_1()))));

    let mut d = Deframer::new(8);
    assert_eq!(d.push(&[1; 20]), vec![]);
    assert_eq!(d.held(), 8);
    assert_eq!(
        d.push(&[1, 0, 3, 1, 1, 0]),
        vec![
            RawFrame::TooLong {
                prefix: vec![1; 8],
                len: 21
            },
            RawFrame::Frame(vec![3, 1, 1])
        ]
    );
}

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9._-]{1,24}|\\PC{1,8}".prop_filter("fits", |s| s.len() <= MAX_NAME_BYTES)
}

fn reading() -> impl Strategy<Value = Reading> {
    (
        name(),
        any::<f64>().prop_filter("finite", |v| v.is_finite()),
        proptest::option::of("[a-zA-Z%°/]{0,6}".prop_filter("fits", |s| s.len() <= MAX_UNIT_BYTES)),
        any::<u32>(),
    )
        .prop_map(|(sensor, value, unit, age_ms)| Reading {
            sensor,
            value,
            unit,
            age_ms,
        })
}

fn data() -> impl Strategy<Value = Data> {
    (
        prop_oneof![Just(String::new()), name()],
        any::<u32>(),
        prop_oneof![Just(0u64), u64::from(u32::MAX)..=MAX_TIMESTAMP_MS],
        proptest::collection::vec(reading(), 1..=MAX_READINGS),
    )
        .prop_map(|(device_id, seq, timestamp_ms, readings)| Data {
            device_id,
            seq,
            timestamp_ms,
            readings,
        })
}

proptest! {
    #[test]
    fn data_frames_round_trip(d in data()) {
        let msg = Message::Data(d);
        match encode(&msg) {
            Ok(wire) => {
                prop_assert_eq!(wire.last(), Some(&DELIMITER));
                prop_assert!(!wire[..wire.len() - 1].contains(&DELIMITER));
                prop_assert!(wire.len() - 1 <= MAX_WIRE_BYTES);
                // Through the deframer, in arbitrary pieces, as a serial port delivers it.
                let mut deframer = Deframer::default();
                let mut frames = Vec::new();
                for piece in wire.chunks(7) {
                    frames.extend(deframer.push(piece));
                }
                prop_assert_eq!(frames.len(), 1);
                let RawFrame::Frame(f) = &frames[0] else { panic!("too long") };
                prop_assert_eq!(decode(f), Ok(msg));
            }
            // Only a frame above the size limit may be refused.
            Err(_) => prop_assert!(body(&msg).len() + CRC_BYTES > MAX_FRAME_BYTES),
        }
    }

    #[test]
    fn acks_and_nacks_round_trip(device_id in name(), seq in any::<u32>(), reason in any::<u8>(), named in any::<bool>()) {
        for msg in [
            Message::Ack(Ack { device_id: device_id.clone(), seq }),
            Message::Nack(Nack { reason, device_id: named.then(|| device_id.clone()), seq: named.then_some(seq) }),
        ] {
            let wire = encode(&msg).expect("small");
            prop_assert_eq!(decode(&wire[..wire.len() - 1]), Ok(msg));
        }
    }

    #[test]
    fn any_single_bit_flip_is_caught(d in data(), bit in any::<proptest::sample::Index>()) {
        let msg = Message::Data(d);
        if let Ok(wire) = encode(&msg) {
            let mut damaged = wire[..wire.len() - 1].to_vec();
            let i = bit.index(damaged.len() * 8);
            damaged[i / 8] ^= 1 << (i % 8);
            // A flip that makes a 0x00 splits the frame; otherwise the decoder must refuse it.
            if !damaged.contains(&DELIMITER) {
                prop_assert!(decode(&damaged).is_err());
            }
        }
    }

    /// The fuzz target's body on random input (stable, no libFuzzer).
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
        crate::fuzz::check(&bytes);
    }

    /// The same with frames that pass the CRC, so the decoder proper is exercised.
    #[test]
    fn arbitrary_bodies_in_valid_frames_never_panic(body in proptest::collection::vec(any::<u8>(), 0..300), version_one in any::<bool>()) {
        let mut body = body;
        if version_one && !body.is_empty() {
            body[0] = VERSION;
        }
        crate::fuzz::check(&frame(&body));
    }

    #[test]
    fn valid_crc_with_arbitrary_body_never_panics(body in proptest::collection::vec(any::<u8>(), 1..200)) {
        let wire = frame(&body);
        if let Err(e) = decode(&wire[..wire.len() - 1]) {
            prop_assert!(!e.reason.is_transmission_error() || body.len() + CRC_BYTES < MIN_FRAME_BYTES);
        }
    }
}
