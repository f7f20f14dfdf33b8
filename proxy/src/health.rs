//! kube-proxy's two health surfaces.
//!
//! - [`ProxierHealth`] answers `/healthz` and `/livez` (default port
//!   10256). It is unhealthy once a queued change has waited longer than
//!   twice the sync period; `/healthz` is also 503 while our Node is being
//!   deleted, so cloud load balancers drain the node first.
//! - [`ServiceHealth`] runs one HTTP server per Service with
//!   `externalTrafficPolicy: Local` on its `healthCheckNodePort`, which
//!   load balancers probe to find the nodes with local endpoints.
//!
//! The answers are pure functions of the state and a given "now", tested
//! with fixed clocks; the servers around them are thin.
//!
//! Bodies follow the newest kube-proxy (the dual-stack health schema, with
//! per-family `status`): JSON from a Go struct, so times are RFC 3339 with
//! nanoseconds in UTC, as Go's `time.Time` marshals. Two differences,
//! neither visible to a parser: kube-proxy reads the clock twice for a
//! healthy answer (so its `lastUpdated` is a few microseconds after
//! `currentTime`) where we use one reading for both, and it prints times
//! in the process's local zone where we always print UTC (`Z`), which is
//! what it prints in a container.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use k8s_openapi::api::core::v1::Node;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::metrics::ProbeCounters;
pub use crate::model::ServiceKey;
use crate::ruleset::Family;

/// Taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// What can fail in this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr} for {what}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// A short, stable name for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Bind { .. } => "bind",
        }
    }
}

/// A moment, on both clocks: the wall clock is what the bodies print, the
/// monotonic one what ages are measured with (so a wall-clock step does not
/// make the proxy look hung or fresh — Go measures the same way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub wall: SystemTime,
    pub mono: Instant,
}

impl Stamp {
    pub fn now() -> Self {
        Self {
            wall: SystemTime::now(),
            mono: Instant::now(),
        }
    }
}

/// Whether our Node may receive traffic: not when it is being deleted or
/// the cluster autoscaler has marked it for deletion.
pub fn node_eligible(node: &Node) -> bool {
    node.metadata.deletion_timestamp.is_none()
        && !node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|ts| ts.iter().any(|t| t.key == TO_BE_DELETED_TAINT))
}

#[derive(Debug)]
struct ProxierState {
    last_updated: BTreeMap<Family, Stamp>,
    oldest_pending: BTreeMap<Family, Stamp>,
    node_eligible: bool,
}

/// The sync loop's health, shared (in an `Arc`) by the sync loop, the
/// `/healthz` server and the service health servers.
#[derive(Debug)]
pub struct ProxierHealth {
    timeout: Duration,
    probes: ProbeCounters,
    state: Mutex<ProxierState>,
}

/// One family's part of [`Health`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FamilyHealth {
    pub last_updated: SystemTime,
    pub healthy: bool,
}

/// The proxier's health at one moment, before node eligibility.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// No family has a queued change older than the timeout.
    pub healthy: bool,
    /// The most recent successful sync of any family; `None` before the
    /// first.
    pub last_updated: Option<SystemTime>,
    /// Families that have synced at least once.
    pub families: BTreeMap<Family, FamilyHealth>,
}

