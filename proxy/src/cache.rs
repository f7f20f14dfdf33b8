//! The proxy's own caches. Each Service and EndpointSlice is converted the
//! moment its watch event arrives into the views the renderer reads, and
//! the object is dropped: a full EndpointSlice is many times the size of
//! the endpoints the data plane needs, and at 10k Services the difference
//! is most of the proxy's memory.
//!
//! Every change marks the Services it touches dirty; a sync takes the dirty
//! set and renders only those (see [`crate::programmed`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::ResourceExt;
use kube::runtime::watcher::Event;

use crate::health;
use crate::model::{self, NodeFacts, PortEndpoints, ServiceKey, ServicePort};
use crate::ruleset::Family;
use crate::sync::TRIGGER_TIME;

/// What the renderer reads of one Service: its ports and, per family, the
/// endpoints its slices give it. Shared between the cache's answer and the
/// per-family tables that last programmed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceInputs {
    pub ports: Vec<ServicePort>,
    /// The endpoints of each family: one slice's own when it has one (most
    /// Services), so nothing is copied.
    pub v4: Arc<PortEndpoints>,
    pub v6: Arc<PortEndpoints>,
}

impl ServiceInputs {
    pub fn endpoints(&self, family: Family) -> &PortEndpoints {
        match family {
            Family::V4 => self.v4.as_ref(),
            Family::V6 => self.v6.as_ref(),
        }
    }
}

/// The watches a cache is fed by, each listed once before the first sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Services,
    Slices,
    Node,
    ServiceCidrs,
}

#[derive(Debug)]
struct ServiceEntry {
    uid: Option<String>,
    version: Option<String>,
    ports: Vec<ServicePort>,
}

#[derive(Debug)]
struct SliceEntry {
    version: Option<String>,
    /// The Service it names and the endpoints it gives (merged, as if it
    /// were the Service's only slice), when it counts.
    gives: Option<(ServiceKey, Family, Arc<PortEndpoints>)>,
}

/// A slice's `namespace/name`.
type SliceKey = (String, String);

/// The Node, as far as the proxy cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub facts: NodeFacts,
    /// Not being deleted (kube-proxy's /healthz condition).
    pub eligible: bool,
}

#[derive(Debug, Default)]
struct State {
    node_name: String,
    services: HashMap<ServiceKey, ServiceEntry>,
    slices: HashMap<SliceKey, SliceEntry>,
    slices_of: HashMap<ServiceKey, BTreeSet<SliceKey>>,
    node: Option<NodeView>,
    service_cidrs: BTreeMap<String, Vec<IpNet>>,
    dirty: HashSet<ServiceKey>,
    /// The node's facts changed: they reach every Service's rendering (its
    /// zone, its addresses), so the next sync rebuilds.
    node_changed: bool,
    /// The node's eligibility or the Service CIDRs changed (the health
    /// state or the scaffold).
    other_changed: bool,
    service_changes: usize,
    slice_changes: usize,
    /// Trigger times of changed slices, observed once programmed.
    triggers: Vec<(Family, String)>,
    listed: BTreeSet<Kind>,
    /// Keys seen during a relist of each kind (`Init` .. `InitDone`).
    relist: BTreeMap<Kind, HashSet<(String, String)>>,
}

/// What changed since the last [`Cache::take`].
#[derive(Debug, Default)]
pub struct Changes {
    /// The Services that changed (their inputs: [`Cache::inputs`]).
    pub services: Vec<ServiceKey>,
    /// The node's facts changed: rebuild.
    pub node_changed: bool,
    pub service_changes: usize,
    pub slice_changes: usize,
    pub triggers: Vec<(Family, String)>,
}

/// The caches, shared by the watch tasks that fill them and the sync loop.
#[derive(Debug, Clone)]
pub struct Cache {
    state: Arc<Mutex<State>>,
}

fn object_key<K: kube::Resource>(o: &K) -> (String, String) {
    (o.namespace().unwrap_or_default(), o.name_any())
}

impl Cache {
    pub fn new(node_name: &str) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                node_name: node_name.to_string(),
                ..Default::default()
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every watch has delivered its first full list.
    pub fn listed(&self) -> bool {
        self.lock().listed.len() == 4
    }

    // Each event returns whether a sync has work now: a Node status
    // heartbeat or an object seen again at the same version does not wake
    // the loop (and so does not spend a sync the rate limit allows).

    pub fn service_event(&self, event: Event<Service>) -> bool {
        let mut s = self.lock();
        s.event(
            Kind::Services,
            event,
            State::put_service,
            State::remove_service,
        );
        s.has_pending()
    }

