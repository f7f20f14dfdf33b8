//! The background process behind `up`: builds the topology, runs the control
//! plane, the lab kubelet and FerroLB's components, answers the CLI on a
//! Unix socket, and removes everything when told to stop.

use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::certs::{self, Pki};
use crate::components;
use crate::control_plane;
use crate::kubeconfig::{self, Credentials};
use crate::kubectl::Kubectl;
use crate::kubelet::Kubelet;
use crate::names::{Component, Kind, Prefix, node_name, parse_node};
use crate::netns;
use crate::process;
use crate::state::{FAILED_LINE, LabInfo, ProxyMode, READY_LINE, StateDir};

const APISERVER_READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long `up` waits for FerroLB's components to report ready before warning.
const COMPONENT_READY_WAIT: Duration = Duration::from_secs(5);

pub struct Supervisor {
    prefix: Prefix,
    state: StateDir,
    info: LabInfo,
    cp_bin: PathBuf,
    pki: Pki,
    kubectl: Kubectl,
    kubelet: tokio::sync::OnceCell<Arc<Kubelet>>,
    shutdown: Notify,
}

/// Appends a progress line for `up` to print, and logs it.
pub fn progress(state: &StateDir, msg: &str) {
    info!("{msg}");
    if let Ok(mut f) = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state.progress_path())
    {
        let _ = writeln!(f, "{msg}");
    }
}

/// Removes every process, netns and link of the prefix; returns what failed.
pub fn force_cleanup(prefix: &Prefix) -> Vec<String> {
    process::kill_all(prefix);
    netns::teardown(prefix)
        .into_iter()
        .map(|e| e.to_string())
        .collect()
}

/// Entry point of the hidden `supervise` command.
pub async fn run(prefix: Prefix) -> Result<()> {
    let state = StateDir::new(&prefix);
    let mut info = state.read_info().context("reading lab.json")?;
    info.supervisor_pid = Some(std::process::id());
    state.write_info(&info)?;
    let cp_bin = control_plane::bin_dir(&control_plane::versions()?);
    let sup = Arc::new(Supervisor {
        pki: Pki { dir: state.certs() },
        kubectl: Kubectl::new(&cp_bin, &state.admin_kubeconfig()),
        prefix: prefix.clone(),
        state: state.clone(),
        info,
        cp_bin,
        kubelet: tokio::sync::OnceCell::new(),
        shutdown: Notify::new(),
    });

    let started = Instant::now();
    let result = tokio::select! {
        r = sup.clone().start() => r,
        _ = terminated() => Err(anyhow::anyhow!("interrupted while starting")),
    };
    if let Err(e) = result {
        // progress.log is line-based; the whole (often multi-line) error goes to failure.txt.
        let full = format!("{e:#}");
        let _ = fs::write(state.failure_path(), &full);
        progress(
            &state,
            &format!("{FAILED_LINE}{}", full.lines().next().unwrap_or_default()),
        );
        let errors = force_cleanup(&prefix);
        for e in errors {
            warn!("cleanup: {e}");
        }
        return Err(e);
    }
    progress(
        &state,
        &format!("lab is up in {:.1}s", started.elapsed().as_secs_f64()),
    );
    progress(&state, READY_LINE);

    let listener = UnixListener::bind(state.socket_path()).context("binding control socket")?;
    tokio::select! {
        _ = terminated() => info!("signal received"),
        _ = sup.shutdown.notified() => info!("shutdown requested"),
        _ = sup.clone().serve(listener) => {}
    }
    info!("tearing the lab down");
    for e in force_cleanup(&prefix) {
        warn!("cleanup: {e}");
    }
    let _ = state.remove_all();
    Ok(())
}

async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
        }
        _ => std::future::pending().await,
    }
}

impl Supervisor {
    fn progress(&self, msg: &str) {
        progress(&self.state, msg);
    }

