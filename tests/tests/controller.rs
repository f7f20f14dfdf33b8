//! The controller end to end, against a real control plane, driven with
//! kubectl like a user would. Named tests share one dual-stack lab and run
//! one after another; each uses its own namespace and pools, so each can
//! run alone (`cargo test -p ferrolb-lab --test controller -- NAME`).
//! Tests that stop or replace the lab's controller come last and leave it
//! leading again.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::{LabTest, wait_until};
use ferrolb_crds::annotations::ALLOW_SHARED_IP_ALIASES;
use ferrolb_lab::components::{self, CONTROLLER_IDENTITY};
use ferrolb_lab::lab::Lab;
use ferrolb_lab::state::{ProxyMode, UpOptions};

const PREFIX: &str = "flbtctl";
const BULK: usize = 1000;
const LAB_CONTROLLER_METRICS: &str = "198.18.0.1:7472";

fn main() -> ExitCode {
    // Dual-stack, so RequireDualStack Services exist to be served.
    let opts = UpOptions {
        nodes: 1,
        proxy: ProxyMode::None,
        ip_family: ferrolb_lab::addresses::IpFamily::Dual,
        ..Default::default()
    };
    let tests: &[(&'static str, LabTest)] = &[
        ("pools_by_cidr_and_range", pools_by_cidr_and_range),
        ("requested_ips_and_pools", requested_ips_and_pools),
        ("sharing_and_its_refusals", sharing_and_its_refusals),
        ("dual_stack", dual_stack),
        ("namespace_pool_with_priority", namespace_pool_with_priority),
        ("other_classes_are_left_alone", other_classes_are_left_alone),
        ("pool_shrink_rename_delete", pool_shrink_rename_delete),
        (
            "namespace_label_change_moves_or_keeps",
            namespace_label_change_moves_or_keeps,
        ),
        (
            "foreign_condition_survives_our_write",
            foreign_condition_survives_our_write,
        ),
        (
            "bad_annotation_keeps_its_ip_across_a_restart",
            bad_annotation_keeps_its_ip_across_a_restart,
        ),
        (
            "bulk_services_survive_a_restart",
            bulk_services_survive_a_restart,
        ),
        (
            "apiserver_restart_mid_creation",
            apiserver_restart_mid_creation,
        ),
        (
            "standby_takes_over_a_killed_leader",
            standby_takes_over_a_killed_leader,
        ),
        (
            "standby_leads_soon_after_leader_sigterm",
            standby_leads_soon_after_leader_sigterm,
        ),
        (
            "leader_cut_off_stops_before_standby_starts",
            leader_cut_off_stops_before_standby_starts,
        ),
        (
            "leader_with_forbidden_lease_stops_writing",
            leader_with_forbidden_lease_stops_writing,
        ),
        (
            "no_unlawful_duplicates_at_the_end",
            no_unlawful_duplicates_at_the_end,
        ),
    ];
    common::run_lab_tests(PREFIX, &opts, setup, tests)
}

/// CRDs and the auto-assign pool most tests share.
fn setup(lab: &Lab) -> Result<()> {
    lab.apply_crds()?;
    lab.apply(
        "apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: shared}\nspec:\n  addresses: [198.18.8.0/26]\n",
    )?;
    Ok(())
}

// ---- helpers ----

fn service(
    ns: &str,
    name: &str,
    annotations: &[(&str, &str)],
    extra_spec: &str,
    ports: &[(u16, &str)],
) -> String {
    let ann = common::annotations_yaml(annotations);
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

/// A namespace and a pool that serves only it, with priority, so a test's
/// addresses are its own and its first Service gets the pool's lowest.
fn namespace_with_pool(lab: &Lab, ns: &str, addresses: &str) -> Result<()> {
    lab.apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---\napiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {{name: {ns}}}\nspec:\n  addresses: [{addresses}]\n  serviceAllocation: {{priority: 1, namespaces: [{ns}]}}\n"
    ))?;
    Ok(())
}

fn namespace(lab: &Lab, ns: &str) -> Result<()> {
    lab.apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n"
    ))?;
    Ok(())
}

fn ips(lab: &Lab, ns: &str, name: &str) -> Result<Vec<String>> {
    let out = lab.field("svc", ns, name, "{.status.loadBalancer.ingress[*].ip}")?;
    Ok(out.split_whitespace().map(str::to_string).collect())
}

fn wait_ips_within(lab: &Lab, ns: &str, name: &str, timeout: Duration) -> Result<Vec<String>> {
    let mut got = Vec::new();
    wait_until(&format!("an IP for {ns}/{name}"), timeout, || {
        got = ips(lab, ns, name)?;
        Ok(!got.is_empty())
    })?;
    Ok(got)
}

fn wait_ips(lab: &Lab, ns: &str, name: &str) -> Result<Vec<String>> {
    wait_ips_within(lab, ns, name, Duration::from_secs(30))
}

