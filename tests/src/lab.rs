//! A handle on a running lab for tests: it drives the real `ferrolb-lab`
//! binary, so tests exercise exactly what users run.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use ferrolb_lab::lab::{Lab, LabEnvironment};
//! use ferrolb_lab::state::UpOptions;
//! if let LabEnvironment::Skip(why) = LabEnvironment::check() { eprintln!("skipped: {why}"); return Ok(()); }
//! let lab = Lab::up("target/debug/ferrolb-lab".as_ref(), "flbt", &UpOptions::default())?;
//! let out = lab.kubectl(&["get", "nodes"]);
//! lab.down()?;
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::addresses::IpFamily;
use crate::components;
use crate::control_plane;
use crate::kubectl::Kubectl;
use crate::names::{Prefix, Target};
use crate::state::{ProxyMode, StateDir, UpOptions};

/// How long [`Lab::up`] waits for another lab on this machine to go down.
pub const WAIT_FOR_OTHER_LAB: Duration = Duration::from_secs(600);

/// Set to 1 to skip lab tests on machines without root or netns support.
pub const SKIP_ENV: &str = "FERROLB_SKIP_LAB";

pub enum LabEnvironment {
    Ready,
    /// FERROLB_SKIP_LAB=1 and the lab cannot run here.
    Skip(String),
}

impl LabEnvironment {
    /// Panics (fails the test) with the reason when the lab cannot run here,
    /// unless FERROLB_SKIP_LAB=1 asks to skip instead.
    pub fn check() -> Self {
        let problem = match crate::commands::require_root() {
            Err(e) => Some(e.to_string()),
            Ok(()) => {
                let probe = format!("ferrolb-probe-{}", std::process::id());
                match crate::netns::ip(&["netns", "add", &probe]) {
                    Ok(()) => {
                        let _ = crate::netns::ip(&["netns", "del", &probe]);
                        None
                    }
                    Err(e) => Some(format!("cannot create a network namespace: {e}")),
                }
            }
        };
        match problem {
            None => LabEnvironment::Ready,
            Some(p) if std::env::var(SKIP_ENV).as_deref() == Ok("1") => LabEnvironment::Skip(p),
            Some(p) => panic!(
                "the lab cannot run here: {p}. Run as root with iproute2, or set {SKIP_ENV}=1 to skip lab tests."
            ),
        }
    }
}

pub struct Lab {
    pub prefix: Prefix,
    exe: PathBuf,
    state: StateDir,
    kubectl: Kubectl,
}

fn up_args(opts: &UpOptions) -> Vec<String> {
    let mut a = vec!["up".to_string(), "--nodes".into(), opts.nodes.to_string()];
    a.push("--ip-family".into());
    a.push(
        match opts.ip_family {
            IpFamily::Ipv4 => "ipv4",
            IpFamily::Dual => "dual",
        }
        .into(),
    );
    a.push("--proxy".into());
    a.push(
        match opts.proxy {
            ProxyMode::Ferrolb => "ferrolb",
            ProxyMode::KubeProxy => "kube-proxy",
            ProxyMode::None => "none",
        }
        .into(),
    );
    if !opts.ferrolb {
        a.push("--no-ferrolb".into());
    }
    a
}

