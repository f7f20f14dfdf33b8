//! Packet sockets on a real link: two network namespaces joined by a veth
//! pair, a thread in each (setns) with its own current-thread runtime.
//! Needs root; fails saying so unless FERROLB_SKIP_LAB=1 asks to skip.

use std::net::Ipv6Addr;
use std::process::Command;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use ferrolb_netraw::{ETHERTYPE_ARP, ETHERTYPE_IPV6, PacketSocket, SolicitedNodeGroups, filters};
use socket2::SockFilter;

/// Ethernet source of every frame the tests send, so they can tell theirs
/// from what the kernels send on their own (IPv6 DAD, MLD reports).
const MARK: [u8; 6] = [0x02, 0xfe, 0, 0, 0, 0x01];
const ETH_P_ALL: u16 = 0x0003;

fn runs_here() -> bool {
    let why = if !nix::unistd::geteuid().is_root() {
        "needs root (network namespaces, veth links and AF_PACKET sockets)".to_string()
    } else if Command::new("ip").arg("-V").output().is_err() {
        "needs iproute2's `ip`".to_string()
    } else {
        return true;
    };
    if std::env::var("FERROLB_SKIP_LAB").as_deref() == Ok("1") {
        eprintln!("SKIPPED on purpose (FERROLB_SKIP_LAB=1): {why}");
        return false;
    }
    panic!("this test {why}; run it as root, or set FERROLB_SKIP_LAB=1 to skip it");
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Two namespaces, `va` in one and `vb` in the other, joined and up.
/// Dropping it deletes both (which deletes the veth), also when a test
/// fails.
struct Pair {
    a: String,
    b: String,
}

impl Pair {
    fn new(test: &str) -> Pair {
        let id = std::process::id();
        let pair = Pair {
            a: format!("fnr-{id}-{test}-a"),
            b: format!("fnr-{id}-{test}-b"),
        };
        // `pair` exists before anything is made, so a failure half-way
        // drops it and still cleans up whatever was made.
        ip(&["netns", "add", &pair.a]);
        ip(&["netns", "add", &pair.b]);
        ip(&[
            "link", "add", "va", "netns", &pair.a, "type", "veth", "peer", "name", "vb", "netns",
            &pair.b,
        ]);
        ip(&["-n", &pair.a, "link", "set", "va", "up"]);
        ip(&["-n", &pair.b, "link", "set", "vb", "up"]);
        pair
    }

    fn ifindex(ns: &str, dev: &str) -> u32 {
        let out = ip(&["-n", ns, "-o", "link", "show", "dev", dev]);
        out.split(':')
            .next()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no index in {out:?}"))
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs `f` on a thread that has entered namespace `ns`, in a
/// current-thread runtime (the reactor must live in the same thread, and
/// so in the same namespace, as the sockets).
fn in_netns<T, F, Fut>(ns: &str, f: F) -> JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open the namespace");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f())
    })
}

/// The next frame from `MARK`, or `None` after `wait`.
async fn next_marked(socket: &PacketSocket, wait: Duration) -> Option<Vec<u8>> {
    let mut buf = [0u8; 2048];
    tokio::time::timeout(wait, async {
        loop {
            let n = socket.recv(&mut buf).await.expect("recv");
            if buf.get(6..12) == Some(&MARK[..]) {
                return buf[..n].to_vec();
            }
        }
    })
    .await
    .ok()
}

fn arp_request() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&MARK);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&MARK);
    f.extend_from_slice(&[198, 18, 8, 1, 0, 0, 0, 0, 0, 0, 198, 18, 8, 5]);
    f.resize(60, 0);
    f
}

/// An ICMPv6 message of `icmp_type` to ff02::1:ff08:5; the checksum is
/// left zero, as the filters do not look at it.
fn icmpv6(icmp_type: u8, hop_limit: u8) -> Vec<u8> {
    let mut f = vec![0x33, 0x33, 0xff, 0x08, 0x00, 0x05];
    f.extend_from_slice(&MARK);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0, 0, 24, 58, hop_limit]);
    f.extend_from_slice(&"fe80::1".parse::<Ipv6Addr>().unwrap().octets());
    f.extend_from_slice(&"ff02::1:ff08:5".parse::<Ipv6Addr>().unwrap().octets());
    f.extend_from_slice(&[icmp_type, 0, 0, 0, 0, 0, 0, 0]);
    f.extend_from_slice(&"2001:db8::8:5".parse::<Ipv6Addr>().unwrap().octets());
    f
}

