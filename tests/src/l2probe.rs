//! What the speaker's tests and benchmark measure from the outside client
//! (run there with `ferrolb-lab exec client -- ferrolb-lab l2 ...`):
//!
//! - [`neighbour_watch`]: asks "who has IP?" every interval on the LAN
//!   (an ARP probe from 0.0.0.0, or a neighbour solicitation) and records
//!   every MAC that answers each question: exactly one node must, never
//!   two, never none.
//! - [`udp_probe`]: one UDP datagram to the Service every interval; the
//!   echo pods answer with their name. Gaps are the client's outage.
//! - [`steady`]: TCP requests at a fixed rate, each a fresh connection
//!   reading the echo line; counts failures.
//!
//! Output is one JSON document on stdout, so the caller (a test or the
//! benchmark, in the root namespace) parses it.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use ferrolb_netraw::{ETHERTYPE_ARP, ETHERTYPE_IPV6, PacketSocket, filters, solicited_node};
use ferrolb_speaker::packet::ether::EthernetHeader;
use ferrolb_speaker::packet::{Arp, ArpFrame, ArpOp, MacAddr, NdpFrame, NdpMessage, Solicitation};
use serde::{Deserialize, Serialize};

/// Milliseconds since the epoch (shared clock of the root and client
/// namespaces: one machine).
pub fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// One question and who answered it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Asked {
    /// When it was sent, ms since the epoch.
    pub at: f64,
    pub macs: Vec<String>,
}

fn sys(interface: &str, file: &str) -> Result<String> {
    let path = format!("/sys/class/net/{interface}/{file}");
    Ok(std::fs::read_to_string(&path)
        .with_context(|| format!("reading {path}"))?
        .trim()
        .to_string())
}

fn link_local(interface: &str) -> Result<Ipv6Addr> {
    // /proc/net/if_inet6: address (32 hex), ifindex, prefix, scope (20 = link), flags, name.
    let table =
        std::fs::read_to_string("/proc/net/if_inet6").context("reading /proc/net/if_inet6")?;
    for line in table.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 6 && f[5] == interface && f[3] == "20" {
            let hex = f[0];
            let mut octets = [0u8; 16];
            for (i, o) in octets.iter_mut().enumerate() {
                *o = u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16)?;
            }
            return Ok(Ipv6Addr::from(octets));
        }
    }
    bail!("{interface} has no IPv6 link-local address")
}

/// The interface's first IPv4 address (`ip -j addr`).
fn own_ipv4(interface: &str) -> Result<std::net::Ipv4Addr> {
    let out = std::process::Command::new("ip")
        .args(["-j", "-4", "addr", "show", "dev", interface])
        .output()
        .context("running ip addr")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v.get(0)
        .and_then(|l| l["addr_info"].get(0))
        .and_then(|a| a["local"].as_str())
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("{interface} has no IPv4 address"))
}

/// Asks who has `ip` every `interval` for `duration` on `interface`; each
/// question's answers are those that arrive before the next question.
pub async fn neighbour_watch(
    interface: &str,
    ip: IpAddr,
    interval: Duration,
    duration: Duration,
) -> Result<Vec<Asked>> {
    neighbour_watch_until(interface, ip, interval, duration, None).await
}

