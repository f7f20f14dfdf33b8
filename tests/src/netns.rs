//! The lab's topology as network namespaces, built with iproute2.
//!
//! LAN: a bridge `br0` in `<prefix>-lan`; each node, the client and the root
//! namespace have a veth onto it. Pods: a veth from the pod netns into its
//! node netns, with a /32 (/128) route on the node side and the node's
//! pod-gateway address on its loopback, host-gw style, so no pod traffic is
//! bridged and every packet passes the node's routing and netfilter.

use std::net::IpAddr;
use std::process::{Command, Stdio};

use crate::addresses::{self, IpFamily};
use crate::names::Prefix;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("cannot run `{0}`: {1}")]
    Run(String, std::io::Error),
}

pub type Result<T, E = NetError> = std::result::Result<T, E>;

/// Runs `ip ARGS`; an error carries the command and iproute2's message.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| NetError::Run(format!("ip {}", args.join(" ")), e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Runs `ip -n NETNS ARGS`.
pub fn ip_in(netns: &str, args: &[&str]) -> Result<()> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    ip(&all)
}

/// Sets sysctls inside a netns (one exec for all of them).
pub fn sysctl_in(netns: &str, settings: &[&str]) -> Result<()> {
    let mut args = vec!["netns", "exec", netns, "sysctl", "-q", "-w"];
    args.extend_from_slice(settings);
    ip(&args)
}

/// Names of all network namespaces (`ip netns list` prints `name (id: N)`).
pub fn list_netns() -> Vec<String> {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

pub fn netns_exists(name: &str) -> bool {
    list_netns().iter().any(|n| n == name)
}

/// The root-namespace link that carries `addr`, if any.
pub fn link_with_address(addr: &IpAddr) -> Option<String> {
    let out = Command::new("ip")
        .args(["-o", "addr", "show"])
        .output()
        .ok()?;
    let needle = format!(" {addr}/");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains(&needle))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_string())
}

pub fn link_exists(name: &str) -> bool {
    ip(&["link", "show", "dev", name]).is_ok()
}

/// Settings every lab netns gets before its links exist, so links inherit them.
fn base_sysctls(netns: &str, forwarding: bool) -> Result<()> {
    let fwd = if forwarding { "1" } else { "0" };
    let v4 = format!("net.ipv4.ip_forward={fwd}");
    let v6 = format!("net.ipv6.conf.all.forwarding={fwd}");
    sysctl_in(
        netns,
        &[
            &v4,
            &v6,
            // Asymmetric paths are normal here (LB traffic in on one node, out on another).
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            // No duplicate address detection: addresses are usable at once.
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ],
    )?;
    ip_in(netns, &["link", "set", "lo", "up"])
}

fn cidr(ip: IpAddr, len: u8) -> String {
    format!("{ip}/{len}")
}

/// Attaches `netns` to the LAN through bridge port `port` as `eth0` with the given addresses.
fn attach_to_lan(prefix: &Prefix, netns: &str, port: &str, ips: &[IpAddr]) -> Result<()> {
    let lan = prefix.lan_netns();
    ip_in(
        &lan,
        &[
            "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", netns,
        ],
    )?;
    ip_in(&lan, &["link", "set", port, "master", "br0", "up"])?;
    for ip in ips {
        let a = match ip {
            IpAddr::V4(_) => cidr(*ip, addresses::LAN_V4_PREFIX_LEN),
            IpAddr::V6(_) => cidr(*ip, addresses::LAN_V6_PREFIX_LEN),
        };
        ip_in(netns, &["addr", "add", &a, "dev", "eth0", "nodad"])?;
    }
    ip_in(netns, &["link", "set", "eth0", "up"])
}

/// Routes to every node's pod CIDR (except `except`) via that node's LAN address.
fn pod_routes(ip_prefix: &[&str], nodes: u8, except: Option<u8>, family: IpFamily) -> Result<()> {
    for m in (1..=nodes).filter(|m| Some(*m) != except) {
        let v4 = addresses::pod_cidr_v4(m).to_string();
        let via4 = addresses::node_v4(m).to_string();
        let mut a = ip_prefix.to_vec();
        a.extend_from_slice(&["route", "replace", &v4, "via", &via4]);
        ip(&a)?;
        if family.has_v6() {
            let v6 = addresses::pod_cidr_v6(m).to_string();
            let via6 = addresses::node_v6(m).to_string();
            let mut a = ip_prefix.to_vec();
            a.extend_from_slice(&["-6", "route", "replace", &v6, "via", &via6]);
            ip(&a)?;
        }
    }
    Ok(())
}

