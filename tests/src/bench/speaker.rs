//! FerroLB's speaker against MetalLB's (L2 mode), in one lab run: three
//! nodes, the real kube-proxy as the data plane for both, the same echo
//! pods, one speaker implementation at a time. Every figure is taken from
//! the outside client (`ferrolb-lab l2 ...` probes in its namespace).
//!
//! Cases, each `trials` times, median and max:
//! - node loss (the announcing node's LAN link cut): outage of a UDP probe
//!   every 10 ms (each from a fresh socket), time until a new TCP
//!   connection succeeds, share of probes answered in the 5 s after
//!   recovery (the lost node's pod stays an endpoint: reported, not ours
//!   to fix here);
//! - link restored: how long two MACs answer for the IP;
//! - announcing speaker SIGKILL: time until the client's neighbour entry
//!   shows the new owner, failed requests of a steady client (50/s), and
//!   the outage of a client whose neighbour cache was flushed at the kill;
//! - rolling restart of every speaker under the steady client: failed
//!   requests, IP moves;
//! - drain (cordon, then SIGTERM of its speaker as the node shuts down)
//!   under the steady client: failed requests, IP moves.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use super::{Table, Ticker, say};
use crate::addresses;
use crate::control_plane;
use crate::l2probe::{self, summarize};
use crate::lab::Lab;
use crate::state::{ProxyMode, UpOptions};

const PREFIX: &str = "flbbspk";
const NS: &str = "bench";
const NODES: u8 = 3;
const METALLB_NS: &str = "metallb-system";
const METALLB_CLASS: &str = "metallb.io/bench";
const STEADY_RATE: u32 = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    FerroLb,
    MetalLb,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Which::FerroLb => "FerroLB",
            Which::MetalLb => "MetalLB",
        }
    }

    fn service(self) -> &'static str {
        match self {
            Which::FerroLb => "lb-ferrolb",
            Which::MetalLb => "lb-metallb",
        }
    }
}