/// [`neighbour_watch`] that may end early: `settle = Some((min, calm))`
/// ends it once `min` has passed and the last `calm` of questions were
/// each answered by exactly one MAC (how long a split lasts is then known
/// without waiting out `duration`).
pub async fn neighbour_watch_until(
    interface: &str,
    ip: IpAddr,
    interval: Duration,
    duration: Duration,
    settle: Option<(Duration, Duration)>,
) -> Result<Vec<Asked>> {
    let index: u32 = sys(interface, "ifindex")?.parse()?;
    let mac: MacAddr = sys(interface, "address")?
        .parse()
        .map_err(|_| anyhow::anyhow!("{interface} has no Ethernet address"))?;
    let (sock, question) = match ip {
        // An ordinary request from the client's own address, as any host
        // asks. (An RFC 5227 probe, from 0.0.0.0, would look to a speaker
        // probing the same IP like another host claiming it.)
        IpAddr::V4(v4) => (
            PacketSocket::open(index, ETHERTYPE_ARP, &filters::arp())?,
            ArpFrame {
                ethernet: EthernetHeader {
                    destination: MacAddr::BROADCAST,
                    source: mac,
                    ethertype: ETHERTYPE_ARP,
                },
                arp: Arp {
                    op: ArpOp::Request,
                    sender_mac: mac,
                    sender_ip: own_ipv4(interface)?,
                    target_mac: MacAddr::ZERO,
                    target_ip: v4,
                },
            }
            .to_bytes(),
        ),
        IpAddr::V6(v6) => {
            let source = link_local(interface)?;
            let group = solicited_node(v6);
            let frame = NdpFrame {
                ethernet: EthernetHeader {
                    destination: MacAddr::ipv6_multicast(group),
                    source: mac,
                    ethertype: ETHERTYPE_IPV6,
                },
                source,
                destination: group,
                message: NdpMessage::Solicitation(Solicitation {
                    target: v6,
                    source_ll: Some(mac),
                }),
            };
            (
                PacketSocket::open(index, ETHERTYPE_IPV6, &filters::neighbor_discovery())?,
                frame.to_bytes(),
            )
        }
    };
    let mut out: Vec<Asked> = Vec::new();
    let started = Instant::now();
    let mut buf = vec![0u8; 1600];
    let mut next = tokio::time::Instant::now();
    while started.elapsed() < duration {
        sock.send(&question).await?;
        out.push(Asked {
            at: now_ms(),
            macs: Vec::new(),
        });
        next += interval;
        let mut macs = BTreeSet::new();
        while let Ok(n) = tokio::time::timeout_at(next, sock.recv(&mut buf)).await {
            let Ok(n) = n else { break };
            if let Some(m) = answer(&buf[..n], ip) {
                macs.insert(m.to_string());
            }
        }
        if let Some(last) = out.last_mut() {
            last.macs = macs.into_iter().collect();
        }
        if let Some((min, calm)) = settle
            && started.elapsed() >= min
        {
            let calm_n = (calm.as_millis() / interval.as_millis().max(1)) as usize;
            let n = out.len();
            if n >= calm_n && out[n - calm_n..].iter().all(|a| a.macs.len() == 1) {
                break;
            }
        }
    }
    Ok(out)
}