/// `reason: message` lines of the Events about a Service, with the
/// reporting instance (`via`) of each.
fn events(lab: &Lab, ns: &str, name: &str) -> Result<String> {
    lab.kubectl_ok(&[
        "get",
        "events",
        "-n",
        ns,
        "--field-selector",
        &format!("involvedObject.name={name}"),
        "-o",
        "jsonpath={range .items[*]}{.reason}: {.message} via={.reportingInstance}{\"\\n\"}{end}",
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
    lab.field(
        "svc",
        ns,
        name,
        "{.metadata.annotations.ferrolb\\.io/ip-allocated-from-pool}",
    )
}

fn condition(lab: &Lab, ns: &str, name: &str) -> Result<String> {
    lab.field(
        "svc",
        ns,
        name,
        "{.status.conditions[?(@.type==\"ferrolb.io/IPAllocated\")].status} {.status.conditions[?(@.type==\"ferrolb.io/IPAllocated\")].reason}",
    )
}

fn metric(addr: &str, name: &str) -> Option<f64> {
    let addr: std::net::SocketAddr = addr.parse().ok()?;
    let (code, body) = ferrolb_runtime::testing::http_get(addr, "/metrics")?;
    if code != 200 {
        return None;
    }
    ferrolb_runtime::testing::samples(&body, name).next()
}

fn cli(lab: &Lab, args: &[&str]) -> Result<String> {
    common::cli_ok(lab, args)
}

/// Waits until the lab's controller leads (after a test replaced it).
fn lab_controller_leads(lab: &Lab) -> Result<()> {
    if lab
        .state()
        .read_pid("controller")
        .is_none_or(|p| !ferrolb_lab::process::alive(p))
    {
        cli(lab, &["start", "controller"])?;
    }
    wait_until(
        "the lab's controller to lead",
        Duration::from_secs(40),
        || Ok(metric(LAB_CONTROLLER_METRICS, "ferrolb_leader") == Some(1.0)),
    )?;
    Ok(())
}

/// Who holds the controller's Lease.
fn lease_holder(lab: &Lab) -> Result<String> {
    lab.field(
        "lease",
        components::NAMESPACE,
        "ferrolb-controller-ferrolb.io-lb",
        "{.spec.holderIdentity}",
    )
}

// ---- tests ----

fn pools_by_cidr_and_range(lab: &Lab) -> Result<()> {
    lab.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: t-pools}\n---\napiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: alpha}\nspec:\n  addresses: [198.18.20.0/28]\n  serviceAllocation: {priority: 1, namespaces: [t-pools]}\n---\napiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: beta}\nspec:\n  addresses: [198.18.21.10-198.18.21.20]\n  autoAssign: false\n",
    )?;
    lab.apply(&lb("t-pools", "first", &[]))?;
    ensure!(wait_ips(lab, "t-pools", "first")? == ["198.18.20.0"]);
    ensure!(annotation(lab, "t-pools", "first")? == "alpha");
    ensure!(condition(lab, "t-pools", "first")? == "True Allocated");
    wait_event(
        lab,
        "t-pools",
        "first",
        &["IPAllocated", "198.18.20.0", "alpha", CONTROLLER_IDENTITY],
    )?;
    lab.apply(&lb(
        "t-pools",
        "from-range",
        &[("ferrolb.io/address-pool", "beta")],
    ))?;
    ensure!(wait_ips(lab, "t-pools", "from-range")? == ["198.18.21.10"]);
    Ok(())
}

fn requested_ips_and_pools(lab: &Lab) -> Result<()> {
    namespace_with_pool(lab, "t-req", "198.18.22.0/28")?;
    lab.apply(&lb(
        "t-req",
        "want-ip",
        &[("ferrolb.io/loadBalancerIPs", "198.18.22.9")],
    ))?;
    lab.apply(&lb(
        "t-req",
        "want-metallb-ip",
        &[("metallb.universe.tf/loadBalancerIPs", "198.18.22.10")],
    ))?;
    lab.apply(&service(
        "t-req",
        "want-spec-ip",
        &[],
        "  loadBalancerIP: 198.18.22.11\n",
        &[(80, "TCP")],
    ))?;
    lab.apply(&lb(
        "t-req",
        "want-pool",
        &[("metallb.io/address-pool", "t-req")],
    ))?;
    ensure!(wait_ips(lab, "t-req", "want-ip")? == ["198.18.22.9"]);
    ensure!(wait_ips(lab, "t-req", "want-metallb-ip")? == ["198.18.22.10"]);
    ensure!(wait_ips(lab, "t-req", "want-spec-ip")? == ["198.18.22.11"]);
    ensure!(wait_ips(lab, "t-req", "want-pool")? == ["198.18.22.0"]);
    lab.apply(&lb(
        "t-req",
        "want-outside",
        &[("ferrolb.io/loadBalancerIPs", "198.18.30.1")],
    ))?;
    wait_event(
        lab,
        "t-req",
        "want-outside",
        &[
            "AllocationFailed",
            "198.18.30.1 is not in any IPAddressPool",
        ],
    )?;
    ensure!(
        ips(lab, "t-req", "want-outside")?.is_empty(),
        "refused, never replaced"
    );
    Ok(())
}

