//! The proxy end to end: one named test per Kubernetes e2e case of
//! `test/e2e/network/service.go` and `conntrack.go` (each test's comment
//! names its case), driven black-box like the e2e does: real Services,
//! Deployments and pods, connections from pods, hosts and the outside
//! client, and the verdict kube-proxy gives (a reply, a fast refusal, or a
//! silent drop). Our proxy runs on both nodes of a dual-stack lab; each
//! test uses its own namespace and removes the routes it adds, so each can
//! run alone (`cargo test -p ferrolb-lab --test proxy -- NAME`).
//!
//! Until the speaker announces LoadBalancer IPs, the client reaches them
//! (and externalIPs) through a static route via a node, which is where the
//! speaker's ARP answer will send them.
//!
//! `FERROLB_PROXY_SUITE=kube-proxy` runs the same tests against kube-proxy
//! in nftables mode instead (the lab's `--proxy kube-proxy`), which is how
//! the verdicts asserted here were checked against the reference; the
//! tests of our own flags are left out then.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::{LabTest, text, wait_until};
use ferrolb_lab::addresses::{self, IpFamily};
use ferrolb_lab::echo::parse_reply;
use ferrolb_lab::lab::Lab;
use ferrolb_lab::state::{ProxyMode, UpOptions};

const PREFIX: &str = "flbtprx";
/// Runs the suite against kube-proxy when set to `kube-proxy`.
const PEER_ENV: &str = "FERROLB_PROXY_SUITE";

/// Client pods every test may use, made once by `setup`: one per node.
const CLIENTS_NS: &str = "proxy-clients";
const CLIENT_1: &str = "pod/proxy-clients/client-1";
const CLIENT_2: &str = "pod/proxy-clients/client-2";
/// The outside client (198.18.0.100 / 2001:db8::100).
const OUTSIDE: &str = "client";

/// How long the proxy may take to act on a change before a test gives up.
const PROGRAMMED: Duration = Duration::from_secs(30);

/// Whether the suite runs against kube-proxy (see the module comment).
fn peer() -> bool {
    std::env::var(PEER_ENV).as_deref() == Ok("kube-proxy")
}

/// The proxy process of node-1, for `kill`/`start`.
fn node_1_proxy() -> &'static str {
    if peer() {
        "kube-proxy@node-1"
    } else {
        "proxy@node-1"
    }
}

fn main() -> std::process::ExitCode {
    let opts = UpOptions {
        nodes: 2,
        ip_family: IpFamily::Dual,
        proxy: if peer() {
            ProxyMode::KubeProxy
        } else {
            ProxyMode::Ferrolb
        },
        ..Default::default()
    };
    let mut tests: Vec<(&'static str, LabTest)> = vec![
        (
            "serve_a_basic_endpoint_from_pods",
            serve_a_basic_endpoint_from_pods,
        ),
        (
            "serve_multiport_endpoints_from_pods",
            serve_multiport_endpoints_from_pods,
        ),
        (
            "be_updated_after_adding_or_deleting_ports",
            be_updated_after_adding_or_deleting_ports,
        ),
        (
            "preserve_source_pod_ip_for_traffic_thru_cluster_ip",
            preserve_source_pod_ip_for_traffic_thru_cluster_ip,
        ),
        (
            "allow_pods_to_hairpin_back_to_themselves_through_services",
            allow_pods_to_hairpin_back_to_themselves_through_services,
        ),
        (
            "be_able_to_up_and_down_services",
            be_able_to_up_and_down_services,
        ),
        (
            "work_after_the_service_has_been_recreated",
            work_after_the_service_has_been_recreated,
        ),
        (
            "create_a_functioning_nodeport_service",
            create_a_functioning_nodeport_service,
        ),
        (
            "connect_via_external_ip_not_assigned_to_a_node",
            connect_via_external_ip_not_assigned_to_a_node,
        ),
        (
            "update_type_to_nodeport_on_the_same_port_with_different_protocols",
            update_type_to_nodeport_on_the_same_port_with_different_protocols,
        ),
        (
            "change_the_type_from_external_name_to_cluster_ip",
            change_the_type_from_external_name_to_cluster_ip,
        ),
        ("release_nodeports_on_delete", release_nodeports_on_delete),
        (
            "connect_to_terminating_and_unready_endpoints_with_publish_not_ready_addresses",
            connect_to_terminating_and_unready_endpoints_with_publish_not_ready_addresses,
        ),
        (
            "not_connect_to_terminating_and_unready_endpoints_without_publish_not_ready_addresses",
            not_connect_to_terminating_and_unready_endpoints_without_publish_not_ready_addresses,
        ),
        (
            "implement_service_proxy_name_label",
            implement_service_proxy_name_label,
        ),
        ("implement_headless_label", implement_headless_label),
        (
            "be_rejected_when_no_endpoints_exist",
            be_rejected_when_no_endpoints_exist,
        ),
        (
            "respect_internal_traffic_policy_local_pod_to_pod",
            respect_internal_traffic_policy_local_pod_to_pod,
        ),
        (
            "respect_internal_traffic_policy_local_host_network_pod_to_pod",
            respect_internal_traffic_policy_local_host_network_pod_to_pod,
        ),
        (
            "fail_health_check_node_port_with_only_terminating_endpoints",
            fail_health_check_node_port_with_only_terminating_endpoints,
        ),
        (
            "fallback_to_terminating_endpoints_internal_traffic_policy_cluster",
            fallback_to_terminating_endpoints_internal_traffic_policy_cluster,
        ),
        (
            "fallback_to_local_terminating_endpoints_internal_traffic_policy_local",
            fallback_to_local_terminating_endpoints_internal_traffic_policy_local,
        ),
        (
            "fallback_to_terminating_endpoints_external_traffic_policy_cluster",
            fallback_to_terminating_endpoints_external_traffic_policy_cluster,
        ),
        (
            "fallback_to_local_terminating_endpoints_external_traffic_policy_local",
            fallback_to_local_terminating_endpoints_external_traffic_policy_local,
        ),
        ("session_affinity_cluster_ip", session_affinity_cluster_ip),
        (
            "session_affinity_timeout_cluster_ip",
            session_affinity_timeout_cluster_ip,
        ),
        (
            "switch_session_affinity_cluster_ip",
            switch_session_affinity_cluster_ip,
        ),
        ("session_affinity_nodeport", session_affinity_nodeport),
        (
            "session_affinity_timeout_nodeport",
            session_affinity_timeout_nodeport,
        ),
        (
            "switch_session_affinity_nodeport",
            switch_session_affinity_nodeport,
        ),
        (
            "preserve_udp_traffic_when_server_pod_cycles_cluster_ip",
            preserve_udp_traffic_when_server_pod_cycles_cluster_ip,
        ),
        (
            "preserve_udp_traffic_when_server_pod_cycles_nodeport",
            preserve_udp_traffic_when_server_pod_cycles_nodeport,
        ),
        (
            "preserve_udp_traffic_when_initial_unready_endpoints_get_ready",
            preserve_udp_traffic_when_initial_unready_endpoints_get_ready,
        ),
        (
            "only_allow_access_from_load_balancer_source_ranges",
            only_allow_access_from_load_balancer_source_ranges,
        ),
        (
            "load_balancer_external_traffic_policy_local_preserves_client_ip",
            load_balancer_external_traffic_policy_local_preserves_client_ip,
        ),
        (
            "dual_stack_ipv6_cluster_ip_and_nodeport",
            dual_stack_ipv6_cluster_ip_and_nodeport,
        ),
        ("proxy_healthz_and_livez", proxy_healthz_and_livez),
        (
            "print_ruleset_shows_a_service",
            print_ruleset_shows_a_service,
        ),
        (
            "work_after_restarting_the_proxy",
            work_after_restarting_the_proxy,
        ),
    ];
    if peer() {
        tests.retain(|(name, _)| !OURS_ONLY.contains(name));
    }
    common::run_lab_tests(PREFIX, &opts, setup, &tests)
}

/// Tests of FerroLB's own interface, which kube-proxy does not have.
const OURS_ONLY: &[&str] = &["print_ruleset_shows_a_service"];

/// CRDs and an address pool for the LoadBalancer tests, and a client pod
/// on each node.
fn setup(lab: &Lab) -> Result<()> {
    lab.apply_crds()?;
    lab.apply(
        "apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: proxy-tests}\nspec:\n  addresses: [198.18.8.0/24, '2001:db8::8:0/112']\n",
    )?;
    let mut manifest =
        format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {CLIENTS_NS}}}\n");
    for n in [1, 2] {
        manifest.push_str("---\n");
        manifest.push_str(
            &Pod::new(&format!("client-{n}"), "client", n)
                .ports("[]")
                .yaml(CLIENTS_NS),
        );
    }
    lab.apply(&manifest)?;
    wait_pods_ready(lab, CLIENTS_NS, &["client-1", "client-2"])
}

// ---- what a connection attempt gives ----

/// What one connection attempt ended in, as `agnhost connect` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// The echo server answered: who, and the source address it saw.
    Reply {
        pod: String,
        client: SocketAddr,
    },
    /// Rejected (ICMP port unreachable): ECONNREFUSED.
    Refused,
    /// Dropped: nothing came back.
    TimedOut,
    Failed(String),
}

impl Outcome {
    fn pod(&self) -> Option<&str> {
        match self {
            Outcome::Reply { pod, .. } => Some(pod),
            _ => None,
        }
    }
}

fn socat_addr(proto: &str, addr: SocketAddr) -> String {
    match addr.ip() {
        IpAddr::V4(ip) => format!("{proto}4:{ip}:{}", addr.port()),
        IpAddr::V6(ip) => format!("{proto}6:[{ip}]:{}", addr.port()),
    }
}

fn classify(out: &std::process::Output) -> Outcome {
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    if let Some((pod, client)) = parse_reply(&stdout) {
        return Outcome::Reply { pod, client };
    }
    if stderr.contains("Connection refused") {
        Outcome::Refused
    } else if stderr.contains("timed out") || (out.status.success() && stdout.trim().is_empty()) {
        Outcome::TimedOut
    } else {
        Outcome::Failed(format!("{stdout}{stderr}").trim().to_string())
    }
}

/// One TCP connection from `from` to `addr`; a drop costs the 2 s
/// connect timeout.
fn tcp(lab: &Lab, from: &str, addr: SocketAddr) -> Result<Outcome> {
    let cmd = format!(
        "echo x | socat -T3 -t1 - {},connect-timeout=2",
        socat_addr("TCP", addr)
    );
    Ok(classify(&lab.exec(from, &["sh", "-c", &cmd])?))
}

/// One UDP datagram from `from` to `addr` and the answer, if any within a
/// second; with `source_port` every attempt is the same flow.
fn udp(lab: &Lab, from: &str, addr: SocketAddr, source_port: Option<u16>) -> Result<Outcome> {
    let port = source_port
        .map(|p| format!(",sourceport={p},reuseaddr"))
        .unwrap_or_default();
    let cmd = format!("echo x | socat -T2 -t1 - {}{port}", socat_addr("UDP", addr));
    Ok(classify(&lab.exec(from, &["sh", "-c", &cmd])?))
}