/// When (ms since the epoch) the kernel's neighbour entry for `ip` first
/// names a MAC other than `from`, polling `ip neigh` every 20 ms; `None`
/// if it did not within `timeout`.
pub fn neighbour_change(ip: IpAddr, from: &str, timeout: Duration) -> Result<Option<f64>> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        let out = std::process::Command::new("ip")
            .args(["neigh", "show", &ip.to_string()])
            .output()
            .context("running ip neigh")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mac = text
            .split_whitespace()
            .skip_while(|w| *w != "lladdr")
            .nth(1);
        if let Some(mac) = mac
            && !mac.eq_ignore_ascii_case(from)
        {
            return Ok(Some(now_ms()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(None)
}

/// The MAC a frame answers "who has `ip`" with, if it does.
fn answer(frame: &[u8], ip: IpAddr) -> Option<MacAddr> {
    match ip {
        IpAddr::V4(v4) => {
            let f = ArpFrame::parse(frame).ok()?;
            (f.arp.op == ArpOp::Reply && f.arp.sender_ip == v4).then_some(f.arp.sender_mac)
        }
        IpAddr::V6(v6) => {
            let f = NdpFrame::parse(frame).ok()?;
            match f.message {
                NdpMessage::Advertisement(a) if a.target == v6 && a.solicited_flag => {
                    Some(a.target_ll.unwrap_or(f.ethernet.source))
                }
                _ => None,
            }
        }
    }
}

/// One UDP probe.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Probed {
    /// Sent, ms since the epoch.
    pub at: f64,
    /// The pod that answered, if one did in time.
    pub pod: Option<String>,
    /// When its answer came, ms since the epoch. A datagram sent while the
    /// client's neighbour entry is unresolved waits in the kernel's queue
    /// and may still be answered, late: outages count from answers.
    pub answered_at: Option<f64>,
}

/// A datagram to `to` every `every` for `duration`, each from a fresh
/// socket (a new flow, as many clients would be: the data plane balances
/// each afresh, and a dead backend costs some probes, not all); a probe
/// counts as answered if its reply comes within `wait`.
pub async fn udp_probe(
    to: SocketAddr,
    every: Duration,
    duration: Duration,
    wait: Duration,
) -> Result<Vec<Probed>> {
    let bind: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let started = tokio::time::Instant::now();
    let mut next = started;
    let mut tasks = tokio::task::JoinSet::new();
    let mut seq = 0usize;
    while next.duration_since(started) < duration {
        tokio::time::sleep_until(next).await;
        next += every;
        seq += 1;
        tasks.spawn(async move {
            let at = now_ms();
            let attempt = async {
                let sock = tokio::net::UdpSocket::bind(bind).await.ok()?;
                // A send error (the neighbour unresolved) is an unanswered
                // probe, not the end of the run.
                sock.send_to(format!("{seq}\n").as_bytes(), to).await.ok()?;
                let mut buf = vec![0u8; 512];
                let (n, _) = sock.recv_from(&mut buf).await.ok()?;
                let line = String::from_utf8_lossy(&buf[..n]).into_owned();
                Some(
                    crate::echo::parse_reply(&line)
                        .map(|(p, _)| p)
                        .unwrap_or_default(),
                )
            };
            let pod = tokio::time::timeout(wait, attempt).await.ok().flatten();
            let answered_at = pod.is_some().then(now_ms);
            Probed {
                at,
                pod,
                answered_at,
            }
        });
    }
    let mut out = Vec::with_capacity(seq);
    while let Some(p) = tasks.join_next().await {
        out.push(p?);
    }
    out.sort_by(|a, b| a.at.total_cmp(&b.at));
    Ok(out)
}

/// A steady client's tally.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Tally {
    pub ok: u64,
    pub failed: u64,
    /// Start times (ms since the epoch) of the failed requests.
    pub failures: Vec<f64>,
}

/// `rate` TCP requests per second to `to` for `duration`, each a new
/// connection reading the echo line within `timeout`.
pub async fn steady(
    to: SocketAddr,
    rate: u32,
    duration: Duration,
    timeout: Duration,
) -> Result<Tally> {
    use tokio::io::AsyncReadExt;
    let every = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let started = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut next = started;
    while next.duration_since(started) < duration {
        tokio::time::sleep_until(next).await;
        next += every;
        tasks.spawn(async move {
            let at = now_ms();
            let attempt = async {
                let mut s = tokio::net::TcpStream::connect(to).await?;
                let mut buf = vec![0u8; 256];
                let n = s.read(&mut buf).await?;
                Ok::<bool, std::io::Error>(n > 0 && buf[..n].starts_with(b"pod="))
            };
            let ok = matches!(tokio::time::timeout(timeout, attempt).await, Ok(Ok(true)));
            (at, ok)
        });
    }
    let mut tally = Tally::default();
    while let Some(r) = tasks.join_next().await {
        let (at, ok) = r?;
        if ok {
            tally.ok += 1;
        } else {
            tally.failed += 1;
            tally.failures.push(at);
        }
    }
    tally.failures.sort_by(f64::total_cmp);
    Ok(tally)
}

/// A probe running in the client namespace; [`Background::collect`]
/// waits for its JSON.
pub struct Background<T> {
    child: std::process::Child,
    what: String,
    _t: std::marker::PhantomData<T>,
}

impl<T: serde::de::DeserializeOwned> Background<T> {
    pub fn collect(self) -> Result<T> {
        let out = self
            .child
            .wait_with_output()
            .with_context(|| format!("waiting for {}", self.what))?;
        if !out.status.success() {
            bail!("{} failed ({})", self.what, out.status);
        }
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("reading the output of {}", self.what))
    }
}