fn sharing_and_its_refusals(lab: &Lab) -> Result<()> {
    namespace_with_pool(lab, "t-share", "198.18.23.0/28")?;
    lab.apply(&service(
        "t-share",
        "dns-tcp",
        &[("ferrolb.io/allow-shared-ip", "dns")],
        "",
        &[(53, "TCP")],
    ))?;
    lab.apply(&service(
        "t-share",
        "dns-udp",
        &[("metallb.universe.tf/allow-shared-ip", "dns")],
        "",
        &[(53, "UDP")],
    ))?;
    let shared = wait_ips(lab, "t-share", "dns-tcp")?;
    ensure!(
        wait_ips(lab, "t-share", "dns-udp")? == shared,
        "same key (through MetalLB's old annotation), different protocol: one IP"
    );
    let ip = shared[0].as_str();
    lab.apply(&service(
        "t-share",
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
        "t-share",
        "dns-clash",
        &["AllocationFailed", "both use port TCP/53"],
    )?;
    lab.apply(&service(
        "t-share",
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
        "t-share",
        "other-key",
        &["AllocationFailed", "sharing key"],
    )?;
    lab.apply(&service(
        "t-share",
        "no-key",
        &[("ferrolb.io/loadBalancerIPs", ip)],
        "",
        &[(9090, "TCP")],
    ))?;
    wait_event(
        lab,
        "t-share",
        "no-key",
        &["AllocationFailed", "no allow-shared-ip"],
    )?;
    ensure!(condition(lab, "t-share", "no-key")? == "False IPInUse");
    assert_no_duplicates(lab)?;
    Ok(())
}

fn dual_stack(lab: &Lab) -> Result<()> {
    lab.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: t-dual}\n---\napiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: t-dual}\nspec:\n  addresses: [198.18.24.0/29, \"2001:db8::8:0/112\"]\n  serviceAllocation: {priority: 1, namespaces: [t-dual]}\n",
    )?;
    lab.apply(&service(
        "t-dual",
        "both",
        &[],
        "  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv6, IPv4]\n",
        &[(80, "TCP")],
    ))?;
    let both = wait_ips(lab, "t-dual", "both")?;
    ensure!(both == ["2001:db8::8:0", "198.18.24.0"], "{both:?}");
    ensure!(annotation(lab, "t-dual", "both")? == "t-dual");
    lab.apply(&service(
        "t-dual",
        "v6only",
        &[],
        "  ipFamilies: [IPv6]\n",
        &[(80, "TCP")],
    ))?;
    ensure!(wait_ips(lab, "t-dual", "v6only")? == ["2001:db8::8:1"]);
    Ok(())
}

fn namespace_pool_with_priority(lab: &Lab) -> Result<()> {
    lab.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: t-prod, labels: {env: prod}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: t-dev}\n---\napiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: prod}\nspec:\n  addresses: [198.18.25.0/29]\n  serviceAllocation:\n    priority: 1\n    namespaceSelectors: [{matchLabels: {env: prod}}]\n",
    )?;
    lab.apply(&lb("t-prod", "api", &[]))?;
    ensure!(wait_ips(lab, "t-prod", "api")? == ["198.18.25.0"]);
    lab.apply(&lb("t-dev", "not-prod", &[]))?;
    let not_prod = wait_ips(lab, "t-dev", "not-prod")?;
    ensure!(
        not_prod[0].starts_with("198.18.8."),
        "an unlabelled namespace stays in the shared pool: {not_prod:?}"
    );
    Ok(())
}

fn other_classes_are_left_alone(lab: &Lab) -> Result<()> {
    namespace_with_pool(lab, "t-class", "198.18.26.0/29")?;
    lab.apply(&service(
        "t-class",
        "other-class",
        &[],
        "  loadBalancerClass: example.com/other\n",
        &[(80, "TCP")],
    ))?;
    // A Service of ours created after it: once it is handled, the other
    // class's Service has been seen (and left alone) too.
    lab.apply(&lb("t-class", "later", &[]))?;
    wait_ips(lab, "t-class", "later")?;
    wait_event(lab, "t-class", "later", &["IPAllocated"])?;
    ensure!(
        ips(lab, "t-class", "other-class")?.is_empty(),
        "another class's Service got an IP"
    );
    ensure!(
        condition(lab, "t-class", "other-class")?.trim().is_empty(),
        "and a condition of ours"
    );
    let theirs = events(lab, "t-class", "other-class")?;
    ensure!(theirs.trim().is_empty(), "and events from us: {theirs}");
    Ok(())
}