    pub fn slice_event(&self, event: Event<EndpointSlice>) -> bool {
        let mut s = self.lock();
        s.event(Kind::Slices, event, State::put_slice, State::remove_slice);
        s.has_pending()
    }

    pub fn node_event(&self, event: Event<Node>) -> bool {
        let mut s = self.lock();
        s.event(Kind::Node, event, State::put_node, State::remove_node);
        s.has_pending()
    }

    pub fn service_cidr_event(&self, event: Event<ServiceCIDR>) -> bool {
        let mut s = self.lock();
        s.event(
            Kind::ServiceCidrs,
            event,
            State::put_service_cidr,
            State::remove_service_cidr,
        );
        s.has_pending()
    }

    /// Something changed that the next sync must program.
    pub fn has_pending(&self) -> bool {
        self.lock().has_pending()
    }

    /// Takes what changed since the last call.
    pub fn take(&self) -> Changes {
        let mut s = self.lock();
        let mut services: Vec<ServiceKey> = s.dirty.drain().collect();
        services.sort();
        s.other_changed = false;
        Changes {
            services,
            node_changed: std::mem::take(&mut s.node_changed),
            service_changes: std::mem::take(&mut s.service_changes),
            slice_changes: std::mem::take(&mut s.slice_changes),
            triggers: std::mem::take(&mut s.triggers),
        }
    }

    /// What Service `key` is now; `None` when gone (or without a port we
    /// proxy).
    pub fn inputs(&self, key: &ServiceKey) -> Option<Arc<ServiceInputs>> {
        self.lock().inputs(key).map(Arc::new)
    }

    /// Each of `keys` with what it is now, for a partial update.
    pub fn inputs_of(&self, keys: &[ServiceKey]) -> Vec<(ServiceKey, Option<Arc<ServiceInputs>>)> {
        let s = self.lock();
        keys.iter()
            .map(|k| (k.clone(), s.inputs(k).map(Arc::new)))
            .collect()
    }

    /// Every Service the cache knows, for a full build.
    pub fn all(&self) -> Vec<(ServiceKey, Arc<ServiceInputs>)> {
        let s = self.lock();
        let keys: BTreeSet<&ServiceKey> = s.services.keys().collect();
        keys.into_iter()
            .filter_map(|k| Some((k.clone(), Arc::new(s.inputs(k)?))))
            .collect()
    }

    /// Changes a failed sync could not program: they wait for the next.
    pub fn restore(&self, changes: Changes) {
        let mut s = self.lock();
        s.dirty.extend(changes.services);
        s.node_changed |= changes.node_changed;
        s.triggers.extend(changes.triggers);
    }

    /// Changes seen but not yet taken (`changes pending` metrics).
    pub fn pending(&self) -> (usize, usize) {
        let s = self.lock();
        (s.slice_changes, s.service_changes)
    }

    pub fn node(&self) -> NodeFacts {
        let s = self.lock();
        s.node
            .as_ref()
            .map(|n| n.facts.clone())
            .unwrap_or_else(|| NodeFacts {
                name: s.node_name.clone(),
                ..Default::default()
            })
    }

    /// Whether the node may take traffic (unknown until the Node is seen).
    pub fn node_eligible(&self) -> Option<bool> {
        self.lock().node.as_ref().map(|n| n.eligible)
    }

    pub fn service_cidrs(&self) -> Vec<IpNet> {
        self.lock()
            .service_cidrs
            .values()
            .flatten()
            .copied()
            .collect()
    }

    pub fn uid(&self, key: &ServiceKey) -> Option<String> {
        self.lock().services.get(key)?.uid.clone()
    }
}

impl State {
    fn has_pending(&self) -> bool {
        !self.dirty.is_empty() || self.node_changed || self.other_changed
    }

    fn event<K: kube::Resource>(
        &mut self,
        kind: Kind,
        event: Event<K>,
        put: fn(&mut Self, K),
        remove: fn(&mut Self, &(String, String)),
    ) {
        match event {
            Event::Apply(o) => put(self, o),
            Event::Delete(o) => remove(self, &object_key(&o)),
            Event::Init => {
                self.relist.insert(kind, HashSet::new());
            }
            Event::InitApply(o) => {
                if let Some(seen) = self.relist.get_mut(&kind) {
                    seen.insert(object_key(&o));
                }
                put(self, o);
            }
            Event::InitDone => {
                let seen = self.relist.remove(&kind).unwrap_or_default();
                let gone: Vec<(String, String)> = match kind {
                    Kind::Services => self
                        .services
                        .keys()
                        .map(|k| (k.namespace.clone(), k.name.clone()))
                        .collect(),
                    Kind::Slices => self.slices.keys().cloned().collect(),
                    Kind::Node => self
                        .node
                        .iter()
                        .map(|n| (String::new(), n.facts.name.clone()))
                        .collect(),
                    Kind::ServiceCidrs => self
                        .service_cidrs
                        .keys()
                        .map(|n| (String::new(), n.clone()))
                        .collect(),
                };
                for k in gone.iter().filter(|k| !seen.contains(*k)) {
                    remove(self, k);
                }
                self.listed.insert(kind);
            }
        }
    }

