//! IPv6 neighbour discovery over Ethernet: the IPv6 header and the ICMPv6
//! Neighbor Solicitation (135) and Advertisement (136) of RFC 4861, checked
//! as §7.1 says a receiver must, and the frames the speaker sends: answers
//! (§7.2.4), unsolicited advertisements (§7.2.6) and DAD-style probes
//! (RFC 4862 §5.4).
//!
//! Only frames whose IPv6 next header is ICMPv6 are accepted: NS and NA
//! carry no extension headers in practice, and the kernel-side BPF filter
//! already assumes so.

use std::net::Ipv6Addr;

use super::ether::{ETHERTYPE_IPV6, EthernetHeader, MacAddr};
use super::{Truncated, bytes_at, pad, u16_at};

const IPV6_HEADER_LEN: usize = 40;
const NEXT_HEADER_ICMPV6: u8 = 58;
/// RFC 4861 §7.1: ND messages are sent with hop limit 255 and dropped
/// otherwise, which proves they were not forwarded by a router.
pub const ND_HOP_LIMIT: u8 = 255;
const TYPE_NS: u8 = 135;
const TYPE_NA: u8 = 136;
/// Type, code, checksum, flags/reserved and the target address.
const MESSAGE_MIN_LEN: usize = 24;
const OPTION_SOURCE_LL: u8 = 1;
const OPTION_TARGET_LL: u8 = 2;
const FLAG_ROUTER: u8 = 0x80;
const FLAG_SOLICITED: u8 = 0x40;
const FLAG_OVERRIDE: u8 = 0x20;

/// ff02::1, where unsolicited advertisements and answers to DAD go.
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// The solicited-node multicast group of `ip` (RFC 4291 §2.7.1):
/// ff02::1:ff00:0/104 with the low 24 bits of `ip`. Solicitations for `ip`
/// are sent there, so the announcing node must have joined it. One
/// implementation, shared with the memberships in `ferrolb-netraw`.
pub use ferrolb_netraw::solicited_node;

pub fn is_solicited_node(ip: Ipv6Addr) -> bool {
    solicited_node(ip) == ip
}

/// The ICMPv6 checksum of `message` between `source` and `destination`
/// (RFC 4443 §2.3 over the RFC 8200 §8.1 pseudo-header). Over a message
/// whose checksum field holds its checksum, this gives 0.
pub fn checksum(source: Ipv6Addr, destination: Ipv6Addr, message: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    let mut add = |bytes: &[u8]| {
        let mut words = bytes.chunks_exact(2);
        for w in &mut words {
            sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
        }
        if let [last] = words.remainder() {
            sum += u64::from(u16::from_be_bytes([*last, 0]));
        }
    };
    add(&source.octets());
    add(&destination.octets());
    // The upper-layer length is a u32 in the pseudo-header; messages we see
    // are bounded by the u16 payload length, so this never truncates.
    add(&u32::try_from(message.len())
        .unwrap_or(u32::MAX)
        .to_be_bytes());
    add(&[0, 0, 0, NEXT_HEADER_ICMPV6]);
    add(message);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // After folding, sum fits 16 bits.
    !(sum as u16)
}

/// A Neighbor Solicitation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Solicitation {
    pub target: Ipv6Addr,
    /// The Source Link-Layer Address option; absent in DAD probes.
    pub source_ll: Option<MacAddr>,
}

/// A Neighbor Advertisement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Advertisement {
    pub target: Ipv6Addr,
    /// R: the sender is a router. The speaker always sends 0.
    pub router_flag: bool,
    /// S: an answer to a solicitation (confirms reachability).
    pub solicited_flag: bool,
    /// O: replace a cached link-layer address. Needed for a takeover to
    /// move clients that already cached the old owner's MAC.
    pub override_flag: bool,
    /// The Target Link-Layer Address option.
    pub target_ll: Option<MacAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NdpMessage {
    Solicitation(Solicitation),
    Advertisement(Advertisement),
}

