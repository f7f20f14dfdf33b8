//! Leader election on a `coordination.k8s.io/v1` Lease. Only the leader
//! writes; standbys keep warm caches and take over once the lease expires
//! (or at once when the leader steps down on shutdown).
//!
//! [`decide`] is the pure rule; [`Elector`] is the thin I/O around it.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the lease record says, reduced to what the decision needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub holder: Option<String>,
    pub renewed: Option<Timestamp>,
    pub duration: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// We hold the lease: renew it.
    Renew,
    /// Nobody validly holds it: take it.
    Acquire,
    /// Someone else holds it.
    Follow(String),
}

/// The election rule: a lease is ours to take when it does not exist, has no
/// holder, or its holder has not renewed it within its duration.
pub fn decide(record: Option<&Record>, me: &str, now: Timestamp) -> Decision {
    let Some(r) = record else {
        return Decision::Acquire;
    };
    match r.holder.as_deref() {
        Some(h) if h == me => Decision::Renew,
        None | Some("") => Decision::Acquire,
        Some(h) => {
            let expired = match r.renewed {
                None => true,
                Some(t) => {
                    let lease = SignedDuration::try_from(r.duration).unwrap_or(SignedDuration::MAX);
                    t.checked_add(lease).is_ok_and(|until| until < now)
                }
            };
            if expired {
                Decision::Acquire
            } else {
                Decision::Follow(h.to_string())
            }
        }
    }
}

fn record(lease: &Lease) -> Record {
    let spec = lease.spec.clone().unwrap_or_default();
    Record {
        holder: spec.holder_identity,
        renewed: spec.renew_time.map(|t| t.0),
        duration: Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64),
    }
}

pub struct Elector {
    pub api: Api<Lease>,
    pub name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub retry: Duration,
}

impl Elector {
    pub fn new(client: Client, namespace: &str, name: &str, identity: String) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity,
            lease_duration: Duration::from_secs(15),
            retry: Duration::from_secs(2),
        }
    }

    /// Campaigns until `shutdown`, publishing whether we lead. On shutdown a
    /// leader gives the lease up so a standby takes over without waiting.
    pub async fn run(self, leading: watch::Sender<bool>, shutdown: CancellationToken) {
        let mut last_renewal: Option<tokio::time::Instant> = None;
        loop {
            let ok = match self.try_once().await {
                Ok(lead) => lead,
                Err(e) => {
                    tracing::warn!(error = %e, lease = %self.name, "lease update failed");
                    // Keep leading only while the last renewal is fresh.
                    *leading.borrow()
                        && last_renewal.is_some_and(|t| t.elapsed() < self.lease_duration)
                }
            };
            if ok {
                last_renewal = Some(tokio::time::Instant::now());
            }
            if *leading.borrow() != ok {
                tracing::info!(identity = %self.identity, leader = ok, "leadership changed");
                let _ = leading.send(ok);
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.retry) => {}
            }
        }
        if *leading.borrow() {
            let _ = leading.send(false);
            if let Err(e) = self.step_down().await {
                tracing::warn!(error = %e, "could not release the lease");
            }
        }
    }

    async fn try_once(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let existing = self.api.get_opt(&self.name).await?;
        let decision = decide(existing.as_ref().map(record).as_ref(), &self.identity, now);
        let Decision::Follow(_) = decision else {
            let mut spec = existing
                .as_ref()
                .and_then(|l| l.spec.clone())
                .unwrap_or_default();
            if decision == Decision::Acquire {
                spec.acquire_time = Some(MicroTime(now));
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            spec.holder_identity = Some(self.identity.clone());
            spec.renew_time = Some(MicroTime(now));
            spec.lease_duration_seconds = Some(self.lease_duration.as_secs() as i32);
            return self.write(existing, spec).await;
        };
        Ok(false)
    }

    /// Create or replace; a conflict means another replica won the race.
    async fn write(&self, existing: Option<Lease>, spec: LeaseSpec) -> Result<bool, kube::Error> {
        let result = match existing {
            Some(mut lease) => {
                lease.spec = Some(spec);
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(spec),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
        };
        match result {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn step_down(&self) -> Result<(), kube::Error> {
        if let Some(mut lease) = self.api.get_opt(&self.name).await?
            && let Some(spec) = lease.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(self.identity.as_str())
        {
            spec.holder_identity = None;
            spec.renew_time = None;
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await?;
            tracing::info!(lease = %self.name, "released the lease");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn held(by: &str, renewed: i64) -> Record {
        Record {
            holder: Some(by.into()),
            renewed: Some(at(renewed)),
            duration: Duration::from_secs(15),
        }
    }

    #[test]
    fn no_lease_is_acquired() {
        assert_eq!(decide(None, "me", at(0)), Decision::Acquire);
    }

    #[test]
    fn our_lease_is_renewed_even_if_late() {
        assert_eq!(decide(Some(&held("me", 0)), "me", at(100)), Decision::Renew);
    }

    #[test]
    fn a_fresh_lease_of_another_is_followed() {
        assert_eq!(
            decide(Some(&held("other", 0)), "me", at(15)),
            Decision::Follow("other".into())
        );
    }

    #[test]
    fn an_expired_lease_is_taken_over() {
        assert_eq!(
            decide(Some(&held("other", 0)), "me", at(16)),
            Decision::Acquire
        );
    }

    #[test]
    fn a_released_lease_is_taken_at_once() {
        let released = Record {
            holder: None,
            renewed: None,
            duration: Duration::from_secs(15),
        };
        assert_eq!(decide(Some(&released), "me", at(0)), Decision::Acquire);
    }
}
