//! The controller end to end, against a real control plane, driven with
//! kubectl like a user would: pools by CIDR and range, requested IPs and
//! pools, sharing (and each refusal), namespace-selected pools and
//! priority, class filtering, pool shrink/rename/delete, a restart with
//! 1,000 assigned Services (no IP may change), an API-server restart
//! mid-way, and a second replica taking over from a killed leader.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::{done, step, wait_until};
use ferrolb_lab::lab::Lab;
use ferrolb_lab::state::{ProxyMode, UpOptions};

const PREFIX: &str = "flbtctl";
const BULK: usize = 1000;

#[test]
fn controller_end_to_end() -> Result<()> {
    // Dual-stack, so RequireDualStack Services exist to be served.
    let opts = UpOptions {
        nodes: 1,
        proxy: ProxyMode::None,
        ip_family: ferrolb_lab::addresses::IpFamily::Dual,
        ..Default::default()
    };
    let Some(lab) = common::up(PREFIX, &opts)? else {
        return Ok(());
    };
    common::with_lab(lab, scenario)
}

fn service(
    ns: &str,
    name: &str,
    annotations: &[(&str, &str)],
    extra_spec: &str,
    ports: &[(u16, &str)],
) -> String {
    let ann: String = annotations
        .iter()
        .map(|(k, v)| format!("    {k}: \"{v}\"\n"))
        .collect();
    let ann = if ann.is_empty() {
        String::new()
    } else {
        format!("  annotations:\n{ann}")
    };
    let ports: String = ports
        .iter()
        .map(|(p, proto)| {
            format!(
                "  - {{name: p{p}{}, port: {p}, protocol: {proto}}}\n",
                proto.to_lowercase()
            )
        })
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\n{ann}spec:\n  type: LoadBalancer\n  selector: {{app: {name}}}\n{extra_spec}  ports:\n{ports}"
    )
}

fn lb(ns: &str, name: &str, annotations: &[(&str, &str)]) -> String {
    service(ns, name, annotations, "", &[(80, "TCP")])
}

fn ips(lab: &Lab, ns: &str, name: &str) -> Result<Vec<String>> {
    let out = lab.kubectl_ok(&[
        "get",
        "svc",
        name,
        "-n",
        ns,
        "-o",
        "jsonpath={.status.loadBalancer.ingress[*].ip}",
    ])?;
    Ok(out.split_whitespace().map(str::to_string).collect())
}

fn wait_ips(lab: &Lab, ns: &str, name: &str) -> Result<Vec<String>> {
    let mut got = Vec::new();
    wait_until(
        &format!("an IP for {ns}/{name}"),
        Duration::from_secs(30),
        || {
            got = ips(lab, ns, name)?;
            Ok(!got.is_empty())
        },
    )?;
    Ok(got)
}

fn events(lab: &Lab, ns: &str, name: &str) -> Result<String> {
    lab.kubectl_ok(&[
        "get",
        "events",
        "-n",
        ns,
        "--field-selector",
        &format!("involvedObject.name={name}"),
        "-o",
        "jsonpath={range .items[*]}{.reason}: {.message}{\"\\n\"}{end}",
    ])
}

fn wait_event(lab: &Lab, ns: &str, name: &str, needles: &[&str]) -> Result<String> {
    let mut last = String::new();
    wait_until(
        &format!("an event on {ns}/{name} with {needles:?}"),
        Duration::from_secs(30),
        || {
            last = events(lab, ns, name)?;
            Ok(last.lines().any(|l| needles.iter().all(|n| l.contains(n))))
        },
    )
    .with_context(|| format!("events were:\n{last}"))?;
    Ok(last)
}

fn annotation(lab: &Lab, ns: &str, name: &str) -> Result<String> {
    lab.kubectl_ok(&[
        "get",
        "svc",
        name,
        "-n",
        ns,
        "-o",
        "jsonpath={.metadata.annotations.ferrolb\\.io/ip-allocated-from-pool}",
    ])
}

fn condition(lab: &Lab, ns: &str, name: &str) -> Result<String> {
    lab.kubectl_ok(&[
        "get", "svc", name, "-n", ns, "-o",
        "jsonpath={.status.conditions[?(@.type==\"ferrolb.io/IPAllocated\")].status} {.status.conditions[?(@.type==\"ferrolb.io/IPAllocated\")].reason}",
    ])
}

