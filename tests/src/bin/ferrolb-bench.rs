//! `ferrolb-bench`: speed and memory of FerroLB's parts, printed as tables.
//! Not a test: numbers go in issue notes, targets are judged by people.
//!
//! - `allocator`: the pure allocator (10k allocations; memory with a /8).
//! - `controller [--services N]`: end to end in the lab — N LoadBalancer
//!   Services created at once, time until all have an IP, controller RSS.
//! - `proxy`, `proxy-layout`: the proxy against kube-proxy.
//! - `speaker [--trials N]`: the speaker against MetalLB.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::{Parser, Subcommand};
use ferrolb_controller::allocator::{Allocator, Family, FamilyPolicy, Pool, ServiceRequest};
use ferrolb_controller::convert::ClassFilter;
use ferrolb_controller::plan::{Index, Inputs};
use ferrolb_crds::{IPAddressPool, IPAddressPoolSpec};
use ferrolb_lab::lab::Lab;
use ferrolb_lab::state::{ProxyMode, UpOptions};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{ListParams, PostParams};

#[derive(Parser)]
#[command(name = "ferrolb-bench")]
struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// The pure allocator.
    Allocator {
        #[arg(long, default_value_t = 10_000)]
        services: usize,
    },
    /// (internal) RSS growth of one allocator in a fresh process.
    #[command(hide = true)]
    AllocatorMemory { cidr: String, services: usize },
    /// The controller in the lab, against a real API server.
    Controller {
        #[arg(long, default_value_t = 10_000)]
        services: usize,
    },
    /// FerroLB's proxy against kube-proxy (nftables), in one lab run.
    Proxy {
        /// Numbers of Services, smallest first (connect latency compares
        /// the first with the last).
        #[arg(long, value_delimiter = ',', default_value = "10,1000,10000")]
        services: Vec<usize>,
        #[arg(long, default_value_t = 10)]
        endpoints: usize,
        /// Measure FerroLB alone (no kube-proxy, no throughput): for work
        /// on the proxy, not for claims.
        #[arg(long)]
        ours_only: bool,
    },
    /// FerroLB's speaker against MetalLB (L2), in one lab run: node loss,
    /// link restore, speaker SIGKILL, rolling restart, drain.
    Speaker {
        #[arg(long, default_value_t = 10)]
        trials: usize,
    },
    /// (internal) connect until the first success; print its time.
    #[command(hide = true)]
    ProbeConnect {
        addr: std::net::SocketAddr,
        #[arg(long, default_value_t = 60000)]
        timeout_ms: u64,
    },
    /// (internal) median TCP connect times (ns) to `addr` and to
    /// `control`, connects to the two alternating.
    #[command(hide = true)]
    ConnectLatency {
        addr: std::net::SocketAddr,
        control: std::net::SocketAddr,
        #[arg(long, default_value_t = 2000)]
        count: usize,
    },
    /// (internal) the proxy's cache, full build and one update in this
    /// process, with time and RSS per step (root).
    #[command(hide = true)]
    ProxyCore {
        #[arg(long, default_value_t = 10_000)]
        services: usize,
        #[arg(long, default_value_t = 10)]
        endpoints: usize,
    },
    /// Ruleset layouts in the kernel: FerroLB's flat one against
    /// kube-proxy's shape (root; throwaway network namespaces).
    ProxyLayout {
        #[arg(long, default_value_t = 10_000)]
        services: usize,
        #[arg(long, default_value_t = 10)]
        endpoints: usize,
    },
}

fn main() -> Result<()> {
    match Args::parse().what {
        What::Allocator { services } => allocator(services),
        What::AllocatorMemory { cidr, services } => allocator_memory(&cidr, services),
        What::Controller { services } => controller(services),
        What::Proxy {
            services,
            endpoints,
            ours_only,
        } => ferrolb_lab::bench::proxy::run(&services, endpoints, ours_only),
        What::Speaker { trials } => ferrolb_lab::bench::speaker::run(trials),
        What::ProbeConnect { addr, timeout_ms } => {
            ferrolb_lab::bench::proxy::probe_connect(addr, Duration::from_millis(timeout_ms))
        }
        What::ConnectLatency {
            addr,
            control,
            count,
        } => ferrolb_lab::bench::proxy::connect_latency(addr, control, count),
        What::ProxyCore {
            services,
            endpoints,
        } => ferrolb_lab::bench::proxy_core::run(services, endpoints),
        What::ProxyLayout {
            services,
            endpoints,
        } => ferrolb_lab::bench::layout::run(services, endpoints),
    }
}

fn rss_kib() -> u64 {
    rss_of("self")
}

fn rss_of(pid: &str) -> u64 {
    ferrolb_lab::bench::rss_kib(pid).unwrap_or(0)
}

struct Row {
    case: String,
    ops: usize,
    total: Duration,
    extra: String,
}

