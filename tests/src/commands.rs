//! What the `ferrolb-lab` commands do. `up` runs in the foreground only until
//! the background supervisor reports READY; everything else talks to that
//! supervisor's socket or acts on the kernel directly.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::control_plane;
use crate::kubectl::Kubectl;
use crate::names::{Component, Kind, Prefix, Target};
use crate::netns;
use crate::process;
use crate::state::{self, FAILED_LINE, LabInfo, READY_LINE, StateDir, UpOptions};
use crate::supervisor;

/// How long `up` waits for the supervisor (binaries are built before this starts).
const UP_TIMEOUT: Duration = Duration::from_secs(240);

pub fn require_root() -> Result<()> {
    let uid = fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .map(str::to_string)
    });
    if uid.as_deref() != Some("0") {
        bail!(
            "the lab creates network namespaces and must run as root (uid {})",
            uid.unwrap_or_else(|| "?".into())
        );
    }
    // What the lab itself runs; tests/scripts/prereqs.sh installs them.
    let missing: Vec<&str> = [
        ("ip", "-V"),
        ("openssl", "version"),
        ("setsid", "--version"),
        ("sysctl", "--version"),
    ]
    .into_iter()
    .filter(|(tool, arg)| Command::new(tool).arg(arg).output().is_err())
    .map(|(tool, _)| tool)
    .collect();
    if !missing.is_empty() {
        bail!(
            "missing tools: {} (run tests/scripts/prereqs.sh)",
            missing.join(", ")
        );
    }
    Ok(())
}

fn supervisor_alive(info: &LabInfo) -> bool {
    info.supervisor_pid.is_some_and(process::alive)
}

/// Prefixes of labs whose supervisor is alive.
pub fn running_labs() -> Vec<Prefix> {
    state::known_prefixes()
        .into_iter()
        .filter_map(|p| p.parse::<Prefix>().ok())
        .filter(|p| {
            StateDir::new(p)
                .read_info()
                .is_ok_and(|i| supervisor_alive(&i))
        })
        .collect()
}

/// Directory of this executable: where ferrolb-echo and FerroLB's binaries are built.
pub fn exe_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating ferrolb-lab")?;
    Ok(exe
        .parent()
        .context("executable has no directory")?
        .to_path_buf())
}

