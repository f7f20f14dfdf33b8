//! Saying who announces: Events on Services (and on Nodes for the
//! liveness fallback) and the `ferrolb.io/Announced` Service condition.
//!
//! The main loop decides what to say ([`Report`]); a background task says
//! it, so a slow API server never delays an announcement. Conditions are
//! written by server-side apply under one field manager shared by every
//! speaker: `status.conditions` is a map keyed by type, so the apply owns
//! our entry alone (the controller's `ferrolb.io/IPAllocated` is never
//! touched), and whichever speaker announces next simply replaces it.

use std::collections::BTreeMap;

use ferrolb_runtime::events::{EventData, EventSink, EventType, service_ref};
use k8s_openapi::api::core::v1::{ObjectReference, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::mpsc;

use crate::membership::FIELD_MANAGER;

/// The condition naming the current announcer.
pub const CONDITION: &str = "ferrolb.io/Announced";

/// Our condition on `svc`, if any.
pub fn condition_of(svc: &Service) -> Option<&Condition> {
    svc.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == CONDITION))
}

/// The message of a True condition: the node's name first, which
/// [`announcer_of`] reads back.
pub fn announcing_message(node: &str, ips: &[String], interfaces: &[String]) -> String {
    format!(
        "{node} announces {} on {}",
        ips.join(", "),
        interfaces.join(", ")
    )
}

/// The node the condition names as announcer (status True, reason
/// `Announcing`): the record the conflict probe checks, and who a takeover
/// took over from.
pub fn announcer_of(svc: &Service) -> Option<String> {
    let c = condition_of(svc)?;
    (c.status == "True")
        .then(|| c.message.split_whitespace().next().map(str::to_string))
        .flatten()
}

/// What one Service's condition should say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Wanted {
    /// Whether `current` already says this (the time is not compared).
    pub fn matches(&self, current: Option<&Condition>) -> bool {
        current.is_some_and(|c| {
            c.status == if self.status { "True" } else { "False" }
                && c.reason == self.reason
                && c.message == self.message
        })
    }
}

/// Something to tell the API.
#[derive(Debug, Clone)]
pub enum Report {
    Event {
        regarding: ObjectReference,
        warning: bool,
        reason: &'static str,
        note: String,
    },
    Condition {
        namespace: String,
        name: String,
        generation: Option<i64>,
        wanted: Wanted,
    },
}

impl Report {
    pub fn service_event(
        namespace: &str,
        name: &str,
        warning: bool,
        reason: &'static str,
        note: String,
    ) -> Self {
        Report::Event {
            regarding: service_ref(namespace, name, None),
            warning,
            reason,
            note,
        }
    }

    pub fn node_event(node: &str, warning: bool, reason: &'static str, note: String) -> Self {
        Report::Event {
            regarding: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(node.into()),
                ..Default::default()
            },
            warning,
            reason,
            note,
        }
    }
}

/// Writes reports in order until the channel closes. A failed write is
/// logged and dropped: the main loop asks again for a condition that is
/// still wrong in the cache, and an Event is worth less than a stalled
/// queue.
pub async fn run(client: Client, node: String, mut rx: mpsc::Receiver<Report>) {
    let events = EventSink::new(client.clone(), format!("ferrolb.io/{FIELD_MANAGER}"), node);
    while let Some(report) = rx.recv().await {
        match report {
            Report::Event {
                regarding,
                warning,
                reason,
                note,
            } => {
                let e = EventData {
                    regarding,
                    type_: if warning {
                        EventType::Warning
                    } else {
                        EventType::Normal
                    },
                    reason,
                    action: "Announce",
                    note: &note,
                };
                if let Err(error) = events.publish(&e).await {
                    tracing::warn!(%reason, %error, "event not published");
                }
            }
            Report::Condition {
                namespace,
                name,
                generation,
                wanted,
            } => {
                if let Err(error) =
                    apply_condition(&client, &namespace, &name, generation, &wanted).await
                {
                    tracing::warn!(service = %format!("{namespace}/{name}"), %error, "condition not written");
                }
            }
        }
    }
}

async fn apply_condition(
    client: &Client,
    namespace: &str,
    name: &str,
    generation: Option<i64>,
    wanted: &Wanted,
) -> Result<(), kube::Error> {
    let api: Api<Service> = Api::namespaced(client.clone(), namespace);
    let condition = Condition {
        type_: CONDITION.into(),
        status: if wanted.status { "True" } else { "False" }.into(),
        reason: wanted.reason.into(),
        message: wanted.message.clone(),
        observed_generation: generation,
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
    };
    let patch = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": name, "namespace": namespace },
        "status": { "conditions": [condition] },
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(name, &params, &Patch::Apply(&patch))
        .await?;
    Ok(())
}

/// Remembers what was last asked for each Service, so a condition whose
/// write is still in flight (the cache not yet updated) is not asked again
/// on every pass.
#[derive(Debug, Default)]
pub struct Asked {
    last: BTreeMap<(String, String), Wanted>,
}

impl Asked {
    /// Whether to write `wanted` given the cache's `current`: it differs
    /// from the cache and is not what we asked for last. Forgets the ask
    /// once the cache shows it.
    pub fn should_write(
        &mut self,
        key: (String, String),
        wanted: &Wanted,
        current: Option<&Condition>,
    ) -> bool {
        if wanted.matches(current) {
            self.last.remove(&key);
            return false;
        }
        if self.last.get(&key) == Some(wanted) {
            return false;
        }
        self.last.insert(key, wanted.clone());
        true
    }

    /// A write failed or timed out long ago: allow asking again.
    pub fn forget_all(&mut self) {
        self.last.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(status: &str, reason: &str, message: &str) -> Condition {
        Condition {
            type_: CONDITION.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: None,
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        }
    }

    #[test]
    fn the_announcer_is_the_first_word_of_a_true_condition() {
        let mut svc = Service {
            status: Some(Default::default()),
            ..Default::default()
        };
        let message = announcing_message("node-2", &["198.18.8.1".into()], &["eth0".into()]);
        assert_eq!(message, "node-2 announces 198.18.8.1 on eth0");
        svc.status.as_mut().unwrap().conditions = Some(vec![cond("True", "Announcing", &message)]);
        assert_eq!(announcer_of(&svc).as_deref(), Some("node-2"));
        svc.status.as_mut().unwrap().conditions = Some(vec![cond(
            "False",
            "IPConflict",
            "198.18.8.1 is held by 02:00:00:00:00:09",
        )]);
        assert_eq!(announcer_of(&svc), None);
    }

    #[test]
    fn a_condition_is_asked_once_until_the_cache_shows_it() {
        let mut asked = Asked::default();
        let key = ("default".to_string(), "web".to_string());
        let w = Wanted {
            status: true,
            reason: "Announcing",
            message: "node-1 announces 198.18.8.1 on eth0".into(),
        };
        assert!(asked.should_write(key.clone(), &w, None));
        assert!(!asked.should_write(key.clone(), &w, None), "in flight");
        let shown = cond("True", "Announcing", &w.message);
        assert!(!asked.should_write(key.clone(), &w, Some(&shown)));
        // Someone else changed it afterwards: ask again.
        let other = cond("True", "Announcing", "node-3 announces 198.18.8.1 on eth0");
        assert!(asked.should_write(key, &w, Some(&other)));
    }
}
