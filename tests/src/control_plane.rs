//! The real Kubernetes control plane: where its binaries are cached, how to
//! build them when missing, and the command lines the lab runs them with.

use std::path::{Path, PathBuf};

use crate::addresses::{self, IpFamily};
use crate::certs::Pki;

/// The one place the versions are pinned, shared with the build script.
const CONTROL_PLANE_ENV: &str = include_str!("../control-plane.env");
/// The build script, run when binaries are missing (it is idempotent).
const BUILD_SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/scripts/build-control-plane.sh"
);
/// Builds the benchmark peers (kube-proxy, MetalLB); idempotent too.
const PEERS_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/build-peers.sh");

pub const ETCD_CLIENT_PORT: u16 = 23790;
pub const ETCD_PEER_PORT: u16 = 23791;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versions {
    pub kubernetes: String,
    pub etcd: String,
    /// The newest kube-proxy release, the benchmark peer (not `kubernetes`).
    pub peer_kube_proxy: String,
    pub peer_metallb: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error("tests/control-plane.env has no {0}=")]
    MissingVersion(&'static str),
    #[error("cannot run {script}: {source}")]
    RunScript {
        script: String,
        source: std::io::Error,
    },
    #[error("{script} failed ({status}); see its output above")]
    ScriptFailed {
        script: String,
        status: std::process::ExitStatus,
    },
    #[error("{0} still missing after the build")]
    StillMissing(String),
}

/// Parses `KEY=VALUE` lines (comments and blanks ignored).
pub fn parse_versions(text: &str) -> Result<Versions, ControlPlaneError> {
    let get = |key: &'static str| {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().trim_matches('"').to_string())
            .filter(|v| !v.is_empty())
            .ok_or(ControlPlaneError::MissingVersion(key))
    };
    Ok(Versions {
        kubernetes: get("KUBERNETES_VERSION")?,
        etcd: get("ETCD_VERSION")?,
        peer_kube_proxy: get("PEER_KUBE_PROXY_VERSION")?,
        peer_metallb: get("PEER_METALLB_VERSION")?,
    })
}

pub fn versions() -> Result<Versions, ControlPlaneError> {
    parse_versions(CONTROL_PLANE_ENV)
}

pub const BINARIES: [&str; 6] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kube-proxy",
];

/// `~/.cache/ferrolb/`, or `$FERROLB_CACHE` like the scripts.
fn cache_dir() -> PathBuf {
    std::env::var_os("FERROLB_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/root"));
            home.join(".cache/ferrolb")
        })
}

/// `~/.cache/ferrolb/bin/<version>/`.
pub fn bin_dir(v: &Versions) -> PathBuf {
    cache_dir().join("bin").join(&v.kubernetes)
}

/// `~/.cache/ferrolb/peers/`, where build-peers.sh puts the benchmark peers.
pub fn peers_dir() -> PathBuf {
    cache_dir().join("peers")
}

/// The peer kube-proxy binary, `peers/kube-proxy-<version>/kube-proxy`.
pub fn peer_kube_proxy(v: &Versions) -> PathBuf {
    peers_dir()
        .join(format!("kube-proxy-{}", v.peer_kube_proxy))
        .join("kube-proxy")
}

/// `peers/metallb-<version>/`, holding `controller`, `speaker` and `crds/*.yaml`.
pub fn peer_metallb_dir(v: &Versions) -> PathBuf {
    peers_dir().join(format!("metallb-{}", v.peer_metallb))
}

fn missing_peers(v: &Versions) -> Vec<PathBuf> {
    let m = peer_metallb_dir(v);
    [
        peer_kube_proxy(v),
        m.join("controller"),
        m.join("speaker"),
        m.join("crds"),
    ]
    .into_iter()
    .filter(|p| !p.exists())
    .collect()
}

pub fn missing_binaries(dir: &Path) -> Vec<&'static str> {
    BINARIES
        .iter()
        .copied()
        .filter(|b| !dir.join(b).is_file())
        .collect()
}

