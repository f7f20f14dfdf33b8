//! The generated CRDs against a real kube-apiserver: accepted as structural
//! schemas, valid pools accepted, invalid ones refused at apply time with a
//! message naming the field (CEL in the schema, no webhook).

mod common;

use anyhow::{Context, Result, ensure};
use common::{both, done, step};
use ferrolb_lab::lab::Lab;
use ferrolb_lab::state::{ProxyMode, UpOptions};

const PREFIX: &str = "flbtcrd";

fn pool(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {{name: {name}}}\nspec:\n{spec}"
    )
}

/// Dry-run applies `manifest` and checks the API server refuses it with a
/// message containing every one of `expect`.
fn refused(lab: &Lab, what: &str, manifest: &str, expect: &[&str]) -> Result<()> {
    let out = lab.kubectl_dry_run(manifest)?;
    let msg = both(&out);
    ensure!(
        !out.status.success(),
        "{what}: accepted but should be refused:\n{manifest}"
    );
    for e in expect {
        ensure!(
            msg.contains(e),
            "{what}: the refusal does not mention {e:?}:\n{msg}"
        );
    }
    eprintln!(
        "    refused {what}: {}",
        msg.lines().last().unwrap_or_default().trim()
    );
    Ok(())
}

fn accepted(lab: &Lab, what: &str, manifest: &str) -> Result<()> {
    let out = lab.kubectl_dry_run(manifest)?;
    ensure!(
        out.status.success(),
        "{what}: refused but valid:\n{}",
        both(&out)
    );
    Ok(())
}

#[test]
fn generated_crds_on_a_real_api_server() -> Result<()> {
    let opts = UpOptions {
        nodes: 1,
        proxy: ProxyMode::None,
        ferrolb: false,
        ..Default::default()
    };
    let Some(lab) = common::up(PREFIX, &opts)? else {
        return Ok(());
    };
    common::with_lab(lab, checks)
}

