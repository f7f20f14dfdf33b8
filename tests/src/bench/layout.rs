//! Ruleset layouts compared in the kernel: the time to load N Services x M
//! endpoints into an empty network namespace, and to add one more Service
//! afterwards, for
//!
//! - FerroLB's flat layout sent over netlink (what the proxy does),
//! - the same ruleset loaded with `nft -f` (like for like with the next row),
//! - kube-proxy's nftables shape (a chain per Service with an anonymous
//!   `numgen` verdict map, a chain per endpoint), loaded with `nft -f`.
//!
//! Each layout gets its own throwaway namespace; nothing leaves the machine.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ferrolb_proxy::diff;
use ferrolb_proxy::model::{
    Endpoint, EndpointIndex, NodeFacts, NodePortAddresses, PortKey, ServiceKey, ServicePort,
};
use ferrolb_proxy::netlink::Nft;
use ferrolb_proxy::render::{self, Config, Inputs};
use ferrolb_proxy::ruleset::{Family, Proto, Ruleset};

use super::{Table, Ticker, say};

struct Netns(String);

impl Netns {
    fn new(name: &str) -> Result<Self> {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        let out = Command::new("ip").args(["netns", "add", name]).output()?;
        ensure!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(Self(name.to_string()))
    }

    fn path(&self) -> std::path::PathBuf {
        format!("/run/netns/{}", self.0).into()
    }

    /// Runs `nft -f -` with `text` in the namespace; returns the time.
    fn nft_file(&self, text: &str) -> Result<Duration> {
        let started = Instant::now();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let feeder = child.stdin.take().map(|mut pipe| {
            let text = text.to_string();
            std::thread::spawn(move || pipe.write_all(text.as_bytes()))
        });
        let out = child.wait_with_output()?;
        if let Some(f) = feeder {
            let _ = f.join();
        }
        let took = started.elapsed();
        if !out.status.success() {
            bail!("nft -f failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(took)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn cluster_ip(i: usize) -> Ipv4Addr {
    // 198.18.64.0/18 holds 16k ClusterIPs.
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 64, 10)) + i as u32)
}

fn endpoint(i: usize, j: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 10)) + ((i * 7 + j * 131) % 60000) as u32)
}

/// N ClusterIP Services with M endpoints each, as the proxy sees them.
fn world(services: usize, endpoints: usize) -> (Vec<ServicePort>, EndpointIndex) {
    let mut ports = Vec::with_capacity(services);
    let mut index: EndpointIndex = BTreeMap::new();
    for i in 0..services {
        let service = ServiceKey::new("bench", format!("s{i:05}"));
        ports.push(ServicePort {
            key: PortKey {
                service: service.clone(),
                port_name: "http".into(),
                proto: Proto::Tcp,
            },
            port: 80,
            cluster_ips: vec![IpAddr::V4(cluster_ip(i))],
            node_port: None,
            external_ips: vec![],
            lb_ips: vec![],
            source_ranges: vec![],
            external_local: false,
            internal_local: false,
            affinity: None,
            health_check_node_port: None,
        });
        let eps = (0..endpoints)
            .map(|j| Endpoint {
                addr: IpAddr::V4(endpoint(i, j)),
                port: 8080,
                ready: true,
                serving: true,
                terminating: false,
                local: false,
                zone_hints: vec![],
                node_hints: vec![],
            })
            .collect();
        index
            .entry(service)
            .or_default()
            .insert(("http".into(), Proto::Tcp), eps);
    }
    (ports, index)
}

fn render_flat(services: usize, endpoints: usize) -> Ruleset {
    let (ports, eps) = world(services, endpoints);
    let node = NodeFacts {
        name: "node-1".into(),
        addresses: vec![
            "198.18.0.11"
                .parse()
                .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ],
        ..Default::default()
    };
    let cfg = Config {
        table: "ferrolb-proxy".into(),
        masquerade_bit: 1 << 14,
        masquerade_all: false,
        cluster_cidrs: vec![
            "198.19.0.0/16"
                .parse()
                .unwrap_or(ipnet::IpNet::V4(Default::default())),
        ],
        nodeport_addresses: NodePortAddresses::Primary,
    };
    let cidrs = vec![
        "198.18.64.0/18"
            .parse()
            .unwrap_or(ipnet::IpNet::V4(Default::default())),
    ];
    render::render(
        Family::V4,
        &cfg,
        &Inputs {
            ports: &ports,
            endpoints: &eps,
            node: &node,
            service_cidrs: &cidrs,
        },
    )
    .ruleset
}