impl ProxierHealth {
    /// `sync_period` is kube-proxy's `--sync-period`: the health timeout is
    /// twice it. The node starts eligible, as in kube-proxy before it has
    /// seen its Node.
    pub fn new(sync_period: Duration, probes: ProbeCounters) -> Arc<Self> {
        Arc::new(Self {
            timeout: sync_period.saturating_mul(2),
            probes,
            state: Mutex::new(ProxierState {
                last_updated: BTreeMap::new(),
                oldest_pending: BTreeMap::new(),
                node_eligible: true,
            }),
        })
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn state(&self) -> MutexGuard<'_, ProxierState> {
        // Every update leaves the state whole, so a panic elsewhere while
        // holding the lock is no reason to stop answering probes.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A change for `family` is waiting for a sync.
    pub fn queued(&self, family: Family) {
        self.queued_at(family, Stamp::now());
    }

    /// [`queued`](Self::queued) at a given time; the oldest pending time is
    /// kept until the next successful sync.
    pub fn queued_at(&self, family: Family, at: Stamp) {
        self.state().oldest_pending.entry(family).or_insert(at);
    }

    /// A sync of `family` succeeded (also call it once when the sync loop
    /// starts, as kube-proxy does).
    pub fn updated(&self, family: Family) {
        self.updated_at(family, Stamp::now());
    }

    pub fn updated_at(&self, family: Family, at: Stamp) {
        let mut s = self.state();
        s.oldest_pending.remove(&family);
        s.last_updated.insert(family, at);
    }

    /// From [`node_eligible`] on every event of our Node.
    pub fn set_node_eligible(&self, eligible: bool) {
        self.state().node_eligible = eligible;
    }

    pub fn is_node_eligible(&self) -> bool {
        self.state().node_eligible
    }

    /// The health rule of kube-proxy: only a family that has synced once
    /// can be late (so startup, before the sync loop runs, is healthy), and
    /// it is late once its oldest queued change is `timeout` old.
    pub fn health(&self, now: Stamp) -> Health {
        let s = self.state();
        let mut health = Health {
            healthy: true,
            last_updated: None,
            families: BTreeMap::new(),
        };
        for (family, updated) in &s.last_updated {
            let late = s
                .oldest_pending
                .get(family)
                .is_some_and(|q| now.mono.saturating_duration_since(q.mono) >= self.timeout);
            health.healthy &= !late;
            health.last_updated = health.last_updated.max(Some(updated.wall));
            health.families.insert(
                *family,
                FamilyHealth {
                    last_updated: updated.wall,
                    healthy: !late,
                },
            );
        }
        health
    }

    /// The rule the service health servers use (node eligibility ignored).
    pub fn is_healthy(&self, now: Stamp) -> bool {
        self.health(now).healthy
    }

    /// Status and body of `/healthz`: 200 iff healthy and the node is
    /// eligible.
    pub fn healthz(&self, now: Stamp) -> (StatusCode, String) {
        let eligible = self.is_node_eligible();
        self.answer(now, Some(eligible))
    }

    /// Status and body of `/livez`: 200 iff healthy.
    pub fn livez(&self, now: Stamp) -> (StatusCode, String) {
        self.answer(now, None)
    }

    fn answer(&self, now: Stamp, node_eligible: Option<bool>) -> (StatusCode, String) {
        let health = self.health(now);
        let ok = health.healthy && node_eligible.unwrap_or(true);
        // A healthy answer reports "now" as lastUpdated: older releases
        // bumped it on every loop even without changes, and probes written
        // for them compare it with the current time.
        let last_updated = if ok {
            Some(now.wall)
        } else {
            health.last_updated
        };
        let body = ProxyHealthBody {
            last_updated: GoTime(last_updated),
            current_time: GoTime(Some(now.wall)),
            node_eligible,
            healthy: health.healthy,
            status: health
                .families
                .iter()
                .map(|(f, h)| {
                    (
                        f.label(),
                        FamilyBody {
                            last_updated: GoTime(Some(h.last_updated)),
                            healthy: h.healthy,
                        },
                    )
                })
                .collect(),
        };
        let code = if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (code, to_json(&body))
    }

    /// Routes one request of the proxier server, counting probe answers.
    fn respond(&self, path: &str, now: Stamp) -> Response<Full<Bytes>> {
        let (code, body) = match path {
            "/healthz" => {
                let (code, body) = self.healthz(now);
                self.probes.healthz(code.as_u16());
                (code, body)
            }
            "/livez" => {
                let (code, body) = self.livez(now);
                self.probes.livez(code.as_u16());
                (code, body)
            }
            // Go's ServeMux: exact paths only, and its plain-text 404.
            _ => {
                let mut resp = response(StatusCode::NOT_FOUND, "404 page not found\n".into());
                resp.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                return resp;
            }
        };
        json_response(code, body)
    }
}

/// Go's JSON form of a `time.Time`: RFC 3339 with nanoseconds, trailing
/// zeros trimmed; the zero time for "never".
#[derive(Debug, Clone, Copy)]
struct GoTime(Option<SystemTime>);

impl GoTime {
    fn render(&self) -> String {
        self.0
            .and_then(|t| k8s_openapi::jiff::Timestamp::try_from(t).ok())
            .map(|t| t.to_string())
            .unwrap_or_else(|| "0001-01-01T00:00:00Z".to_string())
    }
}

impl Serialize for GoTime {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.render())
    }
}

