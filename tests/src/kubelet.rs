//! The lab's kubelet: registers the lab nodes, keeps their status and Leases
//! fresh, and runs every Pod the real scheduler binds to them as a network
//! namespace with our echo server in it, then reports the Pod's status so the
//! real endpointslice controller publishes it.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::addresses::{self, IpFamily, PodIpAllocator};
use crate::container;
use crate::names::{Prefix, node_name, parse_node};
use crate::netns;
use crate::process;
use crate::state::{PodRecord, StateDir};

/// Annotation a test sets to `"false"` to make a running pod unready.
pub const READY_ANNOTATION: &str = "lab.ferrolb.io/ready";
pub const FIELD_MANAGER: &str = "ferrolb-lab-kubelet";
/// How often Node status and Leases are renewed (the real kubelet's default).
pub const HEARTBEAT: Duration = Duration::from_secs(10);
const LEASE_DURATION_SECONDS: i32 = 40;

#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("network: {0}")]
    Net(#[from] netns::NetError),
    #[error("process: {0}")]
    Process(#[from] process::ProcessError),
    #[error("node {0} has no free pod address")]
    NodeFull(String),
    #[error("setup task failed: {0}")]
    Join(String),
}

type Result<T, E = KubeletError> = std::result::Result<T, E>;

struct RunningPod {
    namespace: String,
    name: String,
    node: u8,
    netns: String,
    /// Host index in the node's pod CIDR; None for hostNetwork pods.
    idx: Option<u8>,
    ips: Vec<IpAddr>,
    /// The object as first seen (its containers never change).
    pod: Pod,
    started: Time,
    /// What the readiness annotation asks for.
    wanted: bool,
    container: container::State,
    restarts: u32,
    phase: &'static str,
    /// Readiness last reported to the API.
    reported: Option<bool>,
    terminating: bool,
    /// Stops the container task, which kills the echo server.
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl RunningPod {
    fn ready(&self) -> bool {
        self.wanted
            && self.phase == "Running"
            && matches!(
                self.container,
                container::State::Running { serving: true, .. }
            )
    }
}

#[derive(Default)]
struct Inner {
    pods: HashMap<String, RunningPod>,
    allocators: HashMap<u8, PodIpAllocator>,
    /// Nodes whose LAN link the lab cut: their kubelet "cannot reach" the API.
    offline: HashSet<u8>,
}

pub struct Kubelet {
    client: Client,
    prefix: Prefix,
    family: IpFamily,
    nodes: u8,
    /// Program and leading arguments of the echo server.
    echo: (PathBuf, Vec<String>),
    state: StateDir,
    inner: Mutex<Inner>,
}

/// The architecture as Kubernetes (Go) names it.
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn now() -> Time {
    Time(Timestamp::now())
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The echo server's arguments: the pod's name and every declared port.
pub fn echo_args(pod: &Pod) -> Vec<String> {
    let mut args = vec!["--name".to_string(), pod.name_any()];
    args.extend(container::Ports::of(pod).args());
    args
}

/// Readiness a test asked for through the annotation (ready unless "false").
pub fn wanted_ready(pod: &Pod) -> bool {
    pod.annotations().get(READY_ANNOTATION).map(String::as_str) != Some("false")
}

/// What the lab reports about one pod.
pub struct Report<'a> {
    pub node_ips: &'a [IpAddr],
    pub pod_ips: &'a [IpAddr],
    pub started: &'a Time,
    pub phase: &'a str,
    pub ready: bool,
    pub container: &'a container::State,
    pub restarts: u32,
}

/// The status the lab reports for a pod it runs.
pub fn pod_status(pod: &Pod, r: &Report<'_>) -> Value {
    let t = serde_json::to_value(now()).unwrap_or(Value::Null);
    let started = serde_json::to_value(r.started).unwrap_or(Value::Null);
    let ready = if r.ready { "True" } else { "False" };
    let cond =
        |ty: &str, status: &str| json!({"type": ty, "status": status, "lastTransitionTime": t});
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default();
    let uid = pod.uid().unwrap_or_default();
    let (state, running) = match r.container {
        container::State::Running { since, .. } => (
            json!({"running": {"startedAt": serde_json::to_value(since).unwrap_or(Value::Null)}}),
            true,
        ),
        container::State::Terminated {
            exit_code,
            finished,
        } => (
            json!({"terminated": {"exitCode": exit_code, "reason": if *exit_code == 0 { "Completed" } else { "Error" },
                   "finishedAt": serde_json::to_value(finished).unwrap_or(Value::Null), "startedAt": started}}),
            false,
        ),
    };
    let statuses: Vec<Value> = containers
        .iter()
        .map(|c| {
            json!({
                "name": c.name,
                "image": c.image.clone().unwrap_or_else(|| "ferrolb-echo".into()),
                "imageID": "lab://ferrolb-echo",
                "containerID": format!("lab://{uid}/{}", c.name),
                "ready": r.ready,
                "started": running,
                "restartCount": r.restarts,
                "state": state,
            })
        })
        .collect();
    let ip_list = |ips: &[IpAddr]| {
        ips.iter()
            .map(|ip| json!({"ip": ip.to_string()}))
            .collect::<Vec<_>>()
    };
    json!({"status": {
        "phase": r.phase,
        "hostIP": r.node_ips.first().map(|i| i.to_string()),
        "hostIPs": ip_list(r.node_ips),
        "podIP": r.pod_ips.first().map(|i| i.to_string()),
        "podIPs": ip_list(r.pod_ips),
        "startTime": started,
        "conditions": [
            cond("PodReadyToStartContainers", "True"),
            cond("Initialized", "True"),
            cond("Ready", ready),
            cond("ContainersReady", ready),
            cond("PodScheduled", "True"),
        ],
        "containerStatuses": statuses,
    }})
}

impl Kubelet {
    pub fn new(
        client: Client,
        prefix: Prefix,
        family: IpFamily,
        nodes: u8,
        echo: (PathBuf, Vec<String>),
        state: StateDir,
    ) -> Arc<Self> {
        Arc::new(Kubelet {
            client,
            prefix,
            family,
            nodes,
            echo,
            state,
            inner: Mutex::new(Inner::default()),
        })
    }

    /// Creates (server-side applies) every lab Node and reports it Ready.
    pub async fn register_nodes(&self) -> Result<()> {
        let api: Api<Node> = Api::all(self.client.clone());
        for n in 1..=self.nodes {
            let name = node_name(n);
            let cidrs: Vec<String> = addresses::pod_cidrs(n, self.family)
                .iter()
                .map(ToString::to_string)
                .collect();
            let node = json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name, "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": go_arch(),
                }},
                "spec": {"podCIDR": cidrs[0], "podCIDRs": cidrs},
            });
            api.patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&node),
            )
            .await?;
            self.heartbeat_node(n).await?;
        }
        Ok(())
    }

    /// Reports node `n` Ready and renews its Lease.
    pub async fn heartbeat_node(&self, n: u8) -> Result<()> {
        let name = node_name(n);
        let t = serde_json::to_value(now()).unwrap_or(Value::Null);
        let cond = |ty: &str, status: &str, reason: &str| {
            json!({"type": ty, "status": status, "reason": reason, "message": "ferrolb lab kubelet",
                   "lastHeartbeatTime": t, "lastTransitionTime": t})
        };
        let mut addrs: Vec<Value> = addresses::node_ips(n, self.family)
            .iter()
            .map(|ip| json!({"type": "InternalIP", "address": ip.to_string()}))
            .collect();
        addrs.push(json!({"type": "Hostname", "address": name}));
        let resources =
            json!({"cpu": "8", "memory": "16Gi", "pods": "110", "ephemeral-storage": "100Gi"});
        let status = json!({"status": {
            "addresses": addrs,
            "capacity": resources,
            "allocatable": resources,
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID"),
                cond("Ready", "True", "KubeletReady"),
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "architecture": go_arch(), "bootID": "lab", "containerRuntimeVersion": "ferrolb-lab://1",
                "kernelVersion": "lab", "kubeProxyVersion": "", "kubeletVersion": "v1.34.0-ferrolb-lab",
                "machineID": name, "operatingSystem": "linux", "osImage": "ferrolb lab", "systemUUID": name,
            },
        }});
        // Merge patch: the lab owns every field it sets, and lists are replaced whole.
        Api::<Node>::all(self.client.clone())
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_DURATION_SECONDS,
                     "renewTime": serde_json::to_value(MicroTime(Timestamp::now())).unwrap_or(Value::Null)},
        });
        Api::<Lease>::namespaced(self.client.clone(), "kube-node-lease")
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&lease),
            )
            .await?;
        Ok(())
    }

    /// Renews Node status and Leases forever, except for nodes cut off the LAN.
    pub async fn heartbeat_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(HEARTBEAT).await;
            for n in 1..=self.nodes {
                if lock(&self.inner).offline.contains(&n) {
                    continue;
                }
                if let Err(e) = self.heartbeat_node(n).await {
                    warn!(node = n, error = %e, "heartbeat failed");
                }
            }
        }
    }

    /// A node whose link is down stops heartbeating, as a real kubelet would.
    pub fn set_online(&self, n: u8, online: bool) {
        let mut inner = lock(&self.inner);
        if online {
            inner.offline.remove(&n)
        } else {
            inner.offline.insert(n)
        };
    }

    /// Watches all Pods and runs the ones bound to lab nodes. Never returns.
    pub async fn run_pods(self: Arc<Self>) {
        let api: Api<Pod> = Api::all(self.client.clone());
        let mut stream = watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut listed: HashSet<String> = HashSet::new();
        while let Some(event) = stream.next().await {
            match event {
                Ok(Event::Apply(pod)) => self.clone().on_pod(pod).await,
                Ok(Event::InitApply(pod)) => {
                    if let Some(uid) = pod.uid() {
                        listed.insert(uid);
                    }
                    self.clone().on_pod(pod).await;
                }
                Ok(Event::Init) => listed.clear(),
                Ok(Event::InitDone) => {
                    // Pods deleted while the watch was down.
                    let gone: Vec<String> = lock(&self.inner)
                        .pods
                        .keys()
                        .filter(|u| !listed.contains(*u))
                        .cloned()
                        .collect();
                    for uid in gone {
                        self.teardown(&uid).await;
                    }
                }
                Ok(Event::Delete(pod)) => {
                    if let Some(uid) = pod.uid() {
                        self.teardown(&uid).await;
                    }
                }
                Err(e) => warn!(error = %e, "pod watch failed; retrying"),
            }
        }
    }

    fn lab_node(&self, pod: &Pod) -> Option<u8> {
        let name = pod.spec.as_ref()?.node_name.as_deref()?;
        parse_node(name).ok().filter(|n| *n <= self.nodes)
    }

    async fn on_pod(self: Arc<Self>, pod: Pod) {
        let Some(n) = self.lab_node(&pod) else { return };
        let Some(uid) = pod.uid() else { return };
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        let (ns, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
        let deleting = pod.metadata.deletion_timestamp.is_some();

        let known = {
            let inner = lock(&self.inner);
            inner.pods.get(&uid).map(|p| (p.terminating, p.wanted))
        };
        match known {
            None if deleting => {
                // Never started here (or the supervisor restarted): nothing to drain.
                self.delete_now(&ns, &name, &uid).await;
            }
            None if matches!(phase, Some("Succeeded" | "Failed")) => {}
            None => {
                if let Err(e) = self.clone().start_pod(n, &uid, &pod).await {
                    warn!(%ns, %name, error = %e, "cannot start pod");
                    self.teardown(&uid).await;
                }
            }
            Some((false, _)) if deleting => {
                let grace = pod
                    .metadata
                    .deletion_grace_period_seconds
                    .unwrap_or(0)
                    .max(0);
                if let Some(p) = lock(&self.inner).pods.get_mut(&uid) {
                    p.terminating = true;
                }
                info!(%ns, %name, grace, "pod terminating; keeps serving for its grace period");
                let me = self.clone();
                tokio::spawn(async move {
                    // Like an application that drains on SIGTERM until killed.
                    tokio::time::sleep(Duration::from_secs(grace.unsigned_abs())).await;
                    me.teardown(&uid).await;
                    me.delete_now(&ns, &name, &uid).await;
                });
            }
            Some((false, wanted)) if wanted != wanted_ready(&pod) => {
                if let Some(p) = lock(&self.inner).pods.get_mut(&uid) {
                    p.wanted = wanted_ready(&pod);
                }
                self.report(&uid).await;
            }
            Some(_) => {}
        }
    }

    async fn start_pod(self: Arc<Self>, n: u8, uid: &str, pod: &Pod) -> Result<()> {
        let (ns, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
        let host_network = pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        let (netns, idx, ips) = if host_network {
            (
                self.prefix.node_netns(n),
                None,
                addresses::node_ips(n, self.family),
            )
        } else {
            let idx = lock(&self.inner)
                .allocators
                .entry(n)
                .or_default()
                .allocate()
                .ok_or_else(|| KubeletError::NodeFull(node_name(n)))?;
            (
                self.prefix.pod_netns(uid),
                Some(idx),
                addresses::pod_ips(n, idx, self.family),
            )
        };
        let started = now();
        lock(&self.inner).pods.insert(
            uid.to_string(),
            RunningPod {
                namespace: ns.clone(),
                name: name.clone(),
                node: n,
                netns: netns.clone(),
                idx,
                ips: ips.clone(),
                pod: pod.clone(),
                started: started.clone(),
                wanted: wanted_ready(pod),
                container: container::State::Running {
                    since: started,
                    serving: false,
                },
                restarts: 0,
                phase: "Running",
                reported: None,
                terminating: false,
                stop: None,
                task: None,
            },
        );
        self.state
            .write_pod(
                &ns,
                &name,
                &PodRecord {
                    uid: uid.to_string(),
                    netns: netns.clone(),
                    pid: None,
                },
            )
            .map_err(|e| KubeletError::Join(format!("writing the pod record: {e}")))?;
        if let Some(idx) = idx {
            let (prefix, family, netns) = (self.prefix.clone(), self.family, netns.clone());
            tokio::task::spawn_blocking(move || netns::add_pod(&prefix, n, &netns, idx, family))
                .await
                .map_err(|e| KubeletError::Join(e.to_string()))??;
        }
        info!(%ns, %name, node = n, ips = ?ips, %netns, "pod running");
        // Running but not Ready: the IP is known, the ports are not proven.
        self.report(uid).await;
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(self.clone().run_container(uid.to_string(), stopped));
        if let Some(p) = lock(&self.inner).pods.get_mut(uid) {
            p.stop = Some(stop);
            p.task = Some(task);
        }
        Ok(())
    }

    /// Runs the pod's echo server until told to stop: Ready once every
    /// declared port answers, NotReady the moment it dies, restarted with
    /// back-off as `restartPolicy` says, Failed if it stays dead.
    async fn run_container(self: Arc<Self>, uid: String, mut stop: oneshot::Receiver<()>) {
        let Some((pod, netns, probe_ip, ns, name)) = lock(&self.inner).pods.get(&uid).map(|p| {
            (
                p.pod.clone(),
                p.netns.clone(),
                p.ips.first().copied(),
                p.namespace.clone(),
                p.name.clone(),
            )
        }) else {
            return;
        };
        let ports = container::Ports::of(&pod);
        let policy = pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into());
        let log = self.state.log(&format!("pod-{ns}-{name}"));
        let (program, leading) = &self.echo;
        let args: Vec<String> = leading.iter().cloned().chain(echo_args(&pod)).collect();
        let mut failures = 0u32;
        loop {
            let spawned = process::command(&self.prefix, Some(&netns), program, &args, &log)
                .and_then(|mut cmd| {
                    cmd.env("POD_NAME", &name).env("POD_NAMESPACE", &ns);
                    cmd.spawn().map_err(|source| process::ProcessError::Spawn {
                        program: "ferrolb-echo".into(),
                        source,
                    })
                });
            let mut child = match spawned {
                Ok(c) => c,
                Err(e) => {
                    warn!(%ns, %name, error = %e, "cannot start the echo server");
                    return;
                }
            };
            let _ = self.state.set_pod_pid(&ns, &name, &uid, child.id());
            let since = now();
            self.set_container(
                &uid,
                container::State::Running {
                    since: since.clone(),
                    serving: false,
                },
                None,
            )
            .await;
            let proven = async {
                let Some(ip) = probe_ip else { return };
                while !container::probe(ip, &ports, &name).await {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            };
            let status = tokio::select! {
                _ = &mut stop => return stop_child(child).await,
                status = child.wait() => status,
                _ = proven => {
                    self.set_container(&uid, container::State::Running { since, serving: true }, None).await;
                    tokio::select! {
                        _ = &mut stop => return stop_child(child).await,
                        status = child.wait() => status,
                    }
                }
            };
            let exit_code = status.ok().and_then(|s| s.code()).unwrap_or(137);
            failures += 1;
            let next = container::restart_after(&policy, failures, exit_code);
            warn!(%ns, %name, exit_code, restart_in = ?next, "echo server exited");
            let phase = if next.is_some() {
                "Running"
            } else {
                container::final_phase(exit_code)
            };
            self.set_container(
                &uid,
                container::State::Terminated {
                    exit_code,
                    finished: now(),
                },
                Some(phase),
            )
            .await;
            let Some(delay) = next else { return };
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(delay) => {}
            }
            if let Some(p) = lock(&self.inner).pods.get_mut(&uid) {
                p.restarts += 1;
            }
        }
    }

    /// Records the container's state (and phase) and reports the pod if
    /// anything visible changed.
    async fn set_container(&self, uid: &str, state: container::State, phase: Option<&'static str>) {
        if let Some(p) = lock(&self.inner).pods.get_mut(uid) {
            p.container = state;
            if let Some(phase) = phase {
                p.phase = phase;
            }
        }
        self.report(uid).await;
    }

    /// Reports the pod's status as the kubelet sees it now.
    async fn report(&self, uid: &str) {
        let Some((pod, ips, node, started, phase, ready, container, restarts)) =
            lock(&self.inner).pods.get(uid).map(|p| {
                (
                    p.pod.clone(),
                    p.ips.clone(),
                    p.node,
                    p.started.clone(),
                    p.phase,
                    p.ready(),
                    p.container.clone(),
                    p.restarts,
                )
            })
        else {
            return;
        };
        // A node cut off the LAN cannot tell the API anything.
        if lock(&self.inner).offline.contains(&node) {
            return;
        }
        let node_ips = addresses::node_ips(node, self.family);
        let status = pod_status(
            &pod,
            &Report {
                node_ips: &node_ips,
                pod_ips: &ips,
                started: &started,
                phase,
                ready,
                container: &container,
                restarts,
            },
        );
        let api: Api<Pod> =
            Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
        match api
            .patch_status(
                &pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&status),
            )
            .await
        {
            Ok(_) => {
                if let Some(p) = lock(&self.inner).pods.get_mut(uid) {
                    p.reported = Some(ready);
                }
            }
            Err(e) => warn!(pod = %pod.name_any(), error = %e, "cannot report pod status"),
        }
    }

    /// Stops the echo server and removes the pod's netns; idempotent.
    async fn teardown(&self, uid: &str) {
        let Some(mut p) = lock(&self.inner).pods.remove(uid) else {
            return;
        };
        if let Some(stop) = p.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = p.task.take() {
            let _ = task.await;
        }
        if let Some(idx) = p.idx {
            let (prefix, netns, n) = (self.prefix.clone(), p.netns.clone(), p.node);
            match tokio::task::spawn_blocking(move || netns::del_pod(&prefix, n, &netns, idx)).await
            {
                Ok(Err(e)) => {
                    warn!(ns = %p.namespace, name = %p.name, error = %e, "cannot remove pod netns")
                }
                Err(e) => warn!(error = %e, "pod teardown task failed"),
                Ok(Ok(())) => {}
            }
            if let Some(a) = lock(&self.inner).allocators.get_mut(&p.node) {
                a.release(idx);
            }
        }
        self.state.remove_pod(&p.namespace, &p.name, uid);
        info!(ns = %p.namespace, name = %p.name, "pod stopped");
    }

    /// Final deletion once the pod is stopped, as the kubelet does after the grace period.
    async fn delete_now(&self, ns: &str, name: &str, uid: &str) {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(name, &dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => warn!(%ns, %name, error = %e, "cannot delete pod"),
        }
    }

    /// Tears down every pod (used on shutdown).
    pub async fn stop_all(&self) {
        let uids: Vec<String> = lock(&self.inner).pods.keys().cloned().collect();
        for uid in uids {
            self.teardown(&uid).await;
        }
    }
}

