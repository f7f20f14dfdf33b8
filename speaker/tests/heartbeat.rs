//! The heartbeat wire format: fixed bytes (tags computed independently with
//! Python's `hmac` module), round trips, tampering, bounds, and the replay
//! guard against a model.

use std::collections::BTreeMap;

use ferrolb_speaker::heartbeat::{
    DecodeError, EncodeError, MAX_HEARD, MAX_MESSAGE, MAX_NAME, Message, Replay, Replayed, State,
    TAG_LEN, VERSION, decode, decode_any, encode,
};
use proptest::prelude::*;

const KEY: &[u8] = b"ferrolb-heartbeat-test-key-32byt";

fn fixture() -> Message {
    Message {
        sender: "node-a".into(),
        incarnation: 0x0102_0304_0506_0708,
        seq: 42,
        state: State::Restarting,
        heard: vec![("node-b".into(), 120), ("node-c".into(), u32::MAX)],
    }
}

#[rustfmt::skip]
const FIXTURE_BYTES: &[u8] = &[
    0x01, // version
    0x01, // restarting
    0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, // incarnation
    0, 0, 0, 0, 0, 0, 0, 42, // seq
    6, b'n', b'o', b'd', b'e', b'-', b'a', // sender
    0x00, 0x02, // two heard
    6, b'n', b'o', b'd', b'e', b'-', b'b', 0, 0, 0, 120,
    6, b'n', b'o', b'd', b'e', b'-', b'c', 0xff, 0xff, 0xff, 0xff,
    // HMAC-SHA256(KEY, the 49 bytes above)[..16]
    0x9f, 0x38, 0x05, 0x56, 0x6e, 0xbe, 0x20, 0x2f,
    0x2f, 0x6e, 0x93, 0xcb, 0xbb, 0xc3, 0xb4, 0x4d,
];

#[rustfmt::skip]
const MINIMAL_BYTES: &[u8] = &[
    0x01, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, b'x', 0, 0,
    0x8c, 0x27, 0x84, 0xea, 0xf8, 0x79, 0x51, 0xf0,
    0x59, 0xdc, 0x78, 0xec, 0x26, 0xe5, 0x87, 0x30,
];

/// Re-signs a body (for tests that need well-authenticated malformed input).
fn sign(body: &[u8]) -> Vec<u8> {
    use hmac::{Hmac, Mac};
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(KEY).unwrap();
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let mut out = body.to_vec();
    out.extend_from_slice(&tag[..TAG_LEN]);
    out
}

#[test]
fn encodes_the_fixture_to_fixed_bytes() {
    assert_eq!(encode(&fixture(), KEY).unwrap(), FIXTURE_BYTES);
    assert_eq!(decode(FIXTURE_BYTES, KEY).unwrap(), fixture());
}

#[test]
fn encodes_a_minimal_message_to_fixed_bytes() {
    let m = Message {
        sender: "x".into(),
        incarnation: 0,
        seq: 0,
        state: State::Running,
        heard: vec![],
    };
    assert_eq!(encode(&m, KEY).unwrap(), MINIMAL_BYTES);
    assert_eq!(decode(MINIMAL_BYTES, KEY).unwrap(), m);
}

#[test]
fn every_state_round_trips() {
    for state in [State::Running, State::Restarting, State::Leaving] {
        let m = Message { state, ..fixture() };
        assert_eq!(decode(&encode(&m, KEY).unwrap(), KEY).unwrap(), m);
    }
}

#[test]
fn a_wrong_key_is_refused() {
    assert_eq!(
        decode(FIXTURE_BYTES, b"another-key-of-thirty-two-bytes!"),
        Err(DecodeError::BadMac)
    );
}

#[test]
fn rotation_accepts_old_and_new_keys() {
    let old: &[u8] = b"old-key-old-key-old-key-old-key!";
    let new: &[u8] = b"new-key-new-key-new-key-new-key!";
    let keys = [new, old];
    for key in keys {
        let bytes = encode(&fixture(), key).unwrap();
        assert_eq!(decode_any(&bytes, &keys).unwrap(), fixture());
    }
    let other = encode(&fixture(), KEY).unwrap();
    assert_eq!(decode_any(&other, &keys), Err(DecodeError::BadMac));
    assert_eq!(decode_any(&other, &[]), Err(DecodeError::BadMac));
}

