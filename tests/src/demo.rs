//! `ferrolb-lab demo`: the README's first command. Each step either works for
//! real or the demo says which piece is not implemented yet and stops.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::addresses;
use crate::components;
use crate::control_plane;
use crate::echo;
use crate::kubectl::Kubectl;
use crate::names::Prefix;
use crate::process;
use crate::state::{StateDir, UpOptions};

const POOL: &str = "apiVersion: ferrolb.io/v1beta1
kind: IPAddressPool
metadata:
  name: demo
spec:
  addresses:
  - 198.18.8.0/24
---
# Announce every pool with ARP/NDP from every node (MetalLB's meaning of an
# empty spec).
apiVersion: ferrolb.io/v1beta1
kind: L2Advertisement
metadata:
  name: demo
spec: {}
";

const APP: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: demo
  namespace: default
spec:
  replicas: 3
  selector:
    matchLabels: {app: demo}
  template:
    metadata:
      labels: {app: demo}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: echo
        image: ferrolb/echo
        ports:
        - containerPort: 8080
---
apiVersion: v1
kind: Service
metadata:
  name: demo
  namespace: default
spec:
  type: LoadBalancer
  selector: {app: demo}
  ports:
  - name: http
    port: 80
    targetPort: 8080
";

fn step(n: u8, msg: &str) {
    eprintln!("\n[demo {n}/6] {msg}");
}

fn not_yet(msg: &str) -> Result<()> {
    eprintln!("\nNOT IMPLEMENTED YET: {msg}");
    eprintln!(
        "The lab itself is up; explore it with `ferrolb-lab status` and kubectl (export line above)."
    );
    bail!("demo stopped: {msg}")
}

pub async fn run(prefix: &Prefix, opts: &UpOptions) -> Result<()> {
    let state = StateDir::new(prefix);
    step(1, "bringing the lab up");
    let kubeconfig = match state.read_info() {
        Ok(info) if info.supervisor_pid.is_some_and(process::alive) => {
            eprintln!("lab {prefix} is already up; reusing it");
            state.admin_kubeconfig()
        }
        _ => crate::commands::up(prefix, opts).await?,
    };
    println!("export KUBECONFIG={}", kubeconfig.display());
    let kubectl = Kubectl::new(
        &control_plane::bin_dir(&control_plane::versions()?),
        &kubeconfig,
    );

    step(
        2,
        &format!(
            "applying an IPAddressPool with {} and an L2Advertisement",
            addresses::DEMO_POOL_V4
        ),
    );
    if components::crd_files().is_empty() {
        return not_yet(&format!(
            "FerroLB's CRDs are not generated yet ({} is empty), so there is no IPAddressPool kind",
            components::crd_dir().display()
        ));
    }
    if let Err(e) = kubectl.apply(POOL) {
        return not_yet(&format!("the API server rejected the IPAddressPool: {e}"));
    }

    step(
        3,
        "creating a 3-replica Deployment and a LoadBalancer Service (default/demo)",
    );
    kubectl.apply(APP)?;
    kubectl.run(
        &[
            "rollout",
            "status",
            "deployment/demo",
            "-n",
            "default",
            "--timeout=90s",
        ],
        None,
    )?;
    eprint!(
        "{}",
        kubectl.run(
            &[
                "get", "pods", "-n", "default", "-l", "app=demo", "-o", "wide"
            ],
            None
        )?
    );

    step(4, "waiting up to 30s for the Service's LoadBalancer IP");
    let demo_field = |path: &str| {
        let path = format!("jsonpath={path}");
        kubectl.run(
            &["get", "service", "demo", "-n", "default", "-o", &path],
            None,
        )
    };
    let controller_running = state.read_pid("controller").is_some_and(process::alive);
    let start = Instant::now();
    let ip = loop {
        let out = demo_field("{.status.loadBalancer.ingress[0].ip}")?;
        if !out.trim().is_empty() {
            break out.trim().to_string();
        }
        if start.elapsed() > Duration::from_secs(30) {
            let why = if controller_running {
                "ferrolb-controller is running but assigned no IP to default/demo within 30s (see `ferrolb-lab logs controller`)"
            } else {
                &format!(
                    "ferrolb-controller is not running (not built next to ferrolb-lab: `{}`; or the chart's RBAC is missing), so nothing assigns LoadBalancer IPs",
                    components::build_command(&crate::commands::exe_dir()?)
                )
            };
            return not_yet(why);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!(
        "default/demo got {ip} after {:.1}s",
        start.elapsed().as_secs_f64()
    );
    // Which node answers ARP for it: the speaker's condition says.
    let announced = Instant::now();
    loop {
        let out = demo_field("{.status.conditions[?(@.type==\"ferrolb.io/Announced\")].message}")?;
        if !out.trim().is_empty() {
            eprintln!("{}", out.trim());
            break;
        }
        if announced.elapsed() > Duration::from_secs(15) {
            eprintln!(
                "no speaker reports announcing {ip} yet (see `ferrolb-lab logs speaker@node-1`)"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    step(
        5,
        &format!("curl http://{ip}/ from the client namespace, 10 times"),
    );
    let mut answered = 0;
    for i in 1..=10 {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &prefix.client_netns(),
                "curl",
                "-s",
                "-m",
                "2",
                &format!("http://{ip}/"),
            ])
            .output()?;
        let body = String::from_utf8_lossy(&out.stdout);
        match echo::parse_reply(&body) {
            Some((pod, client)) => {
                answered += 1;
                println!("  request {i:>2}: answered by {pod} (it saw client {client})");
            }
            None => println!(
                "  request {i:>2}: no answer ({})",
                if body.is_empty() {
                    "timeout"
                } else {
                    body.trim()
                }
            ),
        }
        // Three silent requests in a row from the start: nothing serves the IP yet.
        if answered == 0 && i == 3 {
            break;
        }
    }
    if answered == 0 {
        return not_yet(&format!(
            "{ip} is assigned but unreachable from the client: the speaker does not announce it or the proxy does not forward it yet"
        ));
    }

    step(6, "what to try next");
    println!(
        "  ferrolb-lab exec client -- curl -s http://{ip}/\n  \
         kubectl get svc demo -o jsonpath='{{.status.conditions}}'   # who announces it\n  \
         ferrolb-lab kill speaker@<that node>   # then watch the IP move\n  \
         ferrolb-lab restart speaker        # a rolling update: nothing moves\n  \
         ferrolb-lab link node-2 down       # and `link node-2 up`\n  \
         ferrolb-lab restart-apiserver\n  \
         kubectl annotate pod <name> lab.ferrolb.io/ready=false   # take one backend out\n  \
         ferrolb-lab down"
    );
    Ok(())
}
