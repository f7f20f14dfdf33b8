//! Performs a pass's plan against the API server: Service status and
//! annotation, pool status, Events.

use std::collections::HashMap;

use ferrolb_crds::IPAddressPool;
use ferrolb_crds::annotations::IP_ALLOCATED_FROM_POOL;
use k8s_openapi::api::core::v1::{ObjectReference, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use crate::allocator::ServiceKey;
use crate::plan::{EventPlan, PoolWrite, ServiceWrite, Severity};

pub const FIELD_MANAGER: &str = "ferrolb-controller";

pub struct Writer {
    client: Client,
    instance: String,
}

impl Writer {
    pub fn new(client: Client, instance: String) -> Self {
        Self { client, instance }
    }

    /// Status first (what users and speakers act on), then the annotation.
    /// Merge patches touch only the fields named, so a write never clobbers
    /// what other controllers own on the same Service.
    pub async fn service(&self, w: &ServiceWrite) -> Result<(), kube::Error> {
        let api: Api<Service> = Api::namespaced(self.client.clone(), &w.key.namespace);
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let mut status = serde_json::Map::new();
        if let Some(ips) = &w.ingress {
            let ingress = if ips.is_empty() {
                serde_json::Value::Null
            } else {
                json!(
                    ips.iter()
                        .map(|ip| json!({"ip": ip.to_string(), "ipMode": "VIP"}))
                        .collect::<Vec<_>>()
                )
            };
            status.insert("loadBalancer".into(), json!({ "ingress": ingress }));
        }
        if let Some(conditions) = &w.conditions {
            status.insert("conditions".into(), json!(conditions));
        }
        if !status.is_empty() {
            let patch = json!({ "status": status });
            api.patch_status(&w.key.name, &params, &Patch::Merge(&patch))
                .await?;
        }
        if let Some(value) = &w.pool_annotation {
            let patch = json!({ "metadata": { "annotations": { IP_ALLOCATED_FROM_POOL: value } } });
            api.patch(&w.key.name, &params, &Patch::Merge(&patch))
                .await?;
        }
        Ok(())
    }

    /// The whole pool status is ours: server-side apply it.
    pub async fn pool(&self, w: &PoolWrite) -> Result<(), kube::Error> {
        let api: Api<IPAddressPool> = Api::all(self.client.clone());
        let patch = json!({
            "apiVersion": "ferrolb.io/v1beta1",
            "kind": "IPAddressPool",
            "metadata": { "name": w.name },
            "status": w.status,
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        api.patch_status(&w.name, &params, &Patch::Apply(&patch))
            .await?;
        Ok(())
    }

    /// Creates one `events.k8s.io/v1` Event. The plan already reports each
    /// outcome once; a generic recorder would fold a new message into an
    /// older event with the same reason and hide it.
    pub async fn event(
        &self,
        e: &EventPlan,
        uids: &HashMap<ServiceKey, String>,
    ) -> Result<(), kube::Error> {
        let regarding = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Service".into()),
            namespace: Some(e.service.namespace.clone()),
            name: Some(e.service.name.clone()),
            uid: uids.get(&e.service).cloned(),
            ..Default::default()
        };
        let event = Event {
            metadata: ObjectMeta {
                // A generated name must end alphanumerically, hence the "-".
                generate_name: Some(format!(
                    "{}-",
                    e.service.name.chars().take(200).collect::<String>()
                )),
                namespace: Some(e.service.namespace.clone()),
                ..Default::default()
            },
            event_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
            type_: Some(match e.severity {
                Severity::Normal => "Normal".into(),
                Severity::Warning => "Warning".into(),
            }),
            reason: Some(e.reason.to_string()),
            note: Some(e.message.chars().take(1000).collect()),
            action: Some("Allocate".into()),
            reporting_controller: Some(format!("ferrolb.io/{FIELD_MANAGER}")),
            reporting_instance: Some(self.instance.chars().take(128).collect()),
            regarding: Some(regarding),
            ..Default::default()
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), &e.service.namespace);
        api.create(&PostParams::default(), &event).await?;
        Ok(())
    }
}
