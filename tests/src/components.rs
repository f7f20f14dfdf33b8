//! FerroLB's own components in the lab: where their binaries are, the
//! manifests they need (CRDs, the chart's RBAC), their ServiceAccount tokens
//! and their command lines.

use std::path::{Path, PathBuf};

use crate::addresses;
use crate::names::{Component, Kind};

pub const NAMESPACE: &str = "ferrolb-system";
/// Tokens are long-lived: a lab may stay up for days of benchmarking.
pub const TOKEN_DURATION: &str = "8760h";

/// Overrides where the CRDs and the chart are read from (default: this repository).
pub const REPO_ENV: &str = "FERROLB_LAB_REPO";

pub fn repo_root() -> PathBuf {
    if let Some(dir) = std::env::var_os(REPO_ENV) {
        return PathBuf::from(dir);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

pub fn crd_dir() -> PathBuf {
    repo_root().join("crds/manifests")
}

pub fn rbac_path() -> PathBuf {
    repo_root().join("charts/ferrolb/templates/rbac.yaml")
}

/// The CRD manifests (`crds/manifests/*.yaml`), sorted; empty if none are generated yet.
pub fn crd_files() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(crd_dir())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    v.sort();
    v
}

/// The cargo command that builds the components into `bin_dir`
/// (`target/release` or `target/debug`).
pub fn build_command(bin_dir: &Path) -> String {
    let release = bin_dir.file_name().is_some_and(|n| n == "release");
    format!(
        "cargo build{} --workspace --bins",
        if release { " --release" } else { "" }
    )
}

/// The chart's only templating is the release namespace.
pub fn render_rbac(template: &str) -> String {
    let mut out = template.to_string();
    for pat in [
        "{{ .Release.Namespace }}",
        "{{.Release.Namespace}}",
        "{{ .Release.Namespace}}",
        "{{.Release.Namespace }}",
    ] {
        out = out.replace(pat, NAMESPACE);
    }
    out
}

/// The Secret holding the speakers' heartbeat key (the chart generates
/// the same one).
pub fn heartbeat_secret(key: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: ferrolb-speaker-heartbeat\n  namespace: {NAMESPACE}\ntype: Opaque\nstringData:\n  key: \"{key}\"\n"
    )
}

pub fn binary_name(kind: Kind) -> Option<&'static str> {
    match kind {
        Kind::Controller => Some("ferrolb-controller"),
        Kind::Speaker => Some("ferrolb-speaker"),
        Kind::Proxy => Some("ferrolb-proxy"),
        _ => None,
    }
}

/// ServiceAccount each component runs as (bound by the chart's RBAC).
pub fn service_account(kind: Kind) -> Option<&'static str> {
    binary_name(kind)
}

/// The identity the lab's controller campaigns under: stable across
/// restarts, as a pod's name is, so a restarted controller takes its own
/// Lease back at once.
pub const CONTROLLER_IDENTITY: &str = "ferrolb-controller-lab-0";

/// The binary's own default ports (the chart's too).
pub fn default_ports(kind: Kind) -> ferrolb_runtime::DefaultPorts {
    match kind {
        Kind::Speaker => ferrolb_runtime::ports::SPEAKER,
        Kind::Proxy => ferrolb_runtime::ports::PROXY,
        _ => ferrolb_runtime::ports::CONTROLLER,
    }
}

/// Metrics and health addresses. Per-node components run with their
/// binaries' default ports on the node (as the chart's host-network pods
/// do), so two of them clashing on one port fails in the lab as it would in
/// a cluster; the controller listens on the control-plane address.
pub fn listen_addrs(c: &Component) -> (String, String) {
    let ip = match c.node {
        Some(n) => addresses::node_v4(n),
        None => addresses::control_plane_v4(),
    };
    let ports = default_ports(c.kind);
    (
        format!("{ip}:{}", ports.metrics),
        format!("{ip}:{}", ports.health),
    )
}

/// `GET /readyz` on a component's health address: the HTTP status code, or
/// None if nothing answers. Reachable from the root namespace over the LAN.
pub fn readyz(c: &Component) -> Option<u16> {
    use std::io::{Read, Write};
    let (_, addr) = listen_addrs(c);
    let addr: std::net::SocketAddr = addr.parse().ok()?;
    let timeout = std::time::Duration::from_millis(500);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout * 2)).ok()?;
    write!(
        s,
        "GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    String::from_utf8_lossy(&buf[..n])
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

pub fn args(c: &Component, kubeconfig: &Path) -> Vec<String> {
    let mut a = vec![
        "--kubeconfig".to_string(),
        kubeconfig.display().to_string(),
        "--log-format".into(),
        "text".into(),
    ];
    match c.node {
        Some(n) => {
            a.push("--node-name".into());
            a.push(crate::names::node_name(n));
            if c.kind == Kind::Proxy {
                // As a cluster's kube-proxy is told its pod network.
                a.push("--cluster-cidr".into());
                a.push(format!(
                    "{},{}",
                    addresses::CLUSTER_POD_CIDR_V4,
                    addresses::CLUSTER_POD_CIDR_V6
                ));
            }
        }
        None => {
            // The root namespace is the machine's: bind only the lab's address.
            let (metrics, health) = listen_addrs(c);
            a.extend([
                "--metrics-addr".into(),
                metrics,
                "--health-addr".into(),
                health,
            ]);
            if c.kind == Kind::Controller {
                a.extend(["--identity".into(), CONTROLLER_IDENTITY.into()]);
            }
        }
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_command_matches_the_profile() {
        assert_eq!(
            build_command(Path::new("/r/target/release")),
            "cargo build --release --workspace --bins"
        );
        assert_eq!(
            build_command(Path::new("/r/target/debug")),
            "cargo build --workspace --bins"
        );
    }

    #[test]
    fn rbac_namespace_is_substituted() {
        let t = "metadata:\n  namespace: {{ .Release.Namespace }}\n---\nnamespace: {{.Release.Namespace}}\n";
        let r = render_rbac(t);
        assert!(!r.contains("{{"), "{r}");
        assert_eq!(r.matches(NAMESPACE).count(), 2);
    }

    #[test]
    fn listen_addresses_do_not_collide() {
        let all = [
            Component::new(Kind::Controller, None),
            Component::new(Kind::Speaker, Some(1)),
            Component::new(Kind::Proxy, Some(1)),
            Component::new(Kind::Speaker, Some(2)),
        ];
        let mut seen = std::collections::HashSet::new();
        for c in &all {
            let (m, h) = listen_addrs(c);
            assert!(seen.insert(m) && seen.insert(h), "{c}");
        }
        let a = args(&all[1], Path::new("/k"));
        assert!(a.windows(2).any(|w| w == ["--node-name", "node-1"]));
        assert!(
            !a.iter().any(|x| x == "--metrics-addr"),
            "per-node components use their binaries' default ports: {a:?}"
        );
        assert_eq!(
            listen_addrs(&all[1]).0,
            format!("198.18.0.11:{}", ferrolb_runtime::ports::SPEAKER.metrics)
        );
        let c = args(&all[0], Path::new("/k"));
        assert!(
            c.windows(2)
                .any(|w| w == ["--identity", CONTROLLER_IDENTITY])
        );
    }
}