/// Starts `ferrolb-lab l2 ARGS` in the lab's client namespace.
pub fn in_client<T>(lab: &crate::lab::Lab, args: &[String]) -> Result<Background<T>> {
    let exe = lab.exe().display().to_string();
    let mut cmd: Vec<&str> = vec![&exe, "l2"];
    cmd.extend(args.iter().map(String::as_str));
    let child = lab.spawn_in("client", &cmd)?;
    Ok(Background {
        child,
        what: format!("l2 {}", args.join(" ")),
        _t: std::marker::PhantomData,
    })
}

/// `l2 watch`: the neighbour watch for `ip`.
pub fn watch(
    lab: &crate::lab::Lab,
    ip: IpAddr,
    interval: Duration,
    duration: Duration,
) -> Result<Background<Vec<Asked>>> {
    in_client(
        lab,
        &[
            "watch".into(),
            ip.to_string(),
            "--interval-ms".into(),
            interval.as_millis().to_string(),
            "--duration-ms".into(),
            duration.as_millis().to_string(),
        ],
    )
}

/// `l2 watch` that ends once answers have been single for `calm` after
/// `min` (see [`neighbour_watch_until`]).
pub fn watch_until_calm(
    lab: &crate::lab::Lab,
    ip: IpAddr,
    min: Duration,
    calm: Duration,
    max: Duration,
) -> Result<Background<Vec<Asked>>> {
    in_client(
        lab,
        &[
            "watch".into(),
            ip.to_string(),
            "--interval-ms".into(),
            "50".into(),
            "--duration-ms".into(),
            max.as_millis().to_string(),
            "--min-ms".into(),
            min.as_millis().to_string(),
            "--calm-ms".into(),
            calm.as_millis().to_string(),
        ],
    )
}

/// `l2 neigh-change`: when (ms since the epoch) the client's neighbour
/// entry for `ip` leaves `from`; the caller subtracts its event's time.
pub fn neigh_change(
    lab: &crate::lab::Lab,
    ip: IpAddr,
    from: &str,
    timeout: Duration,
) -> Result<Background<Option<f64>>> {
    in_client(
        lab,
        &[
            "neigh-change".into(),
            ip.to_string(),
            from.to_string(),
            "--timeout-ms".into(),
            timeout.as_millis().to_string(),
        ],
    )
}

/// `l2 udp`: a UDP probe every `every`.
pub fn udp(
    lab: &crate::lab::Lab,
    to: SocketAddr,
    every: Duration,
    duration: Duration,
) -> Result<Background<Vec<Probed>>> {
    in_client(
        lab,
        &[
            "udp".into(),
            to.to_string(),
            "--every-ms".into(),
            every.as_millis().to_string(),
            "--duration-ms".into(),
            duration.as_millis().to_string(),
        ],
    )
}

/// `l2 steady`: `rate` TCP requests per second.
pub fn steady_client(
    lab: &crate::lab::Lab,
    to: SocketAddr,
    rate: u32,
    duration: Duration,
) -> Result<Background<Tally>> {
    in_client(
        lab,
        &[
            "steady".into(),
            to.to_string(),
            "--rate".into(),
            rate.to_string(),
            "--duration-ms".into(),
            duration.as_millis().to_string(),
        ],
    )
}

/// Summaries the tests and the benchmark draw from a neighbour watch.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchSummary {
    /// Longest run of questions answered by two or more MACs, in ms (0:
    /// never).
    pub longest_double_ms: f64,
    /// Longest run of unanswered questions, in ms.
    pub longest_silence_ms: f64,
    /// Every MAC that answered.
    pub macs: BTreeSet<String>,
    /// From the first question answered by two MACs to the last, in ms.
    pub double_span_ms: f64,
    /// How often the answering MAC changed (questions answered by one MAC
    /// only, compared in order): the IP's moves.
    pub moves: usize,
}