/// One implementation's samples, per figure.
#[derive(Debug, Default)]
struct Samples(BTreeMap<&'static str, Vec<f64>>);

impl Samples {
    fn add(&mut self, what: &'static str, v: f64) {
        self.0.entry(what).or_default().push(v);
    }
}

/// Figures in table order: (key, label, unit).
const FIGURES: &[(&str, &str, &str)] = &[
    ("loss_outage", "node loss: UDP outage", "ms"),
    (
        "loss_connect",
        "node loss: new TCP connection works after",
        "ms",
    ),
    (
        "loss_share",
        "node loss: probes answered in the 5 s after recovery",
        "%",
    ),
    ("restore_double", "link restored: two MACs answer for", "ms"),
    (
        "kill_neigh",
        "speaker SIGKILL: client's neighbour entry moves after",
        "ms",
    ),
    (
        "kill_failed",
        "speaker SIGKILL: failed requests (steady client)",
        "",
    ),
    (
        "kill_flushed",
        "speaker SIGKILL: outage, client cache flushed",
        "ms",
    ),
    ("roll_failed", "rolling restart: failed requests", ""),
    ("roll_moves", "rolling restart: IP moves", ""),
    ("drain_failed", "drain: failed requests", ""),
    ("drain_moves", "drain: IP moves", ""),
];

pub fn run(trials: usize) -> Result<()> {
    let versions = control_plane::ensure_peers()?;
    let metallb = control_plane::peer_metallb_dir(&versions);
    say(&format!(
        "speaker: FerroLB against MetalLB {} ({trials} trials per case, 3 nodes, kube-proxy data plane)",
        versions.peer_metallb
    ));
    let exe = std::env::current_exe()?.with_file_name("ferrolb-lab");
    let opts = UpOptions {
        nodes: NODES,
        proxy: ProxyMode::KubeProxy,
        ip_family: addresses::IpFamily::Ipv4,
        ferrolb: true,
    };
    say("bringing up a lab (3 nodes, kube-proxy)");
    let lab = Lab::up(Path::new(&exe), PREFIX, &opts)?;
    let mut peer = MetalLb::new(metallb);
    let result = run_in(&lab, &mut peer, trials);
    if result.is_err() {
        lab.keep_logs();
    }
    peer.stop_all();
    lab.down()?;
    let (ours, theirs) = result?;
    let mut table = Table::new(
        &format!(
            "Speaker failover, FerroLB vs MetalLB {} ({trials} trials each, same lab run; median / max)",
            versions.peer_metallb
        ),
        &[
            "case",
            "FerroLB",
            "MetalLB",
            "ratio (MetalLB / FerroLB, median)",
        ],
    );
    for (key, label, unit) in FIGURES {
        let a = ours.0.get(key).cloned().unwrap_or_default();
        let b = theirs.0.get(key).cloned().unwrap_or_default();
        let ratio = match (median(&a), median(&b)) {
            // A share, where more is better: the difference reads right,
            // a ratio of the two would not.
            (Some(x), Some(y)) if *unit == "%" => format!("{:+.0} points, ours", x - y),
            (Some(x), Some(y)) if x > 0.0 => format!("{:.1}×", y / x),
            (Some(x), Some(y)) if x == 0.0 && y == 0.0 => "equal".into(),
            (Some(_), Some(_)) => "ours 0".into(),
            _ => "-".into(),
        };
        table.row(&[label.to_string(), cell(&a, unit), cell(&b, unit), ratio]);
    }
    table.print();
    Ok(())
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    Some(s[s.len() / 2])
}

fn cell(v: &[f64], unit: &str) -> String {
    let max = v.iter().copied().fold(f64::NAN, f64::max);
    match median(v) {
        Some(m) => format!("{m:.0}{unit} / {max:.0}{unit}"),
        None => "-".into(),
    }
}

fn run_in(lab: &Lab, peer: &mut MetalLb, trials: usize) -> Result<(Samples, Samples)> {
    lab.apply_crds()?;
    let mut m = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n---\n\
         apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {{name: bench}}\nspec:\n  addresses: [198.18.8.0/26]\n---\n\
         apiVersion: ferrolb.io/v1beta1\nkind: L2Advertisement\nmetadata: {{name: bench}}\nspec: {{}}\n"
    );
    for n in 1..=NODES {
        m.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: web-{n}\n  namespace: {NS}\n  labels: {{app: web}}\nspec:\n  nodeName: node-{n}\n  terminationGracePeriodSeconds: 0\n  containers: [{{name: echo, image: registry.invalid/echo, ports: [{{containerPort: 8080}}, {{containerPort: 8081, protocol: UDP}}]}}]\n"
        ));
    }
    m.push_str(&service(Which::FerroLb));
    lab.apply(&m)?;
    lab.kubectl_ok(&[
        "wait",
        "--for=condition=Ready",
        "-n",
        NS,
        "pod/web-1",
        "pod/web-2",
        "pod/web-3",
        "--timeout=120s",
    ])?;
    let macs = node_macs(lab)?;

    say("FerroLB: measuring");
    let ours = measure(lab, Which::FerroLb, &macs, trials, peer)?;
    lab.kubectl_ok(&["delete", "svc", Which::FerroLb.service(), "-n", NS])?;
    for n in 1..=NODES {
        let _ = lab.cli(&["stop", &format!("speaker@node-{n}")]);
    }

    say("MetalLB: starting its controller and speakers");
    peer.start(lab)?;
    lab.apply(&service(Which::MetalLb))?;
    let theirs = measure(lab, Which::MetalLb, &macs, trials, peer)?;
    Ok((ours, theirs))
}

fn service(which: Which) -> String {
    let class = match which {
        Which::FerroLb => String::new(),
        Which::MetalLb => format!("  loadBalancerClass: {METALLB_CLASS}\n"),
    };
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: {NS}}}\nspec:\n  type: LoadBalancer\n{class}  selector: {{app: web}}\n  ports:\n  - {{name: tcp, port: 80, targetPort: 8080, protocol: TCP}}\n  - {{name: udp, port: 81, targetPort: 8081, protocol: UDP}}\n",
        which.service()
    )
}