impl NdpMessage {
    pub fn target(&self) -> Ipv6Addr {
        match self {
            NdpMessage::Solicitation(s) => s.target,
            NdpMessage::Advertisement(a) => a.target,
        }
    }
}

/// An NS or NA with the Ethernet and IPv6 headers it came in (or goes out)
/// in. Hop limit and IPv6 version are not kept: a valid frame has 255 and 6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NdpFrame {
    pub ethernet: EthernetHeader,
    pub source: Ipv6Addr,
    pub destination: Ipv6Addr,
    pub message: NdpMessage,
}

/// Why a frame is not a valid NS or NA (RFC 4861 §7.1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NdpError {
    #[error("truncated NDP frame: {0}")]
    Truncated(#[from] Truncated),
    #[error("EtherType {0:#06x} is not IPv6")]
    NotIpv6(u16),
    #[error("IP version {0} is not 6")]
    Version(u8),
    #[error("next header {0} is not ICMPv6")]
    NotIcmpv6(u8),
    #[error("ICMPv6 type {0} is neither a neighbour solicitation nor an advertisement")]
    NotNeighborDiscovery(u8),
    #[error("hop limit {0} is not 255: the message was forwarded or forged")]
    HopLimit(u8),
    #[error("ICMPv6 code {0} is not 0")]
    Code(u8),
    #[error("ICMPv6 message of {0} bytes is shorter than 24")]
    MessageLength(usize),
    #[error("ICMPv6 checksum {got:#06x} is wrong")]
    Checksum { got: u16 },
    #[error("target {0} is a multicast address")]
    MulticastTarget(Ipv6Addr),
    #[error("source {0} is a multicast address")]
    MulticastSource(Ipv6Addr),
    #[error("option of type {0} has length 0")]
    ZeroLengthOption(u8),
    #[error("option of type {kind} runs {len} bytes past the message")]
    OptionOverrun { kind: u8, len: usize },
    #[error("link-layer address option of {0} units is not an Ethernet address")]
    LinkLayerOptionLength(u8),
    #[error("solicitation from :: to {0}, which is not a solicited-node group")]
    DadDestination(Ipv6Addr),
    #[error("solicitation from :: carries a source link-layer address")]
    DadWithSourceLinkLayer,
    #[error("advertisement to multicast {0} has the solicited flag set")]
    SolicitedToMulticast(Ipv6Addr),
}

