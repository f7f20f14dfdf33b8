//! FerroLB's proxy against the real kube-proxy (nftables mode, the newest
//! release), in one lab run: the same API server, the same Services, one
//! proxy at a time on the lab's node.
//!
//! For each scale (Services of 10 endpoints each, selector-less with
//! hand-made EndpointSlices; a few endpoints are real pods):
//! - full sync: process start until the last Service answers a connection
//!   from the node, and the proxy's RSS once synced;
//! - one added Service: its create until the first successful connection
//!   to it (from the node), and the proxy's own programming metric;
//! - connect latency through a ClusterIP, against connects to a pod
//!   directly made alternately with them (the control: what the machine's
//!   state adds to both);
//! - and once, bulk TCP throughput client -> LB IP -> pod against client ->
//!   pod directly, the latter both with no proxy (no netfilter at all on
//!   the node) and alternating with the LB trials while each proxy runs
//!   (iperf3, 12 trials per path, in rounds that alternate which proxy
//!   goes first, medians).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::PostParams;

use super::{Table, Ticker, say};
use crate::addresses;
use crate::control_plane;
use crate::lab::Lab;
use crate::state::{ProxyMode, UpOptions};

const PREFIX: &str = "flbbench";
const NS: &str = "bench";
/// The probe Services, one per proxy and scale, each with a ClusterIP of
/// its own fixed in advance (so a probe can start connecting before the
/// Service exists) and never reused in a run: earlier probes stay.
fn next_probe_ip() -> Ipv4Addr {
    use std::sync::atomic::{AtomicU8, Ordering};
    static NEXT: AtomicU8 = AtomicU8::new(0);
    let k = NEXT.fetch_add(1, Ordering::Relaxed) % 50;
    Ipv4Addr::new(198, 18, 127, 200 + k)
}

/// The bulk Service's ClusterIP, fixed like every other here: a dynamic
/// one could take an address a background Service asks for later.
const BULK_CLUSTER_IP: &str = "198.18.127.199";

/// The ClusterIP of background Service `i` (inside 198.18.64.0/18, below
/// the probe addresses).
fn background_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 64, 100)) + i as u32)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    FerroLb = 0,
    KubeProxy = 1,
}

/// One proxy running on the lab's node.
enum Running {
    FerroLb(u32),
    KubeProxy(Child),
}

impl Running {
    fn start(lab: &Lab, peer: Peer, kube_proxy: &Path) -> Result<Self> {
        Ok(match peer {
            Peer::FerroLb => Running::FerroLb(start_ferrolb(lab)?),
            Peer::KubeProxy => Running::KubeProxy(start_kube_proxy(lab, kube_proxy)?),
        })
    }

    /// The proxy's own pid (`ip netns exec` execs in place).
    fn pid(&self) -> u32 {
        match self {
            Running::FerroLb(pid) => *pid,
            Running::KubeProxy(child) => child.id(),
        }
    }

    /// Stops it and removes its tables, as an operator switching proxies
    /// would.
    fn stop(self, lab: &Lab, kube_proxy: &Path) -> Result<()> {
        match self {
            Running::FerroLb(_) => stop_ferrolb(lab),
            Running::KubeProxy(child) => stop_kube_proxy(child, kube_proxy),
        }
    }
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::FerroLb => "FerroLB",
            Peer::KubeProxy => "kube-proxy",
        }
    }
}

/// One proxy's figures at one scale.
#[derive(Debug, Default, Clone)]
struct Figures {
    full_sync: Option<Duration>,
    rss_kib: Option<u64>,
    add_to_connect: Option<Duration>,
    add_metric: Option<f64>,
    /// Mean duration of the (IPv4) syncs the added Service caused.
    add_sync: Option<f64>,
    connect_median: Option<Duration>,
    /// Median connect to a pod directly, alternating with the above.
    direct_median: Option<Duration>,
}

