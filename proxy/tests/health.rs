//! kube-proxy's health surfaces: the pure answers with fixed clocks, then
//! the real servers on loopback.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ferrolb_proxy::health::{
    ProxierHealth, ServiceHealth, ServiceKey, Stamp, Wanted, node_eligible, serve_proxier,
    service_answer,
};
use ferrolb_proxy::metrics::{KubeProxyMetrics, ProbeCounters};
use ferrolb_proxy::ruleset::Family;
use hyper::StatusCode;
use k8s_openapi::api::core::v1::{Node, NodeSpec, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const PERIOD: Duration = Duration::from_secs(30); // timeout 60 s

/// A fixed clock: `at(s)` is `s` seconds after 2024-05-01T10:00:00Z (on
/// the wall) and after a fixed monotonic origin.
struct Clock {
    origin: Instant,
}

impl Clock {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }

    fn at(&self, secs: f64) -> Stamp {
        let d = Duration::from_secs_f64(secs);
        Stamp {
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_714_557_600) + d,
            mono: self.origin + d,
        }
    }
}

fn health() -> Arc<ProxierHealth> {
    ProxierHealth::new(PERIOD, ProbeCounters::default())
}

#[test]
fn startup_is_healthy_and_reports_now() {
    let c = Clock::new();
    let h = health();
    let (code, body) = h.healthz(c.at(1.5));
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        body,
        r#"{"lastUpdated":"2024-05-01T10:00:01.5Z","currentTime":"2024-05-01T10:00:01.5Z","nodeEligible":true,"healthy":true}"#
    );
    let (code, body) = h.livez(c.at(0.0));
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        body,
        r#"{"lastUpdated":"2024-05-01T10:00:00Z","currentTime":"2024-05-01T10:00:00Z","healthy":true}"#
    );
}

#[test]
fn a_change_queued_before_the_first_sync_never_makes_it_unhealthy() {
    // kube-proxy judges only families that have synced once; the sync loop
    // marks itself updated when it starts.
    let c = Clock::new();
    let h = health();
    h.queued_at(Family::V4, c.at(0.0));
    assert_eq!(h.livez(c.at(3600.0)).0, StatusCode::OK);
}

#[test]
fn late_once_the_oldest_queued_change_is_twice_the_sync_period_old() {
    let c = Clock::new();
    let h = health();
    h.updated_at(Family::V4, c.at(0.0));
    h.queued_at(Family::V4, c.at(10.0));
    // A second change does not restart the clock.
    h.queued_at(Family::V4, c.at(50.0));

    let (code, body) = h.healthz(c.at(69.999));
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        body,
        r#"{"lastUpdated":"2024-05-01T10:01:09.999Z","currentTime":"2024-05-01T10:01:09.999Z","nodeEligible":true,"healthy":true,"status":{"IPv4":{"lastUpdated":"2024-05-01T10:00:00Z","healthy":true}}}"#
    );

    let (code, body) = h.healthz(c.at(70.0));
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        body,
        r#"{"lastUpdated":"2024-05-01T10:00:00Z","currentTime":"2024-05-01T10:01:10Z","nodeEligible":true,"healthy":false,"status":{"IPv4":{"lastUpdated":"2024-05-01T10:00:00Z","healthy":false}}}"#
    );
    let (code, body) = h.livez(c.at(70.0));
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        body,
        r#"{"lastUpdated":"2024-05-01T10:00:00Z","currentTime":"2024-05-01T10:01:10Z","healthy":false,"status":{"IPv4":{"lastUpdated":"2024-05-01T10:00:00Z","healthy":false}}}"#
    );

    // A successful sync clears it.
    h.updated_at(Family::V4, c.at(71.0));
    assert_eq!(h.healthz(c.at(200.0)).0, StatusCode::OK);
    assert!(h.is_healthy(c.at(200.0)));
}

#[test]
fn one_late_family_makes_the_proxy_unhealthy() {
    let c = Clock::new();
    let h = health();
    h.updated_at(Family::V4, c.at(0.0));
    h.updated_at(Family::V6, c.at(5.0));
    h.queued_at(Family::V4, c.at(6.0));
    let health = h.health(c.at(100.0));
    assert!(!health.healthy);
    assert!(!health.families[&Family::V4].healthy);
    assert!(health.families[&Family::V6].healthy);
    let (code, body) = h.livez(c.at(100.0));
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    // lastUpdated is the newest of the families.
    assert_eq!(
        body,
        r#"{"lastUpdated":"2024-05-01T10:00:05Z","currentTime":"2024-05-01T10:01:40Z","healthy":false,"status":{"IPv4":{"lastUpdated":"2024-05-01T10:00:00Z","healthy":false},"IPv6":{"lastUpdated":"2024-05-01T10:00:05Z","healthy":true}}}"#
    );
    assert!(!h.is_healthy(c.at(100.0)));
}