impl NdpFrame {
    /// Parses a whole Ethernet frame and validates it as RFC 4861 §7.1.1
    /// (NS) or §7.1.2 (NA) says; bytes beyond the IPv6 payload length are
    /// ignored.
    pub fn parse(frame: &[u8]) -> Result<Self, NdpError> {
        let (ethernet, ip) = EthernetHeader::parse(frame)?;
        if ethernet.ethertype != ETHERTYPE_IPV6 {
            return Err(NdpError::NotIpv6(ethernet.ethertype));
        }
        let [version_byte] = bytes_at(ip, 0, "IPv6 version")?;
        let payload_len = usize::from(u16_at(ip, 4, "IPv6 payload length")?);
        let [next_header, hop_limit] = bytes_at(ip, 6, "IPv6 next header")?;
        let source = Ipv6Addr::from(bytes_at::<16>(ip, 8, "IPv6 source")?);
        let destination = Ipv6Addr::from(bytes_at::<16>(ip, 24, "IPv6 destination")?);
        let version = version_byte >> 4;
        if version != 6 {
            return Err(NdpError::Version(version));
        }
        if next_header != NEXT_HEADER_ICMPV6 {
            return Err(NdpError::NotIcmpv6(next_header));
        }
        let message = ip
            .get(IPV6_HEADER_LEN..)
            .and_then(|rest| rest.get(..payload_len))
            .ok_or(Truncated {
                what: "IPv6 payload",
                needed: IPV6_HEADER_LEN + payload_len,
                got: ip.len(),
            })?;
        let [kind, code] = bytes_at(message, 0, "ICMPv6 type")?;
        if kind != TYPE_NS && kind != TYPE_NA {
            return Err(NdpError::NotNeighborDiscovery(kind));
        }
        if hop_limit != ND_HOP_LIMIT {
            return Err(NdpError::HopLimit(hop_limit));
        }
        if code != 0 {
            return Err(NdpError::Code(code));
        }
        if message.len() < MESSAGE_MIN_LEN {
            return Err(NdpError::MessageLength(message.len()));
        }
        if checksum(source, destination, message) != 0 {
            return Err(NdpError::Checksum {
                got: u16_at(message, 2, "ICMPv6 checksum")?,
            });
        }
        let [flags] = bytes_at(message, 4, "NA flags")?;
        let target = Ipv6Addr::from(bytes_at::<16>(message, 8, "ND target")?);
        if target.is_multicast() {
            return Err(NdpError::MulticastTarget(target));
        }
        let wanted_option = if kind == TYPE_NS {
            OPTION_SOURCE_LL
        } else {
            OPTION_TARGET_LL
        };
        let link_layer = link_layer_option(
            message.get(MESSAGE_MIN_LEN..).unwrap_or_default(),
            wanted_option,
        )?;
        let message = if kind == TYPE_NS {
            if source.is_multicast() {
                return Err(NdpError::MulticastSource(source));
            }
            if source.is_unspecified() {
                if !is_solicited_node(destination) {
                    return Err(NdpError::DadDestination(destination));
                }
                if link_layer.is_some() {
                    return Err(NdpError::DadWithSourceLinkLayer);
                }
            }
            NdpMessage::Solicitation(Solicitation {
                target,
                source_ll: link_layer,
            })
        } else {
            let solicited_flag = flags & FLAG_SOLICITED != 0;
            if destination.is_multicast() && solicited_flag {
                return Err(NdpError::SolicitedToMulticast(destination));
            }
            NdpMessage::Advertisement(Advertisement {
                target,
                router_flag: flags & FLAG_ROUTER != 0,
                solicited_flag,
                override_flag: flags & FLAG_OVERRIDE != 0,
                target_ll: link_layer,
            })
        };
        Ok(NdpFrame {
            ethernet,
            source,
            destination,
            message,
        })
    }

    /// The frame on the wire, with hop limit 255 and the checksum filled in.
    pub fn to_bytes(&self) -> Vec<u8> {
        let (kind, flags, target, option) = match self.message {
            NdpMessage::Solicitation(s) => (
                TYPE_NS,
                0,
                s.target,
                s.source_ll.map(|m| (OPTION_SOURCE_LL, m)),
            ),
            NdpMessage::Advertisement(a) => {
                let flag = |set: bool, bit: u8| if set { bit } else { 0 };
                let flags = flag(a.router_flag, FLAG_ROUTER)
                    | flag(a.solicited_flag, FLAG_SOLICITED)
                    | flag(a.override_flag, FLAG_OVERRIDE);
                (
                    TYPE_NA,
                    flags,
                    a.target,
                    a.target_ll.map(|m| (OPTION_TARGET_LL, m)),
                )
            }
        };
        let mut icmp = Vec::with_capacity(32);
        icmp.extend_from_slice(&[kind, 0, 0, 0, flags, 0, 0, 0]);
        icmp.extend_from_slice(&target.octets());
        if let Some((option, mac)) = option {
            // Length 1 = 8 bytes: type, length and the 6-byte MAC.
            icmp.extend_from_slice(&[option, 1]);
            icmp.extend_from_slice(&mac.0);
        }
        let sum = checksum(self.source, self.destination, &icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());

        let mut out = Vec::with_capacity(14 + IPV6_HEADER_LEN + icmp.len());
        self.ethernet.write(&mut out);
        out.extend_from_slice(&[0x60, 0, 0, 0]);
        // At most 32 bytes of ICMPv6, so the length fits.
        out.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
        out.extend_from_slice(&[NEXT_HEADER_ICMPV6, ND_HOP_LIMIT]);
        out.extend_from_slice(&self.source.octets());
        out.extend_from_slice(&self.destination.octets());
        out.extend_from_slice(&icmp);
        pad(&mut out);
        out
    }

