//! Classic-BPF programs run by the kernel on each frame before it is
//! queued to a [`PacketSocket`](crate::PacketSocket), so the speaker wakes
//! only for frames it may answer. Both drop frames the host itself sends
//! (packet type OUTGOING): a protocol-bound packet socket is not handed
//! those today, but a socket bound to every protocol is, and the speaker
//! must never answer its own frames.

use socket2::SockFilter;

/// One classic-BPF instruction, kept in our own type so the tests can run
/// the programs (socket2's `SockFilter` has no getters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

// Opcodes (linux/filter.h, linux/bpf_common.h).
pub(crate) const LD_W_ABS: u16 = 0x20;
pub(crate) const LD_H_ABS: u16 = 0x28;
pub(crate) const LD_B_ABS: u16 = 0x30;
pub(crate) const JEQ_K: u16 = 0x15;
pub(crate) const RET_K: u16 = 0x06;
/// Loads at SKF_AD_OFF (-0x1000) and above read packet metadata, not bytes.
const SKF_AD_OFF: u32 = 0xffff_f000;
const SKF_AD_PKTTYPE: u32 = 4;
pub(crate) const PACKET_OUTGOING: u32 = 4;
/// Accept: keep the whole frame.
const KEEP: u32 = u32::MAX;

const fn ld(code: u16, k: u32) -> Insn {
    Insn {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

const fn jeq(k: u32, jt: u8, jf: u8) -> Insn {
    Insn {
        code: JEQ_K,
        jt,
        jf,
        k,
    }
}

const fn ret(k: u32) -> Insn {
    Insn {
        code: RET_K,
        jt: 0,
        jf: 0,
        k,
    }
}

/// Every ARP frame (any opcode; the parser decides what to do with it)
/// that the host did not send. Offsets are from the Ethernet header.
pub(crate) const ARP: [Insn; 6] = [
    ld(LD_H_ABS, 12),                          // 0: EtherType
    jeq(0x0806, 0, 3),                         // 1: ARP, else drop (5)
    ld(LD_W_ABS, SKF_AD_OFF + SKF_AD_PKTTYPE), // 2: packet type
    jeq(PACKET_OUTGOING, 1, 0),                // 3: ours: drop
    ret(KEEP),                                 // 4
    ret(0),                                    // 5
];

/// IPv6 neighbour solicitations and advertisements the host did not send:
/// next header ICMPv6 directly after the IPv6 header (ND messages carry no
/// extension headers), hop limit 255 (RFC 4861 §7.1: anything else was
/// forwarded and must be ignored), ICMPv6 type 135 or 136.
pub(crate) const NEIGHBOR_DISCOVERY: [Insn; 13] = [
    ld(LD_H_ABS, 12),                          // 0: EtherType
    jeq(0x86dd, 0, 10),                        // 1: IPv6, else drop (12)
    ld(LD_B_ABS, 20),                          // 2: next header
    jeq(58, 0, 8),                             // 3: ICMPv6, else drop
    ld(LD_B_ABS, 21),                          // 4: hop limit
    jeq(255, 0, 6),                            // 5: 255, else drop
    ld(LD_B_ABS, 54),                          // 6: ICMPv6 type
    jeq(135, 1, 0),                            // 7: NS: on to 9
    jeq(136, 0, 3),                            // 8: NA: on to 9, else drop
    ld(LD_W_ABS, SKF_AD_OFF + SKF_AD_PKTTYPE), // 9: packet type
    jeq(PACKET_OUTGOING, 1, 0),                // 10: ours: drop
    ret(KEEP),                                 // 11
    ret(0),                                    // 12
];

fn compile(program: &[Insn]) -> Vec<SockFilter> {
    program
        .iter()
        .map(|i| SockFilter::new(i.code, i.jt, i.jf, i.k))
        .collect()
}

/// The filter for an ARP socket ([`crate::ETHERTYPE_ARP`]).
pub fn arp() -> Vec<SockFilter> {
    compile(&ARP)
}

/// The filter for an NDP socket ([`crate::ETHERTYPE_IPV6`]).
pub fn neighbor_discovery() -> Vec<SockFilter> {
    compile(&NEIGHBOR_DISCOVERY)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `program` on `frame` received with packet type `pkttype` as the
    /// kernel's classic-BPF interpreter would, for the instructions these
    /// programs use: the bytes kept (0 = dropped). A load past the frame
    /// drops it, as in the kernel.
    fn run(program: &[Insn], frame: &[u8], pkttype: u32) -> u32 {
        let mut acc: u32 = 0;
        let mut pc = 0usize;
        loop {
            let i = program[pc];
            pc += 1;
            let load = |size: usize| -> Option<u32> {
                if i.k == SKF_AD_OFF + SKF_AD_PKTTYPE {
                    return Some(pkttype);
                }
                let at = i.k as usize;
                let bytes = frame.get(at..at + size)?;
                Some(bytes.iter().fold(0u32, |a, b| (a << 8) | u32::from(*b)))
            };
            match i.code {
                LD_W_ABS | LD_H_ABS | LD_B_ABS => {
                    let size = match i.code {
                        LD_W_ABS => 4,
                        LD_H_ABS => 2,
                        _ => 1,
                    };
                    match load(size) {
                        Some(v) => acc = v,
                        None => return 0,
                    }
                }
                JEQ_K => pc += usize::from(if acc == i.k { i.jt } else { i.jf }),
                RET_K => return i.k,
                other => panic!("opcode {other:#x} not modelled"),
            }
            assert!(pc < program.len(), "jump past the end");
        }
    }

    /// Every path ends in a return inside the program, as the kernel's
    /// checker demands.
    fn check_jumps(program: &[Insn]) {
        for (pc, i) in program.iter().enumerate() {
            if i.code == JEQ_K {
                assert!(pc + 1 + usize::from(i.jt.max(i.jf)) < program.len(), "{pc}");
            }
        }
        assert_eq!(program.last().map(|i| i.code), Some(RET_K));
    }

    fn arp_frame() -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
        f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f.resize(60, 0);
        f
    }

    fn nd_frame(icmp_type: u8, next_header: u8, hop_limit: u8) -> Vec<u8> {
        let mut f = vec![0x33, 0x33, 0xff, 0, 0, 1, 2, 0, 0, 0, 0, 1, 0x86, 0xdd];
        f.extend_from_slice(&[0x60, 0, 0, 0, 0, 32, next_header, hop_limit]);
        f.resize(54, 0);
        f.push(icmp_type);
        f.resize(86, 0);
        f
    }

    const HOST: u32 = 0;
    const BROADCAST: u32 = 1;
    const MULTICAST: u32 = 2;
    const OTHERHOST: u32 = 3;

    #[test]
    fn jumps_stay_inside_the_programs() {
        check_jumps(&ARP);
        check_jumps(&NEIGHBOR_DISCOVERY);
        assert_eq!(arp().len(), ARP.len());
        assert_eq!(neighbor_discovery().len(), NEIGHBOR_DISCOVERY.len());
    }

    #[test]
    fn arp_keeps_incoming_arp_only() {
        let f = arp_frame();
        for t in [HOST, BROADCAST, MULTICAST, OTHERHOST] {
            assert_eq!(run(&ARP, &f, t), KEEP, "pkttype {t}");
        }
        assert_eq!(run(&ARP, &f, PACKET_OUTGOING), 0);
        let mut reply = f.clone();
        reply[21] = 2;
        assert_eq!(run(&ARP, &reply, BROADCAST), KEEP, "any opcode");
        assert_eq!(run(&ARP, &nd_frame(135, 58, 255), MULTICAST), 0);
        assert_eq!(run(&ARP, &f[..13], BROADCAST), 0);
    }

    #[test]
    fn neighbor_discovery_keeps_incoming_ns_and_na_only() {
        for t in [135, 136] {
            assert_eq!(
                run(&NEIGHBOR_DISCOVERY, &nd_frame(t, 58, 255), MULTICAST),
                KEEP
            );
            assert_eq!(run(&NEIGHBOR_DISCOVERY, &nd_frame(t, 58, 255), HOST), KEEP);
            assert_eq!(
                run(&NEIGHBOR_DISCOVERY, &nd_frame(t, 58, 255), PACKET_OUTGOING),
                0
            );
        }
        // Echo request, router solicitation, MLD report.
        for t in [128, 133, 143] {
            assert_eq!(
                run(&NEIGHBOR_DISCOVERY, &nd_frame(t, 58, 255), MULTICAST),
                0
            );
        }
        assert_eq!(
            run(&NEIGHBOR_DISCOVERY, &nd_frame(135, 58, 64), MULTICAST),
            0
        );
        // Hop-by-hop options first (as MLD sends): not ND.
        assert_eq!(
            run(&NEIGHBOR_DISCOVERY, &nd_frame(135, 0, 255), MULTICAST),
            0
        );
        assert_eq!(run(&NEIGHBOR_DISCOVERY, &arp_frame(), BROADCAST), 0);
        assert_eq!(
            run(
                &NEIGHBOR_DISCOVERY,
                &nd_frame(135, 58, 255)[..54],
                MULTICAST
            ),
            0
        );
    }
}