fn pool_shrink_rename_delete(lab: &Lab) -> Result<()> {
    namespace_with_pool(lab, "t-edits", "198.18.27.0/29")?;
    for n in ["e1", "e2", "e3"] {
        lab.apply(&lb("t-edits", n, &[]))?;
        wait_ips(lab, "t-edits", n)?;
    }
    let before: Vec<Vec<String>> = ["e1", "e2", "e3"]
        .iter()
        .map(|n| ips(lab, "t-edits", n))
        .collect::<Result<_>>()?;
    ensure!(
        before == [["198.18.27.0"], ["198.18.27.1"], ["198.18.27.2"]],
        "{before:?}"
    );
    let pool = |name: &str| {
        format!(
            "apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {{name: {name}}}\nspec:\n  addresses: [198.18.27.0/31, 198.18.27.100/32]\n  serviceAllocation: {{priority: 1, namespaces: [t-edits]}}\n"
        )
    };
    lab.apply(&pool("t-edits"))?;
    wait_event(
        lab,
        "t-edits",
        "e3",
        &["IPAllocated", "198.18.27.100", "replacing 198.18.27.2"],
    )?;
    ensure!(
        ips(lab, "t-edits", "e1")? == ["198.18.27.0"]
            && ips(lab, "t-edits", "e2")? == ["198.18.27.1"]
    );
    lab.apply(&pool("t-edits-renamed"))?;
    lab.kubectl_ok(&["delete", "ippool", "t-edits"])?;
    wait_until(
        "the annotation to follow the rename",
        Duration::from_secs(20),
        || Ok(annotation(lab, "t-edits", "e1")? == "t-edits-renamed"),
    )?;
    ensure!(
        ips(lab, "t-edits", "e1")? == ["198.18.27.0"],
        "rename moved an IP"
    );
    lab.kubectl_ok(&["delete", "ippool", "t-edits-renamed"])?;
    // No pool holds 198.18.27.0 any more: e1 is told why and, since the
    // shared pool serves its namespace, gets a new IP from it at once.
    wait_event(
        lab,
        "t-edits",
        "e1",
        &[
            "IPAllocated",
            "replacing 198.18.27.0",
            "not in any IPAddressPool",
        ],
    )?;
    let fallback = ips(lab, "t-edits", "e1")?;
    ensure!(
        fallback.len() == 1 && fallback[0].starts_with("198.18.8."),
        "{fallback:?}"
    );
    Ok(())
}

/// A label edit moves a Service to a pool that admits it, or, while none
/// does, keeps its IP and says why (never an outage).
fn namespace_label_change_moves_or_keeps(lab: &Lab) -> Result<()> {
    lab.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: t-move, labels: {tier: gold}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: t-keep, labels: {tier: silver}}\n---\napiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: gold}\nspec:\n  addresses: [198.18.28.0/29]\n  serviceAllocation:\n    priority: 1\n    namespaceSelectors: [{matchLabels: {tier: gold}}]\n---\napiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: silver-only}\nspec:\n  addresses: [198.18.28.8/29]\n  autoAssign: false\n  serviceAllocation:\n    namespaceSelectors: [{matchLabels: {tier: silver}}]\n",
    )?;
    lab.apply(&lb("t-move", "web", &[]))?;
    ensure!(wait_ips(lab, "t-move", "web")? == ["198.18.28.0"]);
    // Moves: the shared pool serves any namespace.
    lab.kubectl_ok(&["label", "namespace", "t-move", "tier=bronze", "--overwrite"])?;
    wait_event(
        lab,
        "t-move",
        "web",
        &[
            "IPAllocated",
            "replacing 198.18.28.0",
            "does not serve this Service",
        ],
    )?;
    let moved = ips(lab, "t-move", "web")?;
    ensure!(
        moved.len() == 1 && moved[0].starts_with("198.18.8."),
        "{moved:?}"
    );

    // Keeps: its IP was requested from a pool that only serves silver.
    lab.apply(&lb(
        "t-keep",
        "pinned",
        &[("ferrolb.io/loadBalancerIPs", "198.18.28.9")],
    ))?;
    ensure!(wait_ips(lab, "t-keep", "pinned")? == ["198.18.28.9"]);
    lab.kubectl_ok(&["label", "namespace", "t-keep", "tier=bronze", "--overwrite"])?;
    wait_event(
        lab,
        "t-keep",
        "pinned",
        &["PoolNotEligible", "Kept 198.18.28.9"],
    )?;
    ensure!(condition(lab, "t-keep", "pinned")? == "True PoolNotEligible");
    ensure!(
        ips(lab, "t-keep", "pinned")? == ["198.18.28.9"],
        "a label edit took an IP away"
    );
    Ok(())
}

/// Our condition is server-side applied: a condition another controller
/// added is kept even when our write was planned from an object that did
/// not have it yet (a stale cache).
fn foreign_condition_survives_our_write(lab: &Lab) -> Result<()> {
    namespace_with_pool(lab, "t-cond", "198.18.29.0/29")?;
    lab.apply(&lb("t-cond", "web", &[]))?;
    wait_ips(lab, "t-cond", "web")?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        use ferrolb_controller::allocator::ServiceKey;
        use ferrolb_controller::plan::{SERVICE_CONDITION, ServiceWrite};
        use k8s_openapi::api::core::v1::Service;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
        use kube::api::{Patch, PatchParams};
        let client = lab.client().await?;
        let api: kube::Api<Service> = kube::Api::namespaced(client.clone(), "t-cond");
        // Another controller adds its condition after our (stale) read.
        let theirs = serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "t-cond"},
            "status": {"conditions": [{
                "type": "example.com/Healthy", "status": "True", "reason": "Probed",
                "message": "another controller's view", "lastTransitionTime": "2026-01-01T00:00:00Z",
            }]},
        });
        api.patch_status("web", &PatchParams::apply("example-controller").force(), &Patch::Apply(&theirs))
            .await?;
        // Our write, planned before that condition existed.
        let ours = Condition {
            type_: SERVICE_CONDITION.into(),
            status: "False".into(),
            reason: "InvalidRequest".into(),
            message: "planned from a stale cache".into(),
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
            observed_generation: None,
        };
        let writer = ferrolb_controller::write::Writer::new(client, "test".into());
        writer
            .service(&ServiceWrite {
                key: ServiceKey::new("t-cond", "web"),
                ingress: None,
                condition: Some(Some(ours)),
                pool_annotation: None,
            })
            .await?;
        let svc = api.get("web").await?;
        let types: Vec<String> = svc
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.type_)
            .collect();
        ensure!(
            types.contains(&"example.com/Healthy".to_string())
                && types.contains(&SERVICE_CONDITION.to_string()),
            "conditions after our write: {types:?}"
        );
        anyhow::Ok(())
    })?;
    // And the controller repairs its own condition without touching theirs.
    wait_until(
        "our condition to be ours again",
        Duration::from_secs(40),
        || Ok(condition(lab, "t-cond", "web")? == "True Allocated"),
    )?;
    let all = lab.field("svc", "t-cond", "web", "{.status.conditions[*].type}")?;
    ensure!(all.contains("example.com/Healthy"), "{all}");
    Ok(())
}

