//! A lab pod's one "container": the echo server, run the way a kubelet runs
//! a container. The pod is Ready only once every port it declares answers
//! (a TCP connect, a UDP round trip) from the node's side; when the process
//! dies the pod turns NotReady at once, is restarted with back-off as its
//! `restartPolicy` says, and ends Failed if it stays dead.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio::net::{TcpStream, UdpSocket};

/// Restarts of a container that keeps dying before its pod is Failed.
pub const MAX_RESTARTS: u32 = 3;
/// The kubelet's first crash back-off; each further one doubles.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(10);
/// How long one probe of one port may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);

/// The ports the echo server serves: every declared containerPort.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ports {
    pub tcp: Vec<u16>,
    pub udp: Vec<u16>,
}

impl Ports {
    pub fn of(pod: &Pod) -> Self {
        let mut ports = Ports::default();
        let containers = pod
            .spec
            .as_ref()
            .map(|s| s.containers.as_slice())
            .unwrap_or_default();
        for port in containers.iter().flat_map(|c| c.ports.iter().flatten()) {
            let Ok(n) = u16::try_from(port.container_port) else {
                continue;
            };
            let list = match port.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => &mut ports.tcp,
                "UDP" => &mut ports.udp,
                _ => continue,
            };
            if !list.contains(&n) {
                list.push(n);
            }
        }
        ports
    }

    /// `--tcp P ... --udp P ...` for the echo server.
    pub fn args(&self) -> Vec<String> {
        let tcp = self
            .tcp
            .iter()
            .flat_map(|p| ["--tcp".to_string(), p.to_string()]);
        let udp = self
            .udp
            .iter()
            .flat_map(|p| ["--udp".to_string(), p.to_string()]);
        tcp.chain(udp).collect()
    }
}

/// True when every port answers on `ip` as this pod's echo server: its
/// reply names `pod`, so another process holding the port (a host-network
/// neighbour) never makes the pod look ready.
pub async fn probe(ip: IpAddr, ports: &Ports, pod: &str) -> bool {
    let want = format!("pod={pod} ");
    for port in &ports.tcp {
        let reply =
            tokio::time::timeout(PROBE_TIMEOUT, probe_tcp(SocketAddr::new(ip, *port))).await;
        if !matches!(reply, Ok(Some(line)) if line.starts_with(&want)) {
            return false;
        }
    }
    for port in &ports.udp {
        let reply =
            tokio::time::timeout(PROBE_TIMEOUT, probe_udp(SocketAddr::new(ip, *port))).await;
        if !matches!(reply, Ok(Some(line)) if line.starts_with(&want)) {
            return false;
        }
    }
    true
}

async fn probe_tcp(addr: SocketAddr) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.ok()?;
    // Any bytes make the echo server answer at once.
    stream.write_all(b"probe\n").await.ok()?;
    let mut buf = vec![0u8; 512];
    let n = stream.read(&mut buf).await.ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

async fn probe_udp(addr: SocketAddr) -> Option<String> {
    let local: SocketAddr = if addr.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let socket = UdpSocket::bind(local).await.ok()?;
    socket.send_to(b"probe", addr).await.ok()?;
    let mut buf = [0u8; 512];
    let (n, _) = socket.recv_from(&mut buf).await.ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// What the container is doing, as `containerStatuses[].state` says it.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    /// Started; `serving` once its ports answered.
    Running { since: Time, serving: bool },
    /// Died; restarted after the back-off unless the pod is final.
    Terminated { exit_code: i32, finished: Time },
}

/// `restartPolicy` and what it does after the `failures`-th death in a row:
/// the back-off before the next start, or `None` when the pod is final.
pub fn restart_after(policy: &str, failures: u32, exit_code: i32) -> Option<Duration> {
    let again = match policy {
        "Never" => false,
        "OnFailure" => exit_code != 0,
        _ => true,
    };
    if !again || failures > MAX_RESTARTS {
        return None;
    }
    Some(FIRST_BACKOFF * 2u32.saturating_pow(failures.saturating_sub(1)))
}

/// The phase of a pod whose container is final (will not be restarted).
pub fn final_phase(exit_code: i32) -> &'static str {
    if exit_code == 0 {
        "Succeeded"
    } else {
        "Failed"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn declared_ports_become_echo_flags_once_each() {
        let p: Pod = serde_json::from_value(json!({"metadata": {"name": "web-1"}, "spec": {"containers": [
            {"name": "a", "ports": [{"containerPort": 80}, {"containerPort": 53, "protocol": "UDP"}, {"containerPort": 9, "protocol": "SCTP"}]},
            {"name": "b", "ports": [{"containerPort": 80, "protocol": "TCP"}, {"containerPort": 53, "protocol": "TCP"}]},
        ]}}))
        .unwrap();
        let ports = Ports::of(&p);
        assert_eq!(
            ports,
            Ports {
                tcp: vec![80, 53],
                udp: vec![53]
            }
        );
        assert_eq!(ports.args(), ["--tcp", "80", "--tcp", "53", "--udp", "53"]);
    }

    #[test]
    fn restart_policy_and_back_off() {
        assert_eq!(restart_after("Always", 1, 1), Some(FIRST_BACKOFF));
        assert_eq!(restart_after("Always", 2, 0), Some(2 * FIRST_BACKOFF));
        assert_eq!(
            restart_after("Always", MAX_RESTARTS + 1, 1),
            None,
            "stays dead: Failed"
        );
        assert_eq!(restart_after("Never", 1, 1), None);
        assert_eq!(restart_after("OnFailure", 1, 0), None);
        assert_eq!(restart_after("OnFailure", 1, 2), Some(FIRST_BACKOFF));
        assert_eq!(final_phase(0), "Succeeded");
        assert_eq!(final_phase(137), "Failed");
    }

    #[tokio::test]
    async fn probes_need_this_pods_server_on_every_port() {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = tcp.local_addr().unwrap().port();
        drop(tcp);
        tokio::spawn(crate::echo::serve_tcp("web-1".into(), port));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let ports = Ports {
            tcp: vec![port],
            udp: vec![],
        };
        assert!(probe(ip, &ports, "web-1").await);
        assert!(
            !probe(ip, &ports, "web-2").await,
            "another pod's server on the port"
        );
        let closed = Ports {
            tcp: vec![1],
            udp: vec![],
        };
        assert!(!probe(ip, &closed, "web-1").await, "closed port");
        // A UDP port nobody answers on fails the probe.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let udp = silent.local_addr().unwrap().port();
        assert!(
            !probe(
                ip,
                &Ports {
                    tcp: vec![],
                    udp: vec![udp]
                },
                "web-1"
            )
            .await
        );
    }
}