pub fn run(scales: &[usize], endpoints: usize, ours_only: bool) -> Result<()> {
    let versions = control_plane::ensure_peers()?;
    let kube_proxy = control_plane::peer_kube_proxy(&versions);
    say(&format!(
        "proxy: FerroLB against kube-proxy {} at {scales:?} Services x {endpoints} endpoints",
        versions.peer_kube_proxy
    ));
    ensure!(
        Command::new("iperf3").arg("--version").output().is_ok(),
        "iperf3 is missing (tests/scripts/prereqs.sh installs it)"
    );
    let exe = std::env::current_exe()?.with_file_name("ferrolb-lab");
    let opts = UpOptions {
        nodes: 1,
        proxy: ProxyMode::None,
        ip_family: addresses::IpFamily::Ipv4,
        ferrolb: true,
    };
    say("bringing up a lab (1 node, no proxy running)");
    let lab = Lab::up(Path::new(&exe), PREFIX, &opts)?;
    let result = run_in(&lab, &kube_proxy, scales, endpoints, ours_only);
    if result.is_err() {
        lab.keep_logs();
    }
    let _ = stop_ferrolb(&lab);
    lab.down()?;
    result
}

fn run_in(
    lab: &Lab,
    kube_proxy: &Path,
    scales: &[usize],
    endpoints: usize,
    ours_only: bool,
) -> Result<()> {
    lab.apply_crds()?;
    lab.apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n---\napiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {{name: bench}}\nspec:\n  addresses: [198.18.8.0/24]\n"
    ))?;
    // Three real pods: echo on 8080, iperf3 started in their namespaces.
    // iperf3 opens a control and a data connection that must reach the
    // same server, hence ClientIP affinity on the bulk Service.
    lab.apply(&format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: real, namespace: {NS}}}\nspec:\n  replicas: 3\n  selector: {{matchLabels: {{app: real}}}}\n  template:\n    metadata: {{labels: {{app: real}}}}\n    spec:\n      containers: [{{name: echo, image: x, ports: [{{containerPort: 8080}}]}}]\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: bulk, namespace: {NS}}}\nspec:\n  type: LoadBalancer\n  clusterIP: {BULK_CLUSTER_IP}\n  sessionAffinity: ClientIP\n  selector: {{app: real}}\n  ports: [{{name: iperf, port: 5201, targetPort: 5201}}]\n"
    ))?;
    lab.kubectl_ok(&[
        "rollout",
        "status",
        "deployment/real",
        "-n",
        NS,
        "--timeout=120s",
    ])?;
    // The lab makes our proxy's ServiceAccount token on its first start
    // (kube-proxy's kubeconfig exists from the start): start it once now,
    // so no timed start includes that.
    start_ferrolb(lab)?;
    stop_ferrolb(lab)?;
    let pods = real_pods(lab)?;
    ensure!(pods.len() == 3, "real pods: {pods:?}");
    for (name, _) in &pods {
        let out = lab.exec(
            &format!("pod/{NS}/{name}"),
            &["iperf3", "-s", "-D", "-p", "5201"],
        )?;
        ensure!(
            out.status.success(),
            "iperf3 -s in {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let rt = tokio::runtime::Runtime::new()?;
    let client = rt.block_on(lab.client())?;
    let mut created = 0usize;
    let mut tables = Vec::new();
    let mut throughput = None;
    for &n in scales {
        if n > created {
            say(&format!(
                "creating background Services {created}..{n} with their EndpointSlices"
            ));
            let _t = Ticker::start("creating Services");
            rt.block_on(create_background(&client, created, n, endpoints, &pods))?;
            created = n;
        }
        let mut figures = Vec::new();
        for peer in [Peer::FerroLb, Peer::KubeProxy] {
            if ours_only && peer == Peer::KubeProxy {
                figures.push(Figures::default());
                continue;
            }
            say(&format!("{} at {n} Services", peer.name()));
            figures.push(measure(lab, &rt, &client, peer, kube_proxy, n, &pods)?);
        }
        tables.push((n, figures));
        // Throughput once, at the smallest scale, with both proxies.
        if throughput.is_none() && !ours_only {
            throughput = Some(measure_throughput(lab, kube_proxy, &pods)?);
        }
    }

    let mut table = Table::new(
        &format!(
            "Proxy against kube-proxy (nftables), one lab run, {endpoints} endpoints per Service (cargo run --release -p ferrolb-lab --bin ferrolb-bench -- proxy)"
        ),
        &[
            "Services",
            "measure",
            "FerroLB",
            "kube-proxy",
            "kube-proxy / FerroLB",
        ],
    );
    for (n, f) in &tables {
        let (ours, theirs) = (&f[0], &f[1]);
        let rows: [(&str, Option<f64>, Option<f64>, &str); 7] = [
            (
                "full sync (start -> last Service answers)",
                secs(ours.full_sync),
                secs(theirs.full_sync),
                "s",
            ),
            (
                "RSS once synced",
                ours.rss_kib.map(|k| k as f64 / 1024.0),
                theirs.rss_kib.map(|k| k as f64 / 1024.0),
                "MiB",
            ),
            (
                "one added Service: create -> first connection",
                secs(ours.add_to_connect).map(|s| s * 1e3),
                secs(theirs.add_to_connect).map(|s| s * 1e3),
                "ms",
            ),
            (
                "one added Service: network programming metric",
                ours.add_metric.map(|s| s * 1e3),
                theirs.add_metric.map(|s| s * 1e3),
                "ms",
            ),
            (
                "one added Service: sync duration (mean of its syncs)",
                ours.add_sync.map(|s| s * 1e3),
                theirs.add_sync.map(|s| s * 1e3),
                "ms",
            ),
            (
                "connect latency through a ClusterIP (median of 2000)",
                secs(ours.connect_median).map(|s| s * 1e6),
                secs(theirs.connect_median).map(|s| s * 1e6),
                "µs",
            ),
            (
                "connect latency to a pod directly (control, alternating)",
                secs(ours.direct_median).map(|s| s * 1e6),
                secs(theirs.direct_median).map(|s| s * 1e6),
                "µs",
            ),
        ];
        for (what, a, b, unit) in rows {
            table.row(&[
                n.to_string(),
                what.to_string(),
                fmt(a, unit),
                fmt(b, unit),
                ratio(b, a),
            ]);
        }
    }
    table.print();
    if let Some(tp) = throughput {
        let mut t = Table::new(
            "Bulk TCP throughput, client -> LB IP -> pod against client -> pod (iperf3, 12 trials of 3 s after 1 s of slow start per path, 6 rounds alternating the proxies' order, medians)",
            &[
                "path",
                "Gbit/s",
                "ratio to direct, no proxy",
                "ratio to direct, this proxy running",
            ],
        );
        t.row(&[
            "client -> pod directly, no proxy (no netfilter on the node)".into(),
            format!("{:.2}", tp.direct),
            "1.000".into(),
            "-".into(),
        ]);
        for (name, via, beside) in [
            ("FerroLB", tp.ours, tp.ours_direct),
            ("kube-proxy", tp.theirs, tp.theirs_direct),
        ] {
            t.row(&[
                format!("client -> pod directly, {name} running"),
                format!("{beside:.2}"),
                format!("{:.3}", beside / tp.direct),
                "1.000".into(),
            ]);
            t.row(&[
                format!("client -> LB IP -> pod via {name}"),
                format!("{via:.2}"),
                format!("{:.3}", via / tp.direct),
                format!("{:.3}", via / beside),
            ]);
        }
        t.print();
    }
    // Connect latency at the smallest against the largest scale: as
    // measured, and divided by the control's own ratio (the direct connects
    // made alternately with them see the same machine, not the table).
    if let (Some((_, small)), Some((big_n, big))) = (tables.first(), tables.last()) {
        let mut t = Table::new(
            &format!("Connect latency ratio, {big_n} Services / the smallest scale"),
            &[
                "proxy",
                "through the ClusterIP",
                "direct (control)",
                "ClusterIP / control",
            ],
        );
        for (i, peer) in [Peer::FerroLb, Peer::KubeProxy].iter().enumerate() {
            let r = |f: fn(&Figures) -> Option<Duration>| match (f(&small[i]), f(&big[i])) {
                (Some(a), Some(b)) => Some(b.as_secs_f64() / a.as_secs_f64()),
                _ => None,
            };
            let (through, direct) = (r(|f| f.connect_median), r(|f| f.direct_median));
            let show = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.3}"));
            let normalised = through.zip(direct).map(|(a, b)| a / b);
            t.row(&[
                peer.name().into(),
                show(through),
                show(direct),
                show(normalised),
            ]);
        }
        t.print();
    }
    Ok(())
}