fn print_table(title: &str, rows: &[Row]) {
    println!("\n{title}");
    println!("| case | ops | total | per op | notes |");
    println!("|---|---:|---:|---:|---|");
    for r in rows {
        let per = r.total.as_secs_f64() / r.ops.max(1) as f64;
        println!(
            "| {} | {} | {:.1} ms | {:.2} µs | {} |",
            r.case,
            r.ops,
            r.total.as_secs_f64() * 1e3,
            per * 1e6,
            r.extra
        );
    }
}

/// A LoadBalancer Service whose status holds `ips`, as after a restart.
fn service_with_status(namespace: &str, name: &str, ips: &[IpAddr]) -> Service {
    serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": namespace, "name": name},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80, "protocol": "TCP"}]},
        "status": {"loadBalancer": {"ingress": ips.iter().map(|ip| serde_json::json!({"ip": ip.to_string()})).collect::<Vec<_>>()}},
    }))
    .unwrap_or_default()
}

fn request(i: usize, families: Vec<Family>, policy: FamilyPolicy) -> ServiceRequest {
    ServiceRequest {
        families,
        policy,
        ..ServiceRequest::simple("bench", &format!("svc-{i}"))
    }
}

/// Allocates `n` Services from `pools`; returns the allocator and the time.
fn fill(
    pools: Vec<Pool>,
    n: usize,
    families: &[Family],
    policy: FamilyPolicy,
) -> Result<(Allocator, Duration)> {
    let mut a = Allocator::new();
    a.set_pools(pools);
    let start = Instant::now();
    for i in 0..n {
        a.ensure(&request(i, families.to_vec(), policy), &[])
            .with_context(|| format!("allocation {i}"))?;
    }
    Ok((a, start.elapsed()))
}

