//! Stale UDP conntrack cleanup: the decision as a table, then the real
//! thing in a throw-away network namespace (root only).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use ferrolb_proxy::conntrack::{Flow, Proto, UdpService, cleanup, flow_of, stale};
use ferrolb_proxy::ruleset::Family;
use nlink::netlink::netfilter::{
    ConntrackBuilder, ConntrackStatus, ConntrackTuple, IpProtocol, TcpConntrackState,
};
use nlink::netlink::{Connection, Netfilter};

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn udp(src: &str, dst: &str, reply_src: &str) -> Flow {
    Flow {
        proto: Proto::Udp,
        orig_src: sa(src),
        orig_dst: sa(dst),
        reply_src: sa(reply_src),
    }
}

/// dns: ClusterIP 10.96.0.10, LB 192.0.2.10, externalIP 203.0.113.7, all
/// on port 53, NodePort 30053; serving 10.244.1.5:5353 and 10.244.2.6:5353.
fn dns() -> UdpService {
    UdpService {
        ips: vec![ip("10.96.0.10"), ip("192.0.2.10"), ip("203.0.113.7")],
        port: 53,
        node_port: Some(30053),
        serving: BTreeSet::from([sa("10.244.1.5:5353"), sa("10.244.2.6:5353")]),
    }
}

/// A UDP Service with no serving endpoint at all.
fn idle() -> UdpService {
    UdpService {
        ips: vec![ip("10.96.0.20")],
        port: 514,
        node_port: Some(30514),
        serving: BTreeSet::new(),
    }
}

#[test]
fn the_decision_table() {
    let c = "10.0.0.1:40000";
    let cases: &[(&str, Flow, bool)] = &[
        (
            "ClusterIP, serving backend",
            udp(c, "10.96.0.10:53", "10.244.1.5:5353"),
            false,
        ),
        (
            "ClusterIP, other serving backend",
            udp(c, "10.96.0.10:53", "10.244.2.6:5353"),
            false,
        ),
        (
            "ClusterIP, backend gone",
            udp(c, "10.96.0.10:53", "10.244.9.9:5353"),
            true,
        ),
        (
            "ClusterIP, right IP wrong port",
            udp(c, "10.96.0.10:53", "10.244.1.5:9999"),
            true,
        ),
        (
            "ClusterIP, never DNATed",
            udp(c, "10.96.0.10:53", "10.96.0.10:53"),
            true,
        ),
        (
            "ClusterIP, another port of it",
            udp(c, "10.96.0.10:54", "10.244.9.9:5353"),
            false,
        ),
        (
            "LB IP, backend gone",
            udp(c, "192.0.2.10:53", "10.244.9.9:5353"),
            true,
        ),
        (
            "LB IP, serving backend",
            udp(c, "192.0.2.10:53", "10.244.2.6:5353"),
            false,
        ),
        (
            "externalIP, backend gone",
            udp(c, "203.0.113.7:53", "10.244.9.9:5353"),
            true,
        ),
        (
            "externalIP, serving",
            udp(c, "203.0.113.7:53", "10.244.1.5:5353"),
            false,
        ),
        (
            "NodePort on a node IP, gone",
            udp(c, "172.18.0.2:30053", "10.244.9.9:5353"),
            true,
        ),
        (
            "NodePort on any address, gone",
            udp(c, "198.51.100.1:30053", "10.244.9.9:5353"),
            true,
        ),
        (
            "NodePort, serving",
            udp(c, "172.18.0.2:30053", "10.244.1.5:5353"),
            false,
        ),
        (
            "NodePort, never DNATed",
            udp(c, "172.18.0.2:30053", "172.18.0.2:30053"),
            true,
        ),
        (
            "Service without serving endpoints",
            udp(c, "10.96.0.20:514", "10.244.9.9:514"),
            false,
        ),
        (
            "its NodePort",
            udp(c, "172.18.0.2:30514", "172.18.0.2:30514"),
            false,
        ),
        ("not a Service", udp(c, "8.8.8.8:53", "8.8.8.8:53"), false),
        (
            "TCP to the ClusterIP, backend gone",
            Flow {
                proto: Proto::Tcp,
                ..udp(c, "10.96.0.10:53", "10.244.9.9:5353")
            },
            false,
        ),
        (
            "SCTP to the NodePort, backend gone",
            Flow {
                proto: Proto::Sctp,
                ..udp(c, "172.18.0.2:30053", "10.244.9.9:5353")
            },
            false,
        ),
    ];
    let services = [dns(), idle()];
    let flows: Vec<Flow> = cases.iter().map(|(_, f, _)| *f).collect();
    let got = stale(&flows, &services);
    for (what, flow, want) in cases {
        assert_eq!(got.contains(flow), *want, "{what}: {flow:?}");
    }
    let expected = cases.iter().filter(|(_, _, w)| *w).count();
    assert_eq!(got.len(), expected, "each stale flow once: {got:?}");
}