#[test]
fn another_version_is_named_not_called_a_bad_mac() {
    let mut body = FIXTURE_BYTES[..FIXTURE_BYTES.len() - TAG_LEN].to_vec();
    body[0] = 2;
    // Unauthenticated (tag for version 1): the version is reported.
    let mut forged = body.clone();
    forged.extend_from_slice(&FIXTURE_BYTES[FIXTURE_BYTES.len() - TAG_LEN..]);
    assert_eq!(decode(&forged, KEY), Err(DecodeError::Version(2)));
    // Authenticated version 2 (a newer speaker with our key): also refused.
    assert_eq!(decode(&sign(&body), KEY), Err(DecodeError::Version(2)));
    assert_eq!(VERSION, 1);
}

#[test]
fn sizes_are_bounded() {
    assert_eq!(decode(&[], KEY), Err(DecodeError::TooShort(0)));
    assert_eq!(
        decode(&[0; TAG_LEN], KEY),
        Err(DecodeError::TooShort(TAG_LEN))
    );
    let huge = vec![1u8; MAX_MESSAGE + 1];
    assert_eq!(
        decode(&huge, KEY),
        Err(DecodeError::TooLarge(MAX_MESSAGE + 1))
    );
}

#[test]
fn malformed_but_authenticated_bodies_are_refused() {
    let body = &FIXTURE_BYTES[..FIXTURE_BYTES.len() - TAG_LEN];
    // Unknown state.
    let mut b = body.to_vec();
    b[1] = 3;
    assert_eq!(decode(&sign(&b), KEY), Err(DecodeError::State(3)));
    // Trailing byte.
    let mut b = body.to_vec();
    b.push(0);
    assert_eq!(decode(&sign(&b), KEY), Err(DecodeError::Trailing(1)));
    // Every truncation.
    for n in 1..body.len() {
        let r = decode(&sign(&body[..n]), KEY);
        assert!(
            matches!(r, Err(DecodeError::Truncated(_) | DecodeError::Name)),
            "{n}: {r:?}"
        );
    }
    // Empty sender name.
    let mut b = body[..18].to_vec();
    b.extend_from_slice(&[0, 0, 0]);
    assert_eq!(decode(&sign(&b), KEY), Err(DecodeError::Name));
    // A name that is not UTF-8.
    let mut b = body[..18].to_vec();
    b.extend_from_slice(&[1, 0xff, 0, 0]);
    assert_eq!(decode(&sign(&b), KEY), Err(DecodeError::Name));
    // A name longer than 253.
    let mut b = body[..18].to_vec();
    b.push(254);
    b.extend(std::iter::repeat_n(b'a', 254));
    b.extend_from_slice(&[0, 0]);
    assert_eq!(decode(&sign(&b), KEY), Err(DecodeError::Name));
    // A count past the limit, and one that cannot fit.
    let mut b = body[..25].to_vec();
    b.extend_from_slice(&(MAX_HEARD as u16 + 1).to_be_bytes());
    assert_eq!(
        decode(&sign(&b), KEY),
        Err(DecodeError::TooManyPeers(MAX_HEARD + 1))
    );
    let mut b = body[..25].to_vec();
    b.extend_from_slice(&[0x03, 0xff]);
    assert_eq!(decode(&sign(&b), KEY), Err(DecodeError::Truncated("heard")));
}

#[test]
fn encoding_refuses_what_decoding_would() {
    let long = "a".repeat(MAX_NAME + 1);
    let m = Message {
        sender: long.clone(),
        ..fixture()
    };
    assert_eq!(encode(&m, KEY), Err(EncodeError::Name(long)));
    let m = Message {
        sender: String::new(),
        ..fixture()
    };
    assert!(matches!(encode(&m, KEY), Err(EncodeError::Name(_))));
    let m = Message {
        heard: (0..=MAX_HEARD).map(|i| (format!("n{i}"), 0)).collect(),
        ..fixture()
    };
    assert_eq!(
        encode(&m, KEY),
        Err(EncodeError::TooManyPeers(MAX_HEARD + 1))
    );
    // 1024 names of 253 bytes would be 264 KB.
    let m = Message {
        heard: (0..MAX_HEARD).map(|i| (format!("{i:0>253}"), 0)).collect(),
        ..fixture()
    };
    assert!(matches!(encode(&m, KEY), Err(EncodeError::TooLarge(_))));
    // The largest message that fits still round trips.
    let m = Message {
        heard: (0..MAX_HEARD).map(|i| (format!("{i:0>50}"), 7)).collect(),
        ..fixture()
    };
    let bytes = encode(&m, KEY).unwrap();
    assert!(bytes.len() <= MAX_MESSAGE);
    assert_eq!(decode(&bytes, KEY).unwrap(), m);
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9]([a-z0-9.-]{0,30}[a-z0-9])?",
        // Any UTF-8 up to the byte limit.
        "\\PC{1,60}".prop_filter("≤ 253 bytes", |s| s.len() <= MAX_NAME),
    ]
}

