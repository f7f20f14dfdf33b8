//! The speaker's own Lease (how the others find it: [`crate::roster`]) and
//! the conversion of the Lease cache into roster records.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::json;

use crate::packet::MacAddr;
use crate::roster::{self, LEASE_DURATION, RecordError, SpeakerRecord};

/// Labels on every speaker Lease; the speakers watch Leases with
/// [`LABEL_SELECTOR`], so the controller's Lease and others are not cached.
pub const LABELS: [(&str, &str); 2] = [
    ("app.kubernetes.io/name", "ferrolb"),
    ("app.kubernetes.io/component", "speaker"),
];
pub const LABEL_SELECTOR: &str =
    "app.kubernetes.io/name=ferrolb,app.kubernetes.io/component=speaker";

pub const FIELD_MANAGER: &str = "ferrolb-speaker";

/// This speaker's Lease.
pub struct OwnLease {
    api: Api<Lease>,
    node: String,
    name: String,
}

impl OwnLease {
    pub fn new(api: Api<Lease>, node: &str) -> Self {
        Self {
            api,
            name: roster::lease_name(node),
            node: node.to_string(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Creates or renews the Lease by server-side apply: holder, duration,
    /// renewTime now, our address and MACs. Owned by the Node (when its uid
    /// is known), so deleting the Node deletes the Lease and the roster
    /// forgets the speaker.
    pub async fn renew(
        &self,
        address: SocketAddr,
        macs: &BTreeSet<MacAddr>,
        node_uid: Option<&str>,
    ) -> Result<(), kube::Error> {
        let labels: BTreeMap<&str, &str> = LABELS.into_iter().collect();
        let mut metadata = json!({
            "name": self.name,
            "labels": labels,
            "annotations": roster::annotations(address, macs),
        });
        if let Some(uid) = node_uid {
            metadata["ownerReferences"] = json!([{
                "apiVersion": "v1",
                "kind": "Node",
                "name": self.node,
                "uid": uid,
            }]);
        }
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": {
                "holderIdentity": self.node,
                "leaseDurationSeconds": LEASE_DURATION.as_secs(),
                "renewTime": now,
            },
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        self.api
            .patch(&self.name, &params, &Patch::Apply(&lease))
            .await?;
        Ok(())
    }

    /// Removes the Lease: this speaker leaves the roster (and the quorum's
    /// count) at once instead of after its duration.
    pub async fn delete(&self) -> Result<(), kube::Error> {
        match self.api.delete(&self.name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The Lease cache as roster records; Leases that are not usable come back
/// with the reason, for a log line.
pub fn records<'a>(
    leases: impl IntoIterator<Item = &'a Lease>,
) -> (Vec<SpeakerRecord>, Vec<(String, RecordError)>) {
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for lease in leases {
        let Some(name) = lease.metadata.name.as_deref() else {
            continue;
        };
        let spec = lease.spec.as_ref();
        let annotations = lease.metadata.annotations.clone().unwrap_or_default();
        // renewTime changes on every renewal; resourceVersion on every
        // write. Either makes a renewal visible to the roster.
        let fingerprint = format!(
            "{}/{}",
            lease.metadata.resource_version.as_deref().unwrap_or(""),
            spec.and_then(|s| s.renew_time.as_ref())
                .map(|t| t.0.to_string())
                .unwrap_or_default()
        );
        match SpeakerRecord::from_lease(
            name,
            spec.and_then(|s| s.holder_identity.as_deref()),
            spec.and_then(|s| s.lease_duration_seconds),
            &annotations,
            fingerprint,
        ) {
            Ok(r) => ok.push(r),
            Err(e) => bad.push((name.to_string(), e)),
        }
    }
    (ok, bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    #[test]
    fn leases_become_records_and_bad_ones_are_named() {
        let lease = |name: &str, holder: Option<&str>, address: Option<&str>| Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                resource_version: Some("7".into()),
                annotations: address.map(|a| {
                    [
                        (roster::ADDRESS_ANNOTATION.to_string(), a.to_string()),
                        (
                            roster::MACS_ANNOTATION.to_string(),
                            "02:00:00:00:00:01".to_string(),
                        ),
                    ]
                    .into()
                }),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                lease_duration_seconds: Some(40),
                ..Default::default()
            }),
        };
        let (ok, bad) = records(&[
            lease(
                "ferrolb-speaker-node-1",
                Some("node-1"),
                Some("198.18.0.11:7476"),
            ),
            lease("ferrolb-speaker-node-2", Some("node-2"), None),
            lease(
                "ferrolb-speaker-node-3",
                Some("node-9"),
                Some("198.18.0.13:7476"),
            ),
        ]);
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].node, "node-1");
        assert_eq!(ok[0].address.to_string(), "198.18.0.11:7476");
        assert_eq!(ok[0].macs.len(), 1);
        assert_eq!(bad.len(), 2);
        assert!(matches!(bad[0].1, RecordError::NoAddress));
        assert!(matches!(bad[1].1, RecordError::Name { .. }));
    }
}
