//! The exposition carries kube-proxy's names, types, label sets and bucket
//! bounds, and ours under `ferrolb_proxy_`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use ferrolb_proxy::metrics::{KubeProxyMetrics, network_programming_buckets, programming_latency};
use ferrolb_proxy::ruleset::Family;
use prometheus_client::registry::Registry;

/// One parsed sample line.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

fn parse_sample(line: &str) -> Sample {
    let (series, value) = line.rsplit_once(' ').expect("value");
    let (name, labels) = match series.split_once('{') {
        None => (series, Vec::new()),
        Some((name, rest)) => {
            let inner = rest.strip_suffix('}').expect("closing brace");
            let labels = inner
                .split(',')
                .map(|kv| {
                    let (k, v) = kv.split_once('=').expect("label");
                    (k.to_string(), v.trim_matches('"').to_string())
                })
                .collect();
            (name, labels)
        }
    };
    Sample {
        name: name.to_string(),
        labels,
        value: value.parse().expect("number"),
    }
}

struct Exposition {
    /// Family name → type, from the `# TYPE` lines.
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

fn expose(use_all: bool) -> (Exposition, KubeProxyMetrics) {
    let mut unprefixed = Registry::default();
    let mut ours = ferrolb_runtime::metrics::registry("proxy");
    let m = KubeProxyMetrics::register(&mut unprefixed, &mut ours);
    if use_all {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        m.observe_sync(Family::V4, true, Duration::from_millis(3));
        m.observe_sync(Family::V4, false, Duration::from_millis(1));
        m.sync_succeeded(Family::V4, now);
        m.sync_queued(Family::V4, now);
        m.observe_trigger_time(
            Family::V4,
            now - Duration::from_secs(60),
            "2023-11-14T22:13:18.5Z",
            now,
        );
        m.service_changed();
        m.endpoints_changed();
        m.set_pending(2, 1);
        m.set_no_local_endpoints(Family::V4, 1, 2);
        m.nftables_sync_failed(Family::V4);
        m.nftables_cleanup_failed(Family::V4);
        m.probes().healthz(200);
        m.probes().livez(503);
        m.full_resync("startup");
        m.set_ruleset_size(Family::V4, 7, 100);
        m.observe_transaction(1000);
        m.conntrack_deleted(Family::V4, 3);
    }
    let text = ferrolb_runtime::metrics::encode(&[&ours, &unprefixed]);
    let mut types = BTreeMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').expect("type");
            types.insert(name.to_string(), ty.to_string());
        } else if !line.starts_with('#') {
            samples.push(parse_sample(line));
        }
    }
    (Exposition { types, samples }, m)
}

const EXP: &[f64] = &[
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096,
    8.192, 16.384,
];

/// (family name, type, label names other than `le`).
const EXPECTED: &[(&str, &str, &[&str])] = &[
    (
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "histogram",
        &["ip_family"],
    ),
    (
        "kubeproxy_sync_full_proxy_rules_duration_seconds",
        "histogram",
        &["ip_family"],
    ),
    (
        "kubeproxy_sync_partial_proxy_rules_duration_seconds",
        "histogram",
        &["ip_family"],
    ),
    (
        "kubeproxy_network_programming_duration_seconds",
        "histogram",
        &["ip_family"],
    ),
    (
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "gauge",
        &["ip_family"],
    ),
    (
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        "gauge",
        &["ip_family"],
    ),
    (
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
        "gauge",
        &[],
    ),
    (
        "kubeproxy_sync_proxy_rules_endpoint_changes",
        "counter",
        &[],
    ),
    (
        "kubeproxy_sync_proxy_rules_service_changes_pending",
        "gauge",
        &[],
    ),
    ("kubeproxy_sync_proxy_rules_service_changes", "counter", &[]),
    (
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
        "gauge",
        &["ip_family", "traffic_policy"],
    ),
    (
        "kubeproxy_sync_proxy_rules_nftables_sync_failures",
        "counter",
        &["ip_family"],
    ),
    (
        "kubeproxy_sync_proxy_rules_nftables_cleanup_failures",
        "counter",
        &["ip_family"],
    ),
    ("kubeproxy_proxy_healthz", "counter", &["code"]),
    ("kubeproxy_proxy_livez", "counter", &["code"]),
    ("ferrolb_build_info", "gauge", &["component", "version"]),
    ("ferrolb_proxy_full_resyncs", "counter", &["reason"]),
    ("ferrolb_proxy_ruleset_elements", "gauge", &["ip_family"]),
    ("ferrolb_proxy_ruleset_chains", "gauge", &["ip_family"]),
    ("ferrolb_proxy_transaction_bytes", "histogram", &[]),
    ("ferrolb_proxy_conntrack_deleted", "counter", &["ip_family"]),
];

