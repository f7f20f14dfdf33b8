//! Performs a pass's plan against the API server: Service status and
//! annotation, pool status, Events.

use ferrolb_crds::IPAddressPool;
use ferrolb_crds::annotations::IP_ALLOCATED_FROM_POOL;
use ferrolb_runtime::events::{EventData, EventSink, EventType, service_ref};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

use crate::plan::{EventPlan, PoolWrite, SERVICE_CONDITION, ServiceWrite, Severity};

pub const FIELD_MANAGER: &str = "ferrolb-controller";

pub struct Writer {
    client: Client,
    events: EventSink,
}

impl Writer {
    pub fn new(client: Client, instance: String) -> Self {
        let events = EventSink::new(
            client.clone(),
            format!("ferrolb.io/{FIELD_MANAGER}"),
            instance,
        );
        Self { client, events }
    }

    /// Status first (what users and speakers act on), then our condition,
    /// then the annotation.
    ///
    /// - The ingress by merge patch: it touches only `status.loadBalancer`.
    /// - Our condition by server-side apply under our field manager:
    ///   `status.conditions` is a map keyed by `type`, so the apply owns our
    ///   entry alone and never clobbers another controller's, whatever our
    ///   cache held. Removing it uses a strategic-merge delete of that one
    ///   entry, which works whoever wrote it last.
    pub async fn service(&self, w: &ServiceWrite) -> Result<(), kube::Error> {
        let api: Api<Service> = Api::namespaced(self.client.clone(), &w.key.namespace);
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
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
            let patch = json!({ "status": { "loadBalancer": { "ingress": ingress } } });
            api.patch_status(&w.key.name, &params, &Patch::Merge(&patch))
                .await?;
        }
        match &w.condition {
            Some(Some(condition)) => {
                let patch = json!({
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": { "name": w.key.name, "namespace": w.key.namespace },
                    "status": { "conditions": [condition] },
                });
                let apply = PatchParams::apply(FIELD_MANAGER).force();
                api.patch_status(&w.key.name, &apply, &Patch::Apply(&patch))
                    .await?;
            }
            Some(None) => {
                let patch = json!({ "status": { "conditions": [
                    { "$patch": "delete", "type": SERVICE_CONDITION }
                ] } });
                api.patch_status(&w.key.name, &params, &Patch::Strategic(&patch))
                    .await?;
            }
            None => {}
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

    /// Publishes one Event; the plan already reports each outcome once.
    pub async fn event(&self, e: &EventPlan) -> Result<(), kube::Error> {
        let regarding = service_ref(&e.service.namespace, &e.service.name, e.uid.clone());
        self.events
            .publish(&EventData {
                regarding,
                type_: match e.severity {
                    Severity::Normal => EventType::Normal,
                    Severity::Warning => EventType::Warning,
                },
                reason: e.reason,
                action: "Allocate",
                note: &e.message,
            })
            .await
    }
}
