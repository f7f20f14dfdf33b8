//! Arbitrary bytes into the ARP parser: it must never panic, and whatever
//! it accepts must survive the answering path and build back to the same
//! fields.
#![no_main]

use ferrolb_speaker::packet::{ArpFrame, MacAddr};
use libfuzzer_sys::fuzz_target;

const OWN: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x02]);

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = ArpFrame::parse(data) else {
        return;
    };
    assert_eq!(ArpFrame::parse(&frame.to_bytes()), Ok(frame));
    if let Some(reply) = frame.reply(OWN) {
        assert_eq!(ArpFrame::parse(&reply.to_bytes()), Ok(reply));
    }
});
