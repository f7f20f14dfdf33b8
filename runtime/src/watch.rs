//! Watch caches (kube-runtime reflectors) whose first full list opens a
//! readiness gate, and raw event watches for components that keep their
//! own, smaller views of each object.

use std::fmt::Debug;

use futures::StreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use serde::de::DeserializeOwned;

use crate::Runtime;

impl Runtime {
    /// Starts a cache of every object `api` sees. `/readyz` reports not ready
    /// until its first list has completed. Watch errors are retried with
    /// backoff and logged; they never end the process.
    pub fn watch<K>(&mut self, api: Api<K>, what: &'static str) -> Store<K>
    where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + DeserializeOwned
            + Debug
            + Send
            + Sync
            + 'static,
    {
        self.watch_with(api, watcher::Config::default(), what)
    }

    /// Like [`Runtime::watch`], with a watcher config (label or field
    /// selectors).
    pub fn watch_with<K>(
        &mut self,
        api: Api<K>,
        config: watcher::Config,
        what: &'static str,
    ) -> Store<K>
    where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + DeserializeOwned
            + Debug
            + Send
            + Sync
            + 'static,
    {
        let (reader, mut writer) = reflector::store();
        self.watch_events(api, config, what, move |mut event| {
            // managedFields are often the largest part of an object and no
            // component reads them; dropping them keeps caches small.
            match &mut event {
                watcher::Event::Apply(o)
                | watcher::Event::Delete(o)
                | watcher::Event::InitApply(o) => o.managed_fields_mut().clear(),
                watcher::Event::Init | watcher::Event::InitDone => {}
            }
            writer.apply_watcher_event(&event);
            true
        });
        reader
    }

    /// Like [`Runtime::watch_with`], without a cache: every event goes to
    /// `apply` as it arrives, so a component can keep only the part of each
    /// object it reads and drop the rest at once. A (re)list arrives as
    /// `Init`, `InitApply`..., `InitDone`: objects not listed again are gone.
    /// `apply` says whether the event left work to do; only then are
    /// changes signalled. A config asking for streaming lists
    /// (`sendInitialEvents`, Kubernetes' WatchList) falls back to list and
    /// watch, from the watch cache, when the API server refuses them (the
    /// feature is off, or the server predates it).
    pub fn watch_events<K, F>(
        &mut self,
        api: Api<K>,
        config: watcher::Config,
        what: &'static str,
        mut apply: F,
    ) where
        K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
        F: FnMut(watcher::Event<K>) -> bool + Send + 'static,
    {
        let gate = self.readiness.gate(what);
        let changes = self.changes.clone();
        self.spawn(async move {
            let mut config = config;
            // The gate opens on the stream's own "initial list done" event,
            // not via `Store::wait_until_ready`: that future wakes only its
            // most recent waiter, so a second waiter could hang forever.
            let mut synced = false;
            let mut listed = 0usize;
            'streams: loop {
                let stream = watcher(api.clone(), config.clone()).default_backoff();
                let mut stream = std::pin::pin!(stream);
                while let Some(event) = stream.next().await {
                    match event {
                        Ok(event) => {
                            let done = matches!(event, watcher::Event::InitDone);
                            match &event {
                                watcher::Event::Init => listed = 0,
                                watcher::Event::InitApply(_) => listed += 1,
                                _ => {}
                            }
                            let work = apply(event);
                            if done && !synced {
                                synced = true;
                                gate.open();
                                tracing::info!(resource = what, objects = listed, "watch listed");
                            }
                            if work || done {
                                changes.notify_one();
                            }
                        }
                        Err(error) if streaming_refused(&config, &error) => {
                            tracing::warn!(%error, resource = what,
                                "the API server refuses streaming lists (WatchList); listing instead");
                            config = listing_instead(config);
                            continue 'streams;
                        }
                        Err(error) => {
                            tracing::warn!(%error, resource = what, "watch failed; retrying with backoff")
                        }
                    }
                }
                break;
            }
            tracing::warn!(resource = what, "watch stream ended");
        });
    }
}

/// True when `error` is the API server refusing a streaming list that
/// `config` asked for: the request is invalid to it (422: WatchList is
/// off, or `resourceVersionMatch` on a watch is unknown to a server from
/// before it; 400 from a proxy in between), not a transient failure.
pub fn streaming_refused(config: &watcher::Config, error: &watcher::Error) -> bool {
    if config.initial_list_strategy != watcher::InitialListStrategy::StreamingList {
        return false;
    }
    let code = match error {
        watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.code,
        watcher::Error::WatchError(status) => status.code,
        _ => return false,
    };
    matches!(code, 400 | 422)
}