/// A TCP reply, or an error saying what came instead.
fn reply(lab: &Lab, from: &str, addr: SocketAddr) -> Result<(String, SocketAddr)> {
    match tcp(lab, from, addr)? {
        Outcome::Reply { pod, client } => Ok((pod, client)),
        other => bail!("{from} -> {addr}: {other:?}"),
    }
}

/// Waits until `addr` answers from `from`.
fn wait_reply(lab: &Lab, from: &str, addr: SocketAddr) -> Result<(String, SocketAddr)> {
    let mut last = None;
    wait_until(&format!("{from} -> {addr} to answer"), PROGRAMMED, || {
        let o = tcp(lab, from, addr)?;
        let done = matches!(o, Outcome::Reply { .. });
        last = Some(o);
        Ok(done)
    })
    .with_context(|| format!("last outcome: {last:?}"))?;
    match last {
        Some(Outcome::Reply { pod, client }) => Ok((pod, client)),
        _ => unreachable!("wait_until returned without a reply"),
    }
}

/// Waits until a TCP connection from `from` to `addr` ends as `want`.
fn wait_tcp(lab: &Lab, from: &str, addr: SocketAddr, want: &Outcome) -> Result<()> {
    let mut last = None;
    wait_until(
        &format!("{from} -> {addr} to be {want:?}"),
        PROGRAMMED,
        || {
            let o = tcp(lab, from, addr)?;
            let done = &o == want;
            last = Some(o);
            Ok(done)
        },
    )
    .with_context(|| format!("last outcome: {last:?}"))?;
    Ok(())
}

/// Refused: rejected, not dropped (a drop never gives ECONNREFUSED).
fn assert_refused(lab: &Lab, from: &str, addr: SocketAddr) -> Result<()> {
    assert_tcp(lab, from, addr, &Outcome::Refused)
}

/// Refused at once, as kube-proxy's reject is.
///
/// Only where few rejects went to `from` just before: the kernel limits
/// the ICMP errors a reject sends per destination (a burst of six, then
/// one a second: `net.ipv4.icmp_ratelimit`), for kube-proxy as for us, and
/// past the burst it is the client's SYN retransmit, a second later, that
/// is refused.
fn assert_refused_at_once(lab: &Lab, from: &str, addr: SocketAddr) -> Result<()> {
    let t = Instant::now();
    assert_refused(lab, from, addr)?;
    ensure!(
        t.elapsed() < Duration::from_secs(1),
        "{from} -> {addr} was refused only after {:?}",
        t.elapsed()
    );
    Ok(())
}

fn assert_tcp(lab: &Lab, from: &str, addr: SocketAddr, want: &Outcome) -> Result<()> {
    let o = tcp(lab, from, addr)?;
    ensure!(&o == want, "{from} -> {addr}: {o:?}, want {want:?}");
    Ok(())
}

/// Waits until connections from `from` to `addr` reach exactly the pods
/// `want` (every one of them, and nothing else, in one sample).
fn wait_backends(lab: &Lab, from: &str, addr: SocketAddr, want: &[&str]) -> Result<()> {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    let mut last = Vec::new();
    wait_until(
        &format!("{from} -> {addr} to reach exactly {want:?}"),
        PROGRAMMED,
        || {
            last.clear();
            let mut seen = BTreeSet::new();
            // Enough draws that a missing or extra backend shows (a backend
            // of two is missed in 10 draws one time in a thousand).
            for _ in 0..(5 * want.len()).max(10) {
                let o = tcp(lab, from, addr)?;
                let ok = o.pod().is_some_and(|p| want.contains(p));
                if let Some(p) = o.pod() {
                    seen.insert(p.to_string());
                }
                last.push(o);
                if !ok {
                    return Ok(false);
                }
                if seen == want && last.len() >= 10 {
                    break;
                }
            }
            Ok(seen == want)
        },
    )
    .with_context(|| format!("last sample: {last:?}"))?;
    Ok(())
}

/// One sample of connections from `from` to `addr` reaches exactly `want`.
fn assert_backends(lab: &Lab, from: &str, addr: SocketAddr, want: &[&str]) -> Result<()> {
    let mut seen = BTreeSet::new();
    let mut outcomes = Vec::new();
    for _ in 0..(5 * want.len()).max(10) {
        let o = tcp(lab, from, addr)?;
        if let Some(p) = o.pod() {
            seen.insert(p.to_string());
        }
        outcomes.push(o);
    }
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    ensure!(
        seen == want && outcomes.iter().all(|o| o.pod().is_some()),
        "{from} -> {addr} reached {outcomes:?}, want exactly {want:?}"
    );
    Ok(())
}

/// `check` holds on every try for `period` (tries at least three times).
fn holds_for(period: Duration, mut check: impl FnMut() -> Result<()>) -> Result<()> {
    let start = Instant::now();
    let mut tries = 0;
    while tries < 3 || start.elapsed() < period {
        check().with_context(|| format!("after {:?}", start.elapsed()))?;
        tries += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    Ok(())
}

fn sock(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

fn node_v4(n: u8) -> IpAddr {
    IpAddr::V4(addresses::node_v4(n))
}

fn node_v6(n: u8) -> IpAddr {
    IpAddr::V6(addresses::node_v6(n))
}

// ---- objects ----

/// A test's namespace, deleted (without waiting) when the test ends.
struct Namespace<'a> {
    lab: &'a Lab,
    name: String,
}

impl std::ops::Deref for Namespace<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.name
    }
}

impl Drop for Namespace<'_> {
    fn drop(&mut self) {
        let _ = self
            .lab
            .kubectl(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}

fn namespace<'a>(lab: &'a Lab, name: &str) -> Result<Namespace<'a>> {
    lab.apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n"
    ))?;
    Ok(Namespace {
        lab,
        name: name.to_string(),
    })
}

/// A host route in the outside client, removed when dropped: what the
/// speaker's announcement of `ip` from node `via` will do.
struct Route<'a> {
    lab: &'a Lab,
    dest: String,
    v6: bool,
}

impl Drop for Route<'_> {
    fn drop(&mut self) {
        let family = if self.v6 { "-6" } else { "-4" };
        let _ = self
            .lab
            .exec(OUTSIDE, &["ip", family, "route", "del", &self.dest]);
    }
}

fn route_via(lab: &Lab, ip: IpAddr, via: u8) -> Result<Route<'_>> {
    let (dest, gw, v6) = match ip {
        IpAddr::V4(_) => (format!("{ip}/32"), node_v4(via), false),
        IpAddr::V6(_) => (format!("{ip}/128"), node_v6(via), true),
    };
    let family = if v6 { "-6" } else { "-4" };
    exec_ok(
        lab,
        OUTSIDE,
        &[
            "ip",
            family,
            "route",
            "replace",
            &dest,
            "via",
            &gw.to_string(),
        ],
    )?;
    Ok(Route { lab, dest, v6 })
}

fn exec_ok(lab: &Lab, target: &str, cmd: &[&str]) -> Result<String> {
    let out = lab.exec(target, cmd)?;
    ensure!(
        out.status.success(),
        "{target}: {}: {}",
        cmd.join(" "),
        common::both(&out)
    );
    Ok(text(&out.stdout))
}

const HTTP: &str = "[{containerPort: 8080}]";
/// Service port 80 to the pods' 8080.
const PORT_80: &str = "  ports: [{name: http, port: 80, targetPort: 8080}]\n";

/// An echo-server pod pinned to a node.
#[derive(Clone)]
struct Pod {
    name: String,
    app: String,
    node: u8,
    ports: String,
    grace: u32,
    host_network: bool,
    ready: bool,
}

impl Pod {
    fn new(name: &str, app: &str, node: u8) -> Self {
        Pod {
            name: name.into(),
            app: app.into(),
            node,
            ports: HTTP.into(),
            grace: 0,
            host_network: false,
            ready: true,
        }
    }

    fn ports(mut self, ports: &str) -> Self {
        self.ports = ports.into();
        self
    }

    /// Keeps serving this long after its deletion (terminating).
    fn grace(mut self, seconds: u32) -> Self {
        self.grace = seconds;
        self
    }

    fn host_network(mut self) -> Self {
        self.host_network = true;
        self
    }

    /// Runs, but never becomes Ready.
    fn unready(mut self) -> Self {
        self.ready = false;
        self
    }

    fn yaml(&self, ns: &str) -> String {
        let annotations = if self.ready {
            String::new()
        } else {
            "  annotations: {lab.ferrolb.io/ready: \"false\"}\n".to_string()
        };
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {ns}\n  labels: {{app: {}}}\n{annotations}spec:\n  nodeName: node-{}\n  hostNetwork: {}\n  terminationGracePeriodSeconds: {}\n  containers: [{{name: echo, image: registry.invalid/echo, ports: {}}}]\n",
            self.name, self.app, self.node, self.host_network, self.grace, self.ports
        )
    }
}

/// A Deployment of echo servers labelled `app: <name>`, optionally pinned.
fn deployment(ns: &str, name: &str, replicas: u32, ports: &str, node: Option<u8>) -> String {
    let pin = node
        .map(|n| format!("      nodeName: node-{n}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec:\n{pin}      terminationGracePeriodSeconds: 1\n      containers: [{{name: echo, image: registry.invalid/echo, ports: {ports}}}]\n"
    )
}

/// A Service; `spec` is its spec's lines (indented two spaces).
fn service(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}"
    )
}

fn field(lab: &Lab, kind: &str, ns: &str, name: &str, jsonpath: &str) -> Result<String> {
    lab.field(kind, ns, name, jsonpath)
}

fn parse_ip(s: &str) -> Result<IpAddr> {
    s.parse().with_context(|| format!("not an IP: {s:?}"))
}

fn cluster_ip(lab: &Lab, ns: &str, svc: &str) -> Result<IpAddr> {
    parse_ip(&field(lab, "svc", ns, svc, "{.spec.clusterIP}")?)
}

fn cluster_ips(lab: &Lab, ns: &str, svc: &str) -> Result<Vec<IpAddr>> {
    field(lab, "svc", ns, svc, "{.spec.clusterIPs[*]}")?
        .split_whitespace()
        .map(parse_ip)
        .collect()
}

/// The NodePort of the Service's port named `port`.
fn node_port(lab: &Lab, ns: &str, svc: &str, port: &str) -> Result<u16> {
    let p = field(
        lab,
        "svc",
        ns,
        svc,
        &format!("{{.spec.ports[?(@.name==\"{port}\")].nodePort}}"),
    )?;
    p.parse()
        .with_context(|| format!("nodePort of {ns}/{svc} port {port}: {p:?}"))
}

fn pod_ips(lab: &Lab, ns: &str, pod: &str) -> Result<Vec<IpAddr>> {
    field(lab, "pod", ns, pod, "{.status.podIPs[*].ip}")?
        .split_whitespace()
        .map(parse_ip)
        .collect()
}

