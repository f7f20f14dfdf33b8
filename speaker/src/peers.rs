//! The heartbeat's I/O: a UDP socket that an old and a new speaker process
//! on one node can both bind (`SO_REUSEPORT`), a task that authenticates
//! what arrives ([`crate::heartbeat`]) and hands it to the main loop, and
//! the node lock that tells two such processes apart.
//!
//! # Why a node lock
//!
//! With `SO_REUSEPORT` the kernel spreads incoming datagrams over the
//! sockets sharing the port by a hash of their addresses, so while an old
//! and a new process overlap (a rolling update with surge), each hears
//! only some of the peers. A process that judged liveness from that half
//! would take the IPs of peers it never hears. So only the process that
//! holds the node lock acts; a second one waits, passive (it keeps its
//! caches warm and is ready, so the rollout proceeds), and takes the lock
//! when the old process exits. From then on it hears everyone, and the
//! fence's listening rule keeps it silent until it has heard them for one
//! dead interval.
//!
//! The lock is an abstract Unix socket name: abstract names live in the
//! network namespace, which host-network pods on one node share, and the
//! kernel frees the name when its holder exits, however it exits.

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Instant;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use crate::heartbeat::{self, DecodeError, MAX_MESSAGE, Message, Replay};

/// Held for the life of the process that acts for this node.
#[derive(Debug)]
pub struct NodeLock {
    _socket: UnixDatagram,
}

impl NodeLock {
    /// Takes the lock for heartbeat port `port`, or `None` while another
    /// process of this node holds it.
    pub fn try_take(port: u16) -> io::Result<Option<Self>> {
        let name = format!("ferrolb-speaker-{port}");
        let addr = UnixAddr::from_abstract_name(name.as_bytes())?;
        match UnixDatagram::bind_addr(&addr) {
            Ok(socket) => Ok(Some(Self { _socket: socket })),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// The heartbeat socket.
#[derive(Debug, Clone)]
pub struct Heartbeats {
    socket: Arc<UdpSocket>,
    /// The same socket for sending: a plain non-blocking send never
    /// waits for the reactor (tokio's `try_send_to` refuses until the
    /// reactor has first seen the socket writable).
    sender: Arc<std::net::UdpSocket>,
    /// Bound to `[::]` (dual-stack): IPv4 peers are sent to as
    /// IPv4-mapped addresses.
    v6: bool,
}

impl Heartbeats {
    /// Binds `port` on every address, dual-stack where the kernel has
    /// IPv6, with `SO_REUSEPORT` so the next process on this node can bind
    /// it too.
    pub fn bind(port: u16) -> io::Result<Self> {
        let (socket, v6) = match bind_one(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), true) {
            Ok(s) => (s, true),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => return Err(e),
            // No IPv6 in this kernel (ipv6.disable=1): IPv4 only.
            Err(_) => (
                bind_one(SocketAddr::from(([0, 0, 0, 0], port)), false)?,
                false,
            ),
        };
        let sender = Arc::new(socket.try_clone()?);
        Ok(Self {
            socket: Arc::new(UdpSocket::from_std(socket)?),
            sender,
            v6,
        })
    }

    /// Sends one datagram to each address; returns how many failed (a
    /// peer's address unreachable now is the liveness's business).
    pub fn send_all(&self, bytes: &[u8], to: impl IntoIterator<Item = SocketAddr>) -> usize {
        let mut failed = 0;
        for addr in to {
            let addr = if self.v6 { mapped(addr) } else { addr };
            // Non-blocking: a full socket buffer drops this heartbeat
            // rather than stalling the loop; the next one goes out an
            // interval later.
            if self.sender.send_to(bytes, addr).is_err() {
                failed += 1;
            }
        }
        failed
    }

    /// Receives, authenticates and de-duplicates heartbeats until the
    /// channel closes. `keys`: the accepted keys, the first one also the
    /// signing key; none means nothing is accepted.
    pub async fn receive(
        self,
        keys: watch::Receiver<Vec<Vec<u8>>>,
        out: mpsc::Sender<Received>,
        rejected: impl Fn(Rejection) + Send + 'static,
    ) {
        let mut replay = Replay::new();
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let (n, from) = match self.socket.recv_from(&mut buf).await {
                Ok(r) => r,
                Err(error) => {
                    tracing::warn!(%error, "heartbeat socket failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let at = Instant::now();
            let from = unmapped(from);
            let message = {
                let keys = keys.borrow();
                let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
                heartbeat::decode_any(&buf[..n], &refs)
            };
            let message = match message {
                Ok(m) => m,
                Err(e) => {
                    rejected(Rejection::Decode(e, from));
                    continue;
                }
            };
            if let Err(e) = replay.accept(&message) {
                rejected(Rejection::Replayed(e.to_string(), from));
                continue;
            }
            if out.send(Received { message, from, at }).await.is_err() {
                return;
            }
        }
    }
}

/// A heartbeat that passed authentication and the replay guard.
#[derive(Debug, Clone)]
pub struct Received {
    pub message: Message,
    pub from: SocketAddr,
    pub at: Instant,
}

/// A datagram refused.
#[derive(Debug, Clone)]
pub enum Rejection {
    Decode(DecodeError, SocketAddr),
    Replayed(String, SocketAddr),
}

impl Rejection {
    /// A short label for the metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::Decode(DecodeError::BadMac, _) => "bad_mac",
            Rejection::Decode(DecodeError::Version(_), _) => "version",
            Rejection::Decode(_, _) => "malformed",
            Rejection::Replayed(_, _) => "replayed",
        }
    }
}

fn bind_one(addr: SocketAddr, v6: bool) -> io::Result<std::net::UdpSocket> {
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if v6 {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

fn mapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) => {
            SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
        }
        v6 => v6,
    }
}

fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => addr,
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_round_trips() {
        let a: SocketAddr = "198.18.0.11:7476".parse().unwrap();
        assert_eq!(mapped(a).to_string(), "[::ffff:198.18.0.11]:7476");
        assert_eq!(unmapped(mapped(a)), a);
        let b: SocketAddr = "[2001:db8::11]:7476".parse().unwrap();
        assert_eq!(mapped(b), b);
        assert_eq!(unmapped(b), b);
    }