#[test]
fn a_node_being_deleted_fails_healthz_but_not_livez() {
    let c = Clock::new();
    let h = health();
    h.updated_at(Family::V4, c.at(0.0));
    h.set_node_eligible(false);
    let (code, body) = h.healthz(c.at(1.0));
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        body,
        r#"{"lastUpdated":"2024-05-01T10:00:00Z","currentTime":"2024-05-01T10:00:01Z","nodeEligible":false,"healthy":true,"status":{"IPv4":{"lastUpdated":"2024-05-01T10:00:00Z","healthy":true}}}"#
    );
    assert_eq!(h.livez(c.at(1.0)).0, StatusCode::OK);
    // The service health checks ignore node eligibility.
    assert!(h.is_healthy(c.at(1.0)));
    h.set_node_eligible(true);
    assert_eq!(h.healthz(c.at(1.0)).0, StatusCode::OK);
}

#[test]
fn never_synced_prints_the_go_zero_time() {
    let c = Clock::new();
    let h = health();
    h.set_node_eligible(false);
    let (_, body) = h.healthz(c.at(0.000_000_001));
    assert_eq!(
        body,
        r#"{"lastUpdated":"0001-01-01T00:00:00Z","currentTime":"2024-05-01T10:00:00.000000001Z","nodeEligible":false,"healthy":true}"#
    );
}

#[test]
fn health_timeout_is_twice_the_sync_period() {
    assert_eq!(health().timeout(), Duration::from_secs(60));
}

fn node(deleting: bool, taints: &[&str]) -> Node {
    let mut n = Node::default();
    if deleting {
        n.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
    }
    n.spec = Some(NodeSpec {
        taints: Some(
            taints
                .iter()
                .map(|k| Taint {
                    key: k.to_string(),
                    effect: "NoSchedule".into(),
                    ..Default::default()
                })
                .collect(),
        ),
        ..Default::default()
    });
    n
}

#[test]
fn node_eligibility() {
    assert!(node_eligible(&Node::default()));
    assert!(node_eligible(&node(
        false,
        &["node.kubernetes.io/unschedulable"]
    )));
    assert!(!node_eligible(&node(true, &[])));
    assert!(!node_eligible(&node(
        false,
        &["a", "ToBeDeletedByClusterAutoscaler"]
    )));
}

#[test]
fn service_answer_is_kube_proxys_body_byte_for_byte() {
    let key = ServiceKey::new("default", "wp-nginx-service");
    let (code, body) = service_answer(&key, 1, true);
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        body,
        "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"wp-nginx-service\"\n\t},\n\t\"localEndpoints\": 1,\n\t\"serviceProxyHealthy\": true\n}"
    );
    // The same length a scan of a real kube-proxy's answer reports.
    assert_eq!(body.len(), 127);
    assert_eq!(
        service_answer(&key, 0, true).0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        service_answer(&key, 3, false).0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(
        service_answer(&key, 3, false)
            .1
            .contains("\"serviceProxyHealthy\": false")
    );
}

// ---- servers ----------------------------------------------------------

/// One HTTP/1.1 answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

/// Sends one request on `conn` (kept alive) and reads the answer.
async fn request(conn: &mut TcpStream, method: &str, path: &str) -> Answer {
    let req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n");
    conn.write_all(req.as_bytes()).await.expect("send");
    let mut buf = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 1024];
        let n = conn.read(&mut chunk).await.expect("read");
        assert!(n > 0, "connection closed before an answer");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).expect("utf-8 head");
    let mut lines = head.split("\r\n");
    let status = lines.next().expect("status line")[9..12]
        .parse()
        .expect("status");
    let headers: BTreeMap<String, String> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').expect("header");
            (k.to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    let len: usize = headers["content-length"].parse().expect("length");
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let mut chunk = [0u8; 1024];
        let n = conn.read(&mut chunk).await.expect("read body");
        assert!(n > 0, "connection closed inside the body");
        body.extend_from_slice(&chunk[..n]);
    }
    Answer {
        status,
        headers,
        body: String::from_utf8(body).expect("utf-8 body"),
    }
}

