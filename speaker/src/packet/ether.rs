//! Ethernet II headers and MAC addresses.

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

use super::{Truncated, bytes_at, u16_at};

pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_IPV6: u16 = 0x86DD;
pub const HEADER_LEN: usize = 14;

/// A 48-bit Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);
    pub const ZERO: MacAddr = MacAddr([0; 6]);

    /// The group bit: set for multicast and broadcast addresses.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }

    /// The Ethernet address an IPv6 multicast group is sent to (RFC 2464
    /// §7): 33:33 followed by the group's last four bytes.
    pub fn ipv6_multicast(group: Ipv6Addr) -> MacAddr {
        let o = group.octets();
        MacAddr([0x33, 0x33, o[12], o[13], o[14], o[15]])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a MAC address (want six hex pairs separated by ':'): {0:?}")]
pub struct MacAddrParseError(pub String);

impl FromStr for MacAddr {
    type Err = MacAddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacAddrParseError(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

impl From<[u8; 6]> for MacAddr {
    fn from(bytes: [u8; 6]) -> Self {
        MacAddr(bytes)
    }
}

/// An Ethernet II header. 802.1Q tags are not parsed: the kernel strips
/// VLAN tags into packet metadata before AF_PACKET sees the frame on the
/// VLAN's own device, which is where the speaker listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EthernetHeader {
    pub destination: MacAddr,
    pub source: MacAddr,
    pub ethertype: u16,
}

impl EthernetHeader {
    /// The header and the payload after it.
    pub fn parse(frame: &[u8]) -> Result<(Self, &[u8]), Truncated> {
        let destination = MacAddr(bytes_at(frame, 0, "Ethernet destination")?);
        let source = MacAddr(bytes_at(frame, 6, "Ethernet source")?);
        let ethertype = u16_at(frame, 12, "EtherType")?;
        let payload = frame.get(HEADER_LEN..).unwrap_or_default();
        Ok((
            EthernetHeader {
                destination,
                source,
                ethertype,
            },
            payload,
        ))
    }

    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.destination.0);
        out.extend_from_slice(&self.source.0);
        out.extend_from_slice(&self.ethertype.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn mac_displays_and_parses_as_colon_hex() {
        let mac = MacAddr([0x02, 0x00, 0x5e, 0x0a, 0xbc, 0xff]);
        assert_eq!(mac.to_string(), "02:00:5e:0a:bc:ff");
        assert_eq!("02:00:5E:0a:bc:ff".parse::<MacAddr>(), Ok(mac));
        for bad in [
            "",
            "02:00:5e:0a:bc",
            "02:00:5e:0a:bc:ff:00",
            "2:00:5e:0a:bc:ff",
            "zz:00:5e:0a:bc:ff",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn ipv6_multicast_mac_takes_the_last_four_bytes() {
        assert_eq!(
            MacAddr::ipv6_multicast("ff02::1".parse().unwrap()).to_string(),
            "33:33:00:00:00:01"
        );
        assert_eq!(
            MacAddr::ipv6_multicast("ff02::1:ff08:5".parse().unwrap()).to_string(),
            "33:33:ff:08:00:05"
        );
        assert!(MacAddr::BROADCAST.is_multicast() && MacAddr::BROADCAST.is_broadcast());
        assert!(!MacAddr([0x02, 0, 0, 0, 0, 1]).is_multicast());
    }

    #[test]
    fn header_fixture() {
        let frame = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // destination
            0x02, 0x00, 0x00, 0x00, 0x00, 0x01, // source
            0x08, 0x06, // ARP
            0xaa, // payload
        ];
        let (h, payload) = EthernetHeader::parse(&frame).unwrap();
        assert_eq!(h.destination, MacAddr::BROADCAST);
        assert_eq!(h.source, MacAddr([2, 0, 0, 0, 0, 1]));
        assert_eq!(h.ethertype, ETHERTYPE_ARP);
        assert_eq!(payload, &[0xaa]);
        let mut out = Vec::new();
        h.write(&mut out);
        assert_eq!(out, frame[..14]);
        assert!(EthernetHeader::parse(&frame[..13]).is_err());
    }

    proptest! {
        #[test]
        fn mac_display_round_trips(bytes: [u8; 6]) {
            let mac = MacAddr(bytes);
            prop_assert_eq!(mac.to_string().parse::<MacAddr>(), Ok(mac));
        }

        #[test]
        fn header_round_trips(dst: [u8; 6], src: [u8; 6], ethertype: u16) {
            let h = EthernetHeader { destination: MacAddr(dst), source: MacAddr(src), ethertype };
            let mut out = Vec::new();
            h.write(&mut out);
            let (back, rest) = EthernetHeader::parse(&out).unwrap();
            prop_assert_eq!(back, h);
            prop_assert!(rest.is_empty());
        }
    }
}