fn allocator(n: usize) -> Result<()> {
    eprintln!("[bench] allocator: {n} Services per case");
    let mut rows = Vec::new();
    let v4 = [Family::V4];

    let (big, t) = fill(
        vec![Pool::new("slash8", &["10.0.0.0/8"])],
        n,
        &v4,
        FamilyPolicy::SingleStack,
    )?;
    rows.push(Row {
        case: format!("{n} allocations, one /8 pool"),
        ops: n,
        total: t,
        extra: format!("{} used-address runs in memory", big.footprint().0),
    });
    drop(big);

    let (_, t) = fill(
        vec![Pool::new("dual", &["10.0.0.0/8", "2001:db8::/64"])],
        n,
        &[Family::V4, Family::V6],
        FamilyPolicy::RequireDualStack,
    )?;
    rows.push(Row {
        case: format!("{n} dual-stack allocations, /8 + /64"),
        ops: n,
        total: t,
        extra: "2 IPs each".into(),
    });

    let many: Vec<Pool> = (0..40)
        .map(|i| Pool::new(&format!("p{i:02}"), &[&format!("10.{i}.0.0/24")]))
        .collect();
    let (filled, t) = fill(many.clone(), n, &v4, FamilyPolicy::SingleStack)?;
    rows.push(Row {
        case: format!("{n} allocations over 40 /24 pools"),
        ops: n,
        total: t,
        extra: "pools fill in name order".into(),
    });

    // A restart as production does it: a fresh index, one reconcile pass
    // over every Service, each restored from the IPs its status holds.
    let objects: Vec<std::sync::Arc<Service>> = filled
        .assignments()
        .into_iter()
        .map(|(key, asg)| {
            std::sync::Arc::new(service_with_status(&key.namespace, &key.name, &asg.ips))
        })
        .collect();
    let pool_objects: Vec<std::sync::Arc<IPAddressPool>> = many
        .iter()
        .map(|p| {
            std::sync::Arc::new(IPAddressPool::new(
                &p.name,
                IPAddressPoolSpec {
                    addresses: p
                        .ranges
                        .iter()
                        .map(|r| r.as_net().map(|n| n.to_string()).unwrap_or_default())
                        .collect(),
                    auto_assign: true,
                    avoid_buggy_ips: false,
                    service_allocation: None,
                },
            ))
        })
        .collect();
    let mut index = Index::new(ClassFilter {
        class: "ferrolb.io/lb".into(),
        classless: true,
    });
    let start = Instant::now();
    let plan = index.pass(&Inputs {
        pools: &pool_objects,
        services: &objects,
        namespaces: &Default::default(),
        now: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ),
    });
    let took = start.elapsed();
    ensure!(
        index.allocator().holders() == n && plan.services.iter().all(|w| w.ingress.is_none()),
        "the restart pass lost or moved Services"
    );
    rows.push(Row {
        case: format!("restart: first pass over {n} Services with IPs"),
        ops: n,
        total: took,
        extra: "conversion, restore and checks, as the controller runs it".into(),
    });

    print_table(
        "Allocator (cargo run --release -p ferrolb-lab --bin ferrolb-bench -- allocator)",
        &rows,
    );

    // Each memory case runs in a fresh process so heap reuse between cases
    // cannot hide or inflate growth.
    println!("\nAllocator memory, each case in a fresh process (RSS growth)");
    println!("| pool | Services | RSS growth |");
    println!("|---|---:|---:|");
    let me = std::env::current_exe()?;
    for (cidr, count) in [
        ("10.0.0.0/8", n),
        ("198.18.64.0/18", n),
        ("2001:db8::/64", n),
        ("10.0.0.0/8", 4),
        ("198.18.8.0/30", 4),
    ] {
        let out = std::process::Command::new(&me)
            .args(["allocator-memory", cidr, &count.to_string()])
            .output()?;
        ensure!(
            out.status.success(),
            "memory case {cidr}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!(
            "| {cidr} | {count} | {} KiB |",
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(())
}

fn allocator_memory(cidr: &str, n: usize) -> Result<()> {
    let family = if cidr.contains(':') {
        Family::V6
    } else {
        Family::V4
    };
    let base = rss_kib();
    let (a, _) = fill(
        vec![Pool::new("p", &[cidr])],
        n,
        &[family],
        FamilyPolicy::SingleStack,
    )?;
    let grown = rss_kib().saturating_sub(base);
    ensure!(a.assignments().len() == n);
    println!("{grown}");
    Ok(())
}

fn controller(n: usize) -> Result<()> {
    let exe = std::env::current_exe()?.with_file_name("ferrolb-lab");
    ensure!(
        exe.exists(),
        "{} is missing; build the workspace with --release first",
        exe.display()
    );
    eprintln!("[bench] controller: bringing up a lab (1 node, no proxy)");
    // Dual-stack: the IPv4 Service CIDR of the address plan (a /20) holds
    // only 4094 ClusterIPs, the IPv6 one (a /112) 65534, so the bench's
    // Services are IPv6 single-stack and take their IPs from an IPv6 pool.
    let opts = UpOptions {
        nodes: 1,
        proxy: ProxyMode::None,
        ip_family: ferrolb_lab::addresses::IpFamily::Dual,
        ..Default::default()
    };
    let lab = Lab::up(Path::new(&exe), "flbbench", &opts)?;
    let result = controller_in(&lab, n);
    lab.down()?;
    result
}

fn controller_in(lab: &Lab, n: usize) -> Result<()> {
    lab.apply_crds()?;
    lab.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: bench}\n---\napiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: bench}\nspec:\n  addresses: [\"2001:db8::8:0/112\"]\n")?;
    let pid = lab
        .state()
        .read_pid("controller")
        .context("the lab's controller is not running")?;
    let rss_before = rss_of(&pid.to_string());
    let rt = tokio::runtime::Runtime::new()?;
    let mut rows = Vec::new();
    let mut rss_peak = rss_before;
    rt.block_on(async {
        let client = lab.client().await?;
        let api: Api<Service> = Api::namespaced(client, "bench");
        let start = Instant::now();
        eprintln!("[bench] creating {n} LoadBalancer Services");
        let created = futures::stream::iter(0..n)
            .map(|i| {
                let api = api.clone();
                async move {
                    let svc: Service = serde_json::from_value(serde_json::json!({
                        "metadata": {"name": format!("s{i:05}")},
                        // Without this every Service takes a NodePort and the
                        // 2768-port range caps the run.
                        "spec": {"type": "LoadBalancer", "allocateLoadBalancerNodePorts": false, "ipFamilies": ["IPv6"], "ipFamilyPolicy": "SingleStack", "selector": {"app": "bench"}, "ports": [{"port": 80}]},
                    }))?;
                    api.create(&PostParams::default(), &svc).await?;
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(32)
            .fold((0usize, 0usize), |(done, failed), r| async move {
                let failed = match r {
                    Ok(()) => failed,
                    Err(e) => {
                        eprintln!("[bench] create failed: {e}");
                        failed + 1
                    }
                };
                if (done + 1) % 1000 == 0 {
                    eprintln!("[bench] created {}/{n}", done + 1);
                }
                (done + 1, failed)
            })
            .await;
        let created_in = start.elapsed();
        ensure!(created.1 == 0, "{} of {n} creates failed", created.1);
        let mut last_note = Instant::now();
        loop {
            let list = api.list(&ListParams::default()).await?;
            let with_ip = list
                .items
                .iter()
                .filter(|s| !ferrolb_controller::convert::status_ips(s).is_empty())
                .count();
            rss_peak = rss_peak.max(rss_of(&pid.to_string()));
            if with_ip == n {
                break;
            }
            if last_note.elapsed() > Duration::from_secs(5) {
                eprintln!("[bench] {with_ip}/{n} have an IP ({:.0}s)", start.elapsed().as_secs_f64());
                last_note = Instant::now();
            }
            ensure!(start.elapsed() < Duration::from_secs(1800), "gave up after 30 min at {with_ip}/{n}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let all = start.elapsed();
        rows.push(Row { case: format!("create {n} LoadBalancer Services (32 in flight)"), ops: n, total: created_in, extra: String::new() });
        rows.push(Row {
            case: format!("until all {n} have an IP (from the first create)"),
            ops: n,
            total: all,
            extra: format!("controller RSS {rss_before} KiB idle, {rss_peak} KiB peak"),
        });
        anyhow::Ok(())
    })?;
    print_table(
        "Controller in the lab (cargo run --release -p ferrolb-lab --bin ferrolb-bench -- controller)",
        &rows,
    );
    Ok(())
}
