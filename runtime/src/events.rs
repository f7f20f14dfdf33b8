//! Publishing `events.k8s.io/v1` Events, the one way every component does
//! it. Each call creates one Event: callers report an outcome once (a
//! generic recorder would fold a new message into an older event with the
//! same reason and hide it).

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

/// Who reports: `reportingController` and `reportingInstance`.
#[derive(Clone)]
pub struct EventSink {
    client: Client,
    controller: String,
    instance: String,
}

/// What one Event says.
#[derive(Debug, Clone)]
pub struct EventData<'a> {
    pub regarding: ObjectReference,
    pub type_: EventType,
    pub reason: &'a str,
    pub action: &'a str,
    pub note: &'a str,
}

impl EventSink {
    /// `controller` like `ferrolb.io/ferrolb-proxy`; `instance` the pod or
    /// node this process runs as.
    pub fn new(client: Client, controller: impl Into<String>, instance: impl Into<String>) -> Self {
        Self {
            client,
            controller: controller.into(),
            instance: instance.into(),
        }
    }

    pub async fn publish(&self, e: &EventData<'_>) -> Result<(), kube::Error> {
        let namespace = e
            .regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name: String = e
            .regarding
            .name
            .clone()
            .unwrap_or_default()
            .chars()
            .take(200)
            .collect();
        let event = Event {
            metadata: ObjectMeta {
                // A generated name must end alphanumerically, hence the "-".
                generate_name: Some(format!("{name}-")),
                namespace: Some(namespace.clone()),
                ..Default::default()
            },
            event_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
            type_: Some(
                match e.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            reason: Some(e.reason.to_string()),
            note: Some(e.note.chars().take(1000).collect()),
            action: Some(e.action.to_string()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.chars().take(128).collect()),
            regarding: Some(e.regarding.clone()),
            ..Default::default()
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        api.create(&PostParams::default(), &event).await?;
        Ok(())
    }
}

/// A reference to a Service, for `regarding`.
pub fn service_ref(namespace: &str, name: &str, uid: Option<String>) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Service".into()),
        namespace: Some(namespace.into()),
        name: Some(name.into()),
        uid,
        ..Default::default()
    }
}