// Field order is the body's key order.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ProxyHealthBody {
    last_updated: GoTime,
    current_time: GoTime,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_eligible: Option<bool>,
    healthy: bool,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    status: BTreeMap<&'static str, FamilyBody>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FamilyBody {
    last_updated: GoTime,
    healthy: bool,
}

fn to_json<T: Serialize>(v: &T) -> String {
    // Serializing plain structs of strings and bools into memory cannot
    // fail; an empty object is still valid JSON if it somehow did.
    serde_json::to_string(v).unwrap_or_else(|_| "{}".to_string())
}

fn response(code: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    resp
}

fn json_response(code: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = response(code, body);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Binds `addr` now (so a taken port fails startup) and returns the bound
/// address and the future that serves `/healthz` and `/livez` until
/// `shutdown`.
pub async fn serve_proxier(
    addr: SocketAddr,
    health: Arc<ProxierHealth>,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, impl Future<Output = ()> + Send + 'static), Error> {
    let (listener, bound) = bind("proxier health", addr).await?;
    tracing::info!(addr = %bound, "serving /healthz and /livez");
    let serve = accept_loop(listener, shutdown, move |req| {
        health.respond(req.uri().path(), Stamp::now())
    });
    Ok((bound, serve))
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<(TcpListener, SocketAddr), Error> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { what, addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| Error::Bind { what, addr, source })?;
    Ok((listener, bound))
}

/// Accepts and serves HTTP/1 until `stop`; open connections are dropped
/// then too, so a closed server stops answering at once.
async fn accept_loop<F>(listener: TcpListener, stop: CancellationToken, respond: F)
where
    F: Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let respond = Arc::new(respond);
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: say so, and do
                    // not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let respond = respond.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let resp = respond(&req);
                async move { Ok::<_, Infallible>(resp) }
            });
            // The timer arms hyper's header read timeout (30 s), so a
            // client that opens connections and sends nothing cannot pile
            // them up on a port every node exposes.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = stop.cancelled() => {}
                done = conn => if let Err(e) = done {
                    tracing::debug!(error = %e, "health connection ended with an error");
                },
            }
        });
    }
}

/// What one Service's health check server should be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wanted {
    /// `spec.healthCheckNodePort`.
    pub port: u16,
    /// Distinct IPs of this node's ready endpoints (terminating ones are
    /// not ready, so not counted), over all the Service's ports.
    pub local_endpoints: usize,
}

#[derive(Debug)]
struct Instance {
    port: u16,
    listen: Vec<IpAddr>,
    local_endpoints: Arc<AtomicUsize>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Instance {
    async fn close(self) {
        self.stop.cancel();
        for t in self.tasks {
            // The loop returns as soon as it sees the token; waiting for it
            // means its listener is closed when we return.
            let _ = t.await;
        }
    }
}

/// The per-Service health check servers.
#[derive(Debug)]
pub struct ServiceHealth {
    proxier: Arc<ProxierHealth>,
    shutdown: CancellationToken,
    servers: tokio::sync::Mutex<BTreeMap<ServiceKey, Instance>>,
}

impl ServiceHealth {
    /// Servers stop when `shutdown` is cancelled.
    pub fn new(proxier: Arc<ProxierHealth>, shutdown: CancellationToken) -> Self {
        Self {
            proxier,
            shutdown,
            servers: tokio::sync::Mutex::new(BTreeMap::new()),
        }
    }

    /// Makes exactly the `wanted` servers listen, one per Service on each
    /// address of `listen` (the node IPs NodePorts are served on, or an
    /// unspecified address): new ones are opened, unwanted ones closed, a
    /// changed port or address list re-opens, and the local endpoint count
    /// of the others is updated in place without touching their sockets.
    ///
    /// Returns the Services whose server could not start, with why, for a
    /// `FailedToStartServiceHealthcheck` event; like kube-proxy, such a
    /// Service listens nowhere (not on some addresses only) and is tried
    /// again on the next call.
    pub async fn sync(
        &self,
        wanted: BTreeMap<ServiceKey, Wanted>,
        listen: &[IpAddr],
    ) -> Vec<(ServiceKey, String)> {
        let mut listen = listen.to_vec();
        listen.sort();
        listen.dedup();
        let mut servers = self.servers.lock().await;
        if self.shutdown.is_cancelled() {
            for (_, inst) in std::mem::take(&mut *servers) {
                inst.close().await;
            }
            return Vec::new();
        }
        let stale: Vec<ServiceKey> = servers
            .iter()
            .filter(|(key, inst)| {
                wanted
                    .get(*key)
                    .is_none_or(|w| w.port != inst.port || inst.listen != listen)
            })
            .map(|(key, _)| key.clone())
            .collect();
        // Close before opening: a re-opened Service may want the same port.
        for key in stale {
            if let Some(inst) = servers.remove(&key) {
                tracing::debug!(service = %key, port = inst.port, "closing health check server");
                inst.close().await;
            }
        }
        let mut failed = Vec::new();
        for (key, w) in wanted {
            if let Some(inst) = servers.get(&key) {
                inst.local_endpoints
                    .store(w.local_endpoints, Ordering::Relaxed);
                continue;
            }
            match self.open(&key, w, &listen).await {
                Ok(inst) => {
                    tracing::debug!(service = %key, port = w.port, "opened health check server");
                    servers.insert(key, inst);
                }
                Err(why) => failed.push((key, why)),
            }
        }
        failed
    }