/// The sample names a family of `ty` produces.
fn sample_names(family: &str, ty: &str) -> Vec<String> {
    match ty {
        "counter" => vec![format!("{family}_total")],
        "histogram" => ["_bucket", "_sum", "_count"]
            .iter()
            .map(|s| format!("{family}{s}"))
            .collect(),
        _ => vec![family.to_string()],
    }
}

#[test]
fn names_types_and_label_sets_are_kube_proxys() {
    let (e, _) = expose(true);
    let expected_types: BTreeMap<String, String> = EXPECTED
        .iter()
        .map(|(n, t, _)| (n.to_string(), t.to_string()))
        .collect();
    assert_eq!(e.types, expected_types);

    let mut by_sample = BTreeMap::new();
    for (family, ty, labels) in EXPECTED {
        for name in sample_names(family, ty) {
            let labels: BTreeSet<&str> = labels.iter().copied().collect();
            by_sample.insert(name, labels);
        }
    }
    let mut seen = BTreeSet::new();
    for s in &e.samples {
        let want = by_sample
            .get(&s.name)
            .unwrap_or_else(|| panic!("unexpected sample {}", s.name));
        let mut got: BTreeSet<&str> = s.labels.iter().map(|(k, _)| k.as_str()).collect();
        if s.name.ends_with("_bucket") {
            assert!(got.remove("le"), "{} without le", s.name);
        }
        assert_eq!(&got, want, "labels of {}", s.name);
        for (k, v) in &s.labels {
            match k.as_str() {
                "ip_family" => assert!(v == "IPv4" || v == "IPv6", "{v}"),
                "traffic_policy" => assert!(v == "internal" || v == "external", "{v}"),
                "code" => assert!(v == "200" || v == "503", "{v}"),
                _ => {}
            }
        }
        seen.insert(s.name.clone());
    }
    let all: BTreeSet<String> = by_sample.keys().cloned().collect();
    assert_eq!(
        seen, all,
        "every metric was used once, so every sample shows"
    );
}

fn bounds(e: &Exposition, bucket_name: &str) -> Vec<f64> {
    let mut out = Vec::new();
    for s in e.samples.iter().filter(|s| s.name == bucket_name) {
        let le = &s.labels.iter().find(|(k, _)| k == "le").expect("le").1;
        if le != "+Inf" {
            out.push(le.parse().expect("bound"));
        }
    }
    out
}

#[test]
fn bucket_bounds_are_kube_proxys() {
    let (e, _) = expose(true);
    for h in [
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
        "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket",
        "kubeproxy_sync_partial_proxy_rules_duration_seconds_bucket",
    ] {
        assert_eq!(bounds(&e, h), EXP, "{h}");
    }

    let mut np = vec![0.0, 0.25, 0.5];
    np.extend((1..=59).map(f64::from));
    np.extend((0..12).map(|i| f64::from(60 + 5 * i)));
    np.extend((0..7).map(|i| f64::from(120 + 30 * i)));
    assert_eq!(np.len(), 81);
    assert_eq!(network_programming_buckets(), np);
    assert_eq!(
        bounds(&e, "kubeproxy_network_programming_duration_seconds_bucket"),
        np
    );
    assert_eq!(np.last(), Some(&300.0));

    let bytes = bounds(&e, "ferrolb_proxy_transaction_bytes_bucket");
    assert_eq!(bytes.first(), Some(&256.0));
    assert_eq!(bytes.last(), Some(&1_073_741_824.0));
}

