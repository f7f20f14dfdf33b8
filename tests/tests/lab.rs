//! Tests of the lab itself, as root, against the real control plane.
//!
//! One lab for the whole binary, driven through named steps in order, because
//! a lab owns fixed addresses (198.18.0.1) and takes seconds to start. Needs
//! root and network namespaces; set FERROLB_SKIP_LAB=1 to skip elsewhere.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::{cli_ok, done, exe, step, wait_until};
use ferrolb_lab::addresses::IpFamily;
use ferrolb_lab::echo::parse_reply;
use ferrolb_lab::lab::Lab;
use ferrolb_lab::names::Prefix;
use ferrolb_lab::state::{ProxyMode, StateDir, UpOptions};
use ferrolb_lab::{netns, process};

/// Distinct from the default `flb`, so a user's lab is never touched.
const PREFIX: &str = "flbtlab";

const WORKLOAD: &str = "apiVersion: apps/v1
kind: Deployment
metadata: {name: labtest, namespace: default}
spec:
  replicas: 3
  selector: {matchLabels: {app: labtest}}
  template:
    metadata: {labels: {app: labtest}}
    spec:
      terminationGracePeriodSeconds: 3
      containers:
      - name: web
        image: registry.invalid/never-pulled
        ports: [{containerPort: 8080}, {containerPort: 5353, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: labtest, namespace: default}
spec:
  selector: {app: labtest}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: pinned-1, namespace: default, labels: {app: pinned}}