#[test]
fn ipv6_and_edge_cases() {
    let svc = UdpService {
        ips: vec![ip("fd00:96::10")],
        port: 53,
        node_port: None,
        serving: BTreeSet::from([sa("[fd00:244::5]:5353")]),
    };
    let gone = udp("[fd00::1]:40000", "[fd00:96::10]:53", "[fd00:244::9]:5353");
    let fine = udp("[fd00::1]:40001", "[fd00:96::10]:53", "[fd00:244::5]:5353");
    assert_eq!(stale(&[gone, fine], std::slice::from_ref(&svc)), vec![gone]);
    // No services, no entries: nothing.
    assert!(stale(&[gone], &[]).is_empty());
    assert!(stale(&[], std::slice::from_ref(&svc)).is_empty());
    // A NodePort of 0 is "none", not a port every flow matches.
    let zero = UdpService {
        node_port: Some(0),
        ..svc.clone()
    };
    let to_port_0 = udp("[fd00::1]:1", "[fd00::2]:0", "[fd00::2]:0");
    assert!(stale(&[to_port_0], &[zero]).is_empty());
    // Two services claiming one frontend: a backend of either is good.
    let twin = UdpService {
        serving: BTreeSet::from([sa("[fd00:244::9]:5353")]),
        ..svc.clone()
    };
    assert!(stale(&[gone], &[svc, twin]).is_empty());
}

// ---- in the kernel ------------------------------------------------------

/// A network namespace that is deleted when dropped.
struct Netns(String);