/// Kills the echo server and reaps it.
async fn stop_child(mut child: tokio::process::Child) {
    let _ = child.start_kill();
    let _ = child.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: Value) -> Pod {
        serde_json::from_value(yaml).unwrap()
    }

    #[test]
    fn readiness_follows_the_annotation() {
        let mut p = pod(json!({"metadata": {"name": "x"}}));
        assert!(wanted_ready(&p));
        p.metadata.annotations = Some([(READY_ANNOTATION.to_string(), "false".to_string())].into());
        assert!(!wanted_ready(&p));
    }

    #[test]
    fn status_reports_ips_and_ready_conditions() {
        let p = pod(
            json!({"metadata": {"name": "x", "uid": "u1"}, "spec": {"containers": [{"name": "c", "image": "nginx"}]}}),
        );
        let ips = addresses::pod_ips(2, 5, IpFamily::Dual);
        let started = now();
        let s = pod_status(
            &p,
            &Report {
                node_ips: &addresses::node_ips(2, IpFamily::Dual),
                pod_ips: &ips,
                started: &started,
                phase: "Running",
                ready: false,
                container: &container::State::Terminated {
                    exit_code: 1,
                    finished: started.clone(),
                },
                restarts: 2,
            },
        );
        assert_eq!(s["status"]["containerStatuses"][0]["restartCount"], 2);
        assert_eq!(
            s["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"],
            1
        );
        assert_eq!(s["status"]["podIP"], "198.19.2.5");
        assert_eq!(s["status"]["podIPs"][1]["ip"], "2001:db8:1:2::5");
        assert_eq!(s["status"]["hostIP"], "198.18.0.12");
        let ready = s["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap();
        assert_eq!(ready["status"], "False");
        assert_eq!(s["status"]["containerStatuses"][0]["ready"], false);
        // The status must deserialize as a real PodStatus.
        let typed: k8s_openapi::api::core::v1::PodStatus =
            serde_json::from_value(s["status"].clone()).unwrap();
        assert_eq!(typed.phase.as_deref(), Some("Running"));
    }
}
