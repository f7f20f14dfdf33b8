//! Arbitrary bytes into the NS/NA parser: it must never panic, whatever it
//! accepts must build back to the same fields, and our answer to any
//! solicitation it accepts must itself be valid.
//!
//! Each input is also parsed a second time with its ICMPv6 checksum
//! corrected: mutations almost never keep a checksum valid, and without
//! this the fuzzer would rarely get past the checksum to the option walk
//! and the DAD rules.
#![no_main]

use std::net::Ipv6Addr;

use ferrolb_speaker::packet::ndp::checksum;
use ferrolb_speaker::packet::{MacAddr, NdpFrame};
use libfuzzer_sys::fuzz_target;

const OWN: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x02]);
const LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2);

fn check(data: &[u8]) {
    let Ok(frame) = NdpFrame::parse(data) else {
        return;
    };
    assert_eq!(NdpFrame::parse(&frame.to_bytes()), Ok(frame));
    if let Some(answer) = frame.advertisement_for(OWN, LINK_LOCAL) {
        assert_eq!(NdpFrame::parse(&answer.to_bytes()), Ok(answer));
    }
}

/// `data` with the checksum the parser will verify made right, when the
/// frame is long enough to have one.
fn with_good_checksum(data: &[u8]) -> Option<Vec<u8>> {
    let mut f = data.to_vec();
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(f.get(22..38)?).ok()?);
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(f.get(38..54)?).ok()?);
    let declared = usize::from(u16::from_be_bytes([*f.get(18)?, *f.get(19)?]));
    let end = 54usize.checked_add(declared)?.min(f.len());
    f.get_mut(56..58)?.copy_from_slice(&[0, 0]);
    let sum = checksum(src, dst, f.get(54..end)?);
    f.get_mut(56..58)?.copy_from_slice(&sum.to_be_bytes());
    Some(f)
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if let Some(fixed) = with_good_checksum(data) {
        check(&fixed);
    }
});