    /// Our answer to a solicitation for an address we announce from
    /// `own_mac`, sent from `source` (an address of the interface, normally
    /// its link-local). RFC 4861 §7.2.4: an NS from `::` (DAD, or a probe
    /// for the address) is answered to all-nodes with S=0; any other is
    /// answered unicast with S=1, to its Source-LL option or else its
    /// Ethernet source. O=1 always, so clients replace a cached old owner;
    /// R=0 always; the Target-LL option always. `None` for anything but a
    /// solicitation.
    pub fn advertisement_for(&self, own_mac: MacAddr, source: Ipv6Addr) -> Option<NdpFrame> {
        let NdpMessage::Solicitation(ns) = self.message else {
            return None;
        };
        let (destination, eth_destination, solicited_flag) = if self.source.is_unspecified() {
            (ALL_NODES, MacAddr::ipv6_multicast(ALL_NODES), false)
        } else {
            (
                self.source,
                ns.source_ll.unwrap_or(self.ethernet.source),
                true,
            )
        };
        Some(NdpFrame {
            ethernet: EthernetHeader {
                destination: eth_destination,
                source: own_mac,
                ethertype: ETHERTYPE_IPV6,
            },
            source,
            destination,
            message: NdpMessage::Advertisement(Advertisement {
                target: ns.target,
                router_flag: false,
                solicited_flag,
                override_flag: true,
                target_ll: Some(own_mac),
            }),
        })
    }

    /// An unsolicited advertisement of `target` at `own_mac` (RFC 4861
    /// §7.2.6) to all-nodes, S=0 O=1, sent on takeover so clients with an
    /// entry for the old owner move over.
    pub fn unsolicited_advertisement(
        target: Ipv6Addr,
        own_mac: MacAddr,
        source: Ipv6Addr,
    ) -> NdpFrame {
        NdpFrame {
            ethernet: EthernetHeader {
                destination: MacAddr::ipv6_multicast(ALL_NODES),
                source: own_mac,
                ethertype: ETHERTYPE_IPV6,
            },
            source,
            destination: ALL_NODES,
            message: NdpMessage::Advertisement(Advertisement {
                target,
                router_flag: false,
                solicited_flag: false,
                override_flag: true,
                target_ll: Some(own_mac),
            }),
        }
    }

    /// A duplicate-address-detection solicitation for `target` (RFC 4862
    /// §5.4.2): from `::` to the target's solicited-node group and without
    /// a Source-LL option, so it changes no neighbour cache. Any NA for the
    /// target in answer means another host holds it.
    pub fn dad_solicitation(target: Ipv6Addr, own_mac: MacAddr) -> NdpFrame {
        let group = solicited_node(target);
        NdpFrame {
            ethernet: EthernetHeader {
                destination: MacAddr::ipv6_multicast(group),
                source: own_mac,
                ethertype: ETHERTYPE_IPV6,
            },
            source: Ipv6Addr::UNSPECIFIED,
            destination: group,
            message: NdpMessage::Solicitation(Solicitation {
                target,
                source_ll: None,
            }),
        }
    }
}