/// Makes sure every binary is cached, running the build script (which prints
/// its own progress on stderr) if not. Returns the binary directory.
pub fn ensure_binaries() -> Result<PathBuf, ControlPlaneError> {
    let v = versions()?;
    let dir = bin_dir(&v);
    let missing = missing_binaries(&dir);
    if missing.is_empty() {
        return Ok(dir);
    }
    eprintln!(
        "control plane binaries missing in {} ({}): building them with {BUILD_SCRIPT}; a cold build takes 20-40 minutes on 2 cores",
        dir.display(),
        missing.join(", ")
    );
    run_script(BUILD_SCRIPT)?;
    match missing_binaries(&dir).first() {
        Some(b) => Err(ControlPlaneError::StillMissing(b.to_string())),
        None => Ok(dir),
    }
}

/// Makes sure the benchmark peers are cached, running build-peers.sh if not.
/// Returns the pinned versions, for `peer_kube_proxy` and `peer_metallb_dir`.
pub fn ensure_peers() -> Result<Versions, ControlPlaneError> {
    let v = versions()?;
    if missing_peers(&v).is_empty() {
        return Ok(v);
    }
    eprintln!(
        "benchmark peers missing in {}: building them with {PEERS_SCRIPT}; a cold build takes several minutes on 2 cores",
        peers_dir().display()
    );
    run_script(PEERS_SCRIPT)?;
    match missing_peers(&v).first() {
        Some(p) => Err(ControlPlaneError::StillMissing(p.display().to_string())),
        None => Ok(v),
    }
}