/// What real nodes have: a default route, here on-link on the LAN
/// interface, so traffic the node sends to an address nobody routes (a
/// ClusterIP before any proxy rewrote it) is attempted on the LAN and dies
/// unanswered on the lab's bridge. Never a route via the root namespace,
/// which could forward it off the machine.
fn default_on_link(netns: &str, family: IpFamily) -> Result<()> {
    ip_in(netns, &["route", "replace", "default", "dev", "eth0"])?;
    if family.has_v6() {
        ip_in(netns, &["-6", "route", "replace", "default", "dev", "eth0"])?;
    }
    Ok(())
}

/// Builds LAN, nodes, client and the root veth. On error the caller tears down.
pub fn build_topology(prefix: &Prefix, nodes: u8, family: IpFamily) -> Result<()> {
    let lan = prefix.lan_netns();
    ip(&["netns", "add", &lan])?;
    base_sysctls(&lan, false)?;
    ip_in(&lan, &["link", "add", "br0", "type", "bridge"])?;
    ip_in(&lan, &["link", "set", "br0", "up"])?;

    // Root namespace: the control plane's address. Created in the root ns and
    // its peer moved, so only this one name ever exists outside our netns.
    let root = prefix.root_link();
    ip(&[
        "link", "add", &root, "type", "veth", "peer", "name", "cp", "netns", &lan,
    ])?;
    ip_in(&lan, &["link", "set", "cp", "master", "br0", "up"])?;
    ip(&[
        "addr",
        "add",
        &cidr(
            addresses::control_plane_v4().into(),
            addresses::LAN_V4_PREFIX_LEN,
        ),
        "dev",
        &root,
    ])?;
    if family.has_v6() {
        let a = cidr(
            addresses::control_plane_v6().into(),
            addresses::LAN_V6_PREFIX_LEN,
        );
        ip(&["addr", "add", &a, "dev", &root, "nodad"])?;
    }
    ip(&["link", "set", &root, "up"])?;

    for n in 1..=nodes {
        let ns = prefix.node_netns(n);
        ip(&["netns", "add", &ns])?;
        base_sysctls(&ns, true)?;
        attach_to_lan(
            prefix,
            &ns,
            &format!("n{n}"),
            &addresses::node_ips(n, family),
        )?;
        // The pods' gateway address. On lo rather than a dummy link (containers
        // often lack the dummy module); ARP from any pod veth is answered for it
        // because arp_ignore=0 answers for every local address.
        ip_in(
            &ns,
            &[
                "addr",
                "add",
                &format!("{}/32", addresses::pod_gateway_v4(n)),
                "dev",
                "lo",
            ],
        )?;
        pod_routes(&["-n", &ns], nodes, Some(n), family)?;
        default_on_link(&ns, family)?;
    }

    let client = prefix.client_netns();
    ip(&["netns", "add", &client])?;
    base_sysctls(&client, false)?;
    let mut client_ips = vec![IpAddr::V4(addresses::client_v4())];
    if family.has_v6() {
        client_ips.push(addresses::client_v6().into());
    }
    attach_to_lan(prefix, &client, "client", &client_ips)?;
    pod_routes(&["-n", &client], nodes, None, family)?;

    // The API server may call into pods (webhooks); give the root ns the same routes.
    pod_routes(&[], nodes, None, family)?;
    Ok(())
}

/// Cuts (`up == false`) or restores a node's LAN link at its bridge port, so
/// the node sees carrier loss exactly as with a pulled cable.
pub fn set_node_link(prefix: &Prefix, n: u8, up: bool) -> Result<()> {
    ip_in(
        &prefix.lan_netns(),
        &[
            "link",
            "set",
            &format!("n{n}"),
            if up { "up" } else { "down" },
        ],
    )
}