/// MAC → node.
fn node_macs(lab: &Lab) -> Result<BTreeMap<String, u8>> {
    let mut out = BTreeMap::new();
    for n in 1..=NODES {
        let o = lab.exec(
            &format!("node-{n}"),
            &["cat", "/sys/class/net/eth0/address"],
        )?;
        out.insert(String::from_utf8_lossy(&o.stdout).trim().to_string(), n);
    }
    Ok(out)
}

fn ingress(lab: &Lab, svc: &str) -> Result<IpAddr> {
    let started = Instant::now();
    loop {
        let out = lab.kubectl_ok(&[
            "get",
            "svc",
            svc,
            "-n",
            NS,
            "-o",
            "jsonpath={.status.loadBalancer.ingress[0].ip}",
        ])?;
        if let Ok(ip) = out.trim().parse() {
            return Ok(ip);
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("{svc} got no LB IP within 60 s");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The node that alone answers ARP for `ip`, once that has held for 2 s
/// (the IP has settled after the last case).
fn settled_owner(lab: &Lab, ip: IpAddr, macs: &BTreeMap<String, u8>) -> Result<u8> {
    let started = Instant::now();
    loop {
        let asked = l2probe::watch(lab, ip, Duration::from_millis(50), Duration::from_secs(2))?
            .collect()?;
        let s = summarize(&asked);
        if s.macs.len() == 1
            && s.longest_silence_ms == 0.0
            && let Some(n) = s.macs.iter().next().and_then(|m| macs.get(m))
        {
            return Ok(*n);
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("{ip} did not settle on one node within 120 s: {:?}", s.macs);
        }
    }
}

fn measure(
    lab: &Lab,
    which: Which,
    macs: &BTreeMap<String, u8>,
    trials: usize,
    peer: &mut MetalLb,
) -> Result<Samples> {
    let ip = ingress(lab, which.service())?;
    let mut s = Samples::default();
    let mac_of = |n: u8| {
        macs.iter()
            .find(|(_, v)| **v == n)
            .map(|(m, _)| m.clone())
            .unwrap_or_default()
    };
    for t in 1..=trials {
        let _tick = Ticker::start(&format!("{} trial {t}/{trials}", which.name()));
        say(&format!("{}: trial {t}/{trials}: node loss", which.name()));
        node_loss(lab, ip, macs, &mut s)?;

        say(&format!(
            "{}: trial {t}/{trials}: speaker SIGKILL",
            which.name()
        ));
        let w = settled_owner(lab, ip, macs)?;
        let neigh = l2probe::neigh_change(lab, ip, &mac_of(w), Duration::from_secs(30))?;
        let steady = l2probe::steady_client(
            lab,
            SocketAddr::new(ip, 80),
            STEADY_RATE,
            Duration::from_secs(10),
        )?;
        std::thread::sleep(Duration::from_secs(1));
        let killed_at = l2probe::now_ms();
        kill_speaker(lab, which, peer, w)?;
        let moved = neigh.collect()?;
        let tally = steady.collect()?;
        s.add("kill_neigh", moved.map_or(30_000.0, |t| t - killed_at));
        s.add("kill_failed", tally.failed as f64);
        start_speaker(lab, which, peer, w)?;
        let w = settled_owner(lab, ip, macs)?;
        // A client that has to resolve the IP again right after the kill.
        let udp = l2probe::udp(
            lab,
            SocketAddr::new(ip, 81),
            Duration::from_millis(10),
            Duration::from_secs(12),
        )?;
        std::thread::sleep(Duration::from_secs(1));
        let at = l2probe::now_ms();
        kill_speaker(lab, which, peer, w)?;
        let _ = lab.exec("client", &["ip", "neigh", "flush", &ip.to_string()]);
        let probes = udp.collect()?;
        s.add("kill_flushed", l2probe::outage_after(&probes, at));
        start_speaker(lab, which, peer, w)?;
        settled_owner(lab, ip, macs)?;

        say(&format!(
            "{}: trial {t}/{trials}: rolling restart",
            which.name()
        ));
        let steady = l2probe::steady_client(
            lab,
            SocketAddr::new(ip, 80),
            STEADY_RATE,
            Duration::from_secs(40),
        )?;
        let watch = l2probe::watch(lab, ip, Duration::from_millis(50), Duration::from_secs(40))?;
        std::thread::sleep(Duration::from_secs(1));
        rolling_restart(lab, which, peer)?;
        let tally = steady.collect()?;
        let summary = summarize(&watch.collect()?);
        s.add("roll_failed", tally.failed as f64);
        s.add("roll_moves", summary.moves as f64);
        settled_owner(lab, ip, macs)?;

        say(&format!("{}: trial {t}/{trials}: drain", which.name()));
        let w = settled_owner(lab, ip, macs)?;
        let node = format!("node-{w}");
        let steady = l2probe::steady_client(
            lab,
            SocketAddr::new(ip, 80),
            STEADY_RATE,
            Duration::from_secs(10),
        )?;
        let watch = l2probe::watch(lab, ip, Duration::from_millis(50), Duration::from_secs(10))?;
        std::thread::sleep(Duration::from_secs(1));
        lab.kubectl_ok(&["cordon", &node])?;
        std::thread::sleep(Duration::from_secs(2));
        // The drained node shuts down: its speaker gets SIGTERM.
        stop_speaker(lab, which, peer, w)?;
        let tally = steady.collect()?;
        let summary = summarize(&watch.collect()?);
        s.add("drain_failed", tally.failed as f64);
        s.add("drain_moves", summary.moves as f64);
        lab.kubectl_ok(&["uncordon", &node])?;
        start_speaker(lab, which, peer, w)?;
        settled_owner(lab, ip, macs)?;
    }
    Ok(s)
}

fn node_loss(lab: &Lab, ip: IpAddr, macs: &BTreeMap<String, u8>, s: &mut Samples) -> Result<()> {
    let w = settled_owner(lab, ip, macs)?;
    let node = format!("node-{w}");
    let udp = l2probe::udp(
        lab,
        SocketAddr::new(ip, 81),
        Duration::from_millis(10),
        Duration::from_secs(16),
    )?;
    std::thread::sleep(Duration::from_secs(1));
    let at = l2probe::now_ms();
    let cut = lab.cli(&["link", &node, "down"])?;
    ensure!(cut.status.success(), "cutting {node}'s link");
    let connect = connect_after(lab, SocketAddr::new(ip, 80))?;
    // The slowest failover seen (MetalLB, about 6.5 s) and the 5 s after
    // it, before the link comes back.
    std::thread::sleep(Duration::from_secs(14));
    // Restore while the udp probe still runs; then watch the split heal.
    let watch = l2probe::watch_until_calm(
        lab,
        ip,
        Duration::from_secs(10),
        Duration::from_secs(5),
        Duration::from_secs(90),
    )?;
    let up = lab.cli(&["link", &node, "up"])?;
    ensure!(up.status.success(), "restoring {node}'s link");
    let probes = udp.collect()?;
    let connected = connect
        .wait_with_output()
        .context("waiting for the connect probe")?;
    let summary = summarize(&watch.collect()?);
    let outage = l2probe::outage_after(&probes, at);
    s.add("loss_outage", outage);
    let first_ok = probes
        .iter()
        .find(|p| p.at > at && p.pod.is_some())
        .map(|p| p.at);
    if let Some(first) = first_ok {
        let window: Vec<_> = probes
            .iter()
            .filter(|p| p.at >= first && p.at < first + 5000.0)
            .collect();
        if !window.is_empty() {
            let ok = window.iter().filter(|p| p.pod.is_some()).count();
            s.add("loss_share", 100.0 * ok as f64 / window.len() as f64);
        }
    }
    if connected.status.success()
        && let Ok(ns) = String::from_utf8_lossy(&connected.stdout)
            .trim()
            .parse::<f64>()
    {
        s.add("loss_connect", ns / 1e6 - at);
    }
    s.add("restore_double", summary.double_span_ms);
    Ok(())
}

/// `ferrolb-bench probe-connect` in the client: connects until one
/// succeeds and prints the time.
fn connect_after(lab: &Lab, addr: SocketAddr) -> Result<Child> {
    let bench = std::env::current_exe()?;
    let bench = bench.display().to_string();
    lab.spawn_in(
        "client",
        &[
            &bench,
            "probe-connect",
            &addr.to_string(),
            "--timeout-ms",
            "30000",
        ],
    )
}

fn kill_speaker(lab: &Lab, which: Which, peer: &mut MetalLb, n: u8) -> Result<()> {
    match which {
        Which::FerroLb => {
            let out = lab.cli(&["kill", &format!("speaker@node-{n}")])?;
            ensure!(out.status.success(), "killing speaker@node-{n}");
        }
        Which::MetalLb => peer.signal(n, "KILL"),
    }
    Ok(())
}

fn stop_speaker(lab: &Lab, which: Which, peer: &mut MetalLb, n: u8) -> Result<()> {
    match which {
        Which::FerroLb => {
            let out = lab.cli(&["stop", &format!("speaker@node-{n}")])?;
            ensure!(out.status.success(), "stopping speaker@node-{n}");
        }
        Which::MetalLb => {
            peer.signal(n, "TERM");
            peer.wait_exit(n, Duration::from_secs(30));
        }
    }
    Ok(())
}

fn start_speaker(lab: &Lab, which: Which, peer: &mut MetalLb, n: u8) -> Result<()> {
    match which {
        Which::FerroLb => {
            let out = lab.cli(&["start", &format!("speaker@node-{n}")])?;
            ensure!(
                out.status.success(),
                "starting speaker@node-{n}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Which::MetalLb => {
            peer.wait_exit(n, Duration::from_secs(10));
            peer.start_speaker(lab, n)?;
        }
    }
    Ok(())
}

/// Every speaker in turn, as its DaemonSet would roll it: ours with surge
/// (the chart's strategy), MetalLB's without (its chart's default,
/// maxUnavailable 1): stop, start, wait until it has joined.
fn rolling_restart(lab: &Lab, which: Which, peer: &mut MetalLb) -> Result<()> {
    match which {
        Which::FerroLb => {
            let out = lab.cli(&["restart", "speaker"])?;
            ensure!(
                out.status.success(),
                "rolling the speakers: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Which::MetalLb => {
            for n in 1..=NODES {
                peer.signal(n, "TERM");
                peer.wait_exit(n, Duration::from_secs(30));
                peer.start_speaker(lab, n)?;
                // A readiness probe would pass once memberlist has joined;
                // MetalLB's speaker logs "joined" quickly, so wait a little.
                std::thread::sleep(Duration::from_secs(5));
            }
        }
    }
    Ok(())
}

/// MetalLB's controller and speakers as plain processes (shared/peers/
/// METALLB.md), serving Services of class `metallb.io/bench` only.
struct MetalLb {
    dir: PathBuf,
    controller: Option<Child>,
    speakers: BTreeMap<u8, Child>,
    secret_dir: Option<PathBuf>,
}

impl MetalLb {
    fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            controller: None,
            speakers: BTreeMap::new(),
            secret_dir: None,
        }
    }

    fn start(&mut self, lab: &Lab) -> Result<()> {
        let crds = self.dir.join("crds");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&crds)
            .with_context(|| format!("reading {}", crds.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        files.sort();
        for f in &files {
            lab.kubectl_ok(&[
                "apply",
                "--server-side",
                "--force-conflicts",
                "-f",
                &f.display().to_string(),
            ])?;
        }
        let key = {
            let mut b = [0u8; 16];
            use std::io::Read;
            std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
            b
        };
        let secret_dir = lab.state().root().join("metallb-memberlist");
        std::fs::create_dir_all(&secret_dir)?;
        std::fs::write(secret_dir.join("secretkey"), key)?;
        self.secret_dir = Some(secret_dir);
        lab.apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {METALLB_NS}}}\n"
        ))?;
        let key_file = self
            .secret_dir
            .as_ref()
            .map(|d| d.join("secretkey"))
            .context("no key written")?;
        lab.kubectl_ok(&[
            "create",
            "secret",
            "generic",
            "memberlist",
            "-n",
            METALLB_NS,
            &format!("--from-file=secretkey={}", key_file.display()),
        ])?;
        let mut m = format!(
            "apiVersion: metallb.io/v1beta1\nkind: IPAddressPool\nmetadata: {{name: bench, namespace: {METALLB_NS}}}\nspec:\n  addresses: [198.18.8.64/26]\n---\n\
             apiVersion: metallb.io/v1beta1\nkind: L2Advertisement\nmetadata: {{name: bench, namespace: {METALLB_NS}}}\nspec: {{}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata:\n  name: metallb-controller\n  namespace: {METALLB_NS}\n  labels: {{app: metallb, component: controller}}\nspec:\n  nodeName: node-1\n  hostNetwork: true\n  containers: [{{name: controller, image: registry.invalid/metallb}}]\n"
        );
        for n in 1..=NODES {
            m.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: metallb-speaker-{n}\n  namespace: {METALLB_NS}\n  labels: {{app: metallb, component: speaker}}\nspec:\n  nodeName: node-{n}\n  hostNetwork: true\n  containers: [{{name: speaker, image: registry.invalid/metallb}}]\n"
            ));
        }
        lab.apply(&m)?;
        let mut wait = vec![
            "wait",
            "--for=condition=Ready",
            "-n",
            METALLB_NS,
            "--timeout=60s",
            "pod/metallb-controller",
        ];
        let names: Vec<String> = (1..=NODES)
            .map(|n| format!("pod/metallb-speaker-{n}"))
            .collect();
        wait.extend(names.iter().map(String::as_str));
        lab.kubectl_ok(&wait)?;
        let log = std::fs::File::create(lab.state().log("bench-metallb-controller"))?;
        let controller = Command::new(self.dir.join("controller"))
            .args([
                &format!("--namespace={METALLB_NS}"),
                // v0.15 has no --pod-name (v0.16's controller looks its Pod up).
                "--webhook-mode=disabled",
                "--port=0",
                &format!("--lb-class={METALLB_CLASS}"),
                &format!("--kubeconfig={}", lab.kubeconfig_path().display()),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting MetalLB's controller")?;
        self.controller = Some(controller);
        for n in 1..=NODES {
            self.start_speaker(lab, n)?;
        }
        Ok(())
    }

    fn start_speaker(&mut self, lab: &Lab, n: u8) -> Result<()> {
        let secret = self.secret_dir.clone().context("MetalLB not started")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(lab.state().log(&format!("bench-metallb-speaker-{n}")))?;
        let netns = lab.node_netns(n);
        let child = Command::new("ip")
            .args(["netns", "exec", &netns])
            .arg(self.dir.join("speaker"))
            .args([
                format!("--namespace={METALLB_NS}"),
                format!("--node-name=node-{n}"),
                format!("--pod-name=metallb-speaker-{n}"),
                format!("--ml-bindaddr={}", addresses::node_v4(n)),
                "--ml-bindport=7946".to_string(),
                "--ml-labels=app=metallb,component=speaker".to_string(),
                format!("--ml-secret-key-path={}", secret.display()),
                "--port=0".to_string(),
                format!("--lb-class={METALLB_CLASS}"),
                format!("--kubeconfig={}", lab.kubeconfig_path().display()),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting MetalLB's speaker on node-{n}"))?;
        self.speakers.insert(n, child);
        Ok(())
    }

    fn signal(&mut self, n: u8, sig: &str) {
        if let Some(c) = self.speakers.get(&n) {
            // `ip netns exec` execs in place: the child's pid is the speaker's.
            crate::process::signal(c.id(), sig);
        }
    }

    fn wait_exit(&mut self, n: u8, bound: Duration) {
        let Some(mut c) = self.speakers.remove(&n) else {
            return;
        };
        let started = Instant::now();
        while started.elapsed() < bound {
            if matches!(c.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    fn stop_all(&mut self) {
        let nodes: Vec<u8> = self.speakers.keys().copied().collect();
        for n in nodes {
            self.signal(n, "TERM");
            self.wait_exit(n, Duration::from_secs(10));
        }
        if let Some(mut c) = self.controller.take() {
            crate::process::signal(c.id(), "TERM");
            let _ = c.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_show_median_and_max() {
        assert_eq!(cell(&[3.0, 1.0, 2.0], "ms"), "2ms / 3ms");
        assert_eq!(cell(&[], "ms"), "-");
    }
}
