//! Checks every binary's tests run against its own executable: it starts,
//! serves health and metrics, stays unready without an API server, and exits
//! promptly and cleanly on SIGTERM. Lives here so the three binaries share
//! one implementation.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The values of every series of metric `name` in a Prometheus text
/// exposition (`name 1` or `name{labels} 1`), in order; `_sum`, `_count`
/// and the like are other names.
pub fn samples<'a>(body: &'a str, name: &'a str) -> impl Iterator<Item = f64> + 'a {
    body.lines()
        .filter(move |l| l.split([' ', '{']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Status code and body of `GET path` on `addr`, or `None` if nothing answers.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// A loopback address with a port that was free a moment ago.
pub fn free_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address")
}

/// Writes a kubeconfig pointing at a port where no API server listens.
pub fn unreachable_kubeconfig(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    let server = free_addr();
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: none\n  cluster:\n    server: https://{server}\n    insecure-skip-tls-verify: true\ncontexts:\n- name: none\n  context:\n    cluster: none\n    user: none\ncurrent-context: none\nusers:\n- name: none\n  user:\n    token: nothing\n"
    );
    std::fs::write(&path, text).expect("write kubeconfig");
    path
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `binary` with `extra` flags against an unreachable API server and
/// asserts the lifecycle every FerroLB binary promises. Panics with what went
/// wrong.
pub fn assert_lifecycle(binary: &Path, extra: &[&str]) {
    let dir = std::env::temp_dir().join(format!(
        "ferrolb-lifecycle-{}-{}",
        binary.file_name().and_then(|n| n.to_str()).unwrap_or("bin"),
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let kubeconfig = unreachable_kubeconfig(&dir);
    let (metrics, health) = (free_addr(), free_addr());
    let child = Command::new(binary)
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .arg(format!("--metrics-addr={metrics}"))
        .arg(format!("--health-addr={health}"))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn binary");
    let mut child = KillOnDrop(child);

    let deadline = Instant::now() + Duration::from_secs(20);
    let healthz = loop {
        if let Some(r) = http_get(health, "/healthz") {
            break r;
        }
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("{} exited early with {status}", binary.display());
        }
        assert!(
            Instant::now() < deadline,
            "{} never served /healthz",
            binary.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(healthz.0, 200, "/healthz: {healthz:?}");

    let (code, body) = http_get(health, "/readyz").expect("/readyz answers");
    assert_eq!(code, 503, "no API server, so not ready: {body}");
    assert!(
        body.starts_with("waiting for: "),
        "readyz says what it waits for: {body}"
    );

    let (code, body) = http_get(metrics, "/metrics").expect("/metrics answers");
    assert_eq!(code, 200);
    assert!(body.contains("ferrolb_build_info"), "{body}");
    assert_eq!(
        http_get(metrics, "/readyz").map(|r| r.0),
        Some(404),
        "health is on its own port"
    );

    let pid = child.0.id().to_string();
    let sent = Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(killed.success());
    let status = loop {
        if let Ok(Some(status)) = child.0.try_wait() {
            break status;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(1),
            "{} still running 1s after SIGTERM",
            binary.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "clean exit after SIGTERM, got {status}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(test)]
mod tests {
    use super::samples;

    #[test]
    fn samples_match_the_name_exactly_with_or_without_labels() {
        let body =
            "# HELP x_total a counter\nx_total 3\nx_total_extra 9\ny{a=\"1\"} 1.5\ny{a=\"2\"} 2\n";
        assert_eq!(samples(body, "x_total").collect::<Vec<_>>(), vec![3.0]);
        assert_eq!(samples(body, "y").sum::<f64>(), 3.5);
        assert_eq!(samples(body, "z").count(), 0);
    }
}
