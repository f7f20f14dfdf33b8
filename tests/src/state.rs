//! The state directory of a running lab, `/run/ferrolb-lab/<prefix>/`:
//! `lab.json` (what was asked for and who supervises it), `progress.log`
//! (what `up` prints while it waits), `logs/`, `pids/`, `certs/`,
//! `kubeconfigs/`, `etcd/` and the supervisor's `control.sock`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::addresses::IpFamily;
use crate::names::{Component, Prefix};

/// Overrides the base directory (tests of the state format use a temp dir).
pub const BASE_ENV: &str = "FERROLB_LAB_BASE";
pub const DEFAULT_BASE: &str = "/run/ferrolb-lab";

/// Which data plane runs in the node namespaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ProxyMode {
    Ferrolb,
    KubeProxy,
    None,
}

/// What `up` was asked for; the supervisor reads it back when it starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpOptions {
    pub nodes: u8,
    pub ip_family: IpFamily,
    pub proxy: ProxyMode,
    /// False with `--no-ferrolb`: none of our components run.
    pub ferrolb: bool,
}

impl Default for UpOptions {
    fn default() -> Self {
        UpOptions {
            nodes: 3,
            ip_family: IpFamily::Ipv4,
            proxy: ProxyMode::Ferrolb,
            ferrolb: true,
        }
    }
}

/// Where the lab runs one pod: written by the lab kubelet, read by `exec`
/// and `kill pod/NS/NAME`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    pub uid: String,
    pub netns: String,
    /// The echo server's pid while it runs.
    pub pid: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabInfo {
    pub prefix: String,
    pub options: UpOptions,
    /// Set by the supervisor once it runs.
    pub supervisor_pid: Option<u32>,
    /// Directory holding ferrolb-echo and, when built, our components.
    pub bin_dir: PathBuf,
}

/// Last line of progress.log once the lab is up.
pub const READY_LINE: &str = "READY";
/// Prefix of the last line of progress.log when the start failed.
pub const FAILED_LINE: &str = "FAILED: ";

