//! ARP for IPv4 over Ethernet (RFC 826), with the frames the speaker sends:
//! replies, gratuitous announcements (RFC 5227 §3, RFC 5944 §4.6) and
//! RFC 5227 probes.

use std::net::Ipv4Addr;

use super::ether::{ETHERTYPE_ARP, EthernetHeader, MacAddr};
use super::{Truncated, bytes_at, pad, u16_at};

const HTYPE_ETHERNET: u16 = 1;
const PTYPE_IPV4: u16 = 0x0800;
/// Bytes of an Ethernet/IPv4 ARP packet after the Ethernet header.
pub const PACKET_LEN: usize = 28;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArpOp {
    Request,
    Reply,
}

impl ArpOp {
    fn code(self) -> u16 {
        match self {
            ArpOp::Request => 1,
            ArpOp::Reply => 2,
        }
    }
}

/// An Ethernet/IPv4 ARP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arp {
    pub op: ArpOp,
    pub sender_mac: MacAddr,
    pub sender_ip: Ipv4Addr,
    pub target_mac: MacAddr,
    pub target_ip: Ipv4Addr,
}

impl Arp {
    /// An RFC 5227 probe: "who has this address" asked without claiming
    /// any address, so no receiver's cache is touched.
    pub fn is_probe(&self) -> bool {
        self.op == ArpOp::Request && self.sender_ip.is_unspecified()
    }

    /// A gratuitous request or reply: the sender announces its own address
    /// (SPA = TPA).
    pub fn is_gratuitous(&self) -> bool {
        self.sender_ip == self.target_ip && !self.sender_ip.is_unspecified()
    }
}

/// Why a frame is not an Ethernet/IPv4 ARP request or reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArpError {
    #[error("truncated ARP frame: {0}")]
    Truncated(#[from] Truncated),
    #[error("EtherType {0:#06x} is not ARP")]
    NotArp(u16),
    #[error("ARP hardware type {0} is not Ethernet")]
    HardwareType(u16),
    #[error("ARP protocol type {0:#06x} is not IPv4")]
    ProtocolType(u16),
    #[error("ARP address lengths {hardware}/{protocol} are not 6/4")]
    AddressLengths { hardware: u8, protocol: u8 },
    #[error("ARP opcode {0} is neither request (1) nor reply (2)")]
    Opcode(u16),
}

/// An ARP packet with the Ethernet header it came in (or goes out) in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArpFrame {
    pub ethernet: EthernetHeader,
    pub arp: Arp,
}

impl ArpFrame {
    /// Parses a whole Ethernet frame; trailing padding is ignored.
    pub fn parse(frame: &[u8]) -> Result<Self, ArpError> {
        let (ethernet, p) = EthernetHeader::parse(frame)?;
        if ethernet.ethertype != ETHERTYPE_ARP {
            return Err(ArpError::NotArp(ethernet.ethertype));
        }
        let htype = u16_at(p, 0, "ARP hardware type")?;
        let ptype = u16_at(p, 2, "ARP protocol type")?;
        let [hardware, protocol] = bytes_at(p, 4, "ARP address lengths")?;
        let op = u16_at(p, 6, "ARP opcode")?;
        if htype != HTYPE_ETHERNET {
            return Err(ArpError::HardwareType(htype));
        }
        if ptype != PTYPE_IPV4 {
            return Err(ArpError::ProtocolType(ptype));
        }
        if (hardware, protocol) != (6, 4) {
            return Err(ArpError::AddressLengths { hardware, protocol });
        }
        let op = match op {
            1 => ArpOp::Request,
            2 => ArpOp::Reply,
            other => return Err(ArpError::Opcode(other)),
        };
        Ok(ArpFrame {
            ethernet,
            arp: Arp {
                op,
                sender_mac: MacAddr(bytes_at(p, 8, "ARP sender MAC")?),
                sender_ip: Ipv4Addr::from(bytes_at::<4>(p, 14, "ARP sender IP")?),
                target_mac: MacAddr(bytes_at(p, 18, "ARP target MAC")?),
                target_ip: Ipv4Addr::from(bytes_at::<4>(p, 24, "ARP target IP")?),
            },
        })
    }