fn pod_ip(lab: &Lab, ns: &str, pod: &str) -> Result<IpAddr> {
    pod_ips(lab, ns, pod)?
        .into_iter()
        .next()
        .with_context(|| format!("{ns}/{pod} has no IP"))
}

/// The LoadBalancer IP of `family` the controller assigned.
fn wait_lb_ip(lab: &Lab, ns: &str, svc: &str, v6: bool) -> Result<IpAddr> {
    let mut ip = None;
    wait_until(&format!("an LB IP for {ns}/{svc}"), PROGRAMMED, || {
        let ips = field(lab, "svc", ns, svc, "{.status.loadBalancer.ingress[*].ip}")?;
        ip = ips
            .split_whitespace()
            .filter_map(|s| s.parse::<IpAddr>().ok())
            .find(|a| a.is_ipv6() == v6);
        Ok(ip.is_some())
    })?;
    Ok(ip.expect("waited for it"))
}

fn wait_pods_ready(lab: &Lab, ns: &str, pods: &[&str]) -> Result<()> {
    let mut args = vec!["wait", "--for=condition=Ready", "-n", ns, "--timeout=60s"];
    let names: Vec<String> = pods.iter().map(|p| format!("pod/{p}")).collect();
    args.extend(names.iter().map(String::as_str));
    lab.kubectl_ok(&args)?;
    Ok(())
}

fn wait_rollout(lab: &Lab, ns: &str, deploy: &str) -> Result<()> {
    lab.kubectl_ok(&[
        "rollout",
        "status",
        &format!("deployment/{deploy}"),
        "-n",
        ns,
        "--timeout=60s",
    ])?;
    Ok(())
}

/// Names of the pods labelled `app: <app>` that are not being deleted.
fn live_pods(lab: &Lab, ns: &str, app: &str) -> Result<Vec<String>> {
    let out = lab.kubectl_ok(&[
        "get",
        "pods",
        "-n",
        ns,
        "-l",
        &format!("app={app}"),
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.metadata.deletionTimestamp}{\"\\n\"}{end}",
    ])?;
    let mut names: Vec<String> = out
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let name = w.next()?;
            w.next().is_none().then(|| name.to_string())
        })
        .collect();
    names.sort();
    Ok(names)
}

/// Deletes a pod without waiting for its grace period.
fn delete_pod(lab: &Lab, ns: &str, pod: &str) -> Result<()> {
    lab.kubectl_ok(&["delete", "pod", pod, "-n", ns, "--wait=false"])?;
    Ok(())
}

/// Waits until a deleted pod is gone. Until then its address may still
/// answer for itself (a stopped server's kernel refuses), so a refusal
/// seen before says nothing about the proxy.
fn wait_deleted(lab: &Lab, ns: &str, pod: &str) -> Result<()> {
    lab.kubectl_ok(&[
        "wait",
        "--for=delete",
        &format!("pod/{pod}"),
        "-n",
        ns,
        "--timeout=60s",
    ])?;
    Ok(())
}

/// The endpoints of a Service's EndpointSlices of `family` ("IPv4"/"IPv6").
fn slice_endpoints(lab: &Lab, ns: &str, svc: &str) -> Result<Vec<serde_json::Value>> {
    let out = lab.kubectl_ok(&[
        "get",
        "endpointslices",
        "-n",
        ns,
        "-l",
        &format!("kubernetes.io/service-name={svc}"),
        "-o",
        "json",
    ])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["addressType"] == "IPv4")
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .collect())
}

/// Waits until every endpoint of the Service is terminating (there is at
/// least one), so the proxy has only terminating endpoints to use.
fn wait_all_terminating(lab: &Lab, ns: &str, svc: &str) -> Result<()> {
    wait_until(
        &format!("only terminating endpoints for {ns}/{svc}"),
        PROGRAMMED,
        || {
            let eps = slice_endpoints(lab, ns, svc)?;
            Ok(!eps.is_empty()
                && eps
                    .iter()
                    .all(|e| e["conditions"]["terminating"].as_bool() == Some(true)))
        },
    )?;
    Ok(())
}

