//! The echo server every lab pod runs: it answers with the pod's name and the
//! client address it saw, so tests can tell which pod answered and whether
//! the source IP was preserved.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// How long a TCP connection may stay silent before it gets the plain line
/// (so `nc`-style probes that only read still get an answer).
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_millis(500);

/// `pod=<name> client=<ip:port>`; IPv4-mapped IPv6 peers are shown as IPv4.
pub fn reply_line(pod: &str, peer: SocketAddr) -> String {
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    format!("pod={pod} client={peer}\n")
}

pub fn is_http_request(data: &[u8]) -> bool {
    [
        "GET ", "HEAD ", "POST ", "PUT ", "DELETE ", "OPTIONS ", "PATCH ",
    ]
    .iter()
    .any(|m| data.starts_with(m.as_bytes()))
}

pub fn http_response(body: &str, head_only: bool) -> String {
    let mut r = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        r.push_str(body);
    }
    r
}

/// Parses `pod=NAME client=IP:PORT` back (what tests do with the reply).
pub fn parse_reply(line: &str) -> Option<(String, SocketAddr)> {
    let line = line.trim();
    let rest = line.strip_prefix("pod=")?;
    let (pod, client) = rest.split_once(" client=")?;
    Some((pod.to_string(), client.parse().ok()?))
}

async fn bind_tcp(port: u16) -> std::io::Result<TcpListener> {
    // [::] also accepts IPv4 (bindv6only is 0 in the lab's namespaces).
    match TcpListener::bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)).await {
        Ok(l) => Ok(l),
        Err(_) => TcpListener::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)).await,
    }
}

async fn bind_udp(port: u16) -> std::io::Result<UdpSocket> {
    match UdpSocket::bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)).await {
        Ok(s) => Ok(s),
        Err(_) => UdpSocket::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)).await,
    }
}

async fn answer_tcp(pod: &str, mut stream: TcpStream, peer: SocketAddr) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let n = match tokio::time::timeout(FIRST_BYTES_TIMEOUT, stream.read(&mut buf)).await {
        Ok(r) => r?,
        Err(_) => 0,
    };
    let line = reply_line(pod, peer);
    let data = &buf[..n];
    let reply = if is_http_request(data) {
        http_response(&line, data.starts_with(b"HEAD "))
    } else {
        line
    };
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}

pub async fn serve_tcp(pod: String, port: u16) -> std::io::Result<()> {
    let listener = bind_tcp(port).await?;
    loop {
        let (stream, peer) = listener.accept().await?;
        let pod = pod.clone();
        tokio::spawn(async move {
            let _ = answer_tcp(&pod, stream, peer).await;
        });
    }
}

pub async fn serve_udp(pod: String, port: u16) -> std::io::Result<()> {
    let socket = bind_udp(port).await?;
    let mut buf = vec![0u8; 65536];
    loop {
        let (_, peer) = socket.recv_from(&mut buf).await?;
        let _ = socket
            .send_to(reply_line(&pod, peer).as_bytes(), peer)
            .await;
    }
}

/// Serves every port until one listener fails; with no ports it waits forever,
/// like a container that only sleeps.
pub async fn run(pod: String, tcp: Vec<u16>, udp: Vec<u16>) -> std::io::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for port in tcp {
        let pod = pod.clone();
        tasks.spawn(async move { (port, "tcp", serve_tcp(pod, port).await) });
    }
    for port in udp {
        let pod = pod.clone();
        tasks.spawn(async move { (port, "udp", serve_udp(pod, port).await) });
    }
    eprintln!("ferrolb-echo: serving as pod {pod}");
    match tasks.join_next().await {
        None => std::future::pending().await,
        Some(Ok((port, proto, Err(e)))) => Err(std::io::Error::new(
            e.kind(),
            format!("{proto} port {port}: {e}"),
        )),
        Some(Ok((_, _, Ok(())))) => Ok(()),
        Some(Err(e)) => Err(std::io::Error::other(e)),
    }
}

/// The echo server's command-line arguments (shared by `ferrolb-echo` and
/// the hidden `ferrolb-lab echo`).
#[derive(clap::Args, Debug, Clone)]
pub struct EchoArgs {
    /// Pod name to report.
    #[arg(long, env = "POD_NAME")]
    pub name: String,
    /// TCP port to listen on (repeatable).
    #[arg(long)]
    pub tcp: Vec<u16>,
    /// UDP port to listen on (repeatable).
    #[arg(long)]
    pub udp: Vec<u16>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_round_trips_and_unmaps_ipv4() {
        let peer: SocketAddr = "[::ffff:198.18.0.100]:40000".parse().unwrap();
        let line = reply_line("web-1", peer);
        assert_eq!(line, "pod=web-1 client=198.18.0.100:40000\n");
        assert_eq!(
            parse_reply(&line),
            Some(("web-1".to_string(), "198.18.0.100:40000".parse().unwrap()))
        );
        let v6 = reply_line("p", "[2001:db8::100]:5".parse().unwrap());
        assert_eq!(
            parse_reply(&v6).unwrap().1,
            "[2001:db8::100]:5".parse::<SocketAddr>().unwrap()
        );
        assert!(parse_reply("garbage").is_none());
    }

    #[test]
    fn http_detection_and_response() {
        assert!(is_http_request(b"GET / HTTP/1.1\r\n"));
        assert!(!is_http_request(b"hello"));
        let r = http_response("pod=a client=1.2.3.4:5\n", false);
        assert!(
            r.starts_with("HTTP/1.1 200 OK\r\n")
                && r.contains("Content-Length: 23\r\n")
                && r.ends_with("5\n")
        );
    }

    #[tokio::test]
    async fn answers_tcp_http_plain_and_udp() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = tcp.local_addr().unwrap().port();
        drop(tcp);
        tokio::spawn(serve_tcp("t1".into(), port));
        tokio::spawn(serve_udp("t1".into(), port));
        tokio::time::sleep(Duration::from_millis(100)).await;

        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let body = out.split("\r\n\r\n").nth(1).unwrap();
        let (pod, client) = parse_reply(body).unwrap();
        assert_eq!(pod, "t1");
        assert_eq!(client, s.local_addr().unwrap());

        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("pod=t1 client=127.0.0.1:"), "{out}");

        let u = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        u.send_to(b"x", ("127.0.0.1", port)).await.unwrap();
        let mut buf = [0u8; 256];
        let (n, _) = tokio::time::timeout(Duration::from_secs(2), u.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let (pod, client) = parse_reply(std::str::from_utf8(&buf[..n]).unwrap()).unwrap();
        assert_eq!((pod.as_str(), client), ("t1", u.local_addr().unwrap()));
    }
}