fn bad_annotation_keeps_its_ip_across_a_restart(lab: &Lab) -> Result<()> {
    namespace_with_pool(lab, "t-bad", "198.18.30.0/29")?;
    lab.apply(&lb("t-bad", "web", &[]))?;
    ensure!(wait_ips(lab, "t-bad", "web")? == ["198.18.30.0"]);
    lab.apply(&lb(
        "t-bad",
        "web",
        &[("ferrolb.io/loadBalancerIPs", "not-an-ip")],
    ))?;
    wait_event(lab, "t-bad", "web", &["AllocationFailed", "not-an-ip"])?;
    cli(lab, &["kill", "controller"])?;
    cli(lab, &["start", "controller"])?;
    lab_controller_leads(lab)?;
    // A Service that asks for the held IP must be refused: it stays reserved.
    lab.apply(&lb(
        "t-bad",
        "thief",
        &[("ferrolb.io/loadBalancerIPs", "198.18.30.0")],
    ))?;
    wait_event(
        lab,
        "t-bad",
        "thief",
        &["AllocationFailed", "198.18.30.0 is in use by t-bad/web"],
    )?;
    // Long enough for a lost IP to show: the restarted leader has written.
    std::thread::sleep(Duration::from_secs(3));
    ensure!(
        ips(lab, "t-bad", "web")? == ["198.18.30.0"],
        "the restart took the IP of a Service with a bad annotation"
    );
    ensure!(ips(lab, "t-bad", "thief")?.is_empty());
    ensure!(condition(lab, "t-bad", "web")? == "False InvalidRequest");
    Ok(())
}

fn bulk_services_survive_a_restart(lab: &Lab) -> Result<()> {
    namespace_with_pool(lab, "t-bulk", "198.18.12.0/22")?;
    let docs: Vec<String> = (0..BULK)
        .map(|i| lb("t-bulk", &format!("s{i:04}"), &[]))
        .collect();
    let created = Instant::now();
    let out = lab.kubectl_with_input(&["create", "-f", "-"], &docs.join("---\n"))?;
    ensure!(
        out.status.success(),
        "creating {BULK} Services: {}",
        common::text(&out.stderr)
    );
    let bulk_ips = || -> Result<BTreeMap<String, String>> {
        let out = lab.kubectl_ok(&["get", "svc", "-n", "t-bulk", "-o", "jsonpath={range .items[*]}{.metadata.name} {.status.loadBalancer.ingress[0].ip}{\"\\n\"}{end}"])?;
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
        created.elapsed().as_secs_f64()
    );
    let before = bulk_ips()?;
    ensure!(
        before.values().collect::<BTreeSet<_>>().len() == BULK,
        "bulk IPs are distinct"
    );
    // SIGKILL, then start again under the same identity: it takes its own
    // Lease back at once instead of waiting for it to expire.
    cli(lab, &["kill", "controller"])?;
    cli(lab, &["start", "controller"])?;
    let started = Instant::now();
    lab.apply(&lb("t-bulk", "after-restart", &[]))?;
    wait_ips_within(lab, "t-bulk", "after-restart", Duration::from_secs(30))?;
    let first_ip = started.elapsed();
    eprintln!(
        "    after SIGKILL and restart, a new Service got its IP {:.1}s after the start",
        first_ip.as_secs_f64()
    );
    ensure!(
        first_ip <= Duration::from_secs(5),
        "a new Service waited {first_ip:?} after the restart (target 5 s)"
    );
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
    Ok(())
}

fn apiserver_restart_mid_creation(lab: &Lab) -> Result<()> {
    namespace_with_pool(lab, "t-churn", "198.18.16.0/26")?;
    for i in 0..15 {
        lab.apply(&lb("t-churn", &format!("c{i:02}"), &[]))?;
    }
    cli(lab, &["restart-apiserver"])?;
    for i in 15..30 {
        let name = format!("c{i:02}");
        wait_until(
            "the API server to accept writes again",
            Duration::from_secs(60),
            || Ok(lab.apply(&lb("t-churn", &name, &[])).is_ok()),
        )?;
    }
    for i in 0..30 {
        wait_ips(lab, "t-churn", &format!("c{i:02}"))?;
    }
    let distinct = assert_no_duplicates(lab)?;
    eprintln!("    {distinct} distinct LoadBalancer IPs in the cluster, no unlawful duplicate");
    Ok(())
}