impl Lab {
    /// Runs `ferrolb-lab --prefix PREFIX up ...` (progress shows on stderr) and
    /// returns a handle once the lab is up.
    ///
    /// The lab's addresses are machine-wide, so while another lab (say, a
    /// concurrent `cargo test` of someone else) is up this waits for it, up to
    /// [`WAIT_FOR_OTHER_LAB`], instead of failing at once.
    pub fn up(exe: &Path, prefix: &str, opts: &UpOptions) -> Result<Lab> {
        let lab = Lab::attach(exe, prefix)?;
        let start = Instant::now();
        let out = loop {
            let others: Vec<String> = crate::commands::running_labs()
                .into_iter()
                .filter(|p| *p != lab.prefix)
                .map(|p| p.to_string())
                .collect();
            if !others.is_empty() {
                if start.elapsed() > WAIT_FOR_OTHER_LAB {
                    bail!(
                        "lab(s) {} still up after {}s; only one lab can run at a time",
                        others.join(", "),
                        WAIT_FOR_OTHER_LAB.as_secs()
                    );
                }
                eprintln!(
                    "[lab] waiting for lab(s) {} to go down first",
                    others.join(", ")
                );
                std::thread::sleep(Duration::from_secs(5));
                continue;
            }
            let (out, tail) = lab.cli_streaming(&up_args(opts))?;
            // Lost a race with another lab starting at the same moment: wait for it.
            if !out.status.success()
                && crate::commands::running_labs()
                    .iter()
                    .any(|p| *p != lab.prefix)
            {
                continue;
            }
            break (out, tail);
        };
        let (out, tail) = out;
        if !out.status.success() {
            // CI shows only the end of a long log: the reason goes with the error.
            bail!(
                "ferrolb-lab up failed ({}); the end of what it printed:\n{tail}",
                out.status
            );
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout.lines().last().unwrap_or_default();
        let want = format!("export KUBECONFIG={}", lab.kubeconfig_path().display());
        if last != want {
            bail!("ferrolb-lab up's last line was {last:?}, expected {want:?}");
        }
        Ok(lab)
    }

    /// A handle on a lab that may or may not be up (for `down` after a crash).
    pub fn attach(exe: &Path, prefix: &str) -> Result<Lab> {
        let prefix: Prefix = prefix.parse()?;
        let state = StateDir::new(&prefix);
        let cp_bin = control_plane::bin_dir(&control_plane::versions()?);
        let kubectl = Kubectl::new(&cp_bin, &state.admin_kubeconfig());
        Ok(Lab {
            prefix,
            exe: exe.to_path_buf(),
            state,
            kubectl,
        })
    }

    pub fn kubeconfig_path(&self) -> PathBuf {
        self.state.admin_kubeconfig()
    }

    pub fn state(&self) -> &StateDir {
        &self.state
    }

    fn cli_with(&self, args: &[String], stderr: Stdio) -> Result<Output> {
        Command::new(&self.exe)
            .arg("--prefix")
            .arg(self.prefix.as_str())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .output()
            .with_context(|| format!("running {}", self.exe.display()))
    }

    /// Runs a `ferrolb-lab` subcommand whose stderr is progress: each line
    /// is passed on to ours as it comes, and the last lines are returned too.
    fn cli_streaming(&self, args: &[String]) -> Result<(Output, String)> {
        use std::io::{BufRead, BufReader, Read};
        const KEEP: usize = 20;
        let mut child = Command::new(&self.exe)
            .arg("--prefix")
            .arg(self.prefix.as_str())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", self.exe.display()))?;
        let stderr = child.stderr.take().context("child stderr")?;
        let relay = std::thread::spawn(move || {
            let mut last = std::collections::VecDeque::with_capacity(KEEP);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                if last.len() == KEEP {
                    last.pop_front();
                }
                last.push_back(line);
            }
            Vec::from(last).join("\n")
        });
        let mut stdout = Vec::new();
        if let Some(mut out) = child.stdout.take() {
            out.read_to_end(&mut stdout)
                .context("reading ferrolb-lab's stdout")?;
        }
        let status = child.wait().context("waiting for ferrolb-lab")?;
        let tail = relay.join().unwrap_or_default();
        Ok((
            Output {
                status,
                stdout,
                stderr: Vec::new(),
            },
            tail,
        ))
    }