    fn put_service(&mut self, svc: Service) {
        let (namespace, name) = object_key(&svc);
        let key = ServiceKey { namespace, name };
        let version = svc.resource_version();
        if self
            .services
            .get(&key)
            .is_some_and(|e| version.is_some() && e.version == version)
        {
            return;
        }
        let entry = ServiceEntry {
            uid: svc.uid(),
            version,
            ports: model::service_ports(&svc),
        };
        self.services.insert(key.clone(), entry);
        self.service_changes += 1;
        self.dirty.insert(key);
    }

    fn remove_service(&mut self, (namespace, name): &(String, String)) {
        let key = ServiceKey {
            namespace: namespace.clone(),
            name: name.clone(),
        };
        if self.services.remove(&key).is_some() {
            self.service_changes += 1;
            self.dirty.insert(key);
        }
    }

    fn put_slice(&mut self, slice: EndpointSlice) {
        let key = object_key(&slice);
        let version = slice.resource_version();
        if self
            .slices
            .get(&key)
            .is_some_and(|e| version.is_some() && e.version == version)
        {
            return;
        }
        let gives = [Family::V4, Family::V6].into_iter().find_map(|f| {
            model::slice_endpoints(&slice, f, &self.node_name)
                .map(|(svc, eps)| (svc, f, Arc::new(model::merge([&eps]))))
        });
        if let (Some((_, family, _)), Some(trigger)) =
            (&gives, slice.annotations().get(TRIGGER_TIME))
        {
            self.triggers.push((*family, trigger.clone()));
        }
        self.remove_slice_quietly(&key);
        if let Some((svc, _, _)) = &gives {
            self.slices_of
                .entry(svc.clone())
                .or_default()
                .insert(key.clone());
            self.dirty.insert(svc.clone());
        }
        self.slices.insert(key, SliceEntry { version, gives });
        self.slice_changes += 1;
    }

    fn remove_slice(&mut self, key: &(String, String)) {
        if self.remove_slice_quietly(key) {
            self.slice_changes += 1;
        }
    }

    /// Forgets a slice, marking the Service it gave endpoints to dirty.
    fn remove_slice_quietly(&mut self, key: &SliceKey) -> bool {
        let Some(old) = self.slices.remove(key) else {
            return false;
        };
        if let Some((svc, _, _)) = old.gives {
            if let Some(set) = self.slices_of.get_mut(&svc) {
                set.remove(key);
                if set.is_empty() {
                    self.slices_of.remove(&svc);
                }
            }
            self.dirty.insert(svc);
        }
        true
    }

    fn put_node(&mut self, node: Node) {
        if node.name_any() != self.node_name {
            return;
        }
        let view = NodeView {
            facts: NodeFacts::of(&node),
            eligible: health::node_eligible(&node),
        };
        if self.node.as_ref() == Some(&view) {
            return;
        }
        let facts_changed = self.node.as_ref().map(|n| &n.facts) != Some(&view.facts);
        self.node = Some(view);
        self.node_changed |= facts_changed;
        self.other_changed = true;
    }

    fn remove_node(&mut self, _: &(String, String)) {
        if self.node.take().is_some() {
            self.node_changed = true;
        }
    }

    fn put_service_cidr(&mut self, c: ServiceCIDR) {
        let cidrs: Vec<IpNet> = c
            .spec
            .as_ref()
            .and_then(|s| s.cidrs.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|c| c.parse().ok())
            .collect();
        let name = c.name_any();
        // Only the scaffold reads them; every sync renders it afresh.
        if self.service_cidrs.get(&name) != Some(&cidrs) {
            self.service_cidrs.insert(name, cidrs);
            self.other_changed = true;
        }
    }

    fn remove_service_cidr(&mut self, (_, name): &(String, String)) {
        if self.service_cidrs.remove(name).is_some() {
            self.other_changed = true;
        }
    }