/// kube-proxy's nftables layout for the same Services, as `nft -f` text:
/// a `service-ips` verdict map to one chain per Service, which picks an
/// endpoint chain through an anonymous `numgen` verdict map; each endpoint
/// chain marks hairpin traffic for masquerade and DNATs.
fn kube_proxy_shape(from: usize, to: usize, endpoints: usize, with_base: bool) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "table ip kube-proxy {{");
    if with_base {
        t.push_str("\tchain mark-for-masquerade {\n\t\tmeta mark set meta mark | 0x4000\n\t}\n");
        t.push_str(
            "\tmap service-ips {\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n\t}\n",
        );
        t.push_str(
            "\tchain services {\n\t\tip daddr . meta l4proto . th dport vmap @service-ips\n\t}\n",
        );
        t.push_str("\tchain nat-prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\tjump services\n\t}\n");
    }
    for i in from..to {
        let svc = format!("service-{i:05}-bench/s{i:05}/tcp/http");
        let mut vmap = Vec::new();
        for j in 0..endpoints {
            let ep = endpoint(i, j);
            let chain = format!("endpoint-{i:05}-{j}-bench/s{i:05}/tcp/http__{ep}/8080");
            let _ = writeln!(
                t,
                "\tchain {chain} {{\n\t\tip saddr {ep} jump mark-for-masquerade\n\t\tmeta l4proto tcp dnat to {ep}:8080\n\t}}"
            );
            vmap.push(format!("{j} : goto {chain}"));
        }
        let _ = writeln!(
            t,
            "\tchain {svc} {{\n\t\tip daddr {} tcp dport 80 ip saddr != 198.19.0.0/16 jump mark-for-masquerade\n\t\tnumgen random mod {endpoints} vmap {{ {} }}\n\t}}",
            cluster_ip(i),
            vmap.join(", ")
        );
    }
    t.push_str("}\n");
    // Elements after the chains they jump to.
    let elements: Vec<String> = (from..to)
        .map(|i| {
            format!(
                "{} . tcp . 80 : goto service-{i:05}-bench/s{i:05}/tcp/http",
                cluster_ip(i)
            )
        })
        .collect();
    if !elements.is_empty() {
        let _ = writeln!(
            t,
            "add element ip kube-proxy service-ips {{ {} }}",
            elements.join(", ")
        );
    }
    t
}

pub fn run(services: usize, endpoints: usize) -> Result<()> {
    ensure!(
        services < 16000,
        "the ClusterIP range of the bench holds 16k Services"
    );
    say(&format!(
        "layouts: {services} Services x {endpoints} endpoints, each loaded into an empty network namespace"
    ));
    let mut table = Table::new(
        &format!(
            "Ruleset layouts in the kernel ({services} Services x {endpoints} endpoints, cargo run --release -p ferrolb-lab --bin ferrolb-bench -- proxy-layout)"
        ),
        &["layout", "load all", "then one more Service", "objects"],
    );

    let flat = render_flat(services, endpoints);
    let more = render_flat(services + 1, endpoints);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _in = rt.enter();
    {
        say("flat layout over netlink");
        let ns = Netns::new("flbl-ours")?;
        let nft = Nft::open_in(&ns.path())?;
        let started = Instant::now();
        rt.block_on(nft.commit(&flat, &diff::full(&flat)))?;
        let load = started.elapsed();
        let ops = diff::diff(&flat, &more).context("a partial update")?;
        let started = Instant::now();
        rt.block_on(nft.commit(&more, &ops))?;
        let one = started.elapsed();
        table.row(&[
            "FerroLB flat, netlink (the proxy)".into(),
            ms(load),
            ms(one),
            format!(
                "{} chains, {} elements",
                flat.chains.len(),
                flat.element_count()
            ),
        ]);
    }
    {
        say("flat layout with nft -f");
        let ns = Netns::new("flbl-nft")?;
        let load = ns.nft_file(&flat.to_nft())?;
        // The one more Service as nft would be told it: its elements.
        let ops = diff::diff(&flat, &more).context("a partial update")?;
        let mut text = String::new();
        for op in &ops {
            if let diff::Op::AddElements { set, elements } = op {
                text.push_str(&flat.add_elements_nft(set, elements));
            }
        }
        let one = ns.nft_file(&text)?;
        table.row(&[
            "FerroLB flat, nft -f".into(),
            ms(load),
            ms(one),
            format!(
                "{} chains, {} elements",
                flat.chains.len(),
                flat.element_count()
            ),
        ]);
    }
    {
        say(&format!(
            "kube-proxy's shape with nft -f ({} chains; this is the slow one, minutes at 10k)",
            services * (endpoints + 1)
        ));
        let ns = Netns::new("flbl-kp")?;
        let load = {
            let _ticker = Ticker::start("loading kube-proxy's shape");
            ns.nft_file(&kube_proxy_shape(0, services, endpoints, true))?
        };
        let one = ns.nft_file(&kube_proxy_shape(services, services + 1, endpoints, false))?;
        table.row(&[
            "kube-proxy nftables shape, nft -f".into(),
            ms(load),
            ms(one),
            format!(
                "{} chains, {} anonymous vmaps",
                services * (endpoints + 1) + 3,
                services
            ),
        ]);
    }
    table.print();
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}