    /// The frame on the wire, padded to 60 bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let a = &self.arp;
        let mut out = Vec::with_capacity(super::MIN_FRAME_LEN);
        self.ethernet.write(&mut out);
        out.extend_from_slice(&HTYPE_ETHERNET.to_be_bytes());
        out.extend_from_slice(&PTYPE_IPV4.to_be_bytes());
        out.extend_from_slice(&[6, 4]);
        out.extend_from_slice(&a.op.code().to_be_bytes());
        out.extend_from_slice(&a.sender_mac.0);
        out.extend_from_slice(&a.sender_ip.octets());
        out.extend_from_slice(&a.target_mac.0);
        out.extend_from_slice(&a.target_ip.octets());
        pad(&mut out);
        out
    }

    /// Our answer to a request for an address we announce from `own_mac`:
    /// sent to the asker's ARP sender MAC (where it wants the answer, even
    /// when a bridge or proxy put another Ethernet source on the frame).
    /// A probe (SPA 0.0.0.0) gets TPA 0.0.0.0, as Linux answers one. `None`
    /// for anything but a request.
    pub fn reply(&self, own_mac: MacAddr) -> Option<ArpFrame> {
        let req = &self.arp;
        (req.op == ArpOp::Request).then_some(ArpFrame {
            ethernet: EthernetHeader {
                destination: req.sender_mac,
                source: own_mac,
                ethertype: ETHERTYPE_ARP,
            },
            arp: Arp {
                op: ArpOp::Reply,
                sender_mac: own_mac,
                sender_ip: req.target_ip,
                target_mac: req.sender_mac,
                target_ip: req.sender_ip,
            },
        })
    }

    /// The RFC 5227 announcement form of gratuitous ARP: a broadcast
    /// request with SPA = TPA = `ip` and THA zero.
    pub fn gratuitous_request(ip: Ipv4Addr, own_mac: MacAddr) -> ArpFrame {
        Self::broadcast(ArpOp::Request, own_mac, ip, MacAddr::ZERO, ip)
    }

    /// The RFC 5944 reply form: a broadcast reply with SPA = TPA = `ip`
    /// and THA = our MAC. Some stacks update their caches only from
    /// replies, so takeovers send both forms.
    pub fn gratuitous_reply(ip: Ipv4Addr, own_mac: MacAddr) -> ArpFrame {
        Self::broadcast(ArpOp::Reply, own_mac, ip, own_mac, ip)
    }

    /// An RFC 5227 probe for `ip`: SPA 0.0.0.0, so asking pollutes no cache;
    /// any answer means another host holds the address.
    pub fn probe(ip: Ipv4Addr, own_mac: MacAddr) -> ArpFrame {
        Self::broadcast(
            ArpOp::Request,
            own_mac,
            Ipv4Addr::UNSPECIFIED,
            MacAddr::ZERO,
            ip,
        )
    }

    fn broadcast(
        op: ArpOp,
        own_mac: MacAddr,
        sender_ip: Ipv4Addr,
        target_mac: MacAddr,
        target_ip: Ipv4Addr,
    ) -> ArpFrame {
        ArpFrame {
            ethernet: EthernetHeader {
                destination: MacAddr::BROADCAST,
                source: own_mac,
                ethertype: ETHERTYPE_ARP,
            },
            arp: Arp {
                op,
                sender_mac: own_mac,
                sender_ip,
                target_mac,
                target_ip,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CLIENT: MacAddr = MacAddr([0x02, 0x00, 0x00, 0x00, 0x00, 0x01]);
    const NODE: MacAddr = MacAddr([0x02, 0x00, 0x00, 0x00, 0x00, 0x02]);
    const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 8, 1);
    const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 8, 5);

    /// "Who has 198.18.8.5? Tell 198.18.8.1", written field by field from
    /// RFC 826, with the 18 bytes of padding a NIC adds to reach 60.
    const REQUEST: [u8; 60] = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // Ethernet destination: broadcast
        0x02, 0x00, 0x00, 0x00, 0x00, 0x01, // Ethernet source
        0x08, 0x06, // EtherType ARP
        0x00, 0x01, // htype Ethernet
        0x08, 0x00, // ptype IPv4
        0x06, 0x04, // hlen, plen
        0x00, 0x01, // op request
        0x02, 0x00, 0x00, 0x00, 0x00, 0x01, // SHA
        198, 18, 8, 1, // SPA
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // THA
        198, 18, 8, 5, // TPA
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // padding
    ];

    /// The answer the node must send to [`REQUEST`].
    const REPLY: [u8; 60] = [
        0x02, 0x00, 0x00, 0x00, 0x00, 0x01, // Ethernet destination: the asker
        0x02, 0x00, 0x00, 0x00, 0x00, 0x02, // Ethernet source: the node
        0x08, 0x06, // EtherType ARP
        0x00, 0x01, 0x08, 0x00, 0x06, 0x04, // Ethernet/IPv4
        0x00, 0x02, // op reply
        0x02, 0x00, 0x00, 0x00, 0x00, 0x02, // SHA: the node
        198, 18, 8, 5, // SPA: the LB IP
        0x02, 0x00, 0x00, 0x00, 0x00, 0x01, // THA: the asker
        198, 18, 8, 1, // TPA: the asker
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];

    #[test]
    fn parses_a_request() {
        let f = ArpFrame::parse(&REQUEST).unwrap();
        assert_eq!(f.ethernet.destination, MacAddr::BROADCAST);
        assert_eq!(
            f.arp,
            Arp {
                op: ArpOp::Request,
                sender_mac: CLIENT,
                sender_ip: CLIENT_IP,
                target_mac: MacAddr::ZERO,
                target_ip: LB_IP,
            }
        );
        assert!(!f.arp.is_probe() && !f.arp.is_gratuitous());
        // Without the padding, as a veth delivers it.
        assert_eq!(ArpFrame::parse(&REQUEST[..42]), Ok(f));
    }

    #[test]
    fn answers_a_request_byte_for_byte() {
        let reply = ArpFrame::parse(&REQUEST).unwrap().reply(NODE).unwrap();
        assert_eq!(reply.to_bytes(), REPLY);
        assert_eq!(ArpFrame::parse(&REPLY).unwrap().reply(NODE), None);
    }

    #[test]
    fn answers_a_probe_with_tpa_zero() {
        let probe = ArpFrame::probe(LB_IP, CLIENT);
        assert!(probe.arp.is_probe());
        let reply = probe.reply(NODE).unwrap();
        assert_eq!(reply.arp.target_ip, Ipv4Addr::UNSPECIFIED);
        assert_eq!(reply.ethernet.destination, CLIENT);
        assert_eq!(reply.arp.sender_ip, LB_IP);
    }

    #[test]
    fn gratuitous_and_probe_fixtures() {
        let garp_request = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0x00, 0x00, 0x00, 0x00, 0x02, 0x08, 0x06,
            0x00, 0x01, 0x08, 0x00, 0x06, 0x04, //
            0x00, 0x01, // request
            0x02, 0x00, 0x00, 0x00, 0x00, 0x02, 198, 18, 8, 5, // SHA, SPA
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 198, 18, 8, 5, // THA 0, TPA = SPA
        ];
        let garp_reply = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0x00, 0x00, 0x00, 0x00, 0x02, 0x08, 0x06,
            0x00, 0x01, 0x08, 0x00, 0x06, 0x04, //
            0x00, 0x02, // reply
            0x02, 0x00, 0x00, 0x00, 0x00, 0x02, 198, 18, 8, 5, // SHA, SPA
            0x02, 0x00, 0x00, 0x00, 0x00, 0x02, 198, 18, 8, 5, // THA = SHA, TPA = SPA
        ];
        let probe = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0x00, 0x00, 0x00, 0x00, 0x02, 0x08, 0x06,
            0x00, 0x01, 0x08, 0x00, 0x06, 0x04, //
            0x00, 0x01, // request
            0x02, 0x00, 0x00, 0x00, 0x00, 0x02, 0, 0, 0, 0, // SHA, SPA 0.0.0.0
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 198, 18, 8, 5, // THA 0, TPA
        ];
        let padded = |b: &[u8]| {
            let mut v = b.to_vec();
            v.resize(60, 0);
            v
        };
        let req = ArpFrame::gratuitous_request(LB_IP, NODE);
        let rep = ArpFrame::gratuitous_reply(LB_IP, NODE);
        assert_eq!(req.to_bytes(), padded(&garp_request));
        assert_eq!(rep.to_bytes(), padded(&garp_reply));
        assert_eq!(ArpFrame::probe(LB_IP, NODE).to_bytes(), padded(&probe));
        assert!(req.arp.is_gratuitous() && rep.arp.is_gratuitous());
    }

    #[test]
    fn refuses_what_is_not_ethernet_ipv4_arp() {
        let with = |at: usize, bytes: &[u8]| {
            let mut f = REQUEST;
            f[at..at + bytes.len()].copy_from_slice(bytes);
            ArpFrame::parse(&f)
        };
        assert_eq!(with(12, &[0x86, 0xdd]), Err(ArpError::NotArp(0x86dd)));
        assert_eq!(with(14, &[0, 6]), Err(ArpError::HardwareType(6)));
        assert_eq!(with(16, &[0x86, 0xdd]), Err(ArpError::ProtocolType(0x86dd)));
        assert_eq!(
            with(18, &[6, 16]),
            Err(ArpError::AddressLengths {
                hardware: 6,
                protocol: 16
            })
        );
        assert_eq!(with(20, &[0, 8]), Err(ArpError::Opcode(8)));
        for len in 0..42 {
            assert!(
                matches!(
                    ArpFrame::parse(&REQUEST[..len]),
                    Err(ArpError::Truncated(_))
                ),
                "{len}"
            );
        }
    }

    fn arb_arp() -> impl Strategy<Value = ArpFrame> {
        (
            any::<[u8; 6]>(),
            any::<[u8; 6]>(),
            any::<bool>(),
            any::<[u8; 6]>(),
            any::<u32>(),
            any::<[u8; 6]>(),
            any::<u32>(),
        )
            .prop_map(|(dst, src, request, sha, spa, tha, tpa)| ArpFrame {
                ethernet: EthernetHeader {
                    destination: MacAddr(dst),
                    source: MacAddr(src),
                    ethertype: ETHERTYPE_ARP,
                },
                arp: Arp {
                    op: if request {
                        ArpOp::Request
                    } else {
                        ArpOp::Reply
                    },
                    sender_mac: MacAddr(sha),
                    sender_ip: spa.into(),
                    target_mac: MacAddr(tha),
                    target_ip: tpa.into(),
                },
            })
    }

    proptest! {
        #[test]
        fn build_then_parse_gives_the_fields_back(f in arb_arp()) {
            let bytes = f.to_bytes();
            prop_assert_eq!(bytes.len(), 60);
            prop_assert_eq!(ArpFrame::parse(&bytes), Ok(f));
        }

        #[test]
        fn reply_swaps_sender_and_target(f in arb_arp(), own: [u8; 6]) {
            let own = MacAddr(own);
            match f.reply(own) {
                Some(r) => {
                    prop_assert_eq!(f.arp.op, ArpOp::Request);
                    prop_assert_eq!(r.arp.sender_ip, f.arp.target_ip);
                    prop_assert_eq!(r.arp.target_ip, f.arp.sender_ip);
                    prop_assert_eq!(r.arp.target_mac, f.arp.sender_mac);
                    prop_assert_eq!(r.ethernet.destination, f.arp.sender_mac);
                    prop_assert_eq!(r.arp.sender_mac, own);
                    prop_assert_eq!(ArpFrame::parse(&r.to_bytes()), Ok(r));
                }
                None => prop_assert_eq!(f.arp.op, ArpOp::Reply),
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = ArpFrame::parse(&bytes);
        }

        #[test]
        fn arp_shaped_noise_never_panics(mut tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            // Most random frames fail the EtherType check; this reaches the
            // field checks and reads behind it.
            let mut f = REQUEST[..20].to_vec();
            f.append(&mut tail);
            let _ = ArpFrame::parse(&f);
        }
    }
}