    async fn open(
        &self,
        key: &ServiceKey,
        w: Wanted,
        listen: &[IpAddr],
    ) -> Result<Instance, String> {
        if w.port == 0 {
            // Binding port 0 would pick a random port nobody probes.
            return Err(format!("{key} has no health check node port"));
        }
        let mut inst = Instance {
            port: w.port,
            listen: listen.to_vec(),
            local_endpoints: Arc::new(AtomicUsize::new(w.local_endpoints)),
            stop: self.shutdown.child_token(),
            tasks: Vec::new(),
        };
        for ip in listen {
            let addr = SocketAddr::new(*ip, w.port);
            let listener = match TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    inst.close().await;
                    return Err(format!(
                        "failed to start the health check server of {key} on {addr}: {e}"
                    ));
                }
            };
            let respond = service_responder(
                key.clone(),
                inst.local_endpoints.clone(),
                self.proxier.clone(),
            );
            inst.tasks.push(tokio::spawn(accept_loop(
                listener,
                inst.stop.clone(),
                move |_req| respond(Stamp::now()),
            )));
        }
        Ok(inst)
    }

    /// The port each Service's server listens on now.
    pub async fn listening(&self) -> BTreeMap<ServiceKey, u16> {
        let servers = self.servers.lock().await;
        servers.iter().map(|(k, i)| (k.clone(), i.port)).collect()
    }

    /// Closes every server and waits until their sockets are closed.
    pub async fn close(&self) {
        let mut servers = self.servers.lock().await;
        for (_, inst) in std::mem::take(&mut *servers) {
            inst.close().await;
        }
    }
}

fn service_responder(
    key: ServiceKey,
    local_endpoints: Arc<AtomicUsize>,
    proxier: Arc<ProxierHealth>,
) -> impl Fn(Stamp) -> Response<Full<Bytes>> + Send + Sync + 'static {
    move |now| {
        let count = local_endpoints.load(Ordering::Relaxed);
        let (code, body) = service_answer(&key, count, proxier.is_healthy(now));
        let mut resp = json_response(code, body);
        // Newer kube-proxy also reports the count as a weight for load
        // balancers that spread by it (GCE's WEIGHTED_MAGLEV).
        resp.headers_mut().insert(
            HeaderName::from_static("x-load-balancing-endpoint-weight"),
            HeaderValue::from(count),
        );
        resp
    }
}

/// Status and body of a service health check: 200 iff this node has a
/// local endpoint and the proxier is healthy.
pub fn service_answer(
    key: &ServiceKey,
    local_endpoints: usize,
    proxy_healthy: bool,
) -> (StatusCode, String) {
    #[derive(Serialize)]
    struct Name<'a> {
        namespace: &'a str,
        name: &'a str,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Body<'a> {
        service: Name<'a>,
        local_endpoints: usize,
        service_proxy_healthy: bool,
    }
    let body = Body {
        service: Name {
            namespace: &key.namespace,
            name: &key.name,
        },
        local_endpoints,
        service_proxy_healthy: proxy_healthy,
    };
    // Tab-indented and without a final newline, byte for byte as
    // kube-proxy prints it.
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"\t");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    let text = match body.serialize(&mut ser) {
        Ok(()) => String::from_utf8(out).unwrap_or_default(),
        Err(_) => "{}".to_string(),
    };
    let code = if local_endpoints > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, text)
}