fn state() -> impl Strategy<Value = State> {
    prop_oneof![
        Just(State::Running),
        Just(State::Restarting),
        Just(State::Leaving)
    ]
}

fn message() -> impl Strategy<Value = Message> {
    (
        name(),
        any::<u64>(),
        any::<u64>(),
        state(),
        prop::collection::vec((name(), any::<u32>()), 0..40),
    )
        .prop_map(|(sender, incarnation, seq, state, heard)| Message {
            sender,
            incarnation,
            seq,
            state,
            heard,
        })
}

proptest! {
    #[test]
    fn round_trips(m in message(), key in prop::collection::vec(any::<u8>(), 0..100)) {
        let bytes = encode(&m, &key).unwrap();
        prop_assert_eq!(decode(&bytes, &key).unwrap(), m);
    }

    #[test]
    fn any_changed_byte_is_refused(m in message(), at in any::<prop::sample::Index>(), delta in 1u8..=255) {
        let mut bytes = encode(&m, KEY).unwrap();
        let i = at.index(bytes.len());
        bytes[i] ^= delta;
        prop_assert!(decode(&bytes, KEY).is_err());
    }

    #[test]
    fn truncated_or_extended_datagrams_are_refused(m in message(), cut in any::<prop::sample::Index>(), extra in prop::collection::vec(any::<u8>(), 1..20)) {
        let bytes = encode(&m, KEY).unwrap();
        let n = cut.index(bytes.len());
        prop_assert!(decode(&bytes[..n], KEY).is_err());
        let mut longer = bytes.clone();
        longer.extend_from_slice(&extra);
        prop_assert!(decode(&longer, KEY).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = decode(&bytes, KEY);
    }

    #[test]
    fn signed_noise_never_panics(body in prop::collection::vec(any::<u8>(), 1..300)) {
        // Noise past the MAC: exercises the parser itself.
        let _ = decode(&sign(&body), KEY);
    }

    /// The replay guard against a model: per sender, the current
    /// incarnation's last seq and every incarnation it replaced.
    #[test]
    fn replay_matches_a_model(events in prop::collection::vec((0usize..3, 0u64..4, 0u64..6), 0..80)) {
        let senders = ["a", "b", "c"];
        let mut guard = Replay::new();
        let mut model: BTreeMap<&str, (u64, u64, Vec<u64>)> = BTreeMap::new();
        for (s, incarnation, seq) in events {
            let sender = senders[s];
            let m = Message { sender: sender.into(), incarnation, seq, state: State::Running, heard: vec![] };
            let expect = match model.get_mut(sender) {
                None => { model.insert(sender, (incarnation, seq, vec![])); true }
                Some((inc, last, retired)) => {
                    if *inc == incarnation {
                        if seq > *last { *last = seq; true } else { false }
                    } else if retired.contains(&incarnation) {
                        false
                    } else {
                        retired.push(*inc);
                        *inc = incarnation;
                        *last = seq;
                        true
                    }
                }
            };
            let got = guard.accept(&m);
            prop_assert_eq!(got.is_ok(), expect, "{:?}", got);
        }
    }
}

#[test]
fn replay_refuses_old_seqs_and_old_processes() {
    let m = |inc, seq| Message {
        sender: "node-a".into(),
        incarnation: inc,
        seq,
        state: State::Running,
        heard: vec![],
    };
    let mut r = Replay::new();
    assert!(r.accept(&m(7, 0)).is_ok());
    assert!(r.accept(&m(7, 1)).is_ok());
    assert_eq!(r.accept(&m(7, 1)), Err(Replayed::Old { seq: 1, last: 1 }));
    assert_eq!(r.accept(&m(7, 0)), Err(Replayed::Old { seq: 0, last: 1 }));
    // A new process starts its own count.
    assert!(r.accept(&m(9, 0)).is_ok());
    // The old process's captured messages cannot come back.
    assert_eq!(r.accept(&m(7, 100)), Err(Replayed::Retired(7)));
    // Senders are independent.
    let other = Message {
        sender: "node-b".into(),
        ..m(7, 0)
    };
    assert!(r.accept(&other).is_ok());
}