/// `GET url` with curl from `target`: status, headers (lower-cased names)
/// and body.
fn http_get(lab: &Lab, target: &str, url: &str) -> Result<(u16, BTreeMap<String, String>, String)> {
    let out = exec_ok(lab, target, &["curl", "-sS", "-i", "-m", "3", "-g", url])?;
    let (head, body) = out
        .split_once("\r\n\r\n")
        .with_context(|| format!("GET {url}: no header end in {out:?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("GET {url}: no status in {head:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
        .collect();
    Ok((status, headers, body.to_string()))
}

// ---- tests ----

/// "should serve a basic endpoint from pods": the ClusterIP follows its
/// endpoints from none to one, two, one and none again.
fn serve_a_basic_endpoint_from_pods(lab: &Lab) -> Result<()> {
    let ns = namespace(lab, "t-basic")?;
    lab.apply(&service(
        &ns,
        "endpoint-test2",
        &format!("  selector: {{app: web}}\n{PORT_80}"),
    ))?;
    let vip = sock(cluster_ip(lab, &ns, "endpoint-test2")?, 80);
    wait_tcp(lab, CLIENT_2, vip, &Outcome::Refused)?;
    assert_refused(lab, CLIENT_2, vip)?;

    lab.apply(&Pod::new("pod1", "web", 1).yaml(&ns))?;
    wait_pods_ready(lab, &ns, &["pod1"])?;
    wait_backends(lab, CLIENT_2, vip, &["pod1"])?;

    lab.apply(&Pod::new("pod2", "web", 2).yaml(&ns))?;
    wait_pods_ready(lab, &ns, &["pod2"])?;
    wait_backends(lab, CLIENT_2, vip, &["pod1", "pod2"])?;

    delete_pod(lab, &ns, "pod1")?;
    wait_backends(lab, CLIENT_2, vip, &["pod2"])?;

    delete_pod(lab, &ns, "pod2")?;
    wait_deleted(lab, &ns, "pod2")?;
    wait_tcp(lab, CLIENT_2, vip, &Outcome::Refused)?;
    assert_refused(lab, CLIENT_2, vip)
}

/// "should serve multiport endpoints from pods": two named ports with
/// named target ports, each served by a different pod.
fn serve_multiport_endpoints_from_pods(lab: &Lab) -> Result<()> {
    let ns = namespace(lab, "t-multiport")?;
    lab.apply(&service(
        &ns,
        "multi-endpoint-test",
        "  selector: {app: multi}\n  ports:\n  - {name: portname1, port: 80, targetPort: svc1}\n  - {name: portname2, port: 81, targetPort: svc2}\n",
    ))?;
    let ip = cluster_ip(lab, &ns, "multi-endpoint-test")?;
    let (p80, p81) = (sock(ip, 80), sock(ip, 81));
    wait_tcp(lab, CLIENT_1, p80, &Outcome::Refused)?;
    assert_refused(lab, CLIENT_1, p81)?;

    lab.apply(
        &Pod::new("pod1", "multi", 1)
            .ports("[{name: svc1, containerPort: 100}]")
            .yaml(&ns),
    )?;
    wait_pods_ready(lab, &ns, &["pod1"])?;
    wait_backends(lab, CLIENT_1, p80, &["pod1"])?;
    assert_refused(lab, CLIENT_1, p81)?;

    lab.apply(
        &Pod::new("pod2", "multi", 2)
            .ports("[{name: svc2, containerPort: 101}]")
            .yaml(&ns),
    )?;
    wait_pods_ready(lab, &ns, &["pod2"])?;
    wait_backends(lab, CLIENT_1, p81, &["pod2"])?;
    wait_backends(lab, CLIENT_1, p80, &["pod1"])?;

    delete_pod(lab, &ns, "pod1")?;
    wait_deleted(lab, &ns, "pod1")?;
    wait_tcp(lab, CLIENT_1, p80, &Outcome::Refused)?;
    wait_backends(lab, CLIENT_1, p81, &["pod2"])?;

    delete_pod(lab, &ns, "pod2")?;
    wait_deleted(lab, &ns, "pod2")?;
    wait_tcp(lab, CLIENT_1, p81, &Outcome::Refused)?;
    assert_refused(lab, CLIENT_1, p80)
}

/// "should be updated after adding or deleting ports ": a port added to a
/// live Service starts working, a removed one stops (and, as a port the
/// ClusterIP does not have, is rejected), the other keeps working.
fn be_updated_after_adding_or_deleting_ports(lab: &Lab) -> Result<()> {
    let ns = namespace(lab, "t-ports")?;
    lab.apply(
        &Pod::new("pod1", "ports", 1)
            .ports("[{containerPort: 8080}, {containerPort: 8081}]")
            .yaml(&ns),
    )?;
    let one =
        "  selector: {app: ports}\n  ports:\n  - {name: portname1, port: 80, targetPort: 8080}\n";
    let two = "  - {name: portname2, port: 81, targetPort: 8081}\n";
    lab.apply(&service(&ns, "edit-port-test", one))?;
    wait_pods_ready(lab, &ns, &["pod1"])?;
    let ip = cluster_ip(lab, &ns, "edit-port-test")?;
    let (p80, p81) = (sock(ip, 80), sock(ip, 81));
    wait_backends(lab, CLIENT_1, p80, &["pod1"])?;
    assert_refused(lab, CLIENT_1, p81)?;

    lab.apply(&service(&ns, "edit-port-test", &format!("{one}{two}")))?;
    wait_backends(lab, CLIENT_1, p81, &["pod1"])?;
    wait_backends(lab, CLIENT_1, p80, &["pod1"])?;

    lab.apply(&service(
        &ns,
        "edit-port-test",
        &format!("  selector: {{app: ports}}\n  ports:\n{two}"),
    ))?;
    wait_tcp(lab, CLIENT_1, p80, &Outcome::Refused)?;
    assert_refused(lab, CLIENT_1, p80)?;
    wait_backends(lab, CLIENT_1, p81, &["pod1"])
}

/// "should preserve source pod IP for traffic thru service cluster IP":
/// the backend sees the client pod's own address, from either node.
fn preserve_source_pod_ip_for_traffic_thru_cluster_ip(lab: &Lab) -> Result<()> {
    let ns = namespace(lab, "t-sourceip")?;
    lab.apply(&Pod::new("echoserver-sourceip", "sourceip", 1).yaml(&ns))?;
    lab.apply(&service(
        &ns,
        "sourceip-test",
        &format!("  selector: {{app: sourceip}}\n{PORT_80}"),
    ))?;
    wait_pods_ready(lab, &ns, &["echoserver-sourceip"])?;
    let vip = sock(cluster_ip(lab, &ns, "sourceip-test")?, 80);
    for (client, name) in [(CLIENT_1, "client-1"), (CLIENT_2, "client-2")] {
        let (pod, seen) = wait_reply(lab, client, vip)?;
        ensure!(pod == "echoserver-sourceip", "answered by {pod}");
        let own = pod_ip(lab, CLIENTS_NS, name)?;
        ensure!(
            seen.ip() == own,
            "{name} ({own}) was seen as {seen}: pod traffic to a ClusterIP must not be masqueraded"
        );
    }
    Ok(())
}

/// "should allow pods to hairpin back to themselves through services": the
/// only backend reaches itself through its ClusterIP (masqueraded, or its
/// own reply would never find the connection).
fn allow_pods_to_hairpin_back_to_themselves_through_services(lab: &Lab) -> Result<()> {
    let ns = namespace(lab, "t-hairpin")?;
    lab.apply(&Pod::new("hairpin", "hairpin", 1).yaml(&ns))?;
    lab.apply(&service(
        &ns,
        "hairpin-test",
        &format!("  selector: {{app: hairpin}}\n{PORT_80}"),
    ))?;
    wait_pods_ready(lab, &ns, &["hairpin"])?;
    let vip = sock(cluster_ip(lab, &ns, "hairpin-test")?, 80);
    let me = format!("pod/{}/hairpin", &*ns);
    let (pod, seen) = wait_reply(lab, &me, vip)?;
    ensure!(pod == "hairpin", "answered by {pod}");
    let own = pod_ip(lab, &ns, "hairpin")?;
    ensure!(
        seen.ip() != own,
        "hairpin traffic kept its source {own}: it must be masqueraded"
    );
    Ok(())
}

/// "should be able to up and down services": deleting one Service takes
/// its ClusterIP down (an unallocated Service address: dropped) and leaves
/// the others up; a new one comes up beside them.
fn be_able_to_up_and_down_services(lab: &Lab) -> Result<()> {
    let ns = namespace(lab, "t-updown")?;
    for name in ["service1", "service2"] {
        lab.apply(&deployment(&ns, name, 2, HTTP, None))?;
        lab.apply(&service(
            &ns,
            name,
            &format!("  selector: {{app: {name}}}\n{PORT_80}"),
        ))?;
    }
    let up = |name: &str| -> Result<SocketAddr> {
        wait_rollout(lab, &ns, name)?;
        let pods = live_pods(lab, &ns, name)?;
        let pods: Vec<&str> = pods.iter().map(String::as_str).collect();
        let vip = sock(cluster_ip(lab, &ns, name)?, 80);
        // From a pod and from a host, as the e2e does.
        wait_backends(lab, CLIENT_1, vip, &pods)?;
        wait_backends(lab, "node-2", vip, &pods)?;
        Ok(vip)
    };
    let svc1 = up("service1")?;
    let svc2 = up("service2")?;

    lab.kubectl_ok(&["delete", "svc", "service1", "-n", &ns])?;
    wait_tcp(lab, "node-1", svc1, &Outcome::TimedOut)?;
    assert_tcp(lab, CLIENT_1, svc1, &Outcome::TimedOut)?;
    up("service2")?;

    lab.apply(&deployment(&ns, "service3", 2, HTTP, None))?;
    lab.apply(&service(
        &ns,
        "service3",
        &format!("  selector: {{app: service3}}\n{PORT_80}"),
    ))?;
    let svc3 = up("service3")?;
    ensure!(svc3 != svc2, "service IPs conflict: {svc2}");
    up("service2")?;
    Ok(())
}

/// "should work after the service has been recreated".
fn work_after_the_service_has_been_recreated(lab: &Lab) -> Result<()> {
    let ns = namespace(lab, "t-recreate")?;
    lab.apply(&deployment(&ns, "recreate", 2, HTTP, None))?;
    let svc = service(
        &ns,
        "recreate",
        &format!("  selector: {{app: recreate}}\n{PORT_80}"),
    );
    lab.apply(&svc)?;
    wait_rollout(lab, &ns, "recreate")?;
    let pods = live_pods(lab, &ns, "recreate")?;
    let pods: Vec<&str> = pods.iter().map(String::as_str).collect();
    let first = sock(cluster_ip(lab, &ns, "recreate")?, 80);
    wait_backends(lab, CLIENT_1, first, &pods)?;

    lab.kubectl_ok(&["delete", "svc", "recreate", "-n", &ns])?;
    wait_tcp(lab, CLIENT_1, first, &Outcome::TimedOut)?;

    lab.apply(&svc)?;
    let second = sock(cluster_ip(lab, &ns, "recreate")?, 80);
    wait_backends(lab, CLIENT_1, second, &pods)?;
    wait_backends(lab, "node-1", second, &pods)
}

/// Restarts node-1's proxy when dropped if it is not running, so a failed
/// test leaves the lab whole.
struct ProxyBack<'a>(&'a Lab);

impl Drop for ProxyBack<'_> {
    fn drop(&mut self) {
        if !proxy_running(self.0) {
            let _ = self.0.cli(&["start", node_1_proxy()]);
        }
    }
}

fn proxy_running(lab: &Lab) -> bool {
    lab.state()
        .read_pid(node_1_proxy())
        .is_some_and(ferrolb_lab::process::alive)
}

/// "should work after restarting kube-proxy": traffic keeps flowing
/// through the kernel's rules while the proxy is dead, and the proxy that
/// comes back applies what changed meanwhile.
fn work_after_restarting_the_proxy(lab: &Lab) -> Result<()> {
    let ns = namespace(lab, "t-restart")?;
    lab.apply(&deployment(&ns, "service1", 2, HTTP, None))?;
    lab.apply(&service(
        &ns,
        "service1",
        &format!("  selector: {{app: service1}}\n{PORT_80}"),
    ))?;
    wait_rollout(lab, &ns, "service1")?;
    let pods = live_pods(lab, &ns, "service1")?;
    let pods: Vec<&str> = pods.iter().map(String::as_str).collect();
    let svc1 = sock(cluster_ip(lab, &ns, "service1")?, 80);
    // client-1 lives on node-1: its Service traffic is node-1's proxy's.
    wait_backends(lab, CLIENT_1, svc1, &pods)?;

    let _back = ProxyBack(lab);
    common::cli_ok(lab, &["kill", node_1_proxy()])?;
    wait_until("node-1's proxy to be gone", PROGRAMMED, || {
        Ok(!proxy_running(lab))
    })?;
    wait_backends(lab, CLIENT_1, svc1, &pods)?;

    // A change while nobody programs node-1: a new Service.
    lab.apply(&service(
        &ns,
        "service2",
        &format!("  selector: {{app: service1}}\n{PORT_80}"),
    ))?;
    let svc2 = sock(cluster_ip(lab, &ns, "service2")?, 80);
    wait_backends(lab, CLIENT_2, svc2, &pods)?;
    assert_tcp(lab, CLIENT_1, svc2, &Outcome::TimedOut)
        .context("node-1 serves a Service created while its proxy was dead")?;

    common::cli_ok(lab, &["start", node_1_proxy()])?;
    wait_backends(lab, CLIENT_1, svc2, &pods)?;
    wait_backends(lab, CLIENT_1, svc1, &pods)
}

/// "should be able to create a functioning NodePort service": the
/// ClusterIP and the NodePort on every node address, from a pod and from
/// outside (masqueraded: externalTrafficPolicy Cluster).
fn create_a_functioning_nodeport_service(lab: &Lab) -> Result<()> {
    let ns = namespace(lab, "t-nodeport")?;
    lab.apply(&deployment(&ns, "nodeport-test", 2, HTTP, None))?;
    lab.apply(&service(
        &ns,
        "nodeport-test",
        &format!("  type: NodePort\n  selector: {{app: nodeport-test}}\n{PORT_80}"),
    ))?;
    wait_rollout(lab, &ns, "nodeport-test")?;
    let pods = live_pods(lab, &ns, "nodeport-test")?;
    let pods: Vec<&str> = pods.iter().map(String::as_str).collect();
    let np = node_port(lab, &ns, "nodeport-test", "http")?;
    wait_backends(
        lab,
        CLIENT_1,
        sock(cluster_ip(lab, &ns, "nodeport-test")?, 80),
        &pods,
    )?;
    for n in [1, 2] {
        let addr = sock(node_v4(n), np);
        wait_backends(lab, CLIENT_1, addr, &pods)?;
        wait_backends(lab, OUTSIDE, addr, &pods)?;
        let (_, seen) = reply(lab, OUTSIDE, addr)?;
        ensure!(
            seen.ip() != IpAddr::V4(addresses::client_v4()),
            "NodePort traffic with externalTrafficPolicy Cluster kept the client's address"
        );
    }
    Ok(())
}

/// "should be possible to connect to a service via ExternalIP when the
/// external IP is not assigned to a node": from a pod, and from outside
/// with a route to the address via a node.
fn connect_via_external_ip_not_assigned_to_a_node(lab: &Lab) -> Result<()> {
    let ns = namespace(lab, "t-externalip")?;
    let external: IpAddr = "203.0.113.250".parse()?;
    lab.apply(&deployment(&ns, "externalip-test", 2, HTTP, None))?;
    lab.apply(&service(
        &ns,
        "externalip-test",
        &format!("  selector: {{app: externalip-test}}\n  externalIPs: ['{external}']\n{PORT_80}"),
    ))?;
    wait_rollout(lab, &ns, "externalip-test")?;
    let pods = live_pods(lab, &ns, "externalip-test")?;
    let pods: Vec<&str> = pods.iter().map(String::as_str).collect();
    let addr = sock(external, 80);
    wait_backends(lab, CLIENT_1, addr, &pods)?;
    wait_backends(lab, CLIENT_2, addr, &pods)?;
    let _route = route_via(lab, external, 2)?;
    wait_backends(lab, OUTSIDE, addr, &pods)
}

/// "should be able to update service type to NodePort listening on same
/// port number but different protocols": a TCP ClusterIP Service becomes a
/// NodePort Service with TCP and UDP on port 80; both work everywhere.
fn update_type_to_nodeport_on_the_same_port_with_different_protocols(lab: &Lab) -> Result<()> {
    let ns = namespace(lab, "t-protocols")?;
    lab.apply(
        &Pod::new("pod1", "protocols", 2)
            .ports("[{containerPort: 8080}, {containerPort: 8080, protocol: UDP}]")
            .yaml(&ns),
    )?;
    lab.apply(&service(
        &ns,
        "nodeport-update-service",
        "  selector: {app: protocols}\n  ports: [{name: tcp-port, port: 80, targetPort: 8080}]\n",
    ))?;
    wait_pods_ready(lab, &ns, &["pod1"])?;
    let ip = cluster_ip(lab, &ns, "nodeport-update-service")?;
    wait_backends(lab, CLIENT_1, sock(ip, 80), &["pod1"])?;

    lab.apply(&service(
        &ns,
        "nodeport-update-service",
        "  type: NodePort\n  selector: {app: protocols}\n  ports:\n  - {name: tcp-port, port: 80, targetPort: 8080}\n  - {name: udp-port, port: 80, targetPort: 8080, protocol: UDP}\n",
    ))?;
    let tcp_np = node_port(lab, &ns, "nodeport-update-service", "tcp-port")?;
    let udp_np = node_port(lab, &ns, "nodeport-update-service", "udp-port")?;
    let udp_reaches = |from: &str, addr: SocketAddr| -> Result<()> {
        let mut last = None;
        wait_until(&format!("UDP {from} -> {addr}"), PROGRAMMED, || {
            let o = udp(lab, from, addr, None)?;
            let ok = o.pod() == Some("pod1");
            last = Some(o);
            Ok(ok)
        })
        .with_context(|| format!("last outcome: {last:?}"))?;
        Ok(())
    };
    udp_reaches(CLIENT_1, sock(ip, 80))?;
    wait_backends(lab, CLIENT_1, sock(ip, 80), &["pod1"])?;
    for n in [1, 2] {
        for from in [CLIENT_1, OUTSIDE] {
            wait_backends(lab, from, sock(node_v4(n), tcp_np), &["pod1"])?;
            udp_reaches(from, sock(node_v4(n), udp_np))?;
        }
    }
    Ok(())
}

/// "should be able to change the type from ExternalName to ClusterIP"
/// (and back: "from ClusterIP to ExternalName" stops proxying).
fn change_the_type_from_external_name_to_cluster_ip(lab: &Lab) -> Result<()> {
    let ns = namespace(lab, "t-externalname")?;
    lab.apply(&deployment(&ns, "externalname-service", 2, HTTP, None))?;
    let external_name = service(
        &ns,
        "externalname-service",
        "  type: ExternalName\n  externalName: foo.example.com\n",
    );
    lab.apply(&external_name)?;
    lab.apply(&service(
        &ns,
        "externalname-service",
        &format!("  type: ClusterIP\n  selector: {{app: externalname-service}}\n{PORT_80}"),
    ))?;
    wait_rollout(lab, &ns, "externalname-service")?;
    let pods = live_pods(lab, &ns, "externalname-service")?;
    let pods: Vec<&str> = pods.iter().map(String::as_str).collect();
    let vip = sock(cluster_ip(lab, &ns, "externalname-service")?, 80);
    wait_backends(lab, CLIENT_1, vip, &pods)?;
    wait_backends(lab, CLIENT_2, vip, &pods)?;

    lab.apply(&external_name)?;
    let now = field(lab, "svc", &ns, "externalname-service", "{.spec.clusterIP}")?;
    ensure!(
        now.is_empty(),
        "an ExternalName Service kept ClusterIP {now}"
    );
    wait_tcp(lab, CLIENT_1, vip, &Outcome::TimedOut)
}

/// Local ports of sockets listening in `target` (TCP LISTEN, UDP bound).
fn listening_ports(lab: &Lab, target: &str) -> Result<BTreeSet<u16>> {
    let out = exec_ok(lab, target, &["ss", "-ltnuH"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter_map(|local| local.rsplit_once(':')?.1.parse().ok())
        .collect())
}

/// "should release NodePorts on delete": nothing holds a socket on the
/// NodePort on any node (while the Service exists or after), and the same
/// NodePort can be given to a new Service that then works.
fn release_nodeports_on_delete(lab: &Lab) -> Result<()> {
    let ns = namespace(lab, "t-release")?;
    lab.apply(&Pod::new("pod1", "release", 1).yaml(&ns))?;
    lab.apply(&service(
        &ns,
        "nodeport-reuse",
        &format!("  type: NodePort\n  selector: {{app: release}}\n{PORT_80}"),
    ))?;
    wait_pods_ready(lab, &ns, &["pod1"])?;
    let np = node_port(lab, &ns, "nodeport-reuse", "http")?;
    wait_backends(lab, OUTSIDE, sock(node_v4(1), np), &["pod1"])?;
    for node in ["node-1", "node-2"] {
        ensure!(
            !listening_ports(lab, node)?.contains(&np),
            "a socket is bound to NodePort {np} on {node}"
        );
    }
    lab.kubectl_ok(&["delete", "svc", "nodeport-reuse", "-n", &ns])?;
    // Nothing is programmed or listening there any more: the node's own
    // TCP stack refuses.
    wait_tcp(lab, OUTSIDE, sock(node_v4(1), np), &Outcome::Refused)?;
    for node in ["node-1", "node-2"] {
        ensure!(
            !listening_ports(lab, node)?.contains(&np),
            "a socket is still bound to NodePort {np} on {node} after the delete"
        );
    }
    lab.apply(&service(
        &ns,
        "nodeport-reuse",
        &format!(
            "  type: NodePort\n  selector: {{app: release}}\n  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: {np}}}]\n"
        ),
    ))?;
    wait_backends(lab, OUTSIDE, sock(node_v4(2), np), &["pod1"])
}

/// The publishNotReadyAddresses pair: an unready pod on node-1, then the
/// same pod terminating, seen from a pod on node-2 through the ClusterIP
/// and both nodes' NodePorts. `reachable` is what kube-proxy gives.
fn unready_and_terminating(lab: &Lab, ns_name: &str, publish: bool) -> Result<()> {
    let ns = namespace(lab, ns_name)?;
    lab.apply(
        &Pod::new("webserver-pod", "unready", 1)
            .unready()
            .grace(60)
            .yaml(&ns),
    )?;
    lab.apply(&service(
        &ns,
        "webserver",
        &format!(
            "  type: NodePort\n  publishNotReadyAddresses: {publish}\n  selector: {{app: unready}}\n{PORT_80}"
        ),
    ))?;
    // Running (it has an IP) but never Ready.
    wait_until("the unready pod to run", PROGRAMMED, || {
        Ok(!field(lab, "pod", &ns, "webserver-pod", "{.status.podIP}")?.is_empty())
    })?;
    let np = node_port(lab, &ns, "webserver", "http")?;
    let frontends = [
        sock(cluster_ip(lab, &ns, "webserver")?, 80),
        sock(node_v4(1), np),
        sock(node_v4(2), np),
    ];
    // Waits for the expected verdict on each frontend, or (`now`) asserts it.
    let check = |phase: &str, now: bool| -> Result<()> {
        for addr in frontends {
            let r = match (publish, now) {
                (true, false) => wait_backends(lab, CLIENT_2, addr, &["webserver-pod"]),
                (true, true) => assert_backends(lab, CLIENT_2, addr, &["webserver-pod"]),
                // Its endpoint is neither ready nor serving: no endpoints
                // at all, so kube-proxy rejects.
                (false, false) => wait_tcp(lab, CLIENT_2, addr, &Outcome::Refused),
                (false, true) => assert_refused(lab, CLIENT_2, addr),
            };
            r.with_context(|| format!("{phase}: {addr}"))?;
        }
        Ok(())
    };
    check("unready", false)?;
    check("unready", true)?;
    delete_pod(lab, &ns, "webserver-pod")?;
    wait_all_terminating(lab, &ns, "webserver")?;
    holds_for(Duration::from_secs(3), || check("terminating", true))
}

/// "should be able to connect to terminating and unready endpoints if
/// PublishNotReadyAddresses is true".
fn connect_to_terminating_and_unready_endpoints_with_publish_not_ready_addresses(
    lab: &Lab,
) -> Result<()> {
    unready_and_terminating(lab, "t-pnra-true", true)
}

/// "should not be able to connect to terminating and unready endpoints if
/// PublishNotReadyAddresses is false".
fn not_connect_to_terminating_and_unready_endpoints_without_publish_not_ready_addresses(
    lab: &Lab,
) -> Result<()> {
    unready_and_terminating(lab, "t-pnra-false", false)
}

/// The label pair: a Service carrying `label` is not ours to proxy (its
/// ClusterIP is an unallocated address to us: dropped); labelling a live
/// Service takes it down, removing the label brings it back.
fn ignored_by_label(lab: &Lab, ns_name: &str, label: &str) -> Result<()> {
    let ns = namespace(lab, ns_name)?;
    lab.apply(&Pod::new("disabled-pod", "disabled", 1).yaml(&ns))?;
    lab.apply(&Pod::new("toggled-pod", "toggled", 2).yaml(&ns))?;
    lab.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: service-disabled\n  namespace: {}\n  labels: {{{label}: foo-bar}}\nspec:\n  selector: {{app: disabled}}\n{PORT_80}",
        &*ns
    ))?;
    lab.apply(&service(
        &ns,
        "service-toggled",
        &format!("  selector: {{app: toggled}}\n{PORT_80}"),
    ))?;
    wait_pods_ready(lab, &ns, &["disabled-pod", "toggled-pod"])?;
    let disabled = sock(cluster_ip(lab, &ns, "service-disabled")?, 80);
    let toggled = sock(cluster_ip(lab, &ns, "service-toggled")?, 80);

    wait_backends(lab, CLIENT_1, toggled, &["toggled-pod"])?;
    assert_tcp(lab, CLIENT_1, disabled, &Outcome::TimedOut)?;
    assert_tcp(lab, "node-1", disabled, &Outcome::TimedOut)?;

    lab.kubectl_ok(&[
        "label",
        "svc",
        "service-toggled",
        "-n",
        &ns,
        &format!("{label}=foo-bar"),
    ])?;
    wait_tcp(lab, CLIENT_1, toggled, &Outcome::TimedOut)?;
    assert_tcp(lab, "node-2", toggled, &Outcome::TimedOut)?;

    lab.kubectl_ok(&[
        "label",
        "svc",
        "service-toggled",
        "-n",
        &ns,
        &format!("{label}-"),
    ])?;
    wait_backends(lab, CLIENT_1, toggled, &["toggled-pod"])?;
    wait_backends(lab, "node-2", toggled, &["toggled-pod"])?;
    assert_tcp(lab, CLIENT_1, disabled, &Outcome::TimedOut)
}

