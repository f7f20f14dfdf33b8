//! The small HTTP server behind `/metrics`, `/healthz` and `/readyz`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{Error, Readiness, Result};

/// Which endpoints one listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints {
    pub metrics: bool,
    pub health: bool,
}

/// What the endpoints read.
pub struct State {
    pub registry: Registry,
    /// Metrics under names another project defined (the proxy's
    /// `kubeproxy_*`), served without the `ferrolb_` prefix.
    pub unprefixed: Registry,
    pub readiness: Readiness,
}

/// Binds now (so a taken port fails startup, not later) and returns the
/// future that serves until `shutdown`.
pub async fn bind(
    addr: SocketAddr,
    endpoints: Endpoints,
    state: Arc<State>,
    shutdown: CancellationToken,
) -> Result<impl Future<Output = ()>> {
    let what = match (endpoints.metrics, endpoints.health) {
        (true, true) => "metrics and health",
        (true, false) => "metrics",
        _ => "health",
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { what, addr, source })?;
    tracing::info!(%addr, what, "serving");
    Ok(serve(listener, endpoints, state, shutdown))
}

async fn serve(
    listener: TcpListener,
    endpoints: Endpoints,
    state: Arc<State>,
    shutdown: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let state = state.clone();
        let service = hyper::service::service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(respond(&req, endpoints, &state)) }
        });
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
        });
    }
}

/// Routes one request. Pure apart from reading `state`, so it is unit-tested.
pub fn respond(
    req: &Request<Incoming>,
    endpoints: Endpoints,
    state: &State,
) -> Response<Full<Bytes>> {
    route(req.method(), req.uri().path(), endpoints, state)
}

fn route(
    method: &Method,
    path: &str,
    endpoints: Endpoints,
    state: &State,
) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".to_string());
    }
    match path {
        "/metrics" if endpoints.metrics => {
            let mut resp = text(
                StatusCode::OK,
                crate::metrics::encode(&[&state.registry, &state.unprefixed]),
            );
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            resp
        }
        "/healthz" | "/livez" if endpoints.health => text(StatusCode::OK, "ok\n".to_string()),
        "/readyz" if endpoints.health => {
            let pending = state.readiness.pending();
            if pending.is_empty() {
                text(StatusCode::OK, "ok\n".to_string())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("waiting for: {}\n", pending.join(", ")),
                )
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".to_string()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State {
            registry: crate::metrics::registry("test"),
            unprefixed: Registry::default(),
            readiness: Readiness::default(),
        }
    }

    const BOTH: Endpoints = Endpoints {
        metrics: true,
        health: true,
    };

    #[test]
    fn readyz_names_what_it_waits_for() {
        let s = state();
        let gate = s.readiness.gate("services");
        let resp = route(&Method::GET, "/readyz", BOTH, &s);
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        gate.open();
        assert_eq!(
            route(&Method::GET, "/readyz", BOTH, &s).status(),
            StatusCode::OK
        );
    }

    #[test]
    fn endpoints_are_split_by_listener() {
        let s = state();
        let metrics_only = Endpoints {
            metrics: true,
            health: false,
        };
        assert_eq!(
            route(&Method::GET, "/metrics", metrics_only, &s).status(),
            StatusCode::OK
        );
        assert_eq!(
            route(&Method::GET, "/healthz", metrics_only, &s).status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            route(&Method::POST, "/healthz", BOTH, &s).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[test]
    fn unprefixed_metrics_keep_their_names() {
        let mut s = state();
        let g = prometheus_client::metrics::gauge::Gauge::<i64>::default();
        s.unprefixed
            .register("kubeproxy_example", "an example", g.clone());
        g.set(3);
        let body = crate::metrics::encode(&[&s.registry, &s.unprefixed]);
        assert!(body.contains("kubeproxy_example 3"), "{body}");
        assert!(!body.contains("ferrolb_kubeproxy"), "{body}");
        assert_eq!(body.matches("# EOF").count(), 1, "{body}");
    }

    #[test]
    fn metrics_carry_build_info() {
        let s = state();
        let body = crate::metrics::encode(&[&s.registry, &s.unprefixed]);
        assert!(
            body.contains("ferrolb_build_info{component=\"test\""),
            "{body}"
        );
    }
}