fn value(e: &Exposition, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    e.samples
        .iter()
        .find(|s| {
            s.name == name
                && s.labels.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
        })
        .map(|s| s.value)
}

#[test]
fn the_typed_methods_set_what_they_say() {
    let (e, _) = expose(true);
    let v4 = [("ip_family", "IPv4")];
    assert_eq!(
        value(&e, "kubeproxy_sync_proxy_rules_duration_seconds_count", &v4),
        Some(2.0)
    );
    assert_eq!(
        value(
            &e,
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
            &v4
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &e,
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_sum",
            &v4
        ),
        Some(0.001)
    );
    assert_eq!(
        value(&e, "kubeproxy_sync_proxy_rules_last_timestamp_seconds", &v4),
        Some(1_700_000_000.0)
    );
    // Triggered 1.5 s before the sync (1_699_999_998.5).
    assert_eq!(
        value(
            &e,
            "kubeproxy_network_programming_duration_seconds_sum",
            &v4
        ),
        Some(1.5)
    );
    assert_eq!(
        value(
            &e,
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            &[]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &e,
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            &[]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &e,
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            &[("ip_family", "IPv4"), ("traffic_policy", "external")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(&e, "ferrolb_proxy_ruleset_elements", &v4),
        Some(100.0)
    );
    assert_eq!(value(&e, "ferrolb_proxy_ruleset_chains", &v4), Some(7.0));
    assert_eq!(
        value(&e, "ferrolb_proxy_conntrack_deleted_total", &v4),
        Some(3.0)
    );
}

#[test]
fn init_families_creates_zero_series() {
    let mut unprefixed = Registry::default();
    let mut ours = Registry::default();
    let m = KubeProxyMetrics::register(&mut unprefixed, &mut ours);
    m.init_families(&[Family::V4, Family::V6]);
    let text = ferrolb_runtime::metrics::encode(&[&ours, &unprefixed]);
    for line in [
        r#"kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family="IPv6"} 0"#,
        r#"kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total{ip_family="IPv4"} 0"#,
        r#"kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family="IPv6",traffic_policy="internal"} 0"#,
        r#"proxy_conntrack_deleted_total{ip_family="IPv4"} 0"#,
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
    }
}

#[test]
fn trigger_times() {
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let now = start + Duration::from_secs(10);
    // 2023-11-14T22:13:20Z is `start`.
    assert_eq!(
        programming_latency(start, "2023-11-14T22:13:25.25Z", now),
        Some(4.75)
    );
    assert_eq!(
        programming_latency(start, "2023-11-14T23:13:25+01:00", now),
        Some(5.0)
    );
    // From before this proxy started: not a latency it caused.
    assert_eq!(
        programming_latency(start, "2023-11-14T22:13:20Z", now),
        None
    );
    assert_eq!(
        programming_latency(start, "2023-11-14T22:00:00Z", now),
        None
    );
    for junk in ["", "yesterday", "2023-11-14", "1700000005"] {
        assert_eq!(programming_latency(start, junk, now), None, "{junk:?}");
    }
    // The apiserver's clock ahead of ours.
    assert_eq!(
        programming_latency(start, "2023-11-14T22:13:32Z", now),
        Some(-2.0)
    );
}

#[test]
fn nothing_shows_for_families_never_used() {
    let (e, _) = expose(false);
    assert!(
        e.samples
            .iter()
            .all(|s| !s.labels.iter().any(|(k, _)| k == "ip_family")),
        "a family series before any use"
    );
}

#[test]
fn unusable_trigger_times_observe_nothing() {
    let mut unprefixed = Registry::default();
    let mut ours = Registry::default();
    let m = KubeProxyMetrics::register(&mut unprefixed, &mut ours);
    let now = SystemTime::now();
    m.observe_trigger_time(Family::V6, now, "not a time", now);
    m.observe_trigger_time(Family::V6, now, "2000-01-01T00:00:00Z", now);
    let text = ferrolb_runtime::metrics::encode(&[&ours, &unprefixed]);
    assert!(
        !text.contains("network_programming_duration_seconds_count"),
        "{text}"
    );
}