async fn get(addr: SocketAddr, path: &str) -> Answer {
    let mut conn = TcpStream::connect(addr).await.expect("connect");
    request(&mut conn, "GET", path).await
}

async fn refused(addr: SocketAddr) -> bool {
    TcpStream::connect(addr).await.is_err()
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind :0");
    l.local_addr().expect("local addr").port()
}

const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

#[tokio::test]
async fn proxier_server_answers_exactly_healthz_and_livez_and_counts() {
    let mut unprefixed = Registry::default();
    let mut ours = Registry::default();
    let metrics = KubeProxyMetrics::register(&mut unprefixed, &mut ours);
    let health = ProxierHealth::new(PERIOD, metrics.probes());
    let shutdown = CancellationToken::new();
    let (addr, serve) = serve_proxier(
        (Ipv4Addr::LOCALHOST, 0).into(),
        health.clone(),
        shutdown.clone(),
    )
    .await
    .expect("bind");
    let server = tokio::spawn(serve);

    let a = get(addr, "/healthz").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.headers["content-type"], "application/json");
    assert_eq!(a.headers["x-content-type-options"], "nosniff");
    assert!(a.body.starts_with(r#"{"lastUpdated":""#), "{}", a.body);
    assert!(
        a.body.ends_with(r#","nodeEligible":true,"healthy":true}"#),
        "{}",
        a.body
    );

    // Any method, as Go's handlers.
    let mut conn = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(request(&mut conn, "POST", "/livez").await.status, 200);
    health.set_node_eligible(false);
    assert_eq!(request(&mut conn, "GET", "/healthz").await.status, 503);
    assert_eq!(request(&mut conn, "GET", "/livez").await.status, 200);

    for path in ["/", "/healthz/", "/metrics", "/readyz"] {
        let a = get(addr, path).await;
        assert_eq!(a.status, 404, "{path}");
        assert_eq!(a.body, "404 page not found\n");
    }

    let text = ferrolb_runtime::metrics::encode(&[&ours, &unprefixed]);
    for line in [
        r#"kubeproxy_proxy_healthz_total{code="200"} 1"#,
        r#"kubeproxy_proxy_healthz_total{code="503"} 1"#,
        r#"kubeproxy_proxy_livez_total{code="200"} 2"#,
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
    }

    shutdown.cancel();
    server.await.expect("server task");
    assert!(refused(addr).await, "still listening after shutdown");
}

#[tokio::test]
async fn proxier_server_bind_failure_is_an_error() {
    let taken = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let addr = taken.local_addr().expect("addr");
    let err = match serve_proxier(addr, health(), CancellationToken::new()).await {
        Ok(_) => panic!("bound a taken port"),
        Err(e) => e,
    };
    assert_eq!(err.metric_label(), "bind");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

fn wanted(entries: &[(&str, u16, usize)]) -> BTreeMap<ServiceKey, Wanted> {
    entries
        .iter()
        .map(|(name, port, local_endpoints)| {
            (
                ServiceKey::new("ns", *name),
                Wanted {
                    port: *port,
                    local_endpoints: *local_endpoints,
                },
            )
        })
        .collect()
}

#[tokio::test]
async fn service_servers_follow_sync() {
    let proxier = health();
    let shutdown = CancellationToken::new();
    let servers = ServiceHealth::new(proxier.clone(), shutdown.clone());
    let (pa, pb, pa2) = (free_port(), free_port(), free_port());
    let a = SocketAddr::new(LO, pa);
    let b = SocketAddr::new(LO, pb);

    let failed = servers
        .sync(wanted(&[("a", pa, 2), ("b", pb, 0)]), &[LO])
        .await;
    assert!(failed.is_empty(), "{failed:?}");

    let ans = get(a, "/healthz").await;
    assert_eq!(ans.status, 200);
    assert_eq!(ans.headers["content-type"], "application/json");
    assert_eq!(ans.headers["x-content-type-options"], "nosniff");
    assert_eq!(ans.headers["x-load-balancing-endpoint-weight"], "2");
    assert_eq!(
        ans.body,
        "{\n\t\"service\": {\n\t\t\"namespace\": \"ns\",\n\t\t\"name\": \"a\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
    );
    // Any path and method.
    let mut conn_b = TcpStream::connect(b).await.expect("connect b");
    let ans = request(&mut conn_b, "POST", "/anything/at/all").await;
    assert_eq!(ans.status, 503);
    assert!(ans.body.contains("\"localEndpoints\": 0"), "{}", ans.body);

    // Counts change in place: the kept-alive connection survives, so the
    // socket was not re-bound.
    servers
        .sync(wanted(&[("a", pa, 2), ("b", pb, 1)]), &[LO])
        .await;
    let ans = request(&mut conn_b, "GET", "/healthz").await;
    assert_eq!(ans.status, 200);
    assert!(ans.body.contains("\"localEndpoints\": 1"), "{}", ans.body);

    // A port change re-binds; a removed Service stops answering.
    let failed = servers.sync(wanted(&[("a", pa2, 2)]), &[LO]).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert!(refused(a).await, "old port of a still open");
    assert!(refused(b).await, "removed b still open");
    assert_eq!(get(SocketAddr::new(LO, pa2), "/").await.status, 200);
    assert_eq!(
        servers.listening().await,
        BTreeMap::from([(ServiceKey::new("ns", "a"), pa2)])
    );

    shutdown.cancel();
    servers.close().await;
    assert!(
        refused(SocketAddr::new(LO, pa2)).await,
        "open after shutdown"
    );
    assert!(
        servers
            .sync(wanted(&[("c", pa, 1)]), &[LO])
            .await
            .is_empty()
    );
    assert!(refused(a).await, "opened after shutdown");
}

#[tokio::test]
async fn service_servers_answer_503_while_the_proxier_is_late() {
    let proxier = ProxierHealth::new(Duration::from_millis(20), ProbeCounters::default());
    let servers = ServiceHealth::new(proxier.clone(), CancellationToken::new());
    let port = free_port();
    servers.sync(wanted(&[("a", port, 1)]), &[LO]).await;
    let addr = SocketAddr::new(LO, port);
    assert_eq!(get(addr, "/healthz").await.status, 200);

    proxier.updated(Family::V4);
    proxier.queued(Family::V4);
    tokio::time::sleep(Duration::from_millis(60)).await;
    let ans = get(addr, "/healthz").await;
    assert_eq!(ans.status, 503);
    assert!(
        ans.body.ends_with("\"serviceProxyHealthy\": false\n}"),
        "{}",
        ans.body
    );
    servers.close().await;
}

#[tokio::test]
async fn a_failed_bind_is_reported_listens_nowhere_and_is_retried() {
    let servers = ServiceHealth::new(health(), CancellationToken::new());
    let taken = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let other = free_port();

    let failed = servers
        .sync(
            wanted(&[("a", port, 1), ("b", other, 1), ("z", 0, 1)]),
            &[LO],
        )
        .await;
    let names: Vec<&str> = failed.iter().map(|(k, _)| k.name.as_str()).collect();
    assert_eq!(names, ["a", "z"], "{failed:?}");
    assert!(failed[0].1.contains("ns/a"), "{}", failed[0].1);
    assert!(
        failed[0].1.contains(&format!("127.0.0.1:{port}")),
        "{}",
        failed[0].1
    );
    assert_eq!(
        servers.listening().await,
        BTreeMap::from([(ServiceKey::new("ns", "b"), other)])
    );

    drop(taken);
    let failed = servers
        .sync(wanted(&[("a", port, 1), ("b", other, 1)]), &[LO])
        .await;
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(get(SocketAddr::new(LO, port), "/").await.status, 200);
    servers.close().await;
}

#[tokio::test]
async fn a_change_of_listen_addresses_rebinds() {
    let servers = ServiceHealth::new(health(), CancellationToken::new());
    let port = free_port();
    let second: IpAddr = Ipv4Addr::new(127, 0, 0, 2).into();
    servers.sync(wanted(&[("a", port, 1)]), &[LO]).await;
    assert!(refused(SocketAddr::new(second, port)).await);
    let failed = servers
        .sync(wanted(&[("a", port, 1)]), &[second, LO, second])
        .await;
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(get(SocketAddr::new(LO, port), "/").await.status, 200);
    assert_eq!(get(SocketAddr::new(second, port), "/").await.status, 200);
    servers.sync(wanted(&[("a", port, 1)]), &[second]).await;
    assert!(refused(SocketAddr::new(LO, port)).await);
    servers.close().await;
}