/// Starts a lab and returns the admin kubeconfig path. Progress goes to stderr.
pub async fn up(prefix: &Prefix, opts: &UpOptions) -> Result<PathBuf> {
    require_root()?;
    if opts.nodes == 0 || opts.nodes > crate::addresses::MAX_NODES {
        bail!("--nodes must be 1..={}", crate::addresses::MAX_NODES);
    }
    // Two labs would both claim 198.18.0.1 in the root namespace.
    if let Some(p) = running_labs().first() {
        if p == prefix {
            bail!("lab {p} is already up; `ferrolb-lab --prefix {p} down` first");
        }
        bail!(
            "another lab ({p}) is up and owns the lab addresses; `ferrolb-lab --prefix {p} down` first"
        );
    }
    let state = StateDir::new(prefix);
    let t0 = Instant::now();
    let left = netns::leftovers(prefix);
    if state.exists() || !left.is_empty() || !process::lab_processes(prefix).is_empty() {
        eprintln!(
            "[lab] removing leftovers of an earlier {prefix} run: {}",
            if left.is_empty() {
                "state".into()
            } else {
                left.join(", ")
            }
        );
        for e in supervisor::force_cleanup(prefix) {
            eprintln!("[lab] cleanup: {e}");
        }
    }
    state
        .remove_all()
        .context("removing the old state directory")?;
    if netns::link_exists(&prefix.root_link()) {
        bail!("{} still exists after cleanup", prefix.root_link());
    }
    // A crashed lab of another prefix may still hold the control-plane address.
    if let Some(link) = netns::link_with_address(&crate::addresses::control_plane_v4().into()) {
        bail!(
            "{} is already configured on {link} (a lab that was not taken down?); \
             `ferrolb-lab --prefix <its prefix> down` or `ip link del {link}` first",
            crate::addresses::control_plane_v4()
        );
    }

    eprintln!("[lab] checking the control-plane binaries");
    tokio::task::spawn_blocking(control_plane::ensure_binaries).await??;

    state
        .create()
        .with_context(|| format!("creating {}", state.root().display()))?;
    let info = LabInfo {
        prefix: prefix.to_string(),
        options: opts.clone(),
        supervisor_pid: None,
        bin_dir: exe_dir()?,
    };
    state.write_info(&info)?;
    let log = fs::File::create(state.log("supervisor"))?;
    let child = Command::new("setsid")
        .arg(std::env::current_exe()?)
        .args(["--prefix", prefix.as_str(), "supervise"])
        .env(process::MARKER_ENV, prefix.as_str())
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the supervisor (is setsid from util-linux installed?)")?;
    let pid = child.id();

    let waited = tokio::select! {
        r = wait_ready(&state, pid) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    if let Err(e) = waited {
        eprintln!("[lab] start failed; removing what was created");
        for err in supervisor::force_cleanup(prefix) {
            eprintln!("[lab] cleanup: {err}");
        }
        bail!("{e:#}\n(logs: {})", state.root().join("logs").display());
    }
    eprintln!("[lab] up in {:.1}s", t0.elapsed().as_secs_f64());
    Ok(state.admin_kubeconfig())
}

/// Prints the supervisor's progress lines until READY or FAILED.
async fn wait_ready(state: &StateDir, pid: u32) -> Result<()> {
    let start = Instant::now();
    let mut printed = 0;
    loop {
        let text = fs::read_to_string(state.progress_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for line in &lines[printed.min(lines.len())..] {
            if *line == READY_LINE {
                return Ok(());
            }
            if let Some(first) = line.strip_prefix(FAILED_LINE) {
                let full =
                    fs::read_to_string(state.failure_path()).unwrap_or_else(|_| first.to_string());
                bail!("{full}");
            }
            eprintln!("[lab] {line}");
        }
        printed = lines.len();
        if !process::alive(pid) {
            bail!(
                "the supervisor exited; last lines of its log:\n{}",
                supervisor::tail(&state.log("supervisor"), 20)
            );
        }
        if start.elapsed() > UP_TIMEOUT {
            bail!("the lab was not up after {}s", UP_TIMEOUT.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// Stops the supervisor and removes everything of the prefix, also after a crash.
pub fn down(prefix: &Prefix) -> Result<()> {
    require_root()?;
    let t0 = Instant::now();
    let state = StateDir::new(prefix);
    if let Ok(info) = state.read_info()
        && let Some(pid) = info.supervisor_pid.filter(|p| process::alive(*p))
    {
        if request(&state, "shutdown").is_err() {
            process::signal(pid, "TERM");
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while process::alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let errors = supervisor::force_cleanup(prefix);
    state.remove_all().context("removing the state directory")?;
    let left = netns::leftovers(prefix);
    let procs = process::lab_processes(prefix);
    if !errors.is_empty() || !left.is_empty() || !procs.is_empty() {
        bail!("down left things behind: {errors:?} {left:?} processes {procs:?}");
    }
    eprintln!(
        "[lab] {prefix} is down ({:.1}s)",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Sends one request line to the supervisor and returns its answer.
pub fn request(state: &StateDir, line: &str) -> Result<String> {
    let mut s = UnixStream::connect(state.socket_path()).with_context(|| {
        format!(
            "connecting to the lab supervisor at {} (is the lab up?)",
            state.socket_path().display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    let reply = reply.trim();
    match reply.strip_prefix("ok ") {
        Some(msg) => Ok(msg.to_string()),
        None => bail!("{}", reply.strip_prefix("error ").unwrap_or(reply)),
    }
}

fn running_info(prefix: &Prefix) -> Result<(StateDir, LabInfo)> {
    let state = StateDir::new(prefix);
    let info = state.read_info().with_context(|| {
        format!(
            "lab {prefix} is not up (no {})",
            state.info_path().display()
        )
    })?;
    Ok((state, info))
}

fn health(name: &str) -> String {
    let Ok(c) = name.parse::<Component>() else {
        return String::new();
    };
    if crate::components::binary_name(c.kind).is_none() {
        return String::new();
    }
    let (_, addr) = crate::components::listen_addrs(&c);
    match crate::components::readyz(&c) {
        Some(200) => format!("ready ({addr}/readyz)"),
        Some(code) => format!("NOT READY: {code} from {addr}/readyz"),
        None => format!("no answer on {addr}"),
    }
}

pub fn status(prefix: &Prefix) -> Result<()> {
    use std::fmt::Write as _;
    let (state, info) = running_info(prefix)?;
    let o = &info.options;
    let mut out = String::new();
    let ferrolb = if o.ferrolb { "on" } else { "off" };
    let _ = writeln!(
        out,
        "lab {prefix}: {} nodes, {:?}, proxy {:?}, ferrolb {ferrolb}",
        o.nodes, o.ip_family, o.proxy
    );
    let _ = writeln!(out, "state: {}", state.root().display());
    let sup = match info.supervisor_pid.map(|p| (p, process::alive(p))) {
        Some((p, true)) => format!("running (pid {p})"),
        Some((p, false)) => format!("DEAD (pid {p}); run `ferrolb-lab --prefix {prefix} down`"),
        None => "not started".into(),
    };
    let _ = writeln!(out, "supervisor: {sup}\nprocesses:");
    for name in state.pid_names() {
        let pid = state.read_pid(&name).unwrap_or(0);
        let (alive, h) = if process::alive(pid) {
            ("running", health(&name))
        } else {
            ("dead", String::new())
        };
        let _ = writeln!(out, "  {name:<24} pid {pid:<8} {alive:<8} {h}");
    }
    let _ = writeln!(out, "namespaces:");
    for ns in netns::list_netns()
        .into_iter()
        .filter(|n| prefix.owns_netns(n))
    {
        let _ = writeln!(out, "  {ns}");
    }
    let cp_bin = control_plane::bin_dir(&control_plane::versions()?);
    let kubectl = Kubectl::new(&cp_bin, &state.admin_kubeconfig());
    let _ = writeln!(
        out,
        "apiserver /readyz: {}",
        if kubectl.ready() { "ok" } else { "NOT READY" }
    );
    if let Ok(nodes) = kubectl.run(
        &["get", "nodes", "-o", "wide", "--request-timeout=3s"],
        None,
    ) {
        out.push_str(&nodes);
    }
    let _ = writeln!(
        out,
        "export KUBECONFIG={}",
        state.admin_kubeconfig().display()
    );
    // A closed pipe (`status | head`) is not an error worth a panic.
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
    Ok(())
}

/// Runs CMD in a lab namespace; returns its exit code.
pub fn exec(prefix: &Prefix, target: &Target, cmd: &[String]) -> Result<i32> {
    let Some(ns) = target.netns(prefix, &StateDir::new(prefix)) else {
        bail!("{target:?} is not running in lab {prefix} (is the pod on a lab node?)");
    };
    if !netns::netns_exists(&ns) {
        bail!("{ns} does not exist (is the lab up, and is that pod running on a lab node?)");
    }
    if cmd.is_empty() {
        bail!("give a command after --");
    }
    let status = Command::new("ip")
        .args(["netns", "exec", &ns])
        .args(cmd)
        .status()
        .context("running ip netns exec")?;
    Ok(status.code().unwrap_or(128))
}

/// SIGKILLs the echo server of pod `namespace/name`, as if its container
/// crashed; the lab kubelet reports it NotReady and restarts it.
pub fn kill_pod(prefix: &Prefix, namespace: &str, name: &str) -> Result<()> {
    let state = StateDir::new(prefix);
    let record = state
        .read_pod(namespace, name)
        .with_context(|| format!("pod {namespace}/{name} does not run in lab {prefix}"))?;
    let pid = record
        .pid
        .filter(|p| process::alive(*p))
        .with_context(|| format!("the container of pod {namespace}/{name} is not running"))?;
    process::signal(pid, "KILL");
    eprintln!("[lab] SIGKILL pod/{namespace}/{name} (pid {pid})");
    Ok(())
}

pub fn kill(prefix: &Prefix, component: &Component) -> Result<()> {
    let (state, info) = running_info(prefix)?;
    let mut none = true;
    for c in component.expand(info.options.nodes) {
        let name = c.to_string();
        match state.read_pid(&name).filter(|p| process::alive(*p)) {
            Some(pid) => {
                process::signal(pid, "KILL");
                eprintln!("[lab] SIGKILL {name} (pid {pid})");
                none = false;
            }
            None => eprintln!("[lab] {name} is not running"),
        }
    }
    if none {
        bail!("nothing to kill for {component}");
    }
    Ok(())
}

/// SIGTERMs a component and waits until it has exited; returns how long
/// that took, as a graceful stop (a rolling update) would.
pub fn stop(prefix: &Prefix, component: &Component) -> Result<String> {
    let (state, info) = running_info(prefix)?;
    let mut report = Vec::new();
    for c in component.expand(info.options.nodes) {
        let name = c.to_string();
        let Some(pid) = state.read_pid(&name).filter(|p| process::alive(*p)) else {
            report.push(format!("{name} was not running"));
            continue;
        };
        let sent = Instant::now();
        process::signal(pid, "TERM");
        let deadline = sent + Duration::from_secs(60);
        while process::alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if process::alive(pid) {
            bail!("{name} (pid {pid}) still runs 60 s after SIGTERM");
        }
        report.push(format!(
            "{name} (pid {pid}) exited {:.2}s after SIGTERM",
            sent.elapsed().as_secs_f64()
        ));
    }
    Ok(report.join("\n"))
}

pub fn logs(prefix: &Prefix, what: &str, follow: bool) -> Result<()> {
    let state = StateDir::new(prefix);
    let path = if let Some(pod) = what.strip_prefix("pod/") {
        state.log(&format!("pod-{}", pod.replacen('/', "-", 1)))
    } else if what == "supervisor" {
        state.log("supervisor")
    } else {
        state.component_log(&what.parse::<Component>()?)
    };
    if !path.exists() {
        bail!("no log at {}", path.display());
    }
    let mut cmd = Command::new("tail");
    if follow {
        cmd.arg("-f");
    } else {
        cmd.args(["-n", "+1"]);
    }
    cmd.arg(&path).status().context("running tail")?;
    Ok(())
}

/// Components that `kill`/`start` accept.
pub fn controllable(c: &Component) -> Result<()> {
    if matches!(c.kind, Kind::Supervisor) {
        bail!("use `down` to stop the supervisor");
    }
    Ok(())
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}