    /// Runs a `ferrolb-lab` subcommand against this lab, e.g. `["kill", "speaker@node-1"]`.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        self.cli_with(&args, Stdio::piped())
    }

    /// Runs kubectl with the admin kubeconfig.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl.output(args, None).unwrap_or_else(|e| Output {
            status: failed_status(),
            stdout: Vec::new(),
            stderr: e.to_string().into_bytes(),
        })
    }

    /// One field of a namespaced object by kubectl's jsonpath, trimmed.
    pub fn field(&self, kind: &str, ns: &str, name: &str, jsonpath: &str) -> Result<String> {
        let path = format!("jsonpath={jsonpath}");
        let out = self.kubectl_ok(&["get", kind, name, "-n", ns, "-o", &path])?;
        Ok(out.trim().to_string())
    }

    /// kubectl that must succeed; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        Ok(self.kubectl.run(args, None)?)
    }

    /// Applies a manifest given as text.
    pub fn apply(&self, manifest: &str) -> Result<String> {
        Ok(self.kubectl.apply(manifest)?)
    }

    /// Applies a manifest with `--dry-run=server`: validation (schema, CEL,
    /// admission) runs for real, nothing is stored. Returns kubectl's output.
    pub fn kubectl_dry_run(&self, manifest: &str) -> Result<Output> {
        self.kubectl_with_input(&["apply", "--dry-run=server", "-f", "-"], manifest)
    }

    /// Runs kubectl with `input` on its standard input (e.g. `create -f -`).
    pub fn kubectl_with_input(&self, args: &[&str], input: &str) -> Result<Output> {
        Ok(self.kubectl.output(args, Some(input))?)
    }

    /// Runs `cmd` in `client`, `node-N` or `pod/NS/NAME`.
    pub fn exec(&self, target: &str, cmd: &[&str]) -> Result<Output> {
        self.in_netns(target, cmd)?
            .output()
            .context("running ip netns exec")
    }

    /// `ip netns exec <target's namespace> cmd...`, stdin closed.
    fn in_netns(&self, target: &str, cmd: &[&str]) -> Result<Command> {
        let t: Target = target.parse()?;
        let netns = t
            .netns(&self.prefix, &self.state)
            .with_context(|| format!("{target} does not run in lab {}", self.prefix))?;
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &netns])
            .args(cmd)
            .stdin(Stdio::null());
        Ok(c)
    }

    /// Starts `cmd` in `client`, `node-N` or `pod/NS/NAME` in the
    /// background, stdout piped (stderr passed through, for progress).
    pub fn spawn_in(&self, target: &str, cmd: &[&str]) -> Result<std::process::Child> {
        self.in_netns(target, cmd)?
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("running ip netns exec")
    }

    /// The network namespace of node `n`.
    pub fn node_netns(&self, n: u8) -> String {
        self.prefix.node_netns(n)
    }

    /// The `ferrolb-lab` binary this lab runs (its hidden `l2` probes run
    /// in the client namespace).
    pub fn exe(&self) -> &Path {
        &self.exe
    }

    /// A kube client with admin rights.
    pub async fn client(&self) -> Result<kube::Client> {
        crate::supervisor::kube_client(&self.kubeconfig_path()).await
    }

    /// Applies `crds/manifests/*.yaml` and waits until each is Established.
    /// Returns the files applied (empty if none are generated yet).
    pub fn apply_crds(&self) -> Result<Vec<PathBuf>> {
        let files = components::crd_files();
        self.kubectl.apply_crds(&files)?;
        Ok(files)
    }

    /// Copies the lab's logs to /tmp/ferrolb-test-logs/<prefix> (`down`
    /// removes them); says where.
    pub fn keep_logs(&self) {
        let keep = Path::new("/tmp/ferrolb-test-logs").join(self.prefix.as_str());
        let _ = std::fs::create_dir_all(&keep);
        if let Ok(entries) = std::fs::read_dir(self.state.root().join("logs")) {
            for e in entries.flatten() {
                let _ = std::fs::copy(e.path(), keep.join(e.file_name()));
            }
        }
        eprintln!("lab logs kept in {}", keep.display());
    }

    pub fn down(&self) -> Result<()> {
        let out = self.cli_with(&["down".to_string()], Stdio::inherit())?;
        if !out.status.success() {
            bail!("ferrolb-lab down failed ({})", out.status);
        }
        Ok(())
    }
}

/// Exit status 1, for a kubectl that could not even be started.
fn failed_status() -> std::process::ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    // A wait status holds the exit code in its second byte.
    std::process::ExitStatus::from_raw(1 << 8)
}