fn secs(d: Option<Duration>) -> Option<f64> {
    d.map(|d| d.as_secs_f64())
}

fn fmt(v: Option<f64>, unit: &str) -> String {
    match v {
        Some(v) if v >= 100.0 => format!("{v:.0} {unit}"),
        Some(v) => format!("{v:.2} {unit}"),
        None => "-".into(),
    }
}

fn ratio(theirs: Option<f64>, ours: Option<f64>) -> String {
    match (theirs, ours) {
        (Some(t), Some(o)) if o > 0.0 => format!("{:.1}x", t / o),
        _ => "-".into(),
    }
}

/// Names and IPs of the real pods.
fn real_pods(lab: &Lab) -> Result<Vec<(String, Ipv4Addr)>> {
    let out = lab.kubectl_ok(&[
        "get",
        "pods",
        "-n",
        NS,
        "-l",
        "app=real",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.status.podIP}{\"\\n\"}{end}",
    ])?;
    out.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(n, ip)| Ok((n.to_string(), ip.parse()?)))
        .collect()
}

fn service_json(name: &str, ip: Ipv4Addr) -> serde_json::Value {
    serde_json::json!({
        "metadata": {"name": name, "namespace": NS},
        "spec": {"type": "ClusterIP", "clusterIP": ip.to_string(), "clusterIPs": [ip.to_string()],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]},
    })
}