spec:
  nodeName: node-1
  containers: [{name: web, image: x, ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: pinned-2, namespace: default, labels: {app: pinned}}
spec:
  nodeName: node-2
  containers: [{name: web, image: x, ports: [{containerPort: 8080}]}]
";

/// Two host-network pods on one node that declare the same port.
const HOST_PORT_PODS: &str = "apiVersion: v1
kind: Pod
metadata: {name: port-a, namespace: default, labels: {app: port-a}}
spec:
  nodeName: node-1
  hostNetwork: true
  containers: [{name: web, image: x, ports: [{containerPort: 9901}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: port-b, namespace: default, labels: {app: port-b}}
spec:
  nodeName: node-1
  hostNetwork: true
  restartPolicy: Never
  containers: [{name: web, image: x, ports: [{containerPort: 9901}]}]
";

const SAME_NAME_POD: &str = "apiVersion: v1
kind: Pod
metadata: {name: same, namespace: default, labels: {app: same}}
spec:
  nodeName: node-2
  terminationGracePeriodSeconds: 3
  containers: [{name: web, image: x, ports: [{containerPort: 8080}]}]
";

fn pod_field(lab: &Lab, name: &str, jsonpath: &str) -> Result<String> {
    lab.field("pod", "default", name, jsonpath)
}

/// Waits until every pod matching `selector` in `default` is Ready.
fn wait_pods_ready(lab: &Lab, selector: &str, timeout: &str) -> Result<()> {
    lab.kubectl_ok(&[
        "wait",
        "--for=condition=Ready",
        "pod",
        "-l",
        selector,
        "-n",
        "default",
        &format!("--timeout={timeout}"),
    ])?;
    Ok(())
}

fn pod_ip(lab: &Lab, name: &str) -> Result<String> {
    Ok(lab
        .kubectl_ok(&[
            "get",
            "pod",
            name,
            "-n",
            "default",
            "-o",
            "jsonpath={.status.podIP}",
        ])?
        .trim()
        .to_string())
}

/// Every address published in the Service's EndpointSlices with their `ready` flag.
fn endpoint_ips(lab: &Lab, service: &str) -> Result<Vec<(String, bool)>> {
    let out = lab.kubectl_ok(&[
        "get",
        "endpointslices",
        "-n",
        "default",
        "-l",
        &format!("kubernetes.io/service-name={service}"),
        "-o",
        "json",
    ])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let mut ips = Vec::new();
    for slice in v["items"].as_array().into_iter().flatten() {
        for ep in slice["endpoints"].as_array().into_iter().flatten() {
            let ready = ep["conditions"]["ready"].as_bool().unwrap_or(false);
            for a in ep["addresses"].as_array().into_iter().flatten() {
                ips.push((a.as_str().unwrap_or_default().to_string(), ready));
            }
        }
    }
    ips.sort();
    Ok(ips)
}

fn curl(lab: &Lab, from: &str, url: &str) -> Result<(String, std::net::SocketAddr)> {
    let out = lab.exec(from, &["curl", "-s", "-m", "3", url])?;
    let body = common::text(&out.stdout);
    parse_reply(&body).with_context(|| {
        format!(
            "curl {url} from {from}: {:?} {}",
            body,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn lab_cycle() -> Result<()> {
    let opts = UpOptions {
        nodes: 2,
        proxy: ProxyMode::None,
        ferrolb: false,
        ..UpOptions::default()
    };
    let prefix: Prefix = PREFIX.parse()?;

    let t = step("up: control plane comes up");
    let Some(lab) = common::up(PREFIX, &opts)? else {
        return Ok(());
    };
    let up_time = t.elapsed();
    ensure!(
        lab.kubectl_ok(&["get", "--raw", "/readyz"])?.trim() == "ok",
        "apiserver not ready"
    );
    let nodes = lab.kubectl_ok(&["get", "nodes", "-o", "jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type==\"Ready\")].status} {end}"])?;
    ensure!(nodes.trim() == "node-1=True node-2=True", "nodes: {nodes}");
    let cidr = lab.kubectl_ok(&["get", "node", "node-2", "-o", "jsonpath={.spec.podCIDR}"])?;
    ensure!(cidr == "198.19.2.0/24", "podCIDR of node-2: {cidr}");
    done(t);

    let t =
        step("a Deployment's pods become Ready and their netns IPs appear in the EndpointSlice");
    lab.apply(WORKLOAD)?;
    lab.kubectl_ok(&[
        "rollout",
        "status",
        "deployment/labtest",
        "-n",
        "default",
        "--timeout=90s",
    ])?;
    wait_pods_ready(&lab, "app=pinned", "60s")?;
    let names = lab.kubectl_ok(&[
        "get",
        "pods",
        "-n",
        "default",
        "-l",
        "app=labtest",
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ])?;
    let names: Vec<&str> = names.split_whitespace().collect();
    ensure!(names.len() == 3, "pods: {names:?}");
    let mut want = BTreeSet::new();
    for name in &names {
        let ip = pod_ip(&lab, name)?;
        // The IP the API shows is really configured inside that pod's netns.
        let addrs = common::text(
            &lab.exec(
                &format!("pod/default/{name}"),
                &["ip", "-o", "addr", "show", "dev", "eth0"],
            )?
            .stdout,
        );
        ensure!(
            addrs.contains(&format!(" {ip}/")),
            "{name}: {ip} not in its netns: {addrs}"
        );
        want.insert(ip);
    }
    wait_until(
        "the EndpointSlice to list the 3 pod IPs as ready",
        Duration::from_secs(30),
        || {
            let got: BTreeSet<String> = endpoint_ips(&lab, "labtest")?
                .into_iter()
                .filter(|(_, r)| *r)
                .map(|(ip, _)| ip)
                .collect();
            Ok(got == want)
        },
    )?;
    done(t);

    let t = step("the client reaches a pod IP through the node routes (TCP and UDP)");
    let target = names[0];
    let ip = pod_ip(&lab, target)?;
    let (pod, client) = curl(&lab, "client", &format!("http://{ip}:8080/"))?;
    ensure!(pod == target, "answered by {pod}, expected {target}");
    ensure!(
        client.ip().to_string() == "198.18.0.100",
        "source not preserved: {client}"
    );
    let udp = lab.exec(
        "client",
        &["sh", "-c", &format!("echo hi | socat -t2 - UDP:{ip}:5353")],
    )?;
    let (pod, _) = parse_reply(&common::text(&udp.stdout))
        .with_context(|| format!("udp reply: {:?}", common::text(&udp.stdout)))?;
    ensure!(pod == target, "udp answered by {pod}");
    done(t);

    let t = step("a pod on node-1 reaches a pod on node-2");
    let (ip1, ip2) = (pod_ip(&lab, "pinned-1")?, pod_ip(&lab, "pinned-2")?);
    ensure!(
        ip1.starts_with("198.19.1.") && ip2.starts_with("198.19.2."),
        "{ip1} {ip2}"
    );
    let (pod, client) = curl(&lab, "pod/default/pinned-1", &format!("http://{ip2}:8080/"))?;
    ensure!(
        pod == "pinned-2" && client.ip().to_string() == ip1,
        "{pod} saw {client}"
    );
    done(t);

    let t = step("`link node-2 down` cuts node-2 off the LAN, `link node-2 up` restores it");
    let url2 = format!("http://{ip2}:8080/");
    cli_ok(&lab, &["link", "node-2", "down"])?;
    ensure!(
        curl(&lab, "client", &url2).is_err(),
        "pinned-2 still reachable with node-2's link down"
    );
    cli_ok(&lab, &["link", "node-2", "up"])?;
    wait_until(
        "pinned-2 to be reachable again",
        Duration::from_secs(10),
        || Ok(curl(&lab, "client", &url2).is_ok()),
    )?;
    done(t);

    let t = step("readiness annotation and graceful deletion show in the EndpointSlice");
    lab.kubectl_ok(&[
        "annotate",
        "pod",
        target,
        "-n",
        "default",
        "lab.ferrolb.io/ready=false",
    ])?;
    wait_until(
        "the annotated pod to be unready in the EndpointSlice",
        Duration::from_secs(20),
        || Ok(endpoint_ips(&lab, "labtest")?.contains(&(ip.clone(), false))),
    )?;
    let target_uid = lab.kubectl_ok(&[
        "get",
        "pod",
        target,
        "-n",
        "default",
        "-o",
        "jsonpath={.metadata.uid}",
    ])?;
    lab.kubectl_ok(&["delete", "pod", target, "-n", "default", "--wait=false"])?;
    let gone = Instant::now();
    wait_until(
        "the deleted pod to leave the EndpointSlice",
        Duration::from_secs(30),
        || Ok(!endpoint_ips(&lab, "labtest")?.iter().any(|(i, _)| *i == ip)),
    )?;
    // terminationGracePeriodSeconds is 3: the endpoint must not vanish at once.
    ensure!(
        gone.elapsed() >= Duration::from_secs(2),
        "pod left after {:?}, before its grace period",
        gone.elapsed()
    );
    ensure!(
        !netns::netns_exists(&prefix.pod_netns(&target_uid)),
        "the deleted pod's netns is still there"
    );
    done(t);

    let t = step("a pod is Ready only once its ports answer; a dead container turns it NotReady");
    lab.apply(HOST_PORT_PODS)?;
    wait_pods_ready(&lab, "app=port-a", "60s")?;
    // port-b's echo server cannot bind the port port-a holds: it must never
    // be reported Ready, and with restartPolicy Never it ends Failed.
    let mut seen_ready = false;
    wait_until("port-b to fail", Duration::from_secs(30), || {
        let ready = pod_field(
            &lab,
            "port-b",
            "{.status.conditions[?(@.type==\"Ready\")].status}",
        )?;
        seen_ready |= ready == "True";
        Ok(pod_field(&lab, "port-b", "{.status.phase}")? == "Failed")
    })?;
    ensure!(
        !seen_ready,
        "a pod whose server never listened was reported Ready"
    );
    let victim = names[1];
    let victim_ip = pod_ip(&lab, victim)?;
    cli_ok(&lab, &["kill", &format!("pod/default/{victim}")])?;
    wait_until(
        "the killed container's endpoint to be unready",
        Duration::from_secs(8),
        || Ok(endpoint_ips(&lab, "labtest")?.contains(&(victim_ip.clone(), false))),
    )?;
    wait_until(
        "the restarted container to be ready again",
        Duration::from_secs(40),
        || Ok(endpoint_ips(&lab, "labtest")?.contains(&(victim_ip.clone(), true))),
    )?;
    ensure!(
        pod_field(&lab, victim, "{.status.containerStatuses[0].restartCount}")? == "1",
        "restart not counted"
    );
    done(t);

    let t = step("a replacement pod of the same name gets a netns of its own");
    lab.apply(SAME_NAME_POD)?;
    wait_pods_ready(&lab, "app=same", "60s")?;
    let first_uid = pod_field(&lab, "same", "{.metadata.uid}")?;
    // Deleted with a grace period, then force-deleted so the name is free
    // while the first pod still drains.
    lab.kubectl_ok(&["delete", "pod", "same", "-n", "default", "--wait=false"])?;
    lab.kubectl_ok(&[
        "delete",
        "pod",
        "same",
        "-n",
        "default",
        "--force",
        "--grace-period=0",
    ])?;
    lab.apply(SAME_NAME_POD)?;
    wait_until(
        "the replacement to be scheduled",
        Duration::from_secs(30),
        || Ok(pod_field(&lab, "same", "{.metadata.uid}")? != first_uid),
    )?;
    wait_pods_ready(&lab, "app=same", "60s")?;
    let second_uid = pod_field(&lab, "same", "{.metadata.uid}")?;
    // Past the first pod's grace period: its cleanup has run.
    std::thread::sleep(Duration::from_secs(5));
    ensure!(
        netns::netns_exists(&prefix.pod_netns(&second_uid)),
        "the replacement's netns was torn down"
    );
    ensure!(!netns::netns_exists(&prefix.pod_netns(&first_uid)));
    let same_ip = pod_ip(&lab, "same")?;
    let (pod, _) = curl(&lab, "client", &format!("http://{same_ip}:8080/"))?;
    ensure!(pod == "same", "answered by {pod}");
    done(t);

    let t = step("a second up after the first one's supervisor was SIGKILLed");
    let state = StateDir::new(&prefix);
    let sup = state
        .read_info()?
        .supervisor_pid
        .context("no supervisor pid")?;
    ensure!(process::signal(sup, "KILL"), "cannot kill the supervisor");
    wait_until("the supervisor to die", Duration::from_secs(5), || {
        Ok(!process::alive(sup))
    })?;
    // The second lab is dual-stack with kube-proxy, to cover those modes too.
    let opts = UpOptions {
        ip_family: IpFamily::Dual,
        proxy: ProxyMode::KubeProxy,
        ..opts
    };
    let lab = Lab::up(exe(), PREFIX, &opts)?;
    let second_up = t.elapsed();
    ensure!(
        lab.kubectl_ok(&["get", "--raw", "/readyz"])?.trim() == "ok",
        "apiserver not ready after the second up"
    );
    let pods = lab.kubectl_ok(&["get", "pods", "-A", "-o", "name"])?;
    ensure!(
        pods.trim().is_empty(),
        "the second lab must start empty, has {pods}"
    );
    done(t);

    let t = step("dual-stack: pods get IPv6 addresses reachable from the client");
    lab.apply(WORKLOAD)?;
    wait_pods_ready(&lab, "app=pinned", "60s")?;
    let v6 = lab.kubectl_ok(&[
        "get",
        "pod",
        "pinned-2",
        "-n",
        "default",
        "-o",
        "jsonpath={.status.podIPs[1].ip}",
    ])?;
    ensure!(v6.starts_with("2001:db8:1:2::"), "pinned-2 IPv6: {v6:?}");
    let (pod, client) = curl(&lab, "client", &format!("http://[{v6}]:8080/"))?;
    ensure!(
        pod == "pinned-2" && client.ip().to_string() == "2001:db8::100",
        "{pod} saw {client}"
    );
    done(t);

    let t = step("kube-proxy mode: a ClusterIP reaches the Deployment's pods from a pod");
    lab.kubectl_ok(&[
        "rollout",
        "status",
        "deployment/labtest",
        "-n",
        "default",
        "--timeout=90s",
    ])?;
    let cluster_ip = lab.kubectl_ok(&[
        "get",
        "service",
        "labtest",
        "-n",
        "default",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ])?;
    let backends: BTreeSet<String> = lab
        .kubectl_ok(&[
            "get",
            "pods",
            "-n",
            "default",
            "-l",
            "app=labtest",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])?
        .split_whitespace()
        .map(str::to_string)
        .collect();
    wait_until(
        "kube-proxy to program the ClusterIP",
        Duration::from_secs(30),
        || {
            Ok(curl(
                &lab,
                "pod/default/pinned-1",
                &format!("http://{cluster_ip}/"),
            )
            .is_ok_and(|(pod, _)| backends.contains(&pod)))
        },
    )?;
    done(t);

    let t = step("kill and start a per-node component; restart the API server");
    cli_ok(&lab, &["kill", "kube-proxy@node-1"])?;
    wait_until(
        "kube-proxy@node-1 to be gone",
        Duration::from_secs(5),
        || Ok(state.read_pid("kube-proxy@node-1").is_none()),
    )?;
    cli_ok(&lab, &["start", "kube-proxy@node-1"])?;
    let pid = state
        .read_pid("kube-proxy@node-1")
        .context("kube-proxy@node-1 not restarted")?;
    ensure!(process::alive(pid), "restarted kube-proxy is not alive");
    let restart = cli_ok(&lab, &["restart-apiserver"])?;
    eprintln!("    {}", restart.trim());
    ensure!(
        lab.kubectl_ok(&["get", "--raw", "/readyz"])?.trim() == "ok",
        "apiserver not ready after restart"
    );
    done(t);

    let t = step("down leaves no namespace, link or process behind");
    lab.down()?;
    let left = netns::leftovers(&prefix);
    ensure!(left.is_empty(), "left behind: {left:?}");
    let procs = process::lab_processes(&prefix);
    ensure!(procs.is_empty(), "processes left: {procs:?}");
    ensure!(!state.exists(), "state dir {} left", state.root().display());
    done(t);
    eprintln!(
        "\nfirst up {:.1}s, second up after a crash {:.1}s",
        up_time.as_secs_f64(),
        second_up.as_secs_f64()
    );
    Ok(())
}

#[test]
fn lab_lifecycle() {
    let result = lab_cycle();
    if result.is_err() {
        // Never leave a half lab behind for the next test binary.
        let _ = Lab::attach(exe(), PREFIX).and_then(|l| l.down());
    }
    if let Err(e) = result {
        panic!("{e:#}");
    }
}