/// The first option of `kind` among `options`, after checking every option
/// has a non-zero length and fits (§7.1.1/§7.1.2); other options are
/// skipped, as §4.6 says unknown ones must be.
fn link_layer_option(mut options: &[u8], kind: u8) -> Result<Option<MacAddr>, NdpError> {
    let mut found = None;
    while !options.is_empty() {
        let [this_kind, units] = bytes_at(options, 0, "ND option header")?;
        if units == 0 {
            return Err(NdpError::ZeroLengthOption(this_kind));
        }
        let len = usize::from(units) * 8;
        let Some(option) = options.get(..len) else {
            return Err(NdpError::OptionOverrun {
                kind: this_kind,
                len: len - options.len(),
            });
        };
        if this_kind == kind && found.is_none() {
            // RFC 2464 §6: on Ethernet the option is one unit, a 6-byte MAC.
            if units != 1 {
                return Err(NdpError::LinkLayerOptionLength(units));
            }
            found = Some(MacAddr(bytes_at(option, 2, "link-layer address")?));
        }
        options = options.get(len..).unwrap_or_default();
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CLIENT: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x01]);
    const NODE: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x02]);

    fn ip(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    /// fe80::1 (02:00:00:00:00:01) asks ff02::1:ff08:5 for 2001:db8::8:5,
    /// written from RFC 8200 §3 and RFC 4861 §4.3; the checksum was
    /// worked out separately (a Python script over the pseudo-header).
    const NS: [u8; 86] = [
        0x33, 0x33, 0xff, 0x08, 0x00, 0x05, // Ethernet destination
        0x02, 0x00, 0x00, 0x00, 0x00, 0x01, // Ethernet source
        0x86, 0xdd, // IPv6
        0x60, 0x00, 0x00, 0x00, // version 6, class 0, flow 0
        0x00, 0x20, // payload length 32
        0x3a, 0xff, // next header ICMPv6, hop limit 255
        0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, // fe80::1
        0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0xff, 0x08, 0x00, 0x05, // ff02::1:ff08:5
        0x87, 0x00, 0x4b, 0x49, // type 135, code 0, checksum
        0x00, 0x00, 0x00, 0x00, // reserved
        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x08, 0x00, 0x05, // target
        0x01, 0x01, 0x02, 0x00, 0x00, 0x00, 0x00, 0x01, // Source LL option
    ];

    /// The node's answer to [`NS`], from fe80::2.
    const NA: [u8; 86] = [
        0x02, 0x00, 0x00, 0x00, 0x00, 0x01, // Ethernet destination: the asker
        0x02, 0x00, 0x00, 0x00, 0x00, 0x02, // Ethernet source: the node
        0x86, 0xdd, //
        0x60, 0x00, 0x00, 0x00, 0x00, 0x20, 0x3a, 0xff, //
        0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, // fe80::2
        0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, // fe80::1
        0x88, 0x00, 0xe8, 0xd6, // type 136, code 0, checksum
        0x60, 0x00, 0x00, 0x00, // S=1, O=1
        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x08, 0x00, 0x05, // target
        0x02, 0x01, 0x02, 0x00, 0x00, 0x00, 0x00, 0x02, // Target LL option
    ];

    /// A DAD probe for 2001:db8::8:5: from ::, no options.
    const DAD: [u8; 78] = [
        0x33, 0x33, 0xff, 0x08, 0x00, 0x05, 0x02, 0x00, 0x00, 0x00, 0x00, 0x01, 0x86, 0xdd, //
        0x60, 0x00, 0x00, 0x00, 0x00, 0x18, 0x3a, 0xff, //
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // ::
        0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0xff, 0x08, 0x00, 0x05, //
        0x87, 0x00, 0x4c, 0xd5, 0x00, 0x00, 0x00, 0x00, //
        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x08, 0x00, 0x05,
    ];

    /// The node's defence against [`DAD`]: to all-nodes, S=0, O=1.
    const NA_TO_ALL: [u8; 86] = [
        0x33, 0x33, 0x00, 0x00, 0x00, 0x01, 0x02, 0x00, 0x00, 0x00, 0x00, 0x02, 0x86, 0xdd, //
        0x60, 0x00, 0x00, 0x00, 0x00, 0x20, 0x3a, 0xff, //
        0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, // fe80::2
        0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, // ff02::1
        0x88, 0x00, 0x28, 0x55, 0x20, 0x00, 0x00, 0x00, // O=1
        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x08, 0x00, 0x05, //
        0x02, 0x01, 0x02, 0x00, 0x00, 0x00, 0x00, 0x02,
    ];

    #[test]
    fn solicited_node_group_takes_the_low_24_bits() {
        assert_eq!(solicited_node(ip("2001:db8::8:5")), ip("ff02::1:ff08:5"));
        assert_eq!(
            solicited_node(ip("2001:db8::abcd:ef12:3456")),
            ip("ff02::1:ff12:3456")
        );
        assert!(is_solicited_node(ip("ff02::1:ff08:5")));
        assert!(!is_solicited_node(ALL_NODES));
    }

    #[test]
    fn checksum_of_fixtures_verifies() {
        assert_eq!(checksum(ip("fe80::1"), ip("ff02::1:ff08:5"), &NS[54..]), 0);
        // Odd lengths pad with a zero byte.
        let s = checksum(Ipv6Addr::UNSPECIFIED, Ipv6Addr::UNSPECIFIED, &[0x12]);
        assert_eq!(s, !(0x1200u16 + 1 + 58));
    }

    #[test]
    fn parses_a_solicitation() {
        let f = NdpFrame::parse(&NS).unwrap();
        assert_eq!(f.source, ip("fe80::1"));
        assert_eq!(f.destination, ip("ff02::1:ff08:5"));
        assert_eq!(f.ethernet.source, CLIENT);
        assert_eq!(
            f.message,
            NdpMessage::Solicitation(Solicitation {
                target: ip("2001:db8::8:5"),
                source_ll: Some(CLIENT),
            })
        );
    }

    #[test]
    fn answers_a_solicitation_byte_for_byte() {
        let ns = NdpFrame::parse(&NS).unwrap();
        let na = ns.advertisement_for(NODE, ip("fe80::2")).unwrap();
        assert_eq!(na.to_bytes(), NA);
        let parsed = NdpFrame::parse(&NA).unwrap();
        assert_eq!(parsed, na);
        assert_eq!(parsed.advertisement_for(NODE, ip("fe80::2")), None);
    }

    #[test]
    fn answers_without_source_ll_go_to_the_ethernet_source() {
        let mut ns = NdpFrame::parse(&NS).unwrap();
        ns.message = NdpMessage::Solicitation(Solicitation {
            target: ip("2001:db8::8:5"),
            source_ll: None,
        });
        ns.ethernet.source = MacAddr([0x02, 0, 0, 0, 0, 0x09]);
        let na = ns.advertisement_for(NODE, ip("fe80::2")).unwrap();
        assert_eq!(na.ethernet.destination, MacAddr([0x02, 0, 0, 0, 0, 0x09]));
        assert_eq!(na.destination, ip("fe80::1"));
    }

    #[test]
    fn defends_against_dad_to_all_nodes() {
        let dad = NdpFrame::parse(&DAD).unwrap();
        assert_eq!(dad.source, Ipv6Addr::UNSPECIFIED);
        let na = dad.advertisement_for(NODE, ip("fe80::2")).unwrap();
        assert_eq!(na.to_bytes(), NA_TO_ALL);
        assert_eq!(
            NdpFrame::unsolicited_advertisement(ip("2001:db8::8:5"), NODE, ip("fe80::2")),
            na
        );
    }

    #[test]
    fn dad_probe_matches_the_fixture() {
        let mut fixture = DAD;
        fixture[6..12].copy_from_slice(&NODE.0);
        // The source MAC is outside the checksum; the bytes are otherwise
        // those of the client's probe.
        assert_eq!(
            NdpFrame::dad_solicitation(ip("2001:db8::8:5"), NODE).to_bytes(),
            fixture
        );
    }

    /// `frame` with `bytes` written at `at` and the checksum redone, so a
    /// test reaches the check after it.
    fn edit(frame: &[u8], at: usize, bytes: &[u8]) -> Vec<u8> {
        let mut f = frame.to_vec();
        f[at..at + bytes.len()].copy_from_slice(bytes);
        fix_checksum(&mut f);
        f
    }

    fn fix_checksum(f: &mut [u8]) {
        let src = Ipv6Addr::from(<[u8; 16]>::try_from(&f[22..38]).unwrap());
        let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&f[38..54]).unwrap());
        f[56..58].copy_from_slice(&[0, 0]);
        let sum = checksum(src, dst, &f[54..]);
        f[56..58].copy_from_slice(&sum.to_be_bytes());
    }

    #[test]
    fn validates_as_rfc_4861_section_7_1() {
        use NdpError::*;
        let p = |f: &[u8]| NdpFrame::parse(f);
        assert_eq!(p(&edit(&NS, 12, &[0x08, 0x00])), Err(NotIpv6(0x0800)));
        assert_eq!(p(&edit(&NS, 14, &[0x40])), Err(Version(4)));
        assert_eq!(p(&edit(&NS, 20, &[17])), Err(NotIcmpv6(17)));
        assert_eq!(p(&edit(&NS, 21, &[64])), Err(HopLimit(64)));
        assert_eq!(p(&edit(&NS, 54, &[128])), Err(NotNeighborDiscovery(128)));
        assert_eq!(p(&edit(&NS, 55, &[1])), Err(Code(1)));
        let mut bad_sum = NS;
        bad_sum[57] ^= 1;
        assert_eq!(p(&bad_sum), Err(Checksum { got: 0x4b48 }));
        assert_eq!(
            p(&edit(&NS, 62, &[0xff, 0x02])),
            Err(MulticastTarget(ip("ff02:db8::8:5")))
        );
        assert_eq!(
            p(&edit(&NS, 22, &[0xff, 0x02])),
            Err(MulticastSource(ip("ff02::1")))
        );
        assert_eq!(p(&edit(&NS, 79, &[0])), Err(ZeroLengthOption(1)));
        assert_eq!(
            p(&edit(&NS, 79, &[2])),
            Err(OptionOverrun { kind: 1, len: 8 })
        );
        // A DAD probe with a Source-LL option, and one not sent to the
        // target's solicited-node group.
        let mut dad_sll = NS;
        dad_sll[22..38].copy_from_slice(&[0; 16]);
        fix_checksum(&mut dad_sll);
        assert_eq!(p(&dad_sll), Err(DadWithSourceLinkLayer));
        assert_eq!(
            p(&edit(&DAD, 38, &ALL_NODES.octets())),
            Err(DadDestination(ALL_NODES))
        );
        // Solicited advertisement to a multicast address.
        assert_eq!(
            p(&edit(&NA_TO_ALL, 58, &[0x60])),
            Err(SolicitedToMulticast(ALL_NODES))
        );
        // The IPv6 payload length says 8 bytes: too short for an NS.
        assert_eq!(p(&edit(&NS, 18, &[0, 8])), Err(MessageLength(8)));
        // It says 40 bytes, more than the frame has.
        assert!(matches!(p(&edit(&NS, 18, &[0, 40])), Err(Truncated(_))));
        for len in 0..NS.len() {
            assert!(p(&NS[..len]).is_err(), "{len}");
        }
    }

    #[test]
    fn skips_unknown_options_and_accepts_trailing_bytes() {
        // A nonce option (type 14, RFC 3971) before the Source-LL option.
        let mut f = NS[..78].to_vec();
        f.extend_from_slice(&[14, 1, 1, 2, 3, 4, 5, 6]);
        f.extend_from_slice(&NS[78..]);
        f[19] = 40;
        fix_checksum(&mut f);
        f.extend_from_slice(&[0xee; 4]); // beyond the payload length
        let parsed = NdpFrame::parse(&f).unwrap();
        assert_eq!(
            parsed.message,
            NdpMessage::Solicitation(Solicitation {
                target: ip("2001:db8::8:5"),
                source_ll: Some(CLIENT),
            })
        );
    }

    fn arb_ipv6() -> impl Strategy<Value = Ipv6Addr> {
        prop_oneof![
            any::<u128>().prop_map(Ipv6Addr::from),
            Just(Ipv6Addr::UNSPECIFIED),
            any::<u64>().prop_map(|low| Ipv6Addr::from((0xfe80u128 << 112) | u128::from(low))),
        ]
    }

    /// Any frame the RFC allows, built from arbitrary fields and then made
    /// valid where §7.1 restricts them.
    fn arb_frame() -> impl Strategy<Value = NdpFrame> {
        (
            any::<[u8; 6]>(),
            any::<[u8; 6]>(),
            arb_ipv6(),
            arb_ipv6(),
            arb_ipv6(),
            any::<bool>(),
            any::<[bool; 3]>(),
            proptest::option::of(any::<[u8; 6]>()),
        )
            .prop_map(
                |(dst_mac, src_mac, src, dst, target, is_ns, [r, s, o], ll)| {
                    let target = if target.is_multicast() {
                        Ipv6Addr::from(u128::from(target) & !(0xffu128 << 120))
                    } else {
                        target
                    };
                    let ll = ll.map(MacAddr);
                    let (src, dst, message) = if is_ns {
                        let src = if src.is_multicast() {
                            Ipv6Addr::UNSPECIFIED
                        } else {
                            src
                        };
                        if src.is_unspecified() {
                            let group = solicited_node(target);
                            (
                                src,
                                group,
                                NdpMessage::Solicitation(Solicitation {
                                    target,
                                    source_ll: None,
                                }),
                            )
                        } else {
                            (
                                src,
                                dst,
                                NdpMessage::Solicitation(Solicitation {
                                    target,
                                    source_ll: ll,
                                }),
                            )
                        }
                    } else {
                        let message = NdpMessage::Advertisement(Advertisement {
                            target,
                            router_flag: r,
                            solicited_flag: s && !dst.is_multicast(),
                            override_flag: o,
                            target_ll: ll,
                        });
                        (src, dst, message)
                    };
                    NdpFrame {
                        ethernet: EthernetHeader {
                            destination: MacAddr(dst_mac),
                            source: MacAddr(src_mac),
                            ethertype: ETHERTYPE_IPV6,
                        },
                        source: src,
                        destination: dst,
                        message,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn build_then_parse_gives_the_fields_back(f in arb_frame()) {
            prop_assert_eq!(NdpFrame::parse(&f.to_bytes()), Ok(f));
        }

        #[test]
        fn every_answer_is_valid_and_overrides(f in arb_frame(), mac: [u8; 6], src in arb_ipv6()) {
            let src = if src.is_multicast() { Ipv6Addr::UNSPECIFIED } else { src };
            if let Some(na) = f.advertisement_for(MacAddr(mac), src) {
                let parsed = NdpFrame::parse(&na.to_bytes());
                prop_assert_eq!(parsed, Ok(na));
                let NdpMessage::Advertisement(a) = na.message else { unreachable!() };
                prop_assert!(a.override_flag && !a.router_flag);
                prop_assert_eq!(a.target, f.message.target());
                prop_assert_eq!(a.solicited_flag, !f.source.is_unspecified());
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..160)) {
            let _ = NdpFrame::parse(&bytes);
        }

        #[test]
        fn icmp_shaped_noise_never_panics(
            kind in prop_oneof![Just(TYPE_NS), Just(TYPE_NA)],
            body in proptest::collection::vec(any::<u8>(), 0..96),
            declared in proptest::option::of(0u16..200),
        ) {
            // A valid IPv6 header and a good checksum around random
            // ICMPv6 bytes, so the option walk and the DAD rules run.
            let mut f = NS[..54].to_vec();
            let mut icmp = vec![kind, 0, 0, 0];
            icmp.extend_from_slice(&body);
            let len = declared.unwrap_or(icmp.len() as u16);
            f[18..20].copy_from_slice(&len.to_be_bytes());
            let sum = checksum(ip("fe80::1"), ip("ff02::1:ff08:5"), &icmp);
            icmp[2..4].copy_from_slice(&sum.to_be_bytes());
            f.extend_from_slice(&icmp);
            let _ = NdpFrame::parse(&f);
        }
    }
}