/// "should implement service.kubernetes.io/service-proxy-name".
fn implement_service_proxy_name_label(lab: &Lab) -> Result<()> {
    ignored_by_label(
        lab,
        "t-proxy-name",
        "service.kubernetes.io/service-proxy-name",
    )
}

/// "should implement service.kubernetes.io/headless".
fn implement_headless_label(lab: &Lab) -> Result<()> {
    ignored_by_label(lab, "t-headless-label", "service.kubernetes.io/headless")
}

/// "should be rejected when no endpoints exist": refused at once, TCP and
/// UDP, through the ClusterIP from a pod and the NodePort from outside.
fn be_rejected_when_no_endpoints_exist(lab: &Lab) -> Result<()> {
    let ns = namespace(lab, "t-reject")?;
    lab.apply(&service(
        &ns,
        "no-pods",
        "  type: NodePort\n  selector: {app: nothing-matches}\n  ports:\n  - {name: http, port: 80, targetPort: 8080}\n  - {name: udp, port: 80, targetPort: 8080, protocol: UDP}\n",
    ))?;
    let vip = sock(cluster_ip(lab, &ns, "no-pods")?, 80);
    let np = node_port(lab, &ns, "no-pods", "http")?;
    let udp_np = node_port(lab, &ns, "no-pods", "udp")?;
    wait_tcp(lab, CLIENT_1, vip, &Outcome::Refused)?;
    assert_refused_at_once(lab, CLIENT_1, vip)?;
    assert_refused_at_once(lab, CLIENT_2, vip)?;
    for n in [1, 2] {
        wait_tcp(lab, OUTSIDE, sock(node_v4(n), np), &Outcome::Refused)?;
        assert_refused_at_once(lab, OUTSIDE, sock(node_v4(n), np))?;
    }
    for (from, addr) in [(CLIENT_1, vip), (OUTSIDE, sock(node_v4(1), udp_np))] {
        let o = udp(lab, from, addr, None)?;
        ensure!(o == Outcome::Refused, "UDP {from} -> {addr}: {o:?}");
    }
    Ok(())
}