fn standby_takes_over_a_killed_leader(lab: &Lab) -> Result<()> {
    lab_controller_leads(lab)?;
    namespace(lab, "t-kill")?;
    let standby = TestController::start(lab, "standby", 7492, Connection::Direct)?;
    standby.wait_synced()?;
    cli(lab, &["kill", "controller"])?;
    let killed = Instant::now();
    lab.apply(&lb("t-kill", "after-failover", &[]))?;
    wait_ips_within(lab, "t-kill", "after-failover", Duration::from_secs(30))?;
    let failover = killed.elapsed();
    ensure!(standby.leading(), "the standby leads now");
    eprintln!(
        "    a new Service got its IP {:.1}s after the leader was SIGKILLed (lease 15 s)",
        failover.as_secs_f64()
    );
    ensure!(
        failover < Duration::from_secs(20),
        "takeover took {failover:?}"
    );
    drop(standby);
    lab_controller_leads(lab)
}

fn standby_leads_soon_after_leader_sigterm(lab: &Lab) -> Result<()> {
    lab_controller_leads(lab)?;
    let standby = TestController::start(lab, "standby", 7492, Connection::Direct)?;
    standby.wait_synced()?;
    let watcher = LeaderWatch::start(vec![
        ("lab".into(), LAB_CONTROLLER_METRICS.into()),
        ("standby".into(), standby.metrics.clone()),
    ]);
    let sent = Instant::now();
    let said = cli(lab, &["stop", "controller"])?;
    eprintln!("    {}", said.trim());
    wait_until("the standby to lead", Duration::from_secs(10), || {
        Ok(standby.leading())
    })?;
    let flips = watcher.stop();
    let lab_lost = flips
        .lost("lab")
        .context("the lab controller never stopped leading")?;
    let standby_won = flips.won("standby").context("the standby never led")?;
    let takeover = standby_won.saturating_duration_since(sent);
    eprintln!(
        "    the standby led {:.2}s after the leader's SIGTERM (the old leader stopped at +{:.2}s)",
        takeover.as_secs_f64(),
        lab_lost.saturating_duration_since(sent).as_secs_f64()
    );
    ensure!(lab_lost <= standby_won, "two leaders: {flips:?}");
    ensure!(
        takeover <= Duration::from_secs(2),
        "the standby took {takeover:?} (target 2 s)"
    );
    ensure!(lease_holder(lab)? == "standby");
    drop(standby);
    lab_controller_leads(lab)
}

/// A leader whose connection to the API server is cut (a forwarder that
/// stops forwarding: requests hang) must stop writing before the standby
/// takes over.
fn leader_cut_off_stops_before_standby_starts(lab: &Lab) -> Result<()> {
    // Hand the Lease over at once, so the leader under test leads.
    cli(lab, &["stop", "controller"])?;
    let link = Blackhole::start()?;
    let leader = TestController::start(lab, "cut-leader", 7494, Connection::Through(link.port))?;
    wait_until("the test leader to lead", Duration::from_secs(30), || {
        Ok(leader.leading())
    })?;
    let standby = TestController::start(lab, "standby", 7492, Connection::Direct)?;
    standby.wait_synced()?;
    let watcher = LeaderWatch::start(vec![
        ("leader".into(), leader.metrics.clone()),
        ("standby".into(), standby.metrics.clone()),
    ]);
    let cut = Instant::now();
    link.cut();
    wait_until("the standby to lead", Duration::from_secs(40), || {
        Ok(standby.leading())
    })?;
    let flips = watcher.stop();
    let lost = flips
        .lost("leader")
        .context("the cut-off leader never stopped leading")?;
    let won = flips.won("standby").context("the standby never led")?;
    eprintln!(
        "    cut-off leader stopped at +{:.1}s, standby led at +{:.1}s",
        lost.saturating_duration_since(cut).as_secs_f64(),
        won.saturating_duration_since(cut).as_secs_f64()
    );
    ensure!(lost < won, "two leaders at once: {flips:?}");
    namespace(lab, "t-cut")?;
    lab.apply(&lb("t-cut", "during-cut", &[]))?;
    wait_ips(lab, "t-cut", "during-cut")?;
    drop(leader);
    drop(standby);
    lab_controller_leads(lab)
}