/// `config` listing first, from the watch cache (resourceVersion 0, as
/// client-go's informers list), instead of streaming its list. Unpaged:
/// kube-rs leaves resourceVersion 0 out of a request with a limit, which
/// would make it a quorum read from etcd, page by page.
pub fn listing_instead(mut config: watcher::Config) -> watcher::Config {
    config.initial_list_strategy = watcher::InitialListStrategy::ListWatch;
    config.page_size = None;
    config.any_semantic()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::Status;

    fn refused(code: u16) -> watcher::Error {
        watcher::Error::WatchStartFailed(kube::Error::Api(
            Status::failure("sendInitialEvents is forbidden", "Invalid")
                .with_code(code)
                .boxed(),
        ))
    }

    #[test]
    fn only_a_refused_streaming_list_falls_back() {
        let streamed = watcher::Config::default().streaming_lists();
        assert!(streaming_refused(&streamed, &refused(422)));
        assert!(streaming_refused(
            &streamed,
            &watcher::Error::WatchError(Status::failure("no", "BadRequest").with_code(400).boxed())
        ));
        // Transient or permission failures are retried as they are.
        for code in [401, 403, 429, 500, 503] {
            assert!(!streaming_refused(&streamed, &refused(code)), "{code}");
        }
        // A plain list-and-watch has nothing to fall back from.
        assert!(!streaming_refused(
            &watcher::Config::default(),
            &refused(422)
        ));
        let instead = listing_instead(streamed);
        assert_eq!(
            instead.initial_list_strategy,
            watcher::InitialListStrategy::ListWatch
        );
        assert_eq!(instead.list_semantic, watcher::ListSemantic::Any);
    }

    /// A real client against a scripted API server that refuses streaming
    /// lists as one with WatchList off does (422): the watch lists from the
    /// watch cache instead, delivers the object and opens its gate.
    #[tokio::test]
    async fn a_refused_streaming_list_lists_instead() {
        use k8s_openapi::api::core::v1::ConfigMap;
        use std::sync::{Arc, Mutex};

        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let log = seen.clone();
        let server = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let query = req.uri().query().unwrap_or("").to_string();
            log.lock().unwrap().push(query.clone());
            async move {
                let json = |code: u16, v: serde_json::Value| {
                    http::Response::builder()
                        .status(code)
                        .header("content-type", "application/json")
                        .body(kube::client::Body::from(v.to_string().into_bytes()))
                };
                if query.contains("sendInitialEvents=true") {
                    return json(
                        422,
                        serde_json::json!({
                        "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 422,
                        "reason": "Invalid",
                        "message": "sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled"}),
                    );
                }
                if query.contains("watch=true") {
                    // The watch after the list: nothing more happens.
                    std::future::pending::<()>().await;
                }
                json(
                    200,
                    serde_json::json!({
                    "kind": "ConfigMapList", "apiVersion": "v1", "metadata": {"resourceVersion": "5"},
                    "items": [{"metadata": {"name": "a", "namespace": "default", "resourceVersion": "5"}}]}),
                )
            }
        });
        let client = kube::Client::new(server, "default");
        let mut rt = Runtime {
            component: "test",
            client: client.clone(),
            readiness: crate::Readiness::default(),
            registry: Default::default(),
            unprefixed: Default::default(),
            shutdown: Default::default(),
            changes: Default::default(),
            tasks: Default::default(),
            args: crate::CommonArgs {
                kubeconfig: None,
                log_format: crate::LogFormat::Text,
                metrics_addr: ([127, 0, 0, 1], 0).into(),
                health_addr: ([127, 0, 0, 1], 0).into(),
                shutdown_timeout: std::time::Duration::from_secs(1),
            },
        };
        let names: Arc<Mutex<Vec<String>>> = Arc::default();
        let got = names.clone();
        rt.watch_events(
            Api::<ConfigMap>::all(client),
            watcher::Config::default().streaming_lists(),
            "configmaps",
            move |e| {
                if let watcher::Event::InitApply(cm) = e {
                    got.lock().unwrap().push(cm.name_any());
                }
                true
            },
        );
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while !rt.readiness.is_ready() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never listed: {:?}",
                seen.lock().unwrap()
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(*names.lock().unwrap(), vec!["a".to_string()]);
        let seen = seen.lock().unwrap().clone();
        assert!(seen[0].contains("sendInitialEvents=true"), "{seen:?}");
        assert!(
            seen[1].contains("resourceVersion=0")
                && !seen[1].contains("limit=")
                && !seen[1].contains("watch=true"),
            "then a list from the watch cache: {seen:?}"
        );
    }
}