/// Every LoadBalancer IP in the cluster, with its Services and sharing keys.
fn all_assignments(lab: &Lab) -> Result<BTreeMap<String, Vec<(String, String)>>> {
    let out = lab.kubectl_ok(&[
        "get", "svc", "-A", "-o",
        "jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name} {.metadata.annotations.ferrolb\\.io/allow-shared-ip}{.metadata.annotations.metallb\\.io/allow-shared-ip} {.status.loadBalancer.ingress[*].ip}{\"\\n\"}{end}",
    ])?;
    let mut by_ip: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for line in out.lines() {
        let mut parts = line.split(' ');
        let svc = parts.next().unwrap_or_default().to_string();
        let key = parts.next().unwrap_or_default().to_string();
        for ip in parts.filter(|p| !p.is_empty()) {
            by_ip
                .entry(ip.to_string())
                .or_default()
                .push((svc.clone(), key.clone()));
        }
    }
    Ok(by_ip)
}

/// No IP is held by two Services unless they share it under one key.
fn assert_no_duplicates(lab: &Lab) -> Result<usize> {
    let all = all_assignments(lab)?;
    for (ip, users) in &all {
        if users.len() > 1 {
            let keys: BTreeSet<&String> = users.iter().map(|(_, k)| k).collect();
            ensure!(
                keys.len() == 1 && !keys.iter().any(|k| k.is_empty()),
                "{ip} is held by {users:?}"
            );
        }
    }
    Ok(all.len())
}