/// A leader that may still write Services but may no longer touch its
/// Lease (its RoleBinding removed) must stop writing before the standby
/// takes over: nothing from it reaches the API server afterwards.
fn leader_with_forbidden_lease_stops_writing(lab: &Lab) -> Result<()> {
    let sa = "ferrolb-controller-fenced";
    let ns = components::NAMESPACE;
    lab.apply(&format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {sa}, namespace: {ns}}}\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {{name: {sa}}}\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: ferrolb-controller}}\nsubjects: [{{kind: ServiceAccount, name: {sa}, namespace: {ns}}}]\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: {sa}-leases, namespace: {ns}}}\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: ferrolb-leases}}\nsubjects: [{{kind: ServiceAccount, name: {sa}, namespace: {ns}}}]\n"
    ))?;
    cli(lab, &["stop", "controller"])?;
    let leader = TestController::start(lab, "fenced-leader", 7494, Connection::ServiceAccount(sa))?;
    wait_until("the test leader to lead", Duration::from_secs(30), || {
        Ok(leader.leading())
    })?;
    let standby = TestController::start(lab, "standby", 7492, Connection::Direct)?;
    standby.wait_synced()?;
    namespace_with_pool(lab, "t-fence", "198.18.31.0/28")?;
    let watcher = LeaderWatch::start(vec![
        ("leader".into(), leader.metrics.clone()),
        ("standby".into(), standby.metrics.clone()),
    ]);
    let revoked = Instant::now();
    lab.kubectl_ok(&["delete", "rolebinding", &format!("{sa}-leases"), "-n", ns])?;
    // Keep creating Services while leadership changes hands.
    let mut created = Vec::new();
    while !standby.leading() && revoked.elapsed() < Duration::from_secs(40) {
        let name = format!("svc-{}", created.len());
        lab.apply(&lb("t-fence", &name, &[]))?;
        created.push(name);
        std::thread::sleep(Duration::from_millis(500));
    }
    let flips = watcher.stop();
    let lost = flips
        .lost("leader")
        .context("the fenced leader never stopped leading")?;
    let won = flips.won("standby").context("the standby never led")?;
    ensure!(lost < won, "two leaders at once: {flips:?}");
    let writes_after_loss = metric(&leader.metrics, "ferrolb_api_writes_total");
    for name in &created {
        wait_ips(lab, "t-fence", name)?;
    }
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        metric(&leader.metrics, "ferrolb_api_writes_total") == writes_after_loss,
        "the fenced leader kept writing after its term ended"
    );
    eprintln!(
        "    Lease write forbidden: the leader stopped at +{:.1}s, the standby led at +{:.1}s; {} Services created meanwhile all got IPs",
        lost.saturating_duration_since(revoked).as_secs_f64(),
        won.saturating_duration_since(revoked).as_secs_f64(),
        created.len()
    );
    drop(leader);
    drop(standby);
    lab_controller_leads(lab)
}

fn no_unlawful_duplicates_at_the_end(lab: &Lab) -> Result<()> {
    lab_controller_leads(lab)?;
    assert_no_duplicates(lab).map(drop)
}

// ---- the duplicate check ----

/// One LoadBalancer Service as far as IP sharing goes.
#[derive(Debug)]
struct Holder {
    service: String,
    key: Option<String>,
    local_selector: Option<String>,
    ports: Vec<(String, i64)>,
}

/// No IP is held by two Services unless MetalLB's sharing rules allow it:
/// the same key (under any annotation name we accept), no (protocol, port)
/// used twice, and the same selector under `externalTrafficPolicy: Local`.
fn assert_no_duplicates(lab: &Lab) -> Result<usize> {
    let out = lab.kubectl_ok(&["get", "svc", "-A", "-o", "json"])?;
    let list: serde_json::Value = serde_json::from_str(&out)?;
    let mut by_ip: BTreeMap<String, Vec<Holder>> = BTreeMap::new();
    for svc in list["items"].as_array().into_iter().flatten() {
        let meta = &svc["metadata"];
        let annotations: BTreeMap<String, String> =
            serde_json::from_value(meta["annotations"].clone()).unwrap_or_default();
        let spec = &svc["spec"];
        let local = spec["externalTrafficPolicy"] == "Local";
        for ingress in svc["status"]["loadBalancer"]["ingress"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let Some(ip) = ingress["ip"].as_str() else {
                continue;
            };
            by_ip.entry(ip.to_string()).or_default().push(Holder {
                service: format!(
                    "{}/{}",
                    meta["namespace"].as_str().unwrap_or(""),
                    meta["name"].as_str().unwrap_or("")
                ),
                key: ALLOW_SHARED_IP_ALIASES
                    .lookup(&annotations)
                    .map(|(_, v)| v.to_string()),
                local_selector: local.then(|| spec["selector"].to_string()),
                ports: spec["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| {
                        (
                            p["protocol"].as_str().unwrap_or("TCP").to_string(),
                            p["port"].as_i64().unwrap_or(0),
                        )
                    })
                    .collect(),
            });
        }
    }
    for (ip, users) in &by_ip {
        if users.len() < 2 {
            continue;
        }
        let names: Vec<&str> = users.iter().map(|u| u.service.as_str()).collect();
        let keys: BTreeSet<&Option<String>> = users.iter().map(|u| &u.key).collect();
        ensure!(
            keys.len() == 1 && !keys.contains(&None),
            "{ip} is held by {names:?} without one common sharing key: {users:?}"
        );
        let mut seen = BTreeSet::new();
        for u in users {
            for p in &u.ports {
                ensure!(
                    seen.insert(p.clone()),
                    "{ip}: port {p:?} used twice: {users:?}"
                );
            }
        }
        let locals: BTreeSet<&Option<String>> = users.iter().map(|u| &u.local_selector).collect();
        ensure!(
            locals.len() == 1,
            "{ip}: externalTrafficPolicy Local with different selectors: {users:?}"
        );
    }
    Ok(by_ip.len())
}

// ---- controllers the tests run themselves ----