    #[test]
    fn the_node_lock_is_exclusive_and_freed_on_drop() {
        // A port number no real speaker uses, so a speaker running on this
        // machine cannot interfere.
        let port = 1;
        let first = NodeLock::try_take(port).unwrap();
        assert!(first.is_some());
        assert!(NodeLock::try_take(port).unwrap().is_none());
        drop(first);
        assert!(NodeLock::try_take(port).unwrap().is_some());
    }

    #[tokio::test]
    async fn two_processes_can_bind_the_port_and_only_authentic_messages_pass() {
        let a = Heartbeats::bind(0).unwrap();
        let port = a.socket.local_addr().unwrap().port();
        // The second bind of the same port succeeds (SO_REUSEPORT).
        let b = Heartbeats::bind(port).unwrap();
        drop(b);
        let key = vec![7u8; 32];
        let (_keys_tx, keys) = watch::channel(vec![key.clone()]);
        let (tx, mut rx) = mpsc::channel(8);
        let rejections = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = rejections.clone();
        tokio::spawn(
            a.clone()
                .receive(keys, tx, move |r| seen.lock().unwrap().push(r.reason())),
        );
        let msg = Message {
            sender: "node-2".into(),
            incarnation: 9,
            seq: 1,
            state: heartbeat::State::Running,
            heard: vec![],
        };
        let to: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let sender = Heartbeats::bind(0).unwrap();
        let forged = heartbeat::encode(&msg, &[1u8; 32]).unwrap();
        let good = heartbeat::encode(&msg, &key).unwrap();
        assert_eq!(sender.send_all(&forged, [to]), 0);
        assert_eq!(sender.send_all(&good, [to]), 0);
        assert_eq!(sender.send_all(&good, [to]), 0);
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.message, msg);
        assert_eq!(got.from.ip(), "127.0.0.1".parse::<IpAddr>().unwrap());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(rx.try_recv().is_err(), "the replayed copy is refused");
        assert_eq!(*rejections.lock().unwrap(), ["bad_mac", "replayed"]);
    }
}