fn metric(addr: &str, name: &str) -> Option<f64> {
    let addr: std::net::SocketAddr = addr.parse().ok()?;
    let (code, body) = ferrolb_runtime::testing::http_get(addr, "/metrics")?;
    if code != 200 {
        return None;
    }
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn cli(lab: &Lab, args: &[&str]) -> Result<()> {
    common::cli_ok(lab, args).map(drop)
}

const LAB_CONTROLLER_METRICS: &str = "198.18.0.1:7472";

fn scenario(lab: &Lab) -> Result<()> {
    let t = step(
        "pools by CIDR and by range; a Service gets the lowest address, its annotation, condition and event",
    );
    lab.apply_crds()?;
    lab.apply(
        "apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: alpha}\nspec:\n  addresses: [198.18.8.0/28]\n---\napiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: beta}\nspec:\n  addresses: [198.18.9.10-198.18.9.20]\n  autoAssign: false\n",
    )?;
    lab.apply(&lb("default", "first", &[]))?;
    ensure!(wait_ips(lab, "default", "first")? == ["198.18.8.0"]);
    ensure!(annotation(lab, "default", "first")? == "alpha");
    ensure!(condition(lab, "default", "first")? == "True Allocated");
    wait_event(
        lab,
        "default",
        "first",
        &["IPAllocated", "198.18.8.0", "alpha"],
    )?;
    done(t);

    let t = step(
        "requested IPs (ours, MetalLB's, spec.loadBalancerIP) and a requested pool are honoured",
    );
    lab.apply(&lb(
        "default",
        "want-ip",
        &[("ferrolb.io/loadBalancerIPs", "198.18.9.15")],
    ))?;
    lab.apply(&lb(
        "default",
        "want-metallb-ip",
        &[("metallb.universe.tf/loadBalancerIPs", "198.18.8.10")],
    ))?;
    lab.apply(&service(
        "default",
        "want-spec-ip",
        &[],
        "  loadBalancerIP: 198.18.8.9\n",
        &[(80, "TCP")],
    ))?;
    lab.apply(&lb(
        "default",
        "want-pool",
        &[("ferrolb.io/address-pool", "beta")],
    ))?;
    ensure!(wait_ips(lab, "default", "want-ip")? == ["198.18.9.15"]);
    ensure!(wait_ips(lab, "default", "want-metallb-ip")? == ["198.18.8.10"]);
    ensure!(wait_ips(lab, "default", "want-spec-ip")? == ["198.18.8.9"]);
    ensure!(wait_ips(lab, "default", "want-pool")? == ["198.18.9.10"]);
    lab.apply(&lb(
        "default",
        "want-outside",
        &[("ferrolb.io/loadBalancerIPs", "198.18.15.1")],
    ))?;
    wait_event(
        lab,
        "default",
        "want-outside",
        &[
            "AllocationFailed",
            "198.18.15.1 is not in any IPAddressPool",
        ],
    )?;
    ensure!(
        ips(lab, "default", "want-outside")?.is_empty(),
        "refused, never replaced"
    );
    done(t);

    let t = step(
        "sharing: same key and distinct ports share; a port clash and a different key are refused with the reason",
    );
    lab.apply(&service(
        "default",
        "dns-tcp",
        &[("ferrolb.io/allow-shared-ip", "dns")],
        "",
        &[(53, "TCP")],
    ))?;
    lab.apply(&service(
        "default",
        "dns-udp",
        &[("metallb.io/allow-shared-ip", "dns")],
        "",
        &[(53, "UDP")],
    ))?;
    let shared = wait_ips(lab, "default", "dns-tcp")?;
    ensure!(
        wait_ips(lab, "default", "dns-udp")? == shared,
        "same key, different protocol: one IP"
    );
    let ip = shared[0].as_str();
    lab.apply(&service(
        "default",
        "dns-clash",
        &[
            ("ferrolb.io/allow-shared-ip", "dns"),
            ("ferrolb.io/loadBalancerIPs", ip),
        ],
        "",
        &[(53, "TCP")],
    ))?;
    wait_event(
        lab,
        "default",
        "dns-clash",
        &["AllocationFailed", "both use port TCP/53"],
    )?;
    lab.apply(&service(
        "default",
        "other-key",
        &[
            ("ferrolb.io/allow-shared-ip", "web"),
            ("ferrolb.io/loadBalancerIPs", ip),
        ],
        "",
        &[(8080, "TCP")],
    ))?;
    wait_event(
        lab,
        "default",
        "other-key",
        &["AllocationFailed", "sharing key"],
    )?;
    lab.apply(&service(
        "default",
        "no-key",
        &[("ferrolb.io/loadBalancerIPs", ip)],
        "",
        &[(9090, "TCP")],
    ))?;
    wait_event(
        lab,
        "default",
        "no-key",
        &["AllocationFailed", "no allow-shared-ip"],
    )?;
    ensure!(condition(lab, "default", "no-key")? == "False IPInUse");
    done(t);

    let t = step(
        "dual-stack: RequireDualStack gets one IP per family from one pool, primary family first",
    );
    lab.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: dual}\n---\napiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: dual}\nspec:\n  addresses: [198.18.14.0/29, \"2001:db8::8:0/112\"]\n  serviceAllocation: {priority: 1, namespaces: [dual]}\n",
    )?;
    lab.apply(&service(
        "dual",
        "both",
        &[],
        "  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv6, IPv4]\n",
        &[(80, "TCP")],
    ))?;
    let both = wait_ips(lab, "dual", "both")?;
    ensure!(both == ["2001:db8::8:0", "198.18.14.0"], "{both:?}");
    ensure!(annotation(lab, "dual", "both")? == "dual");
    lab.apply(&service(
        "dual",
        "v6only",
        &[],
        "  ipFamilies: [IPv6]\n",
        &[(80, "TCP")],
    ))?;
    ensure!(wait_ips(lab, "dual", "v6only")? == ["2001:db8::8:1"]);
    done(t);

    let t = step(
        "a namespace-selected pool with priority serves its namespace first; other classes are left alone",
    );
    lab.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: team-a, labels: {env: prod}}\n---\napiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: prod}\nspec:\n  addresses: [198.18.10.0/29]\n  serviceAllocation:\n    priority: 1\n    namespaceSelectors: [{matchLabels: {env: prod}}]\n",
    )?;
    lab.apply(&lb("team-a", "api", &[]))?;
    ensure!(wait_ips(lab, "team-a", "api")? == ["198.18.10.0"]);
    lab.apply(&lb("default", "not-prod", &[]))?;
    let not_prod = wait_ips(lab, "default", "not-prod")?;
    ensure!(
        not_prod[0].starts_with("198.18.8."),
        "default namespace stays in alpha: {not_prod:?}"
    );
    lab.apply(&service(
        "default",
        "other-class",
        &[],
        "  loadBalancerClass: example.com/other\n",
        &[(80, "TCP")],
    ))?;
    std::thread::sleep(Duration::from_secs(3));
    ensure!(
        ips(lab, "default", "other-class")?.is_empty(),
        "another class's Service got an IP"
    );
    ensure!(
        condition(lab, "default", "other-class")?.trim().is_empty(),
        "and no condition of ours"
    );
    done(t);

    let t = step(
        "pool shrunk: IPs still inside stay, the one outside moves with an event; renamed: nothing moves; deleted: Services are told why and move",
    );
    lab.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: edits}\n---\napiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: gamma}\nspec:\n  addresses: [198.18.11.0/29]\n  serviceAllocation: {priority: 1, namespaces: [edits]}\n",
    )?;
    for n in ["e1", "e2", "e3"] {
        lab.apply(&lb("edits", n, &[]))?;
        wait_ips(lab, "edits", n)?;
    }
    let before: Vec<Vec<String>> = ["e1", "e2", "e3"]
        .iter()
        .map(|n| ips(lab, "edits", n))
        .collect::<Result<_>>()?;
    ensure!(
        before == [["198.18.11.0"], ["198.18.11.1"], ["198.18.11.2"]],
        "{before:?}"
    );
    lab.apply("apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: gamma}\nspec:\n  addresses: [198.18.11.0/31, 198.18.11.100/32]\n  serviceAllocation: {priority: 1, namespaces: [edits]}\n")?;
    wait_event(
        lab,
        "edits",
        "e3",
        &["IPAllocated", "198.18.11.100", "replacing 198.18.11.2"],
    )?;
    ensure!(
        ips(lab, "edits", "e1")? == ["198.18.11.0"] && ips(lab, "edits", "e2")? == ["198.18.11.1"]
    );
    lab.apply("apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: gamma-renamed}\nspec:\n  addresses: [198.18.11.0/31, 198.18.11.100/32]\n  serviceAllocation: {priority: 1, namespaces: [edits]}\n")?;
    lab.kubectl_ok(&["delete", "ippool", "gamma"])?;
    wait_until(
        "the annotation to follow the rename",
        Duration::from_secs(20),
        || Ok(annotation(lab, "edits", "e1")? == "gamma-renamed"),
    )?;
    ensure!(
        ips(lab, "edits", "e1")? == ["198.18.11.0"],
        "rename moved an IP"
    );
    lab.kubectl_ok(&["delete", "ippool", "gamma-renamed"])?;
    // No pool holds 198.18.11.0 any more: e1 is told why and, since the
    // shared pool serves its namespace, gets a new IP from it at once.
    wait_event(
        lab,
        "edits",
        "e1",
        &[
            "IPAllocated",
            "replacing 198.18.11.0",
            "not in any IPAddressPool",
        ],
    )?;
    let fallback = ips(lab, "edits", "e1")?;
    ensure!(
        fallback.len() == 1 && fallback[0].starts_with("198.18.8."),
        "{fallback:?}"
    );
    done(t);

    let t = step(&format!(
        "{BULK} Services get distinct IPs; a controller restart changes none of them"
    ));
    lab.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: bulk}\n---\napiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: bulk}\nspec:\n  addresses: [198.18.12.0/22]\n  serviceAllocation: {priority: 1, namespaces: [bulk]}\n")?;
    let docs: Vec<String> = (0..BULK)
        .map(|i| lb("bulk", &format!("s{i:04}"), &[]))
        .collect();
    let created = Instant::now();
    let out = lab.kubectl_with_input(&["create", "-f", "-"], &docs.join("---\n"))?;
    ensure!(
        out.status.success(),
        "creating {BULK} Services: {}",
        common::text(&out.stderr)
    );
    let bulk_ips = || -> Result<BTreeMap<String, String>> {
        let out = lab.kubectl_ok(&["get", "svc", "-n", "bulk", "-o", "jsonpath={range .items[*]}{.metadata.name} {.status.loadBalancer.ingress[0].ip}{\"\\n\"}{end}"])?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let (n, ip) = l.split_once(' ')?;
                (!ip.is_empty()).then(|| (n.to_string(), ip.to_string()))
            })
            .collect())
    };
    wait_until(
        &format!("{BULK} bulk Services to get IPs"),
        Duration::from_secs(180),
        || Ok(bulk_ips()?.len() == BULK),
    )?;
    eprintln!(
        "    {BULK} Services created and assigned in {:.1}s",
        (created.elapsed()).as_secs_f64()
    );
    let before = bulk_ips()?;
    ensure!(
        before.values().collect::<BTreeSet<_>>().len() == BULK,
        "bulk IPs are distinct"
    );
    cli(lab, &["kill", "controller"])?;
    cli(lab, &["start", "controller"])?;
    // The killed leader never released its Lease, so the new process waits
    // for it to expire (15 s) before it may write.
    let converged = wait_until(
        "the restarted controller to hold every Service",
        Duration::from_secs(90),
        || {
            Ok(
                metric(LAB_CONTROLLER_METRICS, "ferrolb_leader") == Some(1.0)
                    && metric(LAB_CONTROLLER_METRICS, "ferrolb_services_allocated").unwrap_or(0.0)
                        >= BULK as f64,
            )
        },
    )?;
    eprintln!(
        "    restart converged in {:.1}s (including the Lease expiry)",
        converged.as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(2));
    let after = bulk_ips()?;
    let moved: Vec<_> = before
        .iter()
        .filter(|(n, ip)| after.get(*n) != Some(ip))
        .collect();
    ensure!(
        moved.is_empty(),
        "{} IPs changed after a restart, e.g. {:?}",
        moved.len(),
        moved.first()
    );
    done(t);

    let t = step(
        "an API-server restart in the middle of creating Services loses nothing and duplicates nothing",
    );
    lab.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: churn}\n---\napiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: churn}\nspec:\n  addresses: [198.18.16.0/26]\n  serviceAllocation: {priority: 1, namespaces: [churn]}\n")?;
    for i in 0..15 {
        lab.apply(&lb("churn", &format!("c{i:02}"), &[]))?;
    }
    cli(lab, &["restart-apiserver"])?;
    for i in 15..30 {
        let name = format!("c{i:02}");
        wait_until(
            "the API server to accept writes again",
            Duration::from_secs(60),
            || Ok(lab.apply(&lb("churn", &name, &[])).is_ok()),
        )?;
    }
    for i in 0..30 {
        wait_ips(lab, "churn", &format!("c{i:02}"))?;
    }
    let distinct = assert_no_duplicates(lab)?;
    eprintln!("    {distinct} distinct LoadBalancer IPs in the cluster, no unlawful duplicate");
    done(t);

    let t = step("two replicas: the standby takes over when the leader is killed");
    let mut standby = StandbyController::start(lab)?;
    wait_until(
        "the standby to sync and stand by",
        Duration::from_secs(30),
        || Ok(metric(&standby.metrics, "ferrolb_leader") == Some(0.0)),
    )?;
    ensure!(
        metric(LAB_CONTROLLER_METRICS, "ferrolb_leader") == Some(1.0),
        "the lab's controller leads"
    );
    cli(lab, &["kill", "controller"])?;
    let killed = Instant::now();
    lab.apply(&lb("default", "after-failover", &[]))?;
    wait_ips(lab, "default", "after-failover")?;
    let failover = killed.elapsed();
    ensure!(
        metric(&standby.metrics, "ferrolb_leader") == Some(1.0),
        "the standby leads now"
    );
    eprintln!(
        "    a new Service got its IP {:.1}s after the leader was killed (lease 15 s)",
        failover.as_secs_f64()
    );
    ensure!(
        failover < Duration::from_secs(25),
        "takeover took {failover:?}"
    );
    standby.stop();
    cli(lab, &["start", "controller"])?;
    assert_no_duplicates(lab)?;
    done(t);
    Ok(())
}

/// A second controller replica, run by the test with the same ServiceAccount.
struct StandbyController {
    child: Child,
    metrics: String,
}

impl StandbyController {
    fn start(lab: &Lab) -> Result<Self> {
        let kubeconfig = lab.state().kubeconfig("ferrolb-controller");
        if !kubeconfig.exists() {
            bail!("no controller kubeconfig at {}", kubeconfig.display());
        }
        let bin = std::path::Path::new(env!("CARGO_BIN_EXE_ferrolb-lab"))
            .with_file_name("ferrolb-controller");
        let metrics = "198.18.0.1:7492".to_string();
        let log = std::fs::File::create(lab.state().log("standby-controller"))?;
        let child = Command::new(&bin)
            .args(["--kubeconfig", &kubeconfig.display().to_string()])
            .args([
                "--metrics-addr",
                &metrics,
                "--health-addr",
                "198.18.0.1:7493",
            ])
            .args(["--identity", "standby"])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self { child, metrics })
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for StandbyController {
    fn drop(&mut self) {
        self.stop();
    }
}