    /// What Service `key` is now; `None` when it has no ports we proxy.
    fn inputs(&self, key: &ServiceKey) -> Option<ServiceInputs> {
        let entry = self.services.get(key)?;
        if entry.ports.is_empty() {
            return None;
        }
        let mut by_family: [Vec<&Arc<PortEndpoints>>; 2] = [Vec::new(), Vec::new()];
        for sk in self.slices_of.get(key).into_iter().flatten() {
            if let Some(SliceEntry {
                gives: Some((_, family, eps)),
                ..
            }) = self.slices.get(sk)
            {
                by_family[usize::from(*family == Family::V6)].push(eps);
            }
        }
        let merged = |parts: Vec<&Arc<PortEndpoints>>| match parts.as_slice() {
            [] => Arc::default(),
            [one] => Arc::clone(one),
            many => Arc::new(model::merge(many.iter().map(|p| p.as_ref()))),
        };
        let [v4, v6] = by_family;
        Some(ServiceInputs {
            ports: entry.ports.clone(),
            v4: merged(v4),
            v6: merged(v6),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(name: &str, rv: &str) -> Service {
        serde_json::from_value(json!({
            "metadata": {"namespace": "default", "name": name, "resourceVersion": rv},
            "spec": {"type": "ClusterIP", "clusterIP": "198.18.64.10", "clusterIPs": ["198.18.64.10"],
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
        }))
        .unwrap()
    }

    fn slice(name: &str, svc: &str, rv: &str, addrs: &[&str]) -> EndpointSlice {
        let eps: Vec<_> = addrs
            .iter()
            .map(|a| json!({"addresses": [a], "nodeName": "node-1", "conditions": {"ready": true}}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"namespace": "default", "name": name, "resourceVersion": rv,
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
            "endpoints": eps,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }))
        .unwrap()
    }

    fn key(name: &str) -> ServiceKey {
        ServiceKey {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    #[test]
    fn changes_mark_only_the_services_they_touch() {
        let c = Cache::new("node-1");
        c.service_event(Event::Apply(svc("a", "1")));
        c.service_event(Event::Apply(svc("b", "1")));
        c.slice_event(Event::Apply(slice("a-1", "a", "1", &["198.19.0.1"])));
        let first = c.take();
        assert_eq!(first.services, [key("a"), key("b")]);
        assert_eq!((first.service_changes, first.slice_changes), (2, 1));

        // The same version again is no change; a second slice merges.
        c.service_event(Event::Apply(svc("b", "1")));
        c.slice_event(Event::Apply(slice("a-2", "a", "1", &["198.19.0.2"])));
        let second = c.take();
        assert_eq!(second.services, [key("a")]);
        let inputs = c.inputs(&key("a")).unwrap();
        let eps = &inputs.v4[&("http".to_string(), crate::ruleset::Proto::Tcp)];
        assert_eq!(eps.len(), 2);

        // Deleting a Service reports it gone.
        c.service_event(Event::Delete(svc("a", "2")));
        let third = c.take();
        assert_eq!(third.services, [key("a")]);
        assert!(c.inputs(&key("a")).is_none());
    }

    #[test]
    fn a_relist_forgets_what_it_no_longer_lists() {
        let c = Cache::new("node-1");
        for e in [
            Event::Init,
            Event::InitApply(svc("a", "1")),
            Event::InitApply(svc("b", "1")),
            Event::InitDone,
        ] {
            c.service_event(e);
        }
        let _ = c.take();
        for e in [
            Event::Init,
            Event::InitApply(svc("b", "1")),
            Event::InitDone,
        ] {
            c.service_event(e);
        }
        let changes = c.take();
        assert_eq!(changes.services, [key("a")]);
        assert!(c.inputs(&key("a")).is_none());
        assert_eq!(c.all().len(), 1);
    }

    #[test]
    fn a_node_heartbeat_is_no_work_but_a_new_address_is() {
        let node = |rv: &str, ip: &str| -> Node {
            serde_json::from_value(json!({
                "metadata": {"name": "node-1", "resourceVersion": rv},
                "status": {"addresses": [{"type": "InternalIP", "address": ip}],
                           "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": format!("2026-12-02T00:00:0{rv}Z")}]},
            }))
            .unwrap()
        };
        let c = Cache::new("node-1");
        assert!(c.node_event(Event::Apply(node("1", "198.18.0.11"))));
        let _ = c.take();
        assert!(!c.node_event(Event::Apply(node("2", "198.18.0.11"))));
        assert!(!c.has_pending());
        assert!(c.node_event(Event::Apply(node("3", "198.18.0.12"))));
        assert!(c.take().node_changed);
        // The same Service version again wakes nothing either.
        assert!(c.service_event(Event::Apply(svc("a", "1"))));
        let _ = c.take();
        assert!(!c.service_event(Event::Apply(svc("a", "1"))));
    }

    #[test]
    fn a_failed_sync_gives_its_changes_back() {
        let c = Cache::new("node-1");
        c.service_event(Event::Apply(svc("a", "1")));
        let taken = c.take();
        assert!(c.take().services.is_empty());
        c.restore(taken);
        assert_eq!(c.take().services.len(), 1);
    }
}
