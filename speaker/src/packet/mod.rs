//! Wire formats the speaker reads and writes on AF_PACKET sockets: Ethernet
//! II, ARP (RFC 826, 5227, 5944) and IPv6 neighbour discovery (RFC 4861,
//! 4862). Pure: bytes in, typed values out, and back. Parsers never panic
//! on any input (the fuzz targets in `speaker/fuzz` and the proptests here
//! hold them to that); every read goes through [`bytes_at`].

pub mod arp;
pub mod ether;
pub mod ndp;

pub use arp::{Arp, ArpError, ArpFrame, ArpOp};
pub use ether::{EthernetHeader, MacAddr};
pub use ndp::{Advertisement, NdpError, NdpFrame, NdpMessage, Solicitation};

/// Shortest Ethernet frame without the FCS. The kernel does not pad frames
/// sent on AF_PACKET sockets, and some drivers and switches drop runts, so
/// every frame we build is padded to this length.
pub const MIN_FRAME_LEN: usize = 60;

/// A frame or header ended before a field it must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{what} needs {needed} bytes, the frame has {got}")]
pub struct Truncated {
    pub what: &'static str,
    pub needed: usize,
    pub got: usize,
}

/// `N` bytes of `bytes` from `at`, or [`Truncated`] naming `what`. The one
/// way the parsers read input, so no slice index can panic.
pub(crate) fn bytes_at<const N: usize>(
    bytes: &[u8],
    at: usize,
    what: &'static str,
) -> Result<[u8; N], Truncated> {
    let truncated = Truncated {
        what,
        needed: at.saturating_add(N),
        got: bytes.len(),
    };
    let end = at.checked_add(N).ok_or(truncated)?;
    bytes
        .get(at..end)
        .and_then(|s| <[u8; N]>::try_from(s).ok())
        .ok_or(truncated)
}

pub(crate) fn u16_at(bytes: &[u8], at: usize, what: &'static str) -> Result<u16, Truncated> {
    bytes_at::<2>(bytes, at, what).map(u16::from_be_bytes)
}

/// Pads a frame we built up to [`MIN_FRAME_LEN`] with zeros.
pub(crate) fn pad(frame: &mut Vec<u8>) {
    if frame.len() < MIN_FRAME_LEN {
        frame.resize(MIN_FRAME_LEN, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_at_refuses_short_and_overflowing_reads() {
        let b = [1u8, 2, 3];
        assert_eq!(bytes_at::<2>(&b, 1, "x"), Ok([2, 3]));
        assert_eq!(
            bytes_at::<2>(&b, 2, "x"),
            Err(Truncated {
                what: "x",
                needed: 4,
                got: 3
            })
        );
        assert!(bytes_at::<2>(&b, usize::MAX, "x").is_err());
    }
}