impl Netns {
    fn create() -> Result<Self, String> {
        let name = format!("flb-ct-{}", std::process::id());
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .map_err(|e| format!("cannot run ip: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "ip netns add {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self(name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The namespace, or why this machine cannot run the test: fails the test
/// with the reason unless FERROLB_SKIP_LAB=1 asks to skip.
fn netns_or_skip() -> Option<Netns> {
    use std::os::unix::fs::MetadataExt;
    let problem = match std::fs::metadata("/proc/self") {
        Ok(m) if m.uid() != 0 => Err("not root (creating a network namespace needs root)".into()),
        Ok(_) => Netns::create(),
        Err(e) => Err(format!("cannot tell who we are: {e}")),
    };
    match problem {
        Ok(ns) => Some(ns),
        Err(why) if std::env::var("FERROLB_SKIP_LAB").as_deref() == Ok("1") => {
            eprintln!("SKIPPED on purpose (FERROLB_SKIP_LAB=1): {why}");
            None
        }
        Err(why) => panic!(
            "this test needs a network namespace: {why}. Run as root, or set FERROLB_SKIP_LAB=1 to skip it."
        ),
    }
}

/// An entry as a DNAT would leave it: `client → frontend`, answered by
/// `backend`.
fn nat_entry(
    proto: IpProtocol,
    client: SocketAddr,
    frontend: SocketAddr,
    backend: SocketAddr,
) -> ConntrackBuilder {
    let (orig, reply, b) = match (client, frontend, backend) {
        (SocketAddr::V4(c), SocketAddr::V4(f), SocketAddr::V4(be)) => (
            ConntrackTuple::v4(*c.ip(), *f.ip()).ports(c.port(), f.port()),
            ConntrackTuple::v4(*be.ip(), *c.ip()).ports(be.port(), c.port()),
            ConntrackBuilder::new_v4(proto),
        ),
        (SocketAddr::V6(c), SocketAddr::V6(f), SocketAddr::V6(be)) => (
            ConntrackTuple::v6(*c.ip(), *f.ip()).ports(c.port(), f.port()),
            ConntrackTuple::v6(*be.ip(), *c.ip()).ports(be.port(), c.port()),
            ConntrackBuilder::new_v6(proto),
        ),
        _ => panic!("mixed families"),
    };
    let b = b
        .orig(orig)
        .reply(reply)
        .status(ConntrackStatus::CONFIRMED | ConntrackStatus::SEEN_REPLY)
        .timeout(Duration::from_secs(300));
    if proto == IpProtocol::Tcp {
        b.tcp_state(TcpConntrackState::Established)
    } else {
        b
    }
}

async fn flows(conn: &Connection<Netfilter>) -> BTreeSet<Flow> {
    let mut out = BTreeSet::new();
    for e in conn.get_conntrack().await.expect("dump v4") {
        out.extend(flow_of(&e));
    }
    for e in conn.get_conntrack_v6().await.expect("dump v6") {
        out.extend(flow_of(&e));
    }
    out
}

#[tokio::test]
async fn cleanup_deletes_exactly_the_stale_entries_in_the_kernel() {
    let Some(ns) = netns_or_skip() else {
        return;
    };
    let conn = Connection::<Netfilter>::new_in(ns.0.as_str()).expect("ctnetlink in the namespace");

    let keep_v4 = [
        (
            IpProtocol::Udp,
            "10.0.0.1:5000",
            "10.96.0.10:53",
            "10.244.1.5:5353",
        ),
        (
            IpProtocol::Udp,
            "10.0.0.2:5000",
            "172.18.0.2:30053",
            "10.244.2.6:5353",
        ),
        (
            IpProtocol::Tcp,
            "10.0.0.3:5000",
            "10.96.0.10:53",
            "10.244.9.9:5353",
        ),
        (
            IpProtocol::Udp,
            "10.0.0.4:5000",
            "10.96.0.20:514",
            "10.244.9.9:514",
        ),
        (IpProtocol::Udp, "10.0.0.5:5000", "8.8.8.8:53", "8.8.8.8:53"),
    ];
    let gone_v4 = [
        (
            IpProtocol::Udp,
            "10.0.0.6:5000",
            "10.96.0.10:53",
            "10.244.9.9:5353",
        ),
        (
            IpProtocol::Udp,
            "10.0.0.7:5000",
            "10.96.0.10:53",
            "10.96.0.10:53",
        ),
        (
            IpProtocol::Udp,
            "10.0.0.8:5000",
            "192.0.2.10:53",
            "10.244.9.9:5353",
        ),
        (
            IpProtocol::Udp,
            "10.0.0.9:5000",
            "203.0.113.7:53",
            "10.244.9.9:5353",
        ),
        (
            IpProtocol::Udp,
            "10.0.0.10:5000",
            "172.18.0.2:30053",
            "10.244.9.9:5353",
        ),
    ];
    let keep_v6 = [(
        IpProtocol::Udp,
        "[fd00::1]:5000",
        "[fd00:96::10]:53",
        "[fd00:244::5]:5353",
    )];
    let gone_v6 = [(
        IpProtocol::Udp,
        "[fd00::2]:5000",
        "[fd00:96::10]:53",
        "[fd00:244::9]:5353",
    )];
    for (proto, c, f, b) in keep_v4
        .iter()
        .chain(&gone_v4)
        .chain(&keep_v6)
        .chain(&gone_v6)
    {
        conn.add_conntrack(nat_entry(*proto, sa(c), sa(f), sa(b)))
            .await
            .unwrap_or_else(|e| panic!("creating {c} -> {f} via {b}: {e}"));
    }
    let before = flows(&conn).await;
    assert_eq!(before.len(), 12, "{before:#?}");

    let v6_dns = UdpService {
        ips: vec![ip("fd00:96::10")],
        port: 53,
        node_port: None,
        serving: BTreeSet::from([sa("[fd00:244::5]:5353")]),
    };
    let v4_services = [dns(), idle()];
    assert_eq!(
        cleanup(&conn, Family::V4, &v4_services).await.expect("v4"),
        5
    );
    // A second run finds nothing left to do.
    assert_eq!(
        cleanup(&conn, Family::V4, &v4_services).await.expect("v4"),
        0
    );
    // The v4 pass left v6 alone, and the v6 pass does only v6.
    assert_eq!(flows(&conn).await.len(), 7);
    assert_eq!(cleanup(&conn, Family::V6, &[v6_dns]).await.expect("v6"), 1);

    let mut want = BTreeSet::new();
    for (proto, c, f, b) in keep_v4.iter().chain(&keep_v6) {
        want.insert(Flow {
            proto: if *proto == IpProtocol::Tcp {
                Proto::Tcp
            } else {
                Proto::Udp
            },
            orig_src: sa(c),
            orig_dst: sa(f),
            reply_src: sa(b),
        });
    }
    assert_eq!(flows(&conn).await, want);

    // Nothing to match: no dump at all, nothing deleted.
    assert_eq!(
        cleanup(&conn, Family::V4, &[idle()]).await.expect("idle"),
        0
    );
    assert_eq!(flows(&conn).await.len(), 6);
}