enum Connection {
    /// Straight to the API server, as the lab's controller.
    Direct,
    /// Through a local forwarder that the test can cut.
    Through(u16),
    /// Directly, but as this ServiceAccount.
    ServiceAccount(&'static str),
}

/// One more controller replica, with its own identity and metrics port.
struct TestController {
    child: Child,
    metrics: String,
}

impl TestController {
    fn start(lab: &Lab, identity: &str, port: u16, via: Connection) -> Result<Self> {
        let lab_kubeconfig = lab.state().kubeconfig("ferrolb-controller");
        let text = std::fs::read_to_string(&lab_kubeconfig)
            .with_context(|| format!("reading {}", lab_kubeconfig.display()))?;
        let kubeconfig = match via {
            Connection::Direct => lab_kubeconfig,
            Connection::Through(local) => {
                let path = lab.state().kubeconfig(&format!("{identity}-cut"));
                let server = ferrolb_lab::kubeconfig::server_url();
                std::fs::write(
                    &path,
                    text.replace(&server, &format!("https://127.0.0.1:{local}")),
                )?;
                path
            }
            Connection::ServiceAccount(sa) => {
                let token =
                    lab.kubectl_ok(&["create", "token", sa, "-n", components::NAMESPACE])?;
                let path = lab.state().kubeconfig(sa);
                let who = format!("system:serviceaccount:{}:{sa}", components::NAMESPACE);
                let ca = lab.state().certs().join("ca.crt");
                std::fs::write(
                    &path,
                    ferrolb_lab::kubeconfig::render(
                        &who,
                        &ca,
                        &ferrolb_lab::kubeconfig::Credentials::Token(token.trim()),
                    ),
                )?;
                path
            }
        };
        let bin = std::path::Path::new(env!("CARGO_BIN_EXE_ferrolb-lab"))
            .with_file_name("ferrolb-controller");
        let metrics = format!("198.18.0.1:{port}");
        let log = std::fs::File::create(lab.state().log(&format!("test-controller-{identity}")))?;
        let child = Command::new(&bin)
            .args(["--kubeconfig", &kubeconfig.display().to_string()])
            .args(["--metrics-addr", &metrics])
            .args(["--health-addr", &format!("198.18.0.1:{}", port + 1)])
            .args(["--identity", identity])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self { child, metrics })
    }

    fn leading(&self) -> bool {
        metric(&self.metrics, "ferrolb_leader") == Some(1.0)
    }

    /// Waits until it serves metrics as a synced standby.
    fn wait_synced(&self) -> Result<()> {
        wait_until(
            "the test controller to stand by",
            Duration::from_secs(30),
            || Ok(metric(&self.metrics, "ferrolb_leader") == Some(0.0)),
        )?;
        Ok(())
    }
}

impl Drop for TestController {
    /// A graceful stop (SIGTERM): it hands its Lease over if it holds one.
    fn drop(&mut self) {
        ferrolb_lab::process::signal(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls each controller's `ferrolb_leader` every 20 ms and records when
/// it changed, to order "stopped leading" against "started leading".
struct LeaderWatch {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Flips>,
}

#[derive(Debug, Default)]
struct Flips(Vec<(String, Instant, bool)>);

impl Flips {
    fn lost(&self, who: &str) -> Option<Instant> {
        self.0
            .iter()
            .find(|(w, _, l)| w == who && !l)
            .map(|(_, t, _)| *t)
    }
    fn won(&self, who: &str) -> Option<Instant> {
        self.0
            .iter()
            .find(|(w, _, l)| w == who && *l)
            .map(|(_, t, _)| *t)
    }
}

impl LeaderWatch {
    fn start(controllers: Vec<(String, String)>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (first_done, first_seen) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            let mut last: BTreeMap<String, bool> = BTreeMap::new();
            let mut flips = Flips::default();
            loop {
                // Read the flag first: the round after it is set is the last.
                let last_round = flag.load(Ordering::SeqCst);
                for (who, addr) in &controllers {
                    // A process that no longer answers does not lead.
                    let leading = metric(addr, "ferrolb_leader") == Some(1.0);
                    if last
                        .insert(who.clone(), leading)
                        .is_some_and(|was| was != leading)
                    {
                        flips.0.push((who.clone(), Instant::now(), leading));
                    }
                }
                // The caller acts only after every controller has been seen
                // once: a change it causes at once is then seen as a change.
                let _ = first_done.send(());
                if last_round {
                    return flips;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let _ = first_seen.recv_timeout(Duration::from_secs(10));
        Self { stop, handle }
    }

    fn stop(self) -> Flips {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().unwrap_or_default()
    }
}

/// A TCP forwarder to the API server that can be cut: afterwards it keeps
/// every connection open but forwards nothing, so requests hang as they do
/// behind a broken network.
struct Blackhole {
    port: u16,
    cut: Arc<AtomicBool>,
}

impl Blackhole {
    fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let cut = Arc::new(AtomicBool::new(false));
        let flag = cut.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let flag = flag.clone();
                std::thread::spawn(move || {
                    let upstream = match TcpStream::connect(("198.18.0.1", 6443)) {
                        Ok(s) => s,
                        Err(_) => return,
                    };
                    let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else {
                        return;
                    };
                    let f2 = flag.clone();
                    std::thread::spawn(move || pump(c2, u2, &f2));
                    pump(upstream, client, &flag);
                });
            }
        });
        Ok(Self { port, cut })
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until the link is cut; then swallows everything,
/// keeping both ends open.
fn pump(mut from: TcpStream, mut to: TcpStream, cut: &AtomicBool) {
    let mut buf = [0u8; 16384];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if !cut.load(Ordering::SeqCst) && to.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}