/// internalTrafficPolicy Local: clients on the backend's node reach it,
/// clients on the other node are dropped (kube-proxy drops, it does not
/// reject, when endpoints exist elsewhere).
fn internal_local(lab: &Lab, ns: &Namespace<'_>, near: &str, far: &str) -> Result<()> {
    lab.apply(&Pod::new("echo-hostname-0", "itp", 1).yaml(ns))?;
    lab.apply(&service(
        ns,
        "svc-itp",
        &format!("  internalTrafficPolicy: Local\n  selector: {{app: itp}}\n{PORT_80}"),
    ))?;
    wait_pods_ready(lab, ns, &["echo-hostname-0"])?;
    let vip = sock(cluster_ip(lab, ns, "svc-itp")?, 80);
    wait_backends(lab, near, vip, &["echo-hostname-0"])?;
    for _ in 0..2 {
        assert_tcp(lab, far, vip, &Outcome::TimedOut)?;
        wait_backends(lab, near, vip, &["echo-hostname-0"])?;
    }
    Ok(())
}

/// "should respect internalTrafficPolicy=Local Pod to Pod".
fn respect_internal_traffic_policy_local_pod_to_pod(lab: &Lab) -> Result<()> {
    let ns = namespace(lab, "t-itp-pod")?;
    internal_local(lab, &ns, CLIENT_1, CLIENT_2)
}

/// "should respect internalTrafficPolicy=Local Pod (hostNetwork: true) to
/// Pod".
fn respect_internal_traffic_policy_local_host_network_pod_to_pod(lab: &Lab) -> Result<()> {
    let ns = namespace(lab, "t-itp-host")?;
    for n in [1, 2] {
        lab.apply(
            &Pod::new(&format!("pause-pod-{n}"), "pause", n)
                .ports("[]")
                .host_network()
                .yaml(&ns),
        )?;
    }
    wait_pods_ready(lab, &ns, &["pause-pod-1", "pause-pod-2"])?;
    let near = format!("pod/{}/pause-pod-1", &*ns);
    let far = format!("pod/{}/pause-pod-2", &*ns);
    internal_local(lab, &ns, &near, &far)
}

/// The health check server's answer on node `n`: status and JSON body.
fn health_check(lab: &Lab, n: u8, port: u16) -> Result<(u16, serde_json::Value)> {
    let (code, headers, body) = http_get(
        lab,
        OUTSIDE,
        &format!("http://{}:{port}/healthz", node_v4(n)),
    )?;
    ensure!(
        headers.get("content-type").map(String::as_str) == Some("application/json"),
        "health check content type: {headers:?}"
    );
    let json =
        serde_json::from_str(&body).with_context(|| format!("health check body {body:?}"))?;
    Ok((code, json))
}

fn health_body(ns: &str, name: &str, local: u64) -> serde_json::Value {
    serde_json::json!({
        "service": {"namespace": ns, "name": name},
        "localEndpoints": local,
        "serviceProxyHealthy": true,
    })
}

/// "should fail health check node port if there are only terminating
/// endpoints": 200 with a ready local endpoint, 503 once it only
/// terminates, while its NodePort still serves through it.
fn fail_health_check_node_port_with_only_terminating_endpoints(lab: &Lab) -> Result<()> {
    let ns = namespace(lab, "t-hc-terminating")?;
    let svc = "svc-proxy-terminating";
    lab.apply(&Pod::new("echo-hostname-0", "hc", 1).grace(60).yaml(&ns))?;
    lab.apply(&service(
        &ns,
        svc,
        &format!(
            "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  selector: {{app: hc}}\n{PORT_80}"
        ),
    ))?;
    wait_pods_ready(lab, &ns, &["echo-hostname-0"])?;
    let hc: u16 = field(lab, "svc", &ns, svc, "{.spec.healthCheckNodePort}")?.parse()?;
    let np = node_port(lab, &ns, svc, "http")?;
    let mut last = None;
    wait_until("the health check to pass on node-1", PROGRAMMED, || {
        let got = health_check(lab, 1, hc)?;
        let ok = got.0 == 200;
        last = Some(got);
        Ok(ok)
    })
    .with_context(|| format!("last answer: {last:?}"))?;
    let (_, body) = last.take().expect("waited for it");
    ensure!(body == health_body(&ns, svc, 1), "node-1 answered {body}");
    let (code, body) = health_check(lab, 2, hc)?;
    ensure!(
        code == 503 && body == health_body(&ns, svc, 0),
        "node-2 (no local endpoint) answered {code} {body}"
    );

    delete_pod(lab, &ns, "echo-hostname-0")?;
    wait_until("the health check to fail on node-1", PROGRAMMED, || {
        let got = health_check(lab, 1, hc)?;
        let failed = got.0 == 503;
        last = Some(got);
        Ok(failed)
    })
    .with_context(|| format!("last answer: {last:?}"))?;
    let (_, body) = last.expect("waited for it");
    ensure!(body == health_body(&ns, svc, 0), "node-1 answered {body}");
    let (pod, seen) = reply(lab, OUTSIDE, sock(node_v4(1), np))?;
    ensure!(pod == "echo-hostname-0", "NodePort answered by {pod}");
    ensure!(
        seen.ip() == IpAddr::V4(addresses::client_v4()),
        "externalTrafficPolicy Local lost the client's address: {seen}"
    );
    Ok(())
}

/// A Service whose only endpoint (on node-1, long grace period) has just
/// been deleted; returns its ClusterIP and NodePort (if `spec` makes one).
fn only_terminating(lab: &Lab, ns: &str, spec: &str) -> Result<(SocketAddr, Option<u16>)> {
    let svc = "svc-proxy-terminating";
    lab.apply(
        &Pod::new("echo-hostname-0", "fallback", 1)
            .grace(60)
            .yaml(ns),
    )?;
    lab.apply(&service(
        ns,
        svc,
        &format!("{spec}  selector: {{app: fallback}}\n{PORT_80}"),
    ))?;
    wait_pods_ready(lab, ns, &["echo-hostname-0"])?;
    let vip = sock(cluster_ip(lab, ns, svc)?, 80);
    let np = spec
        .contains("NodePort")
        .then(|| node_port(lab, ns, svc, "http"))
        .transpose()?;
    // Programmed with the ready endpoint first, as in the e2e.
    let probe = np.map_or(vip, |p| sock(node_v4(1), p));
    wait_backends(lab, CLIENT_1, probe, &["echo-hostname-0"])?;
    delete_pod(lab, ns, "echo-hostname-0")?;
    wait_all_terminating(lab, ns, svc)?;
    Ok((vip, np))
}

const TERMINATING_POD: &[&str] = &["echo-hostname-0"];

/// "should fallback to terminating endpoints when there are no ready
/// endpoints with internalTrafficPolicy=Cluster".
fn fallback_to_terminating_endpoints_internal_traffic_policy_cluster(lab: &Lab) -> Result<()> {
    let ns = namespace(lab, "t-fallback-itp-cluster")?;
    let (vip, _) = only_terminating(lab, &ns, "")?;
    holds_for(Duration::from_secs(3), || {
        assert_backends(lab, CLIENT_1, vip, TERMINATING_POD)?;
        assert_backends(lab, CLIENT_2, vip, TERMINATING_POD)
    })
}

/// "should fallback to local terminating endpoints when there are no ready
/// endpoints with internalTrafficPolicy=Local".
fn fallback_to_local_terminating_endpoints_internal_traffic_policy_local(lab: &Lab) -> Result<()> {
    let ns = namespace(lab, "t-fallback-itp-local")?;
    let (vip, _) = only_terminating(lab, &ns, "  internalTrafficPolicy: Local\n")?;
    holds_for(Duration::from_secs(3), || {
        assert_backends(lab, CLIENT_1, vip, TERMINATING_POD)?;
        assert_tcp(lab, CLIENT_2, vip, &Outcome::TimedOut)
    })
}

/// "should fallback to terminating endpoints when there are no ready
/// endpoints with externallTrafficPolicy=Cluster": node-1's NodePort
/// works from both nodes.
fn fallback_to_terminating_endpoints_external_traffic_policy_cluster(lab: &Lab) -> Result<()> {
    let ns = namespace(lab, "t-fallback-etp-cluster")?;
    let (_, np) = only_terminating(lab, &ns, "  type: NodePort\n")?;
    let addr = sock(node_v4(1), np.context("no NodePort")?);
    holds_for(Duration::from_secs(3), || {
        assert_backends(lab, CLIENT_1, addr, TERMINATING_POD)?;
        assert_backends(lab, CLIENT_2, addr, TERMINATING_POD)
    })
}

/// "should fallback to local terminating endpoints when there are no ready
/// endpoints with externalTrafficPolicy=Local": node-1's NodePort works
/// from pods on both nodes; node-2's does not work from node-1's pod.
fn fallback_to_local_terminating_endpoints_external_traffic_policy_local(lab: &Lab) -> Result<()> {
    let ns = namespace(lab, "t-fallback-etp-local")?;
    let (_, np) = only_terminating(
        lab,
        &ns,
        "  type: NodePort\n  externalTrafficPolicy: Local\n",
    )?;
    let np = np.context("no NodePort")?;
    holds_for(Duration::from_secs(3), || {
        // kube-proxy short-circuits pod traffic to the cluster-wide set,
        // so node-2 DNATs to the pod on node-1 without SNAT, and the
        // answer goes straight back on node-1: the connection never
        // completes. That is what the e2e asserts (it names the reason
        // "no local endpoints"); any failure will do.
        let o = tcp(lab, CLIENT_1, sock(node_v4(2), np))?;
        ensure!(
            o.pod().is_none(),
            "pod on node-1 -> node-2's NodePort: {o:?}"
        );
        assert_backends(lab, CLIENT_1, sock(node_v4(1), np), TERMINATING_POD)?;
        assert_backends(lab, CLIENT_2, sock(node_v4(1), np), TERMINATING_POD)
    })
}

// ---- session affinity ----

#[derive(Clone, Copy, PartialEq, Eq)]
enum Affinity {
    /// Sticks (the e2e's 15 requests in a row to one pod).
    Works,
    /// `timeoutSeconds: 10`: sticks while used, spreads after 10 s idle.
    Timeout,
    /// ClientIP → None → ClientIP.
    Switch,
}