/// A slice of `endpoints` endpoints: the real pods first when `real`, the
/// rest addresses nobody owns (traffic to them dies unanswered).
fn slice_json(
    name: &str,
    endpoints: usize,
    pods: &[(String, Ipv4Addr)],
    real_only: bool,
    trigger: Option<&str>,
) -> serde_json::Value {
    let mut eps: Vec<serde_json::Value> = Vec::new();
    for (_, ip) in pods.iter().take(endpoints) {
        eps.push(serde_json::json!({"addresses": [ip.to_string()], "nodeName": "node-1", "conditions": {"ready": true}}));
    }
    if !real_only {
        for j in pods.len()..endpoints {
            eps.push(serde_json::json!({"addresses": [format!("198.19.200.{}", 10 + j)], "nodeName": "node-1", "conditions": {"ready": true}}));
        }
    }
    let mut meta = serde_json::json!({"name": format!("{name}-1"), "namespace": NS,
        "labels": {"kubernetes.io/service-name": name, "endpointslice.kubernetes.io/managed-by": "ferrolb-bench"}});
    if let Some(t) = trigger {
        meta["annotations"] =
            serde_json::json!({"endpoints.kubernetes.io/last-change-trigger-time": t});
    }
    serde_json::json!({
        "metadata": meta,
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    })
}

