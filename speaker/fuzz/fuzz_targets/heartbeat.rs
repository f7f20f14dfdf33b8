//! Arbitrary bytes into the heartbeat decoder: it must never panic, and
//! whatever it accepts must encode back to exactly the same bytes (the
//! format has one encoding per message), then pass through the replay
//! guard and the liveness view without a panic either.
//!
//! Random bytes essentially never carry a valid MAC, so an input whose
//! first byte is odd has its remainder signed with the key first: those
//! inputs exercise the parser behind the MAC, the others the refusal
//! path in front of it.
#![no_main]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ferrolb_speaker::heartbeat::{Replay, TAG_LEN, decode, encode};
use ferrolb_speaker::liveness::{Liveness, Timings};
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;

const KEY: &[u8] = b"ferrolb-heartbeat-fuzz-key-32byt";

fn sign(body: &[u8]) -> Vec<u8> {
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(KEY).expect("HMAC takes any key");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let mut out = body.to_vec();
    out.extend_from_slice(&tag[..TAG_LEN]);
    out
}

fuzz_target!(|data: &[u8]| {
    let bytes = match data.split_first() {
        Some((first, rest)) if first & 1 == 1 => sign(rest),
        _ => data.to_vec(),
    };
    let Ok(msg) = decode(&bytes, KEY) else {
        return;
    };
    assert_eq!(encode(&msg, KEY).as_deref(), Ok(&bytes[..]));
    let mut replay = Replay::new();
    assert!(replay.accept(&msg).is_ok());
    assert!(replay.accept(&msg).is_err());
    let now = Instant::now();
    let from: SocketAddr = "192.0.2.1:7472".parse().expect("literal address");
    let mut view = Liveness::new("fuzz-self", Timings::default());
    view.heard(&msg, from, now);
    let known: BTreeMap<String, SocketAddr> = msg
        .heard
        .iter()
        .map(|(n, _)| (n.clone(), from))
        .chain([(msg.sender.clone(), from)])
        .collect();
    let _ = view.alive(now + Duration::from_millis(50), &known);
    let _ = view.report(now);
    let _ = view.last_heard();
});