const AFFINITY_CONFIRM: usize = 15;

/// The pod 15 connections in a row went to, or None if they spread.
fn sticky(lab: &Lab, from: &str, addr: SocketAddr) -> Result<Option<String>> {
    let mut pods = BTreeSet::new();
    for _ in 0..AFFINITY_CONFIRM {
        pods.insert(reply(lab, from, addr)?.0);
    }
    Ok((pods.len() == 1).then(|| pods.into_iter().next().expect("one")))
}

fn session_affinity(lab: &Lab, ns_name: &str, nodeport: bool, mode: Affinity) -> Result<()> {
    let ns = namespace(lab, ns_name)?;
    let name = "affinity";
    // Pods first, so the Service's first EndpointSlice lists them all
    // and its first working connection proves they are all programmed.
    // The e2e runs three; the timeout case runs five, so that a pick after
    // the timeout lands on another pod four times in five.
    let replicas = if mode == Affinity::Timeout { 5 } else { 3 };
    lab.apply(&deployment(&ns, name, replicas, HTTP, None))?;
    wait_rollout(lab, &ns, name)?;
    let kind = if nodeport { "NodePort" } else { "ClusterIP" };
    let timeout = if mode == Affinity::Timeout {
        "  sessionAffinityConfig: {clientIP: {timeoutSeconds: 10}}\n"
    } else {
        ""
    };
    lab.apply(&service(
        &ns,
        name,
        &format!(
            "  type: {kind}\n  sessionAffinity: ClientIP\n{timeout}  selector: {{app: {name}}}\n{PORT_80}"
        ),
    ))?;
    let addr = if nodeport {
        sock(node_v4(1), node_port(lab, &ns, name, "http")?)
    } else {
        sock(cluster_ip(lab, &ns, name)?, 80)
    };
    wait_reply(lab, CLIENT_1, addr)?;
    let first = sticky(lab, CLIENT_1, addr)?.context("session affinity does not hold")?;
    match mode {
        Affinity::Works => Ok(()),
        Affinity::Timeout => {
            // Every new connection renews the client's entry: used every
            // 3 s, it outlives its 10 s timeout.
            for _ in 0..4 {
                std::thread::sleep(Duration::from_secs(3));
                let (pod, _) = reply(lab, CLIENT_1, addr)?;
                ensure!(
                    pod == first,
                    "a client using the Service every 3 s moved from {first} to {pod}: new connections must renew the affinity"
                );
            }
            // Idle for longer than the timeout, the next connection picks
            // at random (the same pod one time in five: try again).
            for _ in 0..6 {
                std::thread::sleep(Duration::from_secs(11));
                let (pod, _) = reply(lab, CLIENT_1, addr)?;
                if pod != first {
                    return Ok(());
                }
            }
            bail!("the session stayed on {first} after six idle periods longer than its timeout")
        }
        Affinity::Switch => {
            lab.kubectl_ok(&[
                "patch",
                "svc",
                name,
                "-n",
                &ns,
                "--type=merge",
                "-p",
                r#"{"spec":{"sessionAffinity":"None","sessionAffinityConfig":null}}"#,
            ])?;
            wait_until("connections to spread", PROGRAMMED, || {
                Ok(sticky(lab, CLIENT_1, addr)?.is_none())
            })?;
            lab.kubectl_ok(&[
                "patch",
                "svc",
                name,
                "-n",
                &ns,
                "--type=merge",
                "-p",
                r#"{"spec":{"sessionAffinity":"ClientIP"}}"#,
            ])?;
            wait_until("connections to stick again", PROGRAMMED, || {
                Ok(sticky(lab, CLIENT_1, addr)?.is_some())
            })?;
            Ok(())
        }
    }
}

/// "should have session affinity work for service with type clusterIP".
fn session_affinity_cluster_ip(lab: &Lab) -> Result<()> {
    session_affinity(lab, "t-affinity-cip", false, Affinity::Works)
}

/// "should have session affinity timeout work for service with type
/// clusterIP".
fn session_affinity_timeout_cluster_ip(lab: &Lab) -> Result<()> {
    session_affinity(lab, "t-affinity-timeout-cip", false, Affinity::Timeout)
}

/// "should be able to switch session affinity for service with type
/// clusterIP".
fn switch_session_affinity_cluster_ip(lab: &Lab) -> Result<()> {
    session_affinity(lab, "t-affinity-switch-cip", false, Affinity::Switch)
}

/// "should have session affinity work for NodePort service".
fn session_affinity_nodeport(lab: &Lab) -> Result<()> {
    session_affinity(lab, "t-affinity-np", true, Affinity::Works)
}

/// "should have session affinity timeout work for NodePort service".
fn session_affinity_timeout_nodeport(lab: &Lab) -> Result<()> {
    session_affinity(lab, "t-affinity-timeout-np", true, Affinity::Timeout)
}

/// "should be able to switch session affinity for NodePort service".
fn switch_session_affinity_nodeport(lab: &Lab) -> Result<()> {
    session_affinity(lab, "t-affinity-switch-np", true, Affinity::Switch)
}

// ---- conntrack ----

/// The conntrack pair: a client on node-1 keeps sending from one UDP
/// source port, about once a second, to a Service whose only backend (on
/// node-2) is replaced; within a minute its datagrams must reach the new
/// pod — so the entry that sent them to the old one must go.
fn udp_pod_cycle(lab: &Lab, ns_name: &str, nodeport: bool, source_port: u16) -> Result<()> {
    let ns = namespace(lab, ns_name)?;
    let name = "udp-server";
    lab.apply(&deployment(
        &ns,
        name,
        1,
        "[{containerPort: 80, protocol: UDP}]",
        Some(2),
    ))?;
    let kind = if nodeport { "NodePort" } else { "ClusterIP" };
    lab.apply(&service(
        &ns,
        name,
        &format!(
            "  type: {kind}\n  selector: {{app: {name}}}\n  ports: [{{name: udp, port: 80, targetPort: 80, protocol: UDP}}]\n"
        ),
    ))?;
    let addr = if nodeport {
        // node-1's NodePort, so node-1 masquerades the flow out of its LAN
        // interface. On the server's node it would go out of the server's
        // own veth, and the kernel drops masqueraded entries with their
        // interface: the replaced pod would take the stale entry with it,
        // and nothing here would show whether the proxy cleans up (a CNI
        // bridge in a real cluster never goes away).
        sock(node_v4(1), node_port(lab, &ns, name, "udp")?)
    } else {
        sock(cluster_ip(lab, &ns, name)?, 80)
    };
    wait_rollout(lab, &ns, name)?;
    let old = live_pods(lab, &ns, name)?;
    ensure!(old.len() == 1, "pods: {old:?}");
    let old = &old[0];

    with_udp_client(lab, CLIENT_1, addr, source_port, |seen| {
        wait_until(
            &format!("the client to reach {old}"),
            Duration::from_secs(60),
            || Ok(heard(&seen(), old)),
        )?;
        delete_pod(lab, &ns, old)?;
        let deleted = Instant::now();
        let mut new = String::new();
        wait_until("a replacement pod", PROGRAMMED, || {
            let pods = live_pods(lab, &ns, name)?;
            new = pods.into_iter().find(|p| p != old).unwrap_or_default();
            Ok(!new.is_empty())
        })?;
        wait_pods_ready(lab, &ns, &[&new])?;
        let left = Duration::from_secs(60).saturating_sub(deleted.elapsed());
        wait_until(&format!("the client to reach {new}"), left, || {
            Ok(heard(&seen(), &new))
        })?;
        Ok(())
    })
}

/// Runs `body` while a client in `from` sends a datagram from
/// `source_port` to `addr` about once a second (the e2e's `nc -u -p`
/// loop: every datagram is the same conntrack flow). `body` is given what
/// the client has seen so far.
fn with_udp_client(
    lab: &Lab,
    from: &str,
    addr: SocketAddr,
    source_port: u16,
    body: impl FnOnce(&dyn Fn() -> Vec<Outcome>) -> Result<()>,
) -> Result<()> {
    let stop = AtomicBool::new(false);
    let seen: Mutex<Vec<Outcome>> = Mutex::new(Vec::new());
    let so_far = || seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let o = match udp(lab, from, addr, Some(source_port)) {
                    Ok(o) => o,
                    Err(e) => Outcome::Failed(format!("{e:#}")),
                };
                // Refused while no endpoint exists, silent while the flow
                // points at a dead pod: keep sending, about once a second.
                if o.pod().is_none() {
                    std::thread::sleep(Duration::from_millis(500));
                }
                seen.lock().unwrap_or_else(|e| e.into_inner()).push(o);
            }
        });
        let result = body(&so_far);
        stop.store(true, Ordering::Relaxed);
        result
    })
}

/// Whether `seen` holds a reply from `pod`.
fn heard(seen: &[Outcome], pod: &str) -> bool {
    seen.iter().any(|o| o.pod() == Some(pod))
}

/// "should be able to preserve UDP traffic when server pod cycles for a
/// ClusterIP service".
fn preserve_udp_traffic_when_server_pod_cycles_cluster_ip(lab: &Lab) -> Result<()> {
    udp_pod_cycle(lab, "t-conntrack-cip", false, 54321)
}

/// "should be able to preserve UDP traffic when server pod cycles for a
/// NodePort service".
fn preserve_udp_traffic_when_server_pod_cycles_nodeport(lab: &Lab) -> Result<()> {
    udp_pod_cycle(lab, "t-conntrack-np", true, 54322)
}

/// "should be able to preserve UDP traffic when initial unready endpoints
/// get ready": a client sends while the only endpoint is not ready yet
/// (rejected: nothing to send it to); once the pod is ready, its next
/// datagrams reach it — nothing left from the unready time may blackhole
/// the flow.
fn preserve_udp_traffic_when_initial_unready_endpoints_get_ready(lab: &Lab) -> Result<()> {
    let ns = namespace(lab, "t-conntrack-unready")?;
    lab.apply(
        &Pod::new("backend", "udp-unready", 2)
            .ports("[{containerPort: 80, protocol: UDP}]")
            .unready()
            .yaml(&ns),
    )?;
    lab.apply(&service(
        &ns,
        "udp-unready",
        "  selector: {app: udp-unready}
  ports: [{name: udp, port: 80, targetPort: 80, protocol: UDP}]
",
    ))?;
    let addr = sock(cluster_ip(lab, &ns, "udp-unready")?, 80);
    wait_until(
        "the unready backend in the EndpointSlice",
        PROGRAMMED,
        || {
            let eps = slice_endpoints(lab, &ns, "udp-unready")?;
            Ok(eps.len() == 1 && eps[0]["conditions"]["ready"] == false)
        },
    )?;
    with_udp_client(lab, CLIENT_1, addr, 54323, |seen| {
        // The client's flow is refused a few times before the pod is ready.
        wait_until("the client to be refused", PROGRAMMED, || {
            Ok(seen().iter().filter(|o| **o == Outcome::Refused).count() >= 3)
        })?;
        let early = seen();
        ensure!(
            !heard(&early, "backend"),
            "an unready pod was reached: {early:?}"
        );
        lab.kubectl_ok(&[
            "annotate",
            "pod",
            "backend",
            "-n",
            &ns,
            "--overwrite",
            "lab.ferrolb.io/ready=true",
        ])?;
        wait_pods_ready(lab, &ns, &["backend"])?;
        wait_until(
            "the client to reach the ready pod",
            Duration::from_secs(60),
            || Ok(heard(&seen(), "backend")),
        )?;
        Ok(())
    })
}