async fn create_background(
    client: &kube::Client,
    from: usize,
    to: usize,
    endpoints: usize,
    pods: &[(String, Ipv4Addr)],
) -> Result<()> {
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
    let results: Vec<Result<()>> = futures::stream::iter(from..to)
        .map(|i| {
            let (services, slices) = (services.clone(), slices.clone());
            async move {
                let name = format!("s{i:05}");
                let svc: Service = serde_json::from_value(service_json(&name, background_ip(i)))?;
                services.create(&PostParams::default(), &svc).await?;
                let slice: EndpointSlice =
                    serde_json::from_value(slice_json(&name, endpoints, pods, false, None))?;
                slices.create(&PostParams::default(), &slice).await?;
                if (i + 1) % 1000 == 0 {
                    say(&format!("created {}/{to}", i + 1));
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let failed: Vec<&anyhow::Error> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    ensure!(
        failed.is_empty(),
        "{} creates failed, e.g. {:#}",
        failed.len(),
        failed[0]
    );
    Ok(())
}

fn node_netns() -> String {
    format!("{PREFIX}-node-1")
}

/// Starts connecting to `ip:80` from the node, every few milliseconds,
/// until one connection succeeds (or `timeout`); running once this returns.
fn spawn_probe(ip: Ipv4Addr, timeout: Duration) -> Result<Child> {
    let child = Command::new("ip")
        .args(["netns", "exec", &node_netns()])
        .arg(std::env::current_exe()?)
        .args([
            "probe-connect",
            &format!("{ip}:80"),
            "--timeout-ms",
            &timeout.as_millis().to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(child)
}

/// When the probe's first connection succeeded, after `t0` (ns since the
/// epoch); `None` if it never did.
fn probe_result(probe: Child, t0: u128) -> Result<Option<Duration>> {
    let out = probe.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .trim()
        .parse::<u128>()
        .ok()
        .filter(|_| out.status.success())
        .map(|at| Duration::from_nanos(at.saturating_sub(t0) as u64)))
}

fn start_ferrolb(lab: &Lab) -> Result<u32> {
    crate::commands::request(lab.state(), "start proxy@node-1")?;
    lab.state()
        .read_pid("proxy@node-1")
        .context("no pid for proxy@node-1")
}

fn stop_ferrolb(lab: &Lab) -> Result<()> {
    if lab.state().read_pid("proxy@node-1").is_some() {
        let _ = lab.cli(&["stop", "proxy@node-1"]);
    }
    // Remove its tables, as an operator switching proxies would.
    let bin = lab_bin("ferrolb-proxy")?;
    let _ = Command::new("ip")
        .args(["netns", "exec", &node_netns()])
        .arg(&bin)
        .args(["--cleanup", "--node-name", "node-1"])
        .output();
    Ok(())
}

fn lab_bin(name: &str) -> Result<std::path::PathBuf> {
    let p = std::env::current_exe()?.with_file_name(name);
    ensure!(
        p.exists(),
        "{} is missing; build the workspace first",
        p.display()
    );
    Ok(p)
}

fn start_kube_proxy(lab: &Lab, binary: &Path) -> Result<Child> {
    let kubeconfig = lab.state().kubeconfig("kube-proxy");
    let args = control_plane::kube_proxy_args(1, &kubeconfig, addresses::IpFamily::Ipv4);
    let log = std::fs::File::create(lab.state().log("bench-kube-proxy"))?;
    Ok(Command::new("ip")
        .args(["netns", "exec", &node_netns()])
        .arg(binary)
        .args(&args)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?)
}

fn stop_kube_proxy(mut child: Child, binary: &Path) -> Result<()> {
    crate::process::signal(child.id(), "TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = Command::new("ip")
        .args(["netns", "exec", &node_netns()])
        .arg(binary)
        .arg("--cleanup")
        .output();
    Ok(())
}

/// Reads one metric's `_sum` and `_count` from a proxy on the node.
fn histogram(name: &str) -> Option<(f64, f64)> {
    let addr: SocketAddr = format!("{}:10249", addresses::node_v4(1)).parse().ok()?;
    let (code, body) = ferrolb_runtime::testing::http_get(addr, "/metrics")?;
    if code != 200 {
        return None;
    }
    // The bench's lab is IPv4 only; ours also syncs an (empty) IPv6 table,
    // whose syncs are left out.
    let v4: String = body
        .lines()
        .filter(|l| !l.contains("ip_family=\"IPv6\""))
        .flat_map(|l| [l, "\n"])
        .collect();
    let total = |suffix: &str| -> f64 {
        ferrolb_runtime::testing::samples(&v4, &format!("{name}{suffix}")).sum()
    };
    // A labelled histogram (ours, per IP family) has no lines before its
    // first observation: that is a count of zero, not "no metric".
    Some((total("_sum"), total("_count")))
}

fn measure(
    lab: &Lab,
    rt: &tokio::runtime::Runtime,
    client: &kube::Client,
    peer: Peer,
    kube_proxy: &Path,
    n: usize,
    pods: &[(String, Ipv4Addr)],
) -> Result<Figures> {
    let mut f = Figures::default();
    // Full sync: until the last Service answers. (Asking the kernel with
    // `nft get element` took 2.7 s on a table this size: longer than what
    // it measured.)
    let last = background_ip(n - 1);
    let prober = spawn_probe(last, Duration::from_secs(1200))?;
    let t0 = unix_nanos();
    let running = Running::start(lab, peer, kube_proxy)?;
    let pid = running.pid();
    {
        let _t = Ticker::start("waiting for the full sync");
        f.full_sync = probe_result(prober, t0)?;
    }
    ensure!(
        f.full_sync.is_some(),
        "{} never made {last} reachable",
        peer.name()
    );
    std::thread::sleep(Duration::from_secs(3));
    if peer == Peer::FerroLb {
        // Where our full sync's time went, as the proxy logs it.
        let log = std::fs::read_to_string(lab.state().log("proxy@node-1")).unwrap_or_default();
        for line in log.lines().filter(|l| {
            l.contains("API server") || l.contains("watch listed") || l.contains("table built")
        }) {
            say(&format!("proxy: {line}"));
        }
    }
    // `ip netns exec` execs in place: the pid is the proxy's own.
    f.rss_kib = super::rss_kib(&pid.to_string());

    // One added Service, reachable through its real endpoints only.
    let probe = next_probe_ip();
    let name = format!("probe-{}-{n}", peer.name().to_lowercase());
    let metric = "kubeproxy_network_programming_duration_seconds";
    let sync_metric = "kubeproxy_sync_proxy_rules_duration_seconds";
    let before = histogram(metric);
    let sync_before = histogram(sync_metric);
    let prober = spawn_probe(probe, Duration::from_secs(60))?;
    let t0 = unix_nanos();
    let trigger = k8s_openapi::jiff::Timestamp::now().to_string();
    rt.block_on(async {
        let services: Api<Service> = Api::namespaced(client.clone(), NS);
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
        let svc: Service = serde_json::from_value(service_json(&name, probe))?;
        services.create(&PostParams::default(), &svc).await?;
        let slice: EndpointSlice =
            serde_json::from_value(slice_json(&name, 3, pods, true, Some(&trigger)))?;
        slices.create(&PostParams::default(), &slice).await?;
        anyhow::Ok(())
    })?;
    f.add_to_connect = probe_result(prober, t0)?;
    std::thread::sleep(Duration::from_secs(2));
    if let (Some((s0, c0)), Some((s1, c1))) = (before, histogram(metric))
        && c1 > c0
    {
        f.add_metric = Some((s1 - s0) / (c1 - c0));
    }
    if let (Some((s0, c0)), Some((s1, c1))) = (sync_before, histogram(sync_metric))
        && c1 > c0
    {
        f.add_sync = Some((s1 - s0) / (c1 - c0));
    }

    // Connect latency through the probe ClusterIP, alternating with
    // connects to one of its pods directly.
    let direct = SocketAddr::from((pods[0].1, 8080));
    let out = Command::new("ip")
        .args(["netns", "exec", &node_netns()])
        .arg(std::env::current_exe()?)
        .args([
            "connect-latency",
            &format!("{probe}:80"),
            &direct.to_string(),
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "connect-latency: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut medians = text
        .split_whitespace()
        .map(|v| v.parse::<u64>().ok().map(Duration::from_nanos));
    f.connect_median = medians.next().flatten();
    f.direct_median = medians.next().flatten();

    running.stop(lab, kube_proxy)?;
    say(&format!("{} at {n}: {f:?}", peer.name()));
    Ok(f)
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Medians of the throughput trials, Gbit/s.
struct Throughput {
    /// Client -> pod with no proxy: no table on the node, so no conntrack.
    direct: f64,
    ours: f64,
    /// Client -> pod while our proxy runs (its table turns conntrack on
    /// for every forwarded packet, as any kube-proxy does).
    ours_direct: f64,
    theirs: f64,
    theirs_direct: f64,
}

/// Client -> LB IP -> pod (through each proxy) against client -> pod, the
/// latter with no proxy and beside each proxy.
fn measure_throughput(
    lab: &Lab,
    kube_proxy: &Path,
    pods: &[(String, Ipv4Addr)],
) -> Result<Throughput> {
    let lb = lab
        .kubectl_ok(&[
            "get",
            "svc",
            "bulk",
            "-n",
            NS,
            "-o",
            "jsonpath={.status.loadBalancer.ingress[0].ip}",
        ])?
        .trim()
        .to_string();
    ensure!(!lb.is_empty(), "the bulk Service has no LB IP");
    let node = addresses::node_v4(1).to_string();
    let route = lab.exec(
        "client",
        &["ip", "route", "replace", &format!("{lb}/32"), "via", &node],
    )?;
    ensure!(
        route.status.success(),
        "client route: {}",
        String::from_utf8_lossy(&route.stderr)
    );
    let direct_ip = pods[0].1.to_string();
    let trial = |target: &str| -> Result<f64> {
        let out = lab.exec(
            "client",
            // The first second (slow start) is left out of the figure.
            &[
                "iperf3", "-c", target, "-p", "5201", "-t", "3", "-O", "1", "-J",
            ],
        )?;
        ensure!(
            out.status.success(),
            "iperf3 to {target}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .map(|b| b / 1e9)
            .with_context(|| format!("iperf3 to {target} measured nothing: {}", v["error"]))
    };
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    // Rounds of two trials per path; which proxy goes first alternates
    // (A B, B A, ...), so a drift of the machine over the minutes this
    // takes weighs on both alike, and the direct path is measured in every
    // round beside them.
    const ROUNDS: usize = 6;
    let mut direct = Vec::new();
    // Per proxy (FerroLB, kube-proxy), with it running: through the LB IP
    // and straight to the pod, alternately.
    let mut via: [Vec<f64>; 2] = Default::default();
    let mut beside: [Vec<f64>; 2] = Default::default();
    for round in 0..ROUNDS {
        say(&format!("throughput: round {}/{ROUNDS}", round + 1));
        direct.push(trial(&direct_ip)?);
        direct.push(trial(&direct_ip)?);
        let order = if round % 2 == 0 {
            [Peer::FerroLb, Peer::KubeProxy]
        } else {
            [Peer::KubeProxy, Peer::FerroLb]
        };
        for peer in order {
            let i = peer as usize;
            let running = Running::start(lab, peer, kube_proxy)?;
            wait_reachable(lab, &lb)?;
            for _ in 0..2 {
                via[i].push(trial(&lb)?);
                beside[i].push(trial(&direct_ip)?);
            }
            running.stop(lab, kube_proxy)?;
        }
    }
    let [ours, theirs] = via;
    let [ours_direct, theirs_direct] = beside;
    say(&format!(
        "throughput trials (Gbit/s): direct, no proxy {direct:.2?}; FerroLB {ours:.2?}, direct beside it {ours_direct:.2?}; kube-proxy {theirs:.2?}, direct beside it {theirs_direct:.2?}"
    ));
    let result = Throughput {
        direct: median(direct),
        ours: median(ours),
        ours_direct: median(ours_direct),
        theirs: median(theirs),
        theirs_direct: median(theirs_direct),
    };
    let _ = lab.exec("client", &["ip", "route", "del", &format!("{lb}/32")]);
    Ok(result)
}

fn wait_reachable(lab: &Lab, ip: &str) -> Result<()> {
    let started = Instant::now();
    loop {
        let out = lab.exec("client", &["iperf3", "-c", ip, "-p", "5201", "-t", "1"])?;
        if out.status.success() {
            return Ok(());
        }
        ensure!(
            started.elapsed() < Duration::from_secs(300),
            "{ip} never became reachable"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `probe-connect`: connects to `addr` every few milliseconds until one
/// connection succeeds; prints the wall time of that success (ns since the
/// epoch) and exits 0, or exits 1 after `timeout`.
pub fn probe_connect(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        // A SYN the proxy drops costs the whole timeout; a connection on
        // this machine takes microseconds, so 10 ms keeps the resolution.
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(10)).is_ok() {
            println!("{}", unix_nanos());
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    bail!("no connection to {addr} within {timeout:?}")
}

/// `connect-latency`: the median times of `count` TCP connects to `addr`
/// and `count` to `control`, made alternately so that both see the same
/// moments of the machine; prints both medians in nanoseconds.
pub fn connect_latency(addr: SocketAddr, control: SocketAddr, count: usize) -> Result<()> {
    ensure!(count > 0, "--count must be positive");
    // A connect whose SYN was lost (a busy 2-core machine drops one now
    // and then) takes a retransmission: a sample like any other, up to a
    // bound; only one that fails outright is retried, and many failures end
    // the run.
    let mut failures = 0usize;
    let mut connect = |to: SocketAddr| -> Result<Duration> {
        loop {
            let t = Instant::now();
            match std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
                Ok(s) => {
                    let took = t.elapsed();
                    drop(s);
                    return Ok(took);
                }
                Err(e) => {
                    failures += 1;
                    ensure!(
                        failures <= count / 100 + 1,
                        "{failures} connects failed, the last to {to}: {e}"
                    );
                }
            }
        }
    };
    let (mut through, mut direct) = (Vec::with_capacity(count), Vec::with_capacity(count));
    // A few of each first: the first connects of a run pay for cold caches.
    for _ in 0..20 {
        connect(addr)?;
        connect(control)?;
    }
    for _ in 0..count {
        through.push(connect(addr)?);
        direct.push(connect(control)?);
    }
    through.sort();
    direct.sort();
    println!(
        "{} {}",
        through[count / 2].as_nanos(),
        direct[count / 2].as_nanos()
    );
    Ok(())
}
