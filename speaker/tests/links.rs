//! The link watch against a real kernel, in a throwaway network namespace:
//! links and addresses appear, change and go, and each change yields a new
//! snapshot; with no change, nothing is yielded (no polling).
//! Needs root; fails saying so unless FERROLB_SKIP_LAB=1 asks to skip.

use std::process::Command;
use std::time::Duration;

use ferrolb_speaker::links::{LinkWatch, Links};
use ipnet::IpNet;

fn runs_here() -> bool {
    let why = if !nix::unistd::geteuid().is_root() {
        "needs root (a network namespace and links in it)".to_string()
    } else if Command::new("ip").arg("-V").output().is_err() {
        "needs iproute2's `ip`".to_string()
    } else {
        return true;
    };
    if std::env::var("FERROLB_SKIP_LAB").as_deref() == Ok("1") {
        eprintln!("SKIPPED on purpose (FERROLB_SKIP_LAB=1): {why}");
        return false;
    }
    panic!("this test {why}; run it as root, or set FERROLB_SKIP_LAB=1 to skip it");
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deletes the namespace when dropped, also when the test fails.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Waits for the first snapshot that satisfies `want`.
async fn until(watch: &mut LinkWatch, what: &str, want: impl Fn(&Links) -> bool) -> Links {
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let links = watch.next().await.expect("watch");
            if want(&links) {
                return links;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no snapshot with {what} within 5 s"))
}

fn has(links: &Links, dev: &str, net: &str) -> bool {
    let net: IpNet = net.parse().unwrap();
    links.by_name(dev).is_some_and(|l| l.addrs.contains(&net))
}

#[test]
fn snapshots_follow_links_and_addresses() {
    if !runs_here() {
        return;
    }
    let ns = Netns(format!("fls-{}", std::process::id()));
    ip(&["netns", "add", &ns.0]);
    let name = ns.0.clone();
    let thread = std::thread::spawn(move || {
        let file = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let n = ["-n", name.as_str()];
            let mut watch = LinkWatch::new().await.unwrap();
            let first = watch.next().await.unwrap();
            let lo = first.by_name("lo").expect("lo exists in a new namespace");
            assert!(!lo.up && lo.addrs.is_empty());
            assert!(first.by_name("d0").is_none());

            // A veth pair, not a dummy link: the lab's uplinks are veths,
            // and not every kernel has the dummy module.
            ip(&[
                &n[..],
                &["link", "add", "d0", "type", "veth", "peer", "name", "d1"],
            ]
            .concat());
            let links = until(&mut watch, "d0 and d1", |l| {
                l.by_name("d0").is_some() && l.by_name("d1").is_some()
            })
            .await;
            let d0 = links.by_name("d0").unwrap();
            assert!(!d0.up);
            assert!(d0.mac.is_some(), "a veth has an Ethernet address");

            ip(&[&n[..], &["addr", "add", "198.18.8.2/24", "dev", "d0"]].concat());
            ip(&[&n[..], &["addr", "add", "2001:db8::2/64", "dev", "d0"]].concat());
            until(&mut watch, "both addresses", |l| {
                has(l, "d0", "198.18.8.2/24") && has(l, "d0", "2001:db8::2/64")
            })
            .await;

            ip(&[&n[..], &["link", "set", "d0", "up"]].concat());
            until(&mut watch, "d0 up", |l| {
                l.by_name("d0").is_some_and(|d| d.up)
            })
            .await;

            ip(&[&n[..], &["addr", "del", "198.18.8.2/24", "dev", "d0"]].concat());
            until(&mut watch, "the IPv4 address gone", |l| {
                !has(l, "d0", "198.18.8.2/24") && has(l, "d0", "2001:db8::2/64")
            })
            .await;

            // Let IPv6 settle (DAD, link-local) so the quiet check below
            // sees a quiet kernel.
            tokio::time::sleep(Duration::from_secs(3)).await;
            while tokio::time::timeout(Duration::from_millis(200), watch.next())
                .await
                .is_ok()
            {}
            assert!(
                tokio::time::timeout(Duration::from_secs(1), watch.next())
                    .await
                    .is_err(),
                "a snapshot came without a change"
            );

            ip(&[&n[..], &["link", "del", "d0"]].concat());
            until(&mut watch, "d0 and d1 gone", |l| {
                l.by_name("d0").is_none() && l.by_name("d1").is_none()
            })
            .await;
        });
    });
    thread.join().unwrap();
}