#[test]
fn arp_crosses_the_link_and_own_frames_never_come_back() {
    if !runs_here() {
        return;
    }
    let pair = Pair::new("arp");
    let (ifa, ifb) = (Pair::ifindex(&pair.a, "va"), Pair::ifindex(&pair.b, "vb"));
    let (ready_tx, ready_rx) = mpsc::channel();

    let receiver = in_netns(&pair.b, move || async move {
        let arp = PacketSocket::open(ifb, ETHERTYPE_ARP, &filters::arp()).unwrap();
        // Bound to every protocol, but filtered to ARP.
        let all = PacketSocket::open(ifb, ETH_P_ALL, &filters::arp()).unwrap();
        assert_eq!(arp.ifindex(), ifb);
        ready_tx.send(()).unwrap();
        let wait = Duration::from_secs(5);
        (next_marked(&arp, wait).await, next_marked(&all, wait).await)
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();

    let sender = in_netns(&pair.a, move || async move {
        let arp = PacketSocket::open(ifa, ETHERTYPE_ARP, &filters::arp()).unwrap();
        let all = PacketSocket::open(ifa, ETH_P_ALL, &filters::arp()).unwrap();
        // Control: a socket on every protocol without the filter is handed
        // our own frame as OUTGOING, so the one above really is tested.
        let keep_all = [SockFilter::new(0x06, 0, 0, u32::MAX)];
        let tap = PacketSocket::open(ifa, ETH_P_ALL, &keep_all).unwrap();
        arp.send(&arp_request()).await.unwrap();
        let quiet = Duration::from_millis(500);
        (
            next_marked(&arp, quiet).await,
            next_marked(&all, quiet).await,
            next_marked(&tap, quiet).await,
        )
    });

    let (got_arp, got_all) = receiver.join().unwrap();
    let (own_arp, own_all, tapped) = sender.join().unwrap();
    assert_eq!(got_arp.as_deref(), Some(&arp_request()[..]), "ARP socket");
    assert_eq!(
        got_all.as_deref(),
        Some(&arp_request()[..]),
        "ETH_P_ALL socket"
    );
    assert_eq!(
        tapped.as_deref(),
        Some(&arp_request()[..]),
        "unfiltered tap"
    );
    assert_eq!(own_arp, None, "the sending socket saw its own frame");
    assert_eq!(own_all, None, "the filter let an outgoing frame through");
}

#[test]
fn neighbor_discovery_filter_passes_only_ns_and_na_at_hop_limit_255() {
    if !runs_here() {
        return;
    }
    let pair = Pair::new("ndp");
    let (ifa, ifb) = (Pair::ifindex(&pair.a, "va"), Pair::ifindex(&pair.b, "vb"));
    let (ready_tx, ready_rx) = mpsc::channel();

    let receiver = in_netns(&pair.b, move || async move {
        let nd = PacketSocket::open(ifb, ETHERTYPE_IPV6, &filters::neighbor_discovery()).unwrap();
        ready_tx.send(()).unwrap();
        let mut got = Vec::new();
        while let Some(f) = next_marked(&nd, Duration::from_secs(2)).await {
            got.push(f);
        }
        got
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();

    let sender = in_netns(&pair.a, move || async move {
        let s = PacketSocket::open(ifa, ETHERTYPE_IPV6, &filters::neighbor_discovery()).unwrap();
        for f in [
            icmpv6(128, 255), // echo request
            icmpv6(135, 64),  // NS that crossed a router
            icmpv6(135, 255), // NS
            icmpv6(143, 255), // MLD report
            icmpv6(136, 255), // NA
        ] {
            s.send(&f).await.unwrap();
        }
    });
    sender.join().unwrap();
    let got = receiver.join().unwrap();
    assert_eq!(got, vec![icmpv6(135, 255), icmpv6(136, 255)]);
}

#[test]
fn solicited_node_groups_are_joined_once_and_left_last() {
    if !runs_here() {
        return;
    }
    let pair = Pair::new("mld");
    let ifb = Pair::ifindex(&pair.b, "vb");
    let t = in_netns(&pair.b, move || async move {
        // /proc/thread-self, not /proc/self: only this thread is in the
        // namespace.
        let joined = || {
            std::fs::read_to_string("/proc/thread-self/net/igmp6")
                .unwrap()
                .lines()
                .any(|l| l.contains(" vb ") && l.contains("ff0200000000000000000001ff080005"))
        };
        let one: Ipv6Addr = "2001:db8::8:5".parse().unwrap();
        let same_group: Ipv6Addr = "2001:db8:1::8:5".parse().unwrap();
        let mut g = SolicitedNodeGroups::new();
        assert!(!joined());
        g.join(ifb, one).unwrap();
        g.join(ifb, one).unwrap();
        g.join(ifb, same_group).unwrap();
        assert!(joined());
        assert_eq!(g.groups().count(), 1);
        g.leave(ifb, one).unwrap();
        assert!(joined(), "another IP still wants the group");
        g.leave(ifb, same_group).unwrap();
        assert!(!joined());
        g.leave(ifb, same_group).unwrap();
        assert_eq!(g.groups().count(), 0);
    });
    t.join().unwrap();
}