// ---- LoadBalancer ----

/// "should only allow access from service loadbalancer source ranges":
/// sources inside a range (the outside client, a pod) reach the LB IP,
/// others (a pod on the other node) are dropped; a range list without them
/// drops them all, while the NodePort does not care; a range holding them
/// all lets them all in again.
fn only_allow_access_from_load_balancer_source_ranges(lab: &Lab) -> Result<()> {
    let ns = namespace(lab, "t-source-ranges")?;
    lab.apply(&deployment(&ns, "ranges", 2, HTTP, None))?;
    let spec = |ranges: &str| {
        service(
            &ns,
            "ranges",
            &format!(
                "  type: LoadBalancer\n  loadBalancerSourceRanges: [{ranges}]\n  selector: {{app: ranges}}\n{PORT_80}"
            ),
        )
    };
    let accept = pod_ip(lab, CLIENTS_NS, "client-1")?;
    lab.apply(&spec(&format!("'198.18.0.100/32', '{accept}/32'")))?;
    wait_rollout(lab, &ns, "ranges")?;
    let pods = live_pods(lab, &ns, "ranges")?;
    let pods: Vec<&str> = pods.iter().map(String::as_str).collect();
    let lb = sock(wait_lb_ip(lab, &ns, "ranges", false)?, 80);
    let np = sock(node_v4(1), node_port(lab, &ns, "ranges", "http")?);
    let _route = route_via(lab, lb.ip(), 1)?;
    wait_backends(lab, OUTSIDE, lb, &pods)?;
    wait_backends(lab, CLIENT_1, lb, &pods)?;
    assert_tcp(lab, CLIENT_2, lb, &Outcome::TimedOut)?;

    lab.apply(&spec("'198.18.0.200/32'"))?;
    wait_tcp(lab, OUTSIDE, lb, &Outcome::TimedOut)?;
    assert_tcp(lab, CLIENT_1, lb, &Outcome::TimedOut)?;
    wait_backends(lab, OUTSIDE, np, &pods)?;

    lab.apply(&spec("'198.18.0.0/24', '198.19.0.0/16'"))?;
    wait_backends(lab, OUTSIDE, lb, &pods)?;
    wait_backends(lab, CLIENT_1, lb, &pods)?;
    wait_backends(lab, CLIENT_2, lb, &pods)
}

/// The ESIPP cases ("should work for type=LoadBalancer", "…for
/// type=NodePort", "should only target nodes with endpoints", "should work
/// from pods"): with externalTrafficPolicy Local the backend sees the
/// client's own address through the LB IP and the NodePort of its node; a
/// node without a local endpoint drops outside traffic, but pods on it
/// reach the LB IP anyway (kube-proxy short-circuits pod traffic to every
/// endpoint), with their own address.
fn load_balancer_external_traffic_policy_local_preserves_client_ip(lab: &Lab) -> Result<()> {
    let ns = namespace(lab, "t-esipp")?;
    lab.apply(&Pod::new("esipp", "esipp", 1).yaml(&ns))?;
    lab.apply(&service(
        &ns,
        "external-local",
        &format!(
            "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  selector: {{app: esipp}}\n{PORT_80}"
        ),
    ))?;
    wait_pods_ready(lab, &ns, &["esipp"])?;
    let lb = sock(wait_lb_ip(lab, &ns, "external-local", false)?, 80);
    let np = node_port(lab, &ns, "external-local", "http")?;
    let client = IpAddr::V4(addresses::client_v4());
    {
        let _route = route_via(lab, lb.ip(), 1)?;
        let (pod, seen) = wait_reply(lab, OUTSIDE, lb)?;
        ensure!(pod == "esipp", "answered by {pod}");
        ensure!(
            seen.ip() == client,
            "the LB IP lost the client's address: {seen}"
        );
    }
    let (_, seen) = reply(lab, OUTSIDE, sock(node_v4(1), np))?;
    ensure!(
        seen.ip() == client,
        "the NodePort lost the client's address: {seen}"
    );
    let _route = route_via(lab, lb.ip(), 2)?;
    assert_tcp(lab, OUTSIDE, lb, &Outcome::TimedOut)?;
    assert_tcp(lab, OUTSIDE, sock(node_v4(2), np), &Outcome::TimedOut)?;
    for (from, name) in [(CLIENT_2, "client-2"), (CLIENT_1, "client-1")] {
        let (pod, seen) = reply(lab, from, lb)?;
        let own = pod_ip(lab, CLIENTS_NS, name)?;
        ensure!(
            pod == "esipp" && seen.ip() == own,
            "{name} ({own}) -> LB IP: answered by {pod}, seen as {seen}"
        );
    }
    Ok(())
}

// ---- the rest ----

/// The dual-stack cases ("should function for pod-Service: http|udp",
/// "…for node-Service"): an IPv6 ClusterIP from a pod (source kept), and
/// the IPv6 NodePort of both nodes from a pod and from outside.
fn dual_stack_ipv6_cluster_ip_and_nodeport(lab: &Lab) -> Result<()> {
    let ns = namespace(lab, "t-dual-stack")?;
    let ports = "[{containerPort: 8080}, {containerPort: 8080, protocol: UDP}]";
    lab.apply(&Pod::new("web-1", "dual", 1).ports(ports).yaml(&ns))?;
    lab.apply(&Pod::new("web-2", "dual", 2).ports(ports).yaml(&ns))?;
    lab.apply(&service(
        &ns,
        "dual",
        "  type: NodePort\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv6, IPv4]\n  selector: {app: dual}\n  ports:\n  - {name: http, port: 80, targetPort: 8080}\n  - {name: udp, port: 80, targetPort: 8080, protocol: UDP}\n",
    ))?;
    wait_pods_ready(lab, &ns, &["web-1", "web-2"])?;
    let ips = cluster_ips(lab, &ns, "dual")?;
    ensure!(
        ips.len() == 2 && ips[0].is_ipv6() && ips[1].is_ipv4(),
        "clusterIPs {ips:?}"
    );
    let both = ["web-1", "web-2"];
    let v6 = sock(ips[0], 80);
    wait_backends(lab, CLIENT_1, v6, &both)?;
    wait_backends(lab, CLIENT_1, sock(ips[1], 80), &both)?;
    let own = pod_ips(lab, CLIENTS_NS, "client-1")?;
    let (_, seen) = reply(lab, CLIENT_1, v6)?;
    ensure!(
        own.contains(&seen.ip()),
        "client-1 ({own:?}) was seen as {seen} through the IPv6 ClusterIP"
    );
    let mut last = None;
    wait_until("UDP over the IPv6 ClusterIP", PROGRAMMED, || {
        let o = udp(lab, CLIENT_1, v6, None)?;
        let ok = o.pod().is_some();
        last = Some(o);
        Ok(ok)
    })
    .with_context(|| format!("last outcome: {last:?}"))?;

    let np = node_port(lab, &ns, "dual", "http")?;
    for n in [1, 2] {
        wait_backends(lab, CLIENT_2, sock(node_v6(n), np), &both)?;
        wait_backends(lab, OUTSIDE, sock(node_v6(n), np), &both)?;
    }
    Ok(())
}

/// kube-proxy's `/healthz` and `/livez` on port 10256 of every node: 200
/// with its JSON (`lastUpdated`, `currentTime`, and `nodeEligible` on
/// `/healthz` only); other paths are 404.
fn proxy_healthz_and_livez(lab: &Lab) -> Result<()> {
    for n in [1, 2] {
        let base = format!("http://{}:10256", node_v4(n));
        for path in ["/healthz", "/livez"] {
            let (code, headers, body) = http_get(lab, OUTSIDE, &format!("{base}{path}"))?;
            ensure!(code == 200, "node-{n} {path}: {code} {body}");
            ensure!(
                headers.get("content-type").map(String::as_str) == Some("application/json")
                    && headers.get("x-content-type-options").map(String::as_str) == Some("nosniff"),
                "node-{n} {path} headers: {headers:?}"
            );
            let json: serde_json::Value = serde_json::from_str(&body)
                .with_context(|| format!("node-{n} {path} body {body:?}"))?;
            for key in ["lastUpdated", "currentTime"] {
                ensure!(json[key].is_string(), "node-{n} {path}: no {key} in {json}");
            }
            // The newest schema: overall and per-family health.
            ensure!(json["healthy"] == true, "node-{n} {path}: {json}");
            for family in ["IPv4", "IPv6"] {
                let f = &json["status"][family];
                ensure!(
                    f["healthy"] == true && f["lastUpdated"].is_string(),
                    "node-{n} {path}: {family} in {json}"
                );
            }
            let eligible = json.get("nodeEligible");
            if path == "/healthz" {
                ensure!(
                    eligible == Some(&serde_json::Value::Bool(true)),
                    "node-{n} /healthz: {json}"
                );
            } else {
                ensure!(eligible.is_none(), "node-{n} /livez: {json}");
            }
        }
        let (code, _, _) = http_get(lab, OUTSIDE, &format!("{base}/nothing-here"))?;
        ensure!(code == 404, "node-{n} /nothing-here: {code}");
    }
    Ok(())
}

/// `ferrolb-proxy --print-ruleset`, run like the node's proxy, prints the
/// rules of a Service it has never programmed.
fn print_ruleset_shows_a_service(lab: &Lab) -> Result<()> {
    let ns = namespace(lab, "t-print")?;
    lab.apply(&service(
        &ns,
        "printed",
        &format!("  selector: {{app: printed}}\n{PORT_80}"),
    ))?;
    let vip = cluster_ip(lab, &ns, "printed")?;
    let bin = lab.state().read_info()?.bin_dir.join("ferrolb-proxy");
    let kubeconfig = lab.state().kubeconfig("ferrolb-proxy");
    let out = exec_ok(
        lab,
        "node-1",
        &[
            &bin.display().to_string(),
            "--kubeconfig",
            &kubeconfig.display().to_string(),
            "--node-name",
            "node-1",
            "--print-ruleset",
        ],
    )?;
    ensure!(
        out.contains("table ip ferrolb-proxy") && out.contains("table ip6 ferrolb-proxy"),
        "no table of each family in:\n{out}"
    );
    ensure!(
        out.contains(&format!("{vip} . tcp . 80")),
        "ClusterIP {vip} port 80 is not in the printed ruleset:\n{out}"
    );
    Ok(())
}