/// Wires one pod netns into node `n` with host index `idx`.
pub fn add_pod(prefix: &Prefix, n: u8, pod_netns: &str, idx: u8, family: IpFamily) -> Result<()> {
    let node = prefix.node_netns(n);
    let veth = format!("p{idx}");
    // A netns from a pod of the same name that was force-deleted, or a veth
    // whose netns is still being destroyed by the kernel, must not block us.
    let _ = ip_in(&node, &["link", "del", &veth]);
    if netns_exists(pod_netns) {
        let _ = ip(&["netns", "del", pod_netns]);
    }
    ip(&["netns", "add", pod_netns])?;
    base_sysctls(pod_netns, false)?;
    ip_in(
        &node,
        &[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", pod_netns,
        ],
    )?;
    ip_in(&node, &["link", "set", &veth, "up"])?;
    ip_in(pod_netns, &["link", "set", "eth0", "up"])?;
    let gw4 = addresses::pod_gateway_v4(n).to_string();
    for pod_ip in addresses::pod_ips(n, idx, family) {
        match pod_ip {
            IpAddr::V4(_) => {
                ip_in(
                    pod_netns,
                    &["addr", "add", &cidr(pod_ip, 32), "dev", "eth0"],
                )?;
                ip_in(
                    pod_netns,
                    &["route", "add", &gw4, "dev", "eth0", "scope", "link"],
                )?;
                ip_in(
                    pod_netns,
                    &["route", "add", "default", "via", &gw4, "dev", "eth0"],
                )?;
                ip_in(
                    &node,
                    &["route", "replace", &cidr(pod_ip, 32), "dev", &veth],
                )?;
            }
            IpAddr::V6(_) => {
                let gw6 = addresses::pod_gateway_v6();
                ip_in(
                    &node,
                    &[
                        "-6",
                        "addr",
                        "add",
                        &format!("{gw6}/64"),
                        "dev",
                        &veth,
                        "nodad",
                    ],
                )?;
                ip_in(
                    pod_netns,
                    &[
                        "-6",
                        "addr",
                        "add",
                        &cidr(pod_ip, 128),
                        "dev",
                        "eth0",
                        "nodad",
                    ],
                )?;
                ip_in(
                    pod_netns,
                    &[
                        "-6",
                        "route",
                        "add",
                        "default",
                        "via",
                        &gw6.to_string(),
                        "dev",
                        "eth0",
                    ],
                )?;
                ip_in(
                    &node,
                    &["-6", "route", "replace", &cidr(pod_ip, 128), "dev", &veth],
                )?;
            }
        }
    }
    Ok(())
}

/// Removes a pod's veth (both ends, synchronously) and its netns.
pub fn del_pod(prefix: &Prefix, n: u8, pod_netns: &str, idx: u8) -> Result<()> {
    let _ = ip_in(&prefix.node_netns(n), &["link", "del", &format!("p{idx}")]);
    if netns_exists(pod_netns) {
        ip(&["netns", "del", pod_netns])
    } else {
        Ok(())
    }
}

/// Deletes every netns and link of the prefix. Keeps going on errors and
/// returns them all, so one failure does not leave the rest behind.
pub fn teardown(prefix: &Prefix) -> Vec<NetError> {
    let mut errors = Vec::new();
    let root = prefix.root_link();
    if link_exists(&root)
        && let Err(e) = ip(&["link", "del", &root])
    {
        errors.push(e);
    }
    for ns in list_netns().into_iter().filter(|ns| prefix.owns_netns(ns)) {
        if let Err(e) = ip(&["netns", "del", &ns]) {
            errors.push(e);
        }
    }
    errors
}

/// What of the prefix is still there: netns names and the root link.
pub fn leftovers(prefix: &Prefix) -> Vec<String> {
    let mut v: Vec<String> = list_netns()
        .into_iter()
        .filter(|ns| prefix.owns_netns(ns))
        .map(|n| format!("netns {n}"))
        .collect();
    if link_exists(&prefix.root_link()) {
        v.push(format!("link {}", prefix.root_link()));
    }
    v
}
