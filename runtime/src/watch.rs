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
    /// changes signalled.
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
        let stream = watcher(api, config).default_backoff();
        let changes = self.changes.clone();
        self.spawn(async move {
            let mut stream = std::pin::pin!(stream);
            // The gate opens on the stream's own "initial list done" event,
            // not via `Store::wait_until_ready`: that future wakes only its
            // most recent waiter, so a second waiter could hang forever.
            let mut synced = false;
            let mut listed = 0usize;
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
                    Err(error) => {
                        tracing::warn!(%error, resource = what, "watch failed; retrying with backoff")
                    }
                }
            }
            tracing::warn!(resource = what, "watch stream ended");
        });
    }
}