    /// Runs kubectl work on the blocking pool, never on the async runtime.
    async fn kubectl<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Kubectl) -> T + Send + 'static,
    ) -> T {
        let k = self.kubectl.clone();
        process::blocking(move || f(&k)).await
    }

    async fn start(self: Arc<Self>) -> Result<()> {
        let opts = self.info.options.clone();
        self.progress("generating certificates");
        let (dir, family) = (self.pki.dir.clone(), opts.ip_family);
        process::blocking(move || certs::generate(&dir, family))
            .await
            .context("generating the lab PKI")?;
        for (stem, cn, _) in certs::CLIENTS {
            let text = kubeconfig::render(
                cn,
                &self.pki.ca_cert(),
                &Credentials::Cert {
                    cert: &self.pki.cert(stem),
                    key: &self.pki.key(stem),
                },
            );
            fs::write(self.state.kubeconfig(stem), text)?;
        }

        self.progress(&format!(
            "creating network namespaces ({} nodes, client, LAN bridge)",
            opts.nodes
        ));
        let (p, n, f) = (self.prefix.clone(), opts.nodes, opts.ip_family);
        tokio::task::spawn_blocking(move || netns::build_topology(&p, n, f))
            .await?
            .context("building the topology")?;

        self.progress("starting etcd and kube-apiserver");
        fs::create_dir_all(self.state.etcd_dir())?;
        self.start_component(&Component::new(Kind::Etcd, None))
            .await?;
        self.start_component(&Component::new(Kind::Apiserver, None))
            .await?;
        self.wait_apiserver().await?;

        self.progress("starting kube-controller-manager, kube-scheduler and the lab kubelet");
        self.start_component(&Component::new(Kind::ControllerManager, None))
            .await?;
        self.start_component(&Component::new(Kind::Scheduler, None))
            .await?;
        let client = kube_client(&self.state.admin_kubeconfig()).await?;
        // `cargo run -p ferrolb-lab` builds only this binary; its hidden `echo`
        // subcommand is the same server as ferrolb-echo.
        let echo_bin = self.info.bin_dir.join("ferrolb-echo");
        let echo = if echo_bin.is_file() {
            (echo_bin, Vec::new())
        } else {
            (std::env::current_exe()?, vec!["echo".to_string()])
        };
        let kubelet = Kubelet::new(
            client,
            self.prefix.clone(),
            opts.ip_family,
            opts.nodes,
            echo,
            self.state.clone(),
        );
        kubelet
            .register_nodes()
            .await
            .context("registering nodes")?;
        tokio::spawn(kubelet.clone().heartbeat_loop());
        tokio::spawn(kubelet.clone().run_pods());
        let _ = self.kubelet.set(kubelet);

        self.progress("waiting for the default ServiceAccount (controller-manager is working)");
        self.wait_for(Duration::from_secs(60), "the default ServiceAccount", |k| {
            k.run(
                &[
                    "get",
                    "serviceaccount",
                    "default",
                    "-n",
                    "default",
                    "-o",
                    "name",
                ],
                None,
            )
            .is_ok()
        })
        .await?;

        if opts.ferrolb {
            self.start_ferrolb().await?;
        } else {
            self.progress("--no-ferrolb: not starting FerroLB's components");
        }
        if opts.proxy == ProxyMode::KubeProxy {
            self.progress("starting kube-proxy (nftables mode) on every node");
            for n in 1..=opts.nodes {
                self.start_component(&Component::new(Kind::KubeProxy, Some(n)))
                    .await?;
            }
        }
        // A component that crashes at once should fail `up`, not the first test.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        for name in self.state.pid_names() {
            match self.state.read_pid(&name) {
                Some(pid) if process::alive(pid) => {}
                _ => bail!(
                    "{name} exited right after start; see {}",
                    self.state.log(&name).display()
                ),
            }
        }
        self.wait_components_ready().await;
        Ok(())
    }

    /// Gives FerroLB's components a few seconds to report ready. Not ready is
    /// reported, not fatal: a component that is running but unready is
    /// exactly what a developer needs a lab to look at.
    async fn wait_components_ready(&self) {
        let ours: Vec<Component> = self
            .state
            .pid_names()
            .iter()
            .filter_map(|n| n.parse::<Component>().ok())
            .filter(|c| components::binary_name(c.kind).is_some())
            .collect();
        if ours.is_empty() {
            return;
        }
        let deadline = Instant::now() + COMPONENT_READY_WAIT;
        loop {
            let probe = ours.clone();
            let unready: Vec<String> = process::blocking(move || {
                probe
                    .iter()
                    .filter(|c| components::readyz(c) != Some(200))
                    .map(ToString::to_string)
                    .collect()
            })
            .await;
            if unready.is_empty() {
                self.progress(&format!(
                    "FerroLB components ready: {} processes",
                    ours.len()
                ));
                return;
            }
            if Instant::now() > deadline {
                self.progress(&format!(
                    "WARNING: running but not ready after {}s: {} (see `ferrolb-lab status` and `ferrolb-lab logs <component>`)",
                    COMPONENT_READY_WAIT.as_secs(),
                    unready.join(", ")
                ));
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Polls `ok` (kubectl work, run off the runtime) until it holds.
    async fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        ok: impl Fn(&Kubectl) -> bool + Send + Sync + Clone + 'static,
    ) -> Result<()> {
        let start = Instant::now();
        let mut next_note = Duration::from_secs(10);
        while !self.kubectl(ok.clone()).await {
            if start.elapsed() > timeout {
                bail!("timed out after {}s waiting for {what}", timeout.as_secs());
            }
            if start.elapsed() > next_note {
                self.progress(&format!(
                    "still waiting for {what} ({}s)",
                    start.elapsed().as_secs()
                ));
                next_note += Duration::from_secs(10);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Ok(())
    }

    async fn wait_apiserver(&self) -> Result<()> {
        let start = Instant::now();
        let mut next_note = Duration::from_secs(10);
        while !self.kubectl(|k| k.ready()).await {
            for c in ["etcd", "apiserver"] {
                if self.state.read_pid(c).is_none_or(|p| !process::alive(p)) {
                    bail!(
                        "{c} exited; last lines of its log:\n{}",
                        tail(&self.state.log(c), 15)
                    );
                }
            }
            if start.elapsed() > APISERVER_READY_TIMEOUT {
                bail!(
                    "kube-apiserver not ready after {}s; see {}",
                    APISERVER_READY_TIMEOUT.as_secs(),
                    self.state.log("apiserver").display()
                );
            }
            if start.elapsed() > next_note {
                self.progress(&format!(
                    "still waiting for kube-apiserver /readyz ({}s)",
                    start.elapsed().as_secs()
                ));
                next_note += Duration::from_secs(10);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        self.progress(&format!(
            "kube-apiserver ready at {}",
            kubeconfig::server_url()
        ));
        Ok(())
    }

    /// CRDs, RBAC, ServiceAccount tokens, then whichever components are built.
    async fn start_ferrolb(&self) -> Result<()> {
        let crds = components::crd_files();
        if crds.is_empty() {
            self.progress(&format!(
                "no CRDs in {} yet: skipping them",
                components::crd_dir().display()
            ));
        } else {
            self.progress(&format!("applying {} CRD manifest(s)", crds.len()));
            self.kubectl(move |k| k.apply_crds(&crds))
                .await
                .context("applying the generated CRDs")?;
        }
        let rbac = components::rbac_path();
        let Ok(template) = fs::read_to_string(&rbac) else {
            self.progress(&format!(
                "{} does not exist yet: not starting FerroLB's components",
                rbac.display()
            ));
            return Ok(());
        };
        self.progress(&format!(
            "applying {} for namespace {}",
            rbac.display(),
            components::NAMESPACE
        ));
        // The chart's RBAC holds the ServiceAccounts; the namespace is the
        // release's, which Helm would create.
        let manifest = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {}\n---\n{}",
            components::NAMESPACE,
            components::render_rbac(&template)
        );
        self.kubectl(move |k| k.apply(&manifest))
            .await
            .context("applying the chart's RBAC")?;
        // What the chart's Secret template generates: the speakers'
        // heartbeat key.
        let secret = components::heartbeat_secret(&random_hex(32)?);
        self.kubectl(move |k| k.apply(&secret))
            .await
            .context("creating the speakers' heartbeat Secret")?;

        let mut wanted = vec![Component::new(Kind::Controller, None)];
        for n in 1..=self.info.options.nodes {
            wanted.push(Component::new(Kind::Speaker, Some(n)));
            if self.info.options.proxy == ProxyMode::Ferrolb {
                wanted.push(Component::new(Kind::Proxy, Some(n)));
            }
        }
        let mut missing = std::collections::BTreeSet::new();
        for c in wanted {
            let Some(bin) = components::binary_name(c.kind) else {
                continue;
            };
            if !self.info.bin_dir.join(bin).is_file() {
                missing.insert(bin);
                continue;
            }
            self.start_component(&c).await?;
        }
        if !missing.is_empty() {
            let list: Vec<&str> = missing.into_iter().collect();
            self.progress(&format!(
                "not built in {}, so not started: {} (build them with `{}`)",
                self.info.bin_dir.display(),
                list.join(", "),
                components::build_command(&self.info.bin_dir)
            ));
        }
        Ok(())
    }

    /// Writes a kubeconfig with a fresh token of the component's ServiceAccount.
    async fn component_kubeconfig(&self, kind: Kind) -> Result<PathBuf> {
        let sa = components::service_account(kind).context("not a FerroLB component")?;
        let path = self.state.kubeconfig(sa);
        if !path.exists() {
            let token = self
                .kubectl(move |k| {
                    k.run(
                        &[
                            "create",
                            "token",
                            sa,
                            "-n",
                            components::NAMESPACE,
                            "--duration",
                            components::TOKEN_DURATION,
                        ],
                        None,
                    )
                })
                .await
                .with_context(|| format!("requesting a token for ServiceAccount {sa}"))?;
            let who = format!("system:serviceaccount:{}:{sa}", components::NAMESPACE);
            fs::write(
                &path,
                kubeconfig::render(&who, &self.pki.ca_cert(), &Credentials::Token(token.trim())),
            )?;
        }
        Ok(path)
    }

    async fn spec(&self, c: &Component) -> Result<(Option<String>, PathBuf, Vec<String>)> {
        let fam = self.info.options.ip_family;
        let cp = |b: &str| self.cp_bin.join(b);
        let node_ns = c.node.map(|n| self.prefix.node_netns(n));
        Ok(match c.kind {
            Kind::Etcd => (
                None,
                cp("etcd"),
                control_plane::etcd_args(&self.state.etcd_dir()),
            ),
            Kind::Apiserver => (
                None,
                cp("kube-apiserver"),
                control_plane::apiserver_args(&self.pki, fam),
            ),
            Kind::ControllerManager => (
                None,
                cp("kube-controller-manager"),
                control_plane::controller_manager_args(
                    &self.pki,
                    &self.state.kubeconfig("controller-manager"),
                    fam,
                ),
            ),
            Kind::Scheduler => (
                None,
                cp("kube-scheduler"),
                control_plane::scheduler_args(&self.state.kubeconfig("scheduler")),
            ),
            Kind::KubeProxy => {
                let n = c.node.context("kube-proxy runs per node")?;
                (
                    node_ns,
                    cp("kube-proxy"),
                    control_plane::kube_proxy_args(n, &self.state.kubeconfig("kube-proxy"), fam),
                )
            }
            Kind::Controller | Kind::Speaker | Kind::Proxy => {
                if !self.info.options.ferrolb {
                    bail!(
                        "this lab was started with --no-ferrolb, so FerroLB's RBAC and tokens are not set up"
                    );
                }
                let bin = components::binary_name(c.kind).context("component binary")?;
                let kc = self.component_kubeconfig(c.kind).await?;
                (
                    node_ns,
                    self.info.bin_dir.join(bin),
                    components::args(c, &kc),
                )
            }
            Kind::Supervisor => bail!("the supervisor is not started this way"),
        })
    }

    async fn start_component(&self, c: &Component) -> Result<u32> {
        let name = c.to_string();
        if let Some(pid) = self.state.read_pid(&name).filter(|p| process::alive(*p)) {
            bail!("{name} is already running (pid {pid})");
        }
        self.spawn_component(c).await
    }

    /// A rolling update with `maxSurge: 1, maxUnavailable: 0`, as a
    /// DaemonSet does it: the new process starts and becomes ready while
    /// the old one still runs, then the old one gets SIGTERM and is waited
    /// for. A component that is not running is just started.
    async fn surge_restart(&self, c: &Component) -> Result<String> {
        let name = c.to_string();
        let old = self.state.read_pid(&name).filter(|p| process::alive(*p));
        let t = Instant::now();
        let new = self.spawn_component(c).await?;
        let ready_after = self.wait_ready(c, Duration::from_secs(60)).await;
        let Some(old) = old else {
            return Ok(format!("{name} was not running; started (pid {new})"));
        };
        let ready = match ready_after {
            Some(d) => format!("ready after {:.2}s", d.as_secs_f64()),
            None => "NOT ready after 60s".to_string(),
        };
        let term = Instant::now();
        process::signal(old, "TERM");
        let deadline = term + Duration::from_secs(60);
        while process::alive(old) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if process::alive(old) {
            bail!("{name}: the old process (pid {old}) still runs 60 s after SIGTERM");
        }
        Ok(format!(
            "{name}: new pid {new} {ready}; old pid {old} exited {:.2}s after SIGTERM ({:.2}s in all)",
            term.elapsed().as_secs_f64(),
            t.elapsed().as_secs_f64()
        ))
    }

    /// Polls the component's `/readyz` until it answers 200.
    async fn wait_ready(&self, c: &Component, bound: Duration) -> Option<Duration> {
        let t = Instant::now();
        while t.elapsed() < bound {
            let c2 = c.clone();
            if process::blocking(move || components::readyz(&c2)).await == Some(200) {
                return Some(t.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    async fn spawn_component(&self, c: &Component) -> Result<u32> {
        let name = c.to_string();
        if c.kind.per_node() && c.node.is_none_or(|n| n > self.info.options.nodes) {
            bail!(
                "{name}: name a node of this lab (node-1 .. node-{})",
                self.info.options.nodes
            );
        }
        let (netns, program, args) = self.spec(c).await?;
        if !program.is_file() {
            bail!("{} does not exist", program.display());
        }
        let log = self.state.component_log(c);
        let _ = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| {
                writeln!(
                    f,
                    "--- ferrolb-lab: starting {name}: {} {}",
                    program.display(),
                    args.join(" ")
                )
            });
        let mut child = process::spawn(&self.prefix, netns.as_deref(), &program, &args, &log)?;
        let pid = child.id().context("child has no pid")?;
        self.state.write_pid(&name, pid)?;
        let state = self.state.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            warn!(component = %name, ?status, "exited");
            if state.read_pid(&name) == Some(pid) {
                state.remove_pid(&name);
            }
        });
        Ok(pid)
    }

    async fn serve(self: Arc<Self>, listener: UnixListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut line = String::new();
                if BufReader::new(r).read_line(&mut line).await.is_err() {
                    return;
                }
                let reply = match me.handle(line.trim()).await {
                    Ok(msg) => format!("ok {msg}\n"),
                    Err(e) => format!("error {e:#}\n"),
                };
                let _ = w.write_all(reply.as_bytes()).await;
                let _ = w.shutdown().await;
            });
        }
    }

    /// One control request: `start C`, `restart C` (surge), `restart-apiserver`, `link node-N up|down`, `shutdown`.
    async fn handle(&self, req: &str) -> Result<String> {
        let words: Vec<&str> = req.split_whitespace().collect();
        match words.as_slice() {
            ["start", c] => {
                let c: Component = c.parse()?;
                let mut started = Vec::new();
                for one in c.expand(self.info.options.nodes) {
                    let pid = self.start_component(&one).await?;
                    started.push(format!("{one} (pid {pid})"));
                }
                Ok(format!("started {}", started.join(", ")))
            }
            ["restart", c] => {
                let c: Component = c.parse()?;
                let mut report = Vec::new();
                for one in c.expand(self.info.options.nodes) {
                    report.push(self.surge_restart(&one).await?);
                }
                Ok(report.join("\n"))
            }
            ["restart-apiserver"] => {
                let t = Instant::now();
                if let Some(pid) = self
                    .state
                    .read_pid("apiserver")
                    .filter(|p| process::alive(*p))
                {
                    process::signal(pid, "TERM");
                    // kube-apiserver drains for up to a minute on SIGTERM; a lab
                    // restart should model a quick restart, so cut that short.
                    let deadline = Instant::now() + Duration::from_secs(3);
                    while process::alive(pid) && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    if process::alive(pid) {
                        process::signal(pid, "KILL");
                    }
                    while self.state.read_pid("apiserver") == Some(pid) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                let down = t.elapsed();
                self.start_component(&Component::new(Kind::Apiserver, None))
                    .await?;
                self.wait_apiserver().await?;
                Ok(format!(
                    "apiserver stopped in {:.1}s, ready again after {:.1}s",
                    down.as_secs_f64(),
                    t.elapsed().as_secs_f64()
                ))
            }
            ["link", node, dir @ ("up" | "down")] => {
                let n = parse_node(node)?;
                if n > self.info.options.nodes {
                    bail!("this lab has {} nodes", self.info.options.nodes);
                }
                let up = *dir == "up";
                let prefix = self.prefix.clone();
                process::blocking(move || netns::set_node_link(&prefix, n, up)).await?;
                // The node's kubelet can no longer reach the API server either.
                if let Some(k) = self.kubelet.get() {
                    k.set_online(n, up);
                    // Back online: report at once, as a kubelet does when it reconnects.
                    if up && let Err(e) = k.heartbeat_node(n).await {
                        warn!(node = n, error = %e, "heartbeat after link up failed");
                    }
                }
                Ok(format!("{} LAN link {dir}", node_name(n)))
            }
            ["shutdown"] => {
                self.shutdown.notify_one();
                Ok("shutting down".into())
            }
            _ => bail!("unknown request {req:?}"),
        }
    }
}

pub async fn kube_client(kubeconfig: &std::path::Path) -> Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await?;
    Ok(kube::Client::try_from(config)?)
}

/// The last `n` lines of a log file, for error messages.
pub fn tail(path: &std::path::Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `n` random bytes as hex, from the kernel.
fn random_hex(n: usize) -> Result<String> {
    use std::io::Read;
    let mut bytes = vec![0u8; n];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