#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn base() -> PathBuf {
        std::env::var_os(BASE_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_BASE))
    }

    pub fn new(prefix: &Prefix) -> Self {
        StateDir {
            root: Self::base().join(prefix.as_str()),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn exists(&self) -> bool {
        self.root.exists()
    }

    pub fn create(&self) -> io::Result<()> {
        for d in ["logs", "pids", "certs", "kubeconfigs"] {
            fs::create_dir_all(self.root.join(d))?;
        }
        Ok(())
    }

    pub fn info_path(&self) -> PathBuf {
        self.root.join("lab.json")
    }
    pub fn progress_path(&self) -> PathBuf {
        self.root.join("progress.log")
    }
    /// The full error of a failed start (progress.log only has its first line).
    pub fn failure_path(&self) -> PathBuf {
        self.root.join("failure.txt")
    }
    pub fn socket_path(&self) -> PathBuf {
        self.root.join("control.sock")
    }
    pub fn certs(&self) -> PathBuf {
        self.root.join("certs")
    }
    pub fn etcd_dir(&self) -> PathBuf {
        self.root.join("etcd")
    }
    pub fn kubeconfig(&self, who: &str) -> PathBuf {
        self.root
            .join("kubeconfigs")
            .join(format!("{who}.kubeconfig"))
    }
    /// The admin kubeconfig `up` prints.
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.kubeconfig("admin")
    }
    pub fn log(&self, name: &str) -> PathBuf {
        self.root.join("logs").join(format!("{name}.log"))
    }
    pub fn component_log(&self, c: &Component) -> PathBuf {
        self.log(&c.to_string())
    }
    pub fn pid_path(&self, name: &str) -> PathBuf {
        self.root.join("pids").join(format!("{name}.pid"))
    }

    pub fn write_info(&self, info: &LabInfo) -> io::Result<()> {
        let tmp = self.root.join("lab.json.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(info)?)?;
        fs::rename(tmp, self.info_path())
    }

    pub fn read_info(&self) -> io::Result<LabInfo> {
        let bytes = fs::read(self.info_path())?;
        serde_json::from_slice(&bytes).map_err(io::Error::other)
    }

    pub fn read_pid(&self, name: &str) -> Option<u32> {
        fs::read_to_string(self.pid_path(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn write_pid(&self, name: &str, pid: u32) -> io::Result<()> {
        fs::write(self.pid_path(name), format!("{pid}\n"))
    }

    pub fn remove_pid(&self, name: &str) {
        let _ = fs::remove_file(self.pid_path(name));
    }

    /// Every name with a pid file, sorted.
    pub fn pid_names(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.root.join("pids"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(".pid")
                    .map(str::to_string)
            })
            .collect();
        names.sort();
        names
    }

    fn pod_path(&self, namespace: &str, name: &str) -> PathBuf {
        // Namespace and pod names are DNS labels/subdomains: no '_' in them.
        self.root
            .join("pods")
            .join(format!("{namespace}_{name}.json"))
    }

    /// Where the pod `namespace/name` runs now, if the lab runs it.
    pub fn read_pod(&self, namespace: &str, name: &str) -> Option<PodRecord> {
        let bytes = fs::read(self.pod_path(namespace, name)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn write_pod(&self, namespace: &str, name: &str, record: &PodRecord) -> io::Result<()> {
        fs::create_dir_all(self.root.join("pods"))?;
        let path = self.pod_path(namespace, name);
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, serde_json::to_vec(record)?)?;
        fs::rename(tmp, path)
    }

    /// Records the echo server's pid, if the record is still this pod's.
    pub fn set_pod_pid(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
        pid: Option<u32>,
    ) -> io::Result<()> {
        match self.read_pod(namespace, name) {
            Some(mut r) if r.uid == uid => {
                r.pid = pid;
                self.write_pod(namespace, name, &r)
            }
            _ => Ok(()),
        }
    }

    /// Removes the record, unless a newer pod of the same name owns it now.
    pub fn remove_pod(&self, namespace: &str, name: &str, uid: &str) {
        if self.read_pod(namespace, name).is_some_and(|r| r.uid == uid) {
            let _ = fs::remove_file(self.pod_path(namespace, name));
        }
    }

    pub fn remove_all(&self) -> io::Result<()> {
        match fs::remove_dir_all(&self.root) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Prefixes that have a state directory, i.e. labs that run or crashed.
pub fn known_prefixes() -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(StateDir::base())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_round_trips_and_has_stable_field_names() {
        let dir = std::env::temp_dir().join(format!("ferrolb-lab-state-{}", std::process::id()));
        let sd = StateDir { root: dir.clone() };
        sd.create().unwrap();
        let info = LabInfo {
            prefix: "flb".into(),
            options: UpOptions {
                nodes: 2,
                ip_family: IpFamily::Dual,
                proxy: ProxyMode::KubeProxy,
                ferrolb: false,
            },
            supervisor_pid: Some(42),
            bin_dir: "/x/target/debug".into(),
        };
        sd.write_info(&info).unwrap();
        assert_eq!(sd.read_info().unwrap(), info);
        let text = fs::read_to_string(sd.info_path()).unwrap();
        assert!(
            text.contains("\"kube-proxy\"") && text.contains("\"dual\""),
            "{text}"
        );
        sd.write_pid("speaker@node-1", 7).unwrap();
        sd.write_pid("apiserver", 8).unwrap();
        assert_eq!(sd.pid_names(), vec!["apiserver", "speaker@node-1"]);
        assert_eq!(sd.read_pid("speaker@node-1"), Some(7));
        sd.remove_pid("apiserver");
        assert_eq!(sd.read_pid("apiserver"), None);
        sd.remove_all().unwrap();
        assert!(!dir.exists());
        sd.remove_all().unwrap();
    }
}