pub fn summarize(watch: &[Asked]) -> WatchSummary {
    let run = |pred: &dyn Fn(&Asked) -> bool| {
        let mut longest: f64 = 0.0;
        let mut start: Option<f64> = None;
        for (i, a) in watch.iter().enumerate() {
            if pred(a) {
                let s = *start.get_or_insert(a.at);
                let end = watch.get(i + 1).map(|n| n.at).unwrap_or(a.at);
                longest = longest.max(end - s);
            } else {
                start = None;
            }
        }
        longest
    };
    let doubles: Vec<f64> = watch
        .iter()
        .filter(|a| a.macs.len() >= 2)
        .map(|a| a.at)
        .collect();
    let double_span_ms = match (doubles.first(), doubles.last()) {
        (Some(first), Some(last)) => last - first + 1.0,
        _ => 0.0,
    };
    let singles: Vec<&String> = watch
        .iter()
        .filter(|a| a.macs.len() == 1)
        .map(|a| &a.macs[0])
        .collect();
    let moves = singles.windows(2).filter(|w| w[0] != w[1]).count();
    WatchSummary {
        longest_double_ms: run(&|a| a.macs.len() >= 2),
        longest_silence_ms: run(&|a| a.macs.is_empty()),
        macs: watch.iter().flat_map(|a| a.macs.iter().cloned()).collect(),
        double_span_ms,
        moves,
    }
}

/// The longest gap between answered UDP probes after `from` (ms since the
/// epoch), in ms: the client-visible outage of an event at `from`.
pub fn outage_after(probes: &[Probed], from: f64) -> f64 {
    let mut answers: Vec<f64> = probes.iter().filter_map(|p| p.answered_at).collect();
    answers.sort_by(f64::total_cmp);
    let mut last: Option<f64> = None;
    let mut longest: f64 = 0.0;
    for &a in &answers {
        if let Some(prev) = last
            && a > from
        {
            longest = longest.max(a - prev.max(from));
        }
        last = Some(a);
    }
    // Never answered again: the outage lasted at least to the last probe.
    if !answers.iter().any(|&a| a > from) {
        let end = probes.iter().map(|p| p.at).fold(from, f64::max);
        longest = longest.max(end - from);
    }
    longest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asked(at: f64, macs: &[&str]) -> Asked {
        Asked {
            at,
            macs: macs.iter().map(|m| m.to_string()).collect(),
        }
    }

    #[test]
    fn summaries_find_the_longest_double_and_silent_runs() {
        let w = [
            asked(0.0, &["a"]),
            asked(50.0, &["a", "b"]),
            asked(100.0, &["a", "b"]),
            asked(150.0, &[]),
            asked(200.0, &[]),
            asked(250.0, &[]),
            asked(300.0, &["b"]),
        ];
        let s = summarize(&w);
        assert_eq!(s.moves, 1);
        assert_eq!(s.double_span_ms, 51.0);
        assert_eq!(s.longest_double_ms, 100.0);
        assert_eq!(s.longest_silence_ms, 150.0);
        assert_eq!(s.macs.len(), 2);
    }

    #[test]
    fn outage_counts_from_the_event() {
        let p = |at: f64, rtt: Option<f64>| Probed {
            at,
            pod: rtt.map(|_| "web".to_string()),
            answered_at: rtt.map(|r| at + r),
        };
        let probes = [
            p(0.0, Some(1.0)),
            p(10.0, Some(1.0)),
            p(20.0, None),
            p(300.0, None),
            p(310.0, Some(1.0)),
        ];
        assert_eq!(outage_after(&probes, 15.0), 296.0);
        assert_eq!(outage_after(&probes, 400.0), 0.0);
        // Sent during the outage, held in the neighbour queue, answered
        // late: the gap between answers is the outage, not between sends.
        let queued = [
            p(0.0, Some(1.0)),
            p(10.0, Some(390.0)),
            p(20.0, Some(380.0)),
        ];
        assert_eq!(outage_after(&queued, 5.0), 395.0);
        // Never answered after the event: at least until the last probe.
        let lost = [p(0.0, Some(1.0)), p(10.0, None), p(500.0, None)];
        assert_eq!(outage_after(&lost, 5.0), 495.0);
    }
}