fn checks(lab: &Lab) -> Result<()> {
    let t = step("CRDs are accepted as structural schemas and become Established");
    let files = lab.apply_crds()?;
    ensure!(
        files.len() == 2,
        "expected two generated CRDs, found {files:?}"
    );
    for crd in ["ipaddresspools.ferrolb.io", "l2advertisements.ferrolb.io"] {
        let conditions = lab.kubectl_ok(&[
            "get",
            "crd",
            crd,
            "-o",
            "jsonpath={.status.conditions[*].type}",
        ])?;
        ensure!(conditions.contains("Established"), "{crd}: {conditions}");
        ensure!(
            !conditions.contains("NonStructuralSchema"),
            "{crd} is not structural: {conditions}"
        );
    }
    done(t);

    let t = step("kubectl explain shows our field descriptions");
    // The API server publishes a new CRD's OpenAPI a few seconds after it is
    // Established, so explain is retried until it answers.
    for (path, needle) in [
        ("ippool.spec.addresses", "Addresses this pool hands out"),
        ("l2adv.spec.interfaces", "never every interface"),
    ] {
        let mut last = String::new();
        common::wait_until(
            &format!("kubectl explain {path}"),
            std::time::Duration::from_secs(60),
            || {
                last = common::both(&lab.kubectl(&["explain", path]));
                Ok(last.contains(needle))
            },
        )
        .with_context(|| format!("kubectl explain {path} said:\n{last}"))?;
    }
    done(t);

    let t = step("a full valid pool is stored, with defaults applied");
    let valid = pool(
        "full",
        "  addresses: [198.18.8.0/24, 2001:db8::8:0/112, 198.18.9.10-198.18.9.20, 198.18.9.30 - 198.18.9.30, 2001:db8::9:1-2001:db8::9:ff]
  avoidBuggyIPs: true
  serviceAllocation:
    priority: 10
    namespaces: [default, team-a]
    namespaceSelectors: [{matchLabels: {env: prod}}]
    serviceSelectors: [{matchExpressions: [{key: tier, operator: In, values: [web]}, {key: legacy, operator: DoesNotExist}]}]
",
    );
    lab.apply(&valid)?;
    let auto = lab.kubectl_ok(&["get", "ippool", "full", "-o", "jsonpath={.spec.autoAssign}"])?;
    ensure!(auto == "true", "autoAssign defaults to true, got {auto:?}");
    let table = lab.kubectl_ok(&["get", "ippools"])?;
    for column in ["ADDRESSES", "AUTO", "ASSIGNED", "AVAILABLE", "READY", "AGE"] {
        ensure!(
            table.contains(column),
            "printer column {column} missing:\n{table}"
        );
    }
    done(t);

    let t = step("a MetalLB pool works after changing apiVersion and dropping the namespace");
    let metallb = "apiVersion: ferrolb.io/v1beta1
kind: IPAddressPool
metadata:
  name: from-metallb
spec:
  addresses:
  - 198.18.10.0/24
  - 198.18.11.1-198.18.11.50
  autoAssign: false
  avoidBuggyIPs: true
  serviceAllocation:
    priority: 50
    namespaces: [default]
    serviceSelectors:
    - matchExpressions:
      - {key: app, operator: In, values: [web]}
";
    lab.apply(metallb).context("MetalLB-style pool")?;
    done(t);

    let t = step("invalid pools are refused at apply time, naming the field");
    refused(
        lab,
        "CIDR with a /33",
        &pool("bad", "  addresses: [198.18.8.0/33]\n"),
        &["spec.addresses[0]", "CIDR"],
    )?;
    refused(
        lab,
        "garbage address",
        &pool("bad", "  addresses: [198.18.8.0/24, not-an-ip]\n"),
        &["spec.addresses[1]"],
    )?;
    refused(
        lab,
        "reversed IPv4 range",
        &pool("bad", "  addresses: [198.18.9.20-198.18.9.10]\n"),
        &["spec.addresses[0]", "must not end before it starts"],
    )?;
    refused(
        lab,
        "IPv4-mapped IPv6 CIDR",
        &pool("bad", "  addresses: [\"::ffff:198.18.8.1/128\"]\n"),
        &["spec.addresses[0]"],
    )?;
    refused(
        lab,
        "empty address",
        &pool("bad", "  addresses: [\"\"]\n"),
        &["spec.addresses[0]"],
    )?;
    refused(
        lab,
        "no addresses",
        &pool("bad", "  addresses: []\n"),
        &["spec.addresses"],
    )?;
    refused(
        lab,
        "IPv4 range with an IPv6 end",
        &pool("bad", "  addresses: [\"198.18.9.1-2001:db8::1\"]\n"),
        &["spec.addresses[0]", "same IP family"],
    )?;
    refused(
        lab,
        "garbage selector operator",
        &pool(
            "bad",
            "  addresses: [198.18.8.0/24]\n  serviceAllocation:\n    serviceSelectors: [{matchExpressions: [{key: a, operator: Maybe}]}]\n",
        ),
        &["spec.serviceAllocation.serviceSelectors[0].matchExpressions[0].operator"],
    )?;
    refused(
        lab,
        "In without values",
        &pool(
            "bad",
            "  addresses: [198.18.8.0/24]\n  serviceAllocation:\n    serviceSelectors: [{matchExpressions: [{key: a, operator: In}]}]\n",
        ),
        &[
            "spec.serviceAllocation.serviceSelectors[0].matchExpressions[0]",
            "need at least one value",
        ],
    )?;
    refused(
        lab,
        "bad label key",
        &pool(
            "bad",
            "  addresses: [198.18.8.0/24]\n  serviceAllocation:\n    namespaceSelectors: [{matchLabels: {\"bad key!\": x}}]\n",
        ),
        &["spec.serviceAllocation.namespaceSelectors[0].matchLabels"],
    )?;
    refused(
        lab,
        "bad namespace name",
        &pool(
            "bad",
            "  addresses: [198.18.8.0/24]\n  serviceAllocation:\n    namespaces: [Not_A_Namespace]\n",
        ),
        &["spec.serviceAllocation.namespaces[0]"],
    )?;
    refused(
        lab,
        "interface name with a slash",
        "apiVersion: ferrolb.io/v1beta1\nkind: L2Advertisement\nmetadata: {name: bad}\nspec:\n  interfaces: [eth/0]\n",
        &["spec.interfaces[0]"],
    )?;
    done(t);

    let t = step("edge cases the parser accepts are accepted by the API server too");
    accepted(
        lab,
        "single-address range",
        &pool(
            "edge",
            "  addresses: [198.18.9.7-198.18.9.7, 198.18.9.8/32, \"2001:db8::8:1/128\"]\n",
        ),
    )?;
    accepted(
        lab,
        "ranges across octets",
        &pool(
            "edge",
            "  addresses: [198.18.8.250-198.18.9.5, \"2001:db8::ffff-2001:db8::1:0\"]\n",
        ),
    )?;
    accepted(
        lab,
        "an L2Advertisement with selectors",
        "apiVersion: ferrolb.io/v1beta1\nkind: L2Advertisement\nmetadata: {name: l2}\nspec:\n  ipAddressPools: [full]\n  nodeSelectors: [{matchLabels: {kubernetes.io/hostname: node-1}}]\n  interfaces: [eth0]\n",
    )?;
    done(t);
    Ok(())
}