/// Runs a build script with its progress (stderr) and output shown.
fn run_script(script: &str) -> Result<(), ControlPlaneError> {
    let status = std::process::Command::new("bash")
        .arg(script)
        .stdout(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::inherit())
        .status()
        .map_err(|source| ControlPlaneError::RunScript {
            script: script.to_string(),
            source,
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(ControlPlaneError::ScriptFailed {
            script: script.to_string(),
            status,
        })
    }
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

pub fn etcd_url() -> String {
    format!("http://127.0.0.1:{ETCD_CLIENT_PORT}")
}

pub fn etcd_args(data_dir: &Path) -> Vec<String> {
    let peer = format!("http://127.0.0.1:{ETCD_PEER_PORT}");
    vec![
        "--name=lab".into(),
        format!("--data-dir={}", p(data_dir)),
        format!("--listen-client-urls={}", etcd_url()),
        format!("--advertise-client-urls={}", etcd_url()),
        format!("--listen-peer-urls={peer}"),
        format!("--initial-advertise-peer-urls={peer}"),
        format!("--initial-cluster=lab={peer}"),
        // The lab's data is thrown away on `down`; fsync only costs start-up time.
        "--unsafe-no-fsync=true".into(),
        "--log-level=warn".into(),
    ]
}

pub fn apiserver_args(pki: &Pki, family: IpFamily) -> Vec<String> {
    vec![
        format!("--etcd-servers={}", etcd_url()),
        format!("--bind-address={}", addresses::control_plane_v4()),
        format!("--advertise-address={}", addresses::control_plane_v4()),
        format!("--secure-port={}", addresses::APISERVER_PORT),
        format!("--tls-cert-file={}", p(&pki.cert("apiserver"))),
        format!("--tls-private-key-file={}", p(&pki.key("apiserver"))),
        format!("--client-ca-file={}", p(&pki.ca_cert())),
        "--authorization-mode=Node,RBAC".into(),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
        format!("--service-account-key-file={}", p(&pki.sa_pub())),
        format!("--service-account-signing-key-file={}", p(&pki.sa_key())),
        format!(
            "--service-cluster-ip-range={}",
            addresses::service_cidrs(family)
        ),
        format!("--service-node-port-range={}", addresses::NODE_PORT_RANGE),
        "--allow-privileged=true".into(),
        "--profiling=false".into(),
        // Nothing listens on the lab nodes' kubelet port; the API server never needs it.
        format!("--kubelet-client-certificate={}", p(&pki.cert("admin"))),
        format!("--kubelet-client-key={}", p(&pki.key("admin"))),
    ]
}

pub fn controller_manager_args(pki: &Pki, kubeconfig: &Path, family: IpFamily) -> Vec<String> {
    let kc = p(kubeconfig);
    vec![
        format!("--kubeconfig={kc}"),
        format!("--authentication-kubeconfig={kc}"),
        format!("--authorization-kubeconfig={kc}"),
        // One instance and quick restarts: no election to wait for.
        "--leader-elect=false".into(),
        "--use-service-account-credentials=true".into(),
        format!("--service-account-private-key-file={}", p(&pki.sa_key())),
        format!("--root-ca-file={}", p(&pki.ca_cert())),
        format!("--cluster-signing-cert-file={}", p(&pki.ca_cert())),
        format!("--cluster-signing-key-file={}", p(&pki.ca_key())),
        // The lab's kubelet sets podCIDRs from the address plan.
        "--allocate-node-cidrs=false".into(),
        format!(
            "--service-cluster-ip-range={}",
            addresses::service_cidrs(family)
        ),
        // No HTTPS endpoint: nothing scrapes it and it would need a free port.
        "--secure-port=0".into(),
        "--controllers=*".into(),
    ]
}

pub fn scheduler_args(kubeconfig: &Path) -> Vec<String> {
    let kc = p(kubeconfig);
    vec![
        format!("--kubeconfig={kc}"),
        format!("--authentication-kubeconfig={kc}"),
        format!("--authorization-kubeconfig={kc}"),
        "--leader-elect=false".into(),
        "--secure-port=0".into(),
    ]
}

/// kube-proxy in nftables mode inside node `n`'s netns, the peer we compare against.
pub fn kube_proxy_args(n: u8, kubeconfig: &Path, family: IpFamily) -> Vec<String> {
    let ip = addresses::node_v4(n);
    let mut cluster = addresses::CLUSTER_POD_CIDR_V4.to_string();
    if family.has_v6() {
        cluster = format!("{cluster},{}", addresses::CLUSTER_POD_CIDR_V6);
    }
    vec![
        format!("--kubeconfig={}", p(kubeconfig)),
        "--proxy-mode=nftables".into(),
        format!("--hostname-override={}", crate::names::node_name(n)),
        format!("--cluster-cidr={cluster}"),
        format!("--metrics-bind-address={ip}:10249"),
        format!("--healthz-bind-address={ip}:10256"),
        // Leave the machine-wide conntrack table size alone.
        "--conntrack-max-per-core=0".into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_come_from_the_env_file() {
        let v = versions().unwrap();
        assert!(v.kubernetes.starts_with("v1."), "{v:?}");
        assert!(v.etcd.starts_with("v3."), "{v:?}");
        assert!(v.peer_kube_proxy.starts_with("v1."), "{v:?}");
        assert!(v.peer_metallb.starts_with("v0."), "{v:?}");
        let parsed = parse_versions(
            "# c\nKUBERNETES_VERSION=\"v1.34.4\"\n\nETCD_VERSION=v3.6.1\n\
             PEER_KUBE_PROXY_VERSION=v1.37.2\nPEER_METALLB_VERSION=v0.15.2\n",
        )
        .unwrap();
        assert_eq!(
            parsed,
            Versions {
                kubernetes: "v1.34.4".into(),
                etcd: "v3.6.1".into(),
                peer_kube_proxy: "v1.37.2".into(),
                peer_metallb: "v0.15.2".into(),
            }
        );
        assert!(peer_kube_proxy(&parsed).ends_with("peers/kube-proxy-v1.37.2/kube-proxy"));
        assert!(peer_metallb_dir(&parsed).ends_with("peers/metallb-v0.15.2"));
        assert!(parse_versions("KUBERNETES_VERSION=v1\n").is_err());
        assert!(parse_versions("KUBERNETES_VERSION=v1\nETCD_VERSION=v3\n").is_err());
    }

    #[test]
    fn apiserver_flags_follow_the_plan() {
        let pki = Pki {
            dir: "/s/certs".into(),
        };
        let a = apiserver_args(&pki, IpFamily::Dual);
        for want in [
            "--authorization-mode=Node,RBAC",
            "--bind-address=198.18.0.1",
            "--service-cluster-ip-range=198.18.64.0/18,2001:db8:2::/112",
            "--service-node-port-range=30000-32767",
            "--service-account-signing-key-file=/s/certs/sa.key",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} missing");
        }
        assert!(
            controller_manager_args(&pki, Path::new("/k"), IpFamily::Ipv4)
                .contains(&"--allocate-node-cidrs=false".to_string())
        );
    }
}
