//! Leader election on a `coordination.k8s.io/v1` Lease, with client-go's
//! rules and timings. Only the leader writes; standbys keep warm caches.
//!
//! - A renewal counts only when the API server accepted it. A leader whose
//!   renewals fail (429, 5xx, timeouts, a forbidden write) stops leading once
//!   `renew_deadline` has passed since the last accepted renewal was *sent*,
//!   which is always before a standby may take the Lease (`lease` after it
//!   *observed* that renewal).
//! - Expiry is judged by the local time at which this replica saw the Lease
//!   record change, never by comparing the holder's `renewTime` with our
//!   clock, so clock skew can neither steal a live Lease nor delay failover.
//! - Leadership is a [`Term`]: a counter bumped on every gain and loss. The
//!   writer checks before each write that the term it planned under is still
//!   current and fresh ([`Fence::permits`]).
//! - A replica restarted under the same identity (its pod name) takes its own
//!   Lease back at once.
//!
//! [`Campaign`] is the pure rule; [`Elector`] is the I/O around it, over a
//! [`LeaseApi`] so tests can script the API server.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// client-go's defaults: lease 15 s, renew deadline 10 s, retry 2 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a Lease stays valid after its holder last changed it.
    pub lease: Duration,
    /// A leader that could not renew for this long stops leading.
    pub renew_deadline: Duration,
    /// Time between attempts.
    pub retry: Duration,
    /// Upper bound of one Lease request.
    pub request_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
        }
    }
}

impl Timing {
    /// The orderings the fence relies on.
    pub fn validate(&self) -> Result<(), String> {
        if self.renew_deadline >= self.lease {
            return Err(format!(
                "the renew deadline ({:?}) must be shorter than the lease duration ({:?})",
                self.renew_deadline, self.lease
            ));
        }
        if self.retry >= self.renew_deadline {
            return Err(format!(
                "the retry period ({:?}) must be shorter than the renew deadline ({:?})",
                self.retry, self.renew_deadline
            ));
        }
        if self.lease.as_secs() < 1 {
            return Err("the lease duration must be at least 1 s".into());
        }
        Ok(())
    }
}

/// One stretch of leadership, or of following.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Term {
    /// Bumped on every gain and every loss.
    pub id: u64,
    pub leading: bool,
    /// While leading: when leadership ends unless renewed before.
    pub valid_until: Option<Instant>,
}

/// The writer's view of leadership: may a write planned in term `id` start
/// now?
#[derive(Debug, Clone)]
pub struct Fence {
    term: watch::Receiver<Term>,
    stopping: CancellationToken,
}

impl Fence {
    pub fn new(term: watch::Receiver<Term>, stopping: CancellationToken) -> Self {
        Self { term, stopping }
    }

    pub fn current(&self) -> Term {
        *self.term.borrow()
    }

    /// `Some(time left)` while `term_id` is current, we lead in it, its
    /// Lease is fresh and the process is not shutting down; a write started
    /// now must be finished (or abandoned) within the time left.
    pub fn permits(&self, term_id: u64) -> Option<Duration> {
        if self.stopping.is_cancelled() {
            return None;
        }
        let t = self.current();
        let left = t.valid_until?.checked_duration_since(Instant::now())?;
        (t.leading && t.id == term_id && !left.is_zero()).then_some(left)
    }

    /// Resolves when the term changes (or its sender is gone).
    pub async fn changed(&mut self) {
        if self.term.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// What the Lease record says; compared whole to notice change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub holder: Option<String>,
    pub duration: Duration,
    pub acquired: Option<Timestamp>,
    pub renewed: Option<Timestamp>,
    pub transitions: Option<i32>,
}

impl Record {
    pub fn of(lease: &Lease) -> Self {
        let spec = lease.spec.clone().unwrap_or_default();
        Record {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            duration: Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64),
            acquired: spec.acquire_time.map(|t| t.0),
            renewed: spec.renew_time.map(|t| t.0),
            transitions: spec.lease_transitions,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The Lease is ours (maybe from an earlier process of ours): renew it.
    Renew,
    /// Nobody validly holds it: take it.
    Acquire,
    /// Someone else holds it.
    Follow(String),
}

/// The election rule, as plain state: what was observed when, and when our
/// last accepted renewal was sent.
#[derive(Debug, Clone)]
pub struct Campaign {
    me: String,
    timing: Timing,
    /// The last record read (`None`: no Lease object) and when it changed.
    observed: Option<(Option<Record>, Instant)>,
    /// Send time of our last accepted write while we hold the Lease.
    renewed_at: Option<Instant>,
}

impl Campaign {
    pub fn new(me: impl Into<String>, timing: Timing) -> Self {
        Self {
            me: me.into(),
            timing,
            observed: None,
            renewed_at: None,
        }
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    /// Notes what a read returned. The expiry clock restarts only when the
    /// record differs from the one seen before.
    pub fn observe(&mut self, record: Option<&Record>, now: Instant) {
        let changed = match &self.observed {
            Some((seen, _)) => seen.as_ref() != record,
            None => true,
        };
        if changed {
            self.observed = Some((record.cloned(), now));
        }
    }

    pub fn decide(&self, now: Instant) -> Decision {
        let Some((record, since)) = &self.observed else {
            return Decision::Acquire;
        };
        let Some(record) = record else {
            return Decision::Acquire;
        };
        match record.holder.as_deref() {
            None => Decision::Acquire,
            Some(h) if h == self.me => Decision::Renew,
            Some(h) => {
                if now >= *since + record.duration {
                    Decision::Acquire
                } else {
                    Decision::Follow(h.to_string())
                }
            }
        }
    }

    /// Our create/replace sent at `sent_at` was accepted.
    pub fn accepted(&mut self, sent_at: Instant) {
        self.renewed_at = Some(sent_at);
    }

    /// Someone else holds the Lease, or we gave it up.
    pub fn lost(&mut self) {
        self.renewed_at = None;
    }

    pub fn valid_until(&self) -> Option<Instant> {
        self.renewed_at.map(|t| t + self.timing.renew_deadline)
    }

    pub fn leading(&self, now: Instant) -> bool {
        self.valid_until().is_some_and(|until| now < until)
    }

    /// True if we may believe we hold the Lease (for releasing it).
    pub fn holds(&self) -> bool {
        self.renewed_at.is_some()
    }
}

/// Why a Lease request failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("the Lease changed since it was read (conflict)")]
    Conflict,
    #[error("the Lease was created by another replica first")]
    AlreadyExists,
    #[error("{0}")]
    Api(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// The four Lease calls the elector makes; the real one is [`KubeLeases`].
pub trait LeaseApi: Send + Sync {
    fn get(&self) -> impl Future<Output = Result<Option<Lease>, LeaseError>> + Send;
    fn create(&self, lease: Lease) -> impl Future<Output = Result<Lease, LeaseError>> + Send;
    /// Replace, guarded by the `resourceVersion` the lease carries.
    fn replace(&self, lease: Lease) -> impl Future<Output = Result<Lease, LeaseError>> + Send;
    /// Resolves soon after the Lease changes (a watch); may also resolve
    /// spuriously.
    fn changed(&self) -> impl Future<Output = ()> + Send;
}

/// [`LeaseApi`] on the API server, with a watch that wakes standbys as soon
/// as the leader releases the Lease.
pub struct KubeLeases {
    api: Api<Lease>,
    name: String,
    poke: std::sync::Arc<Notify>,
}

impl KubeLeases {
    /// Must be called inside a tokio runtime: starts the Lease watch.
    pub fn new(client: Client, namespace: &str, name: &str) -> Self {
        let api: Api<Lease> = Api::namespaced(client, namespace);
        let poke = std::sync::Arc::new(Notify::new());
        let (watch_api, notify) = (api.clone(), poke.clone());
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        tokio::spawn(async move {
            use futures::StreamExt;
            let stream = watcher(watch_api, config).default_backoff();
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                if event.is_ok() {
                    notify.notify_one();
                }
            }
        });
        Self {
            api,
            name: name.to_string(),
            poke,
        }
    }
}

fn api_error(e: kube::Error) -> LeaseError {
    match e {
        kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists" => {
            LeaseError::AlreadyExists
        }
        kube::Error::Api(s) if s.code == 409 => LeaseError::Conflict,
        other => LeaseError::Api(other.to_string()),
    }
}

impl LeaseApi for KubeLeases {
    async fn get(&self) -> Result<Option<Lease>, LeaseError> {
        self.api.get_opt(&self.name).await.map_err(api_error)
    }

    async fn create(&self, lease: Lease) -> Result<Lease, LeaseError> {
        self.api
            .create(&PostParams::default(), &lease)
            .await
            .map_err(api_error)
    }

    async fn replace(&self, lease: Lease) -> Result<Lease, LeaseError> {
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
            .map_err(api_error)
    }

    async fn changed(&self) {
        self.poke.notified().await
    }
}

/// Campaigns for one Lease and publishes the [`Term`].
pub struct Elector<A> {
    api: A,
    name: String,
    campaign: Campaign,
    timing: Timing,
    term: watch::Sender<Term>,
}

impl<A: LeaseApi> Elector<A> {
    pub fn new(
        api: A,
        name: &str,
        identity: &str,
        timing: Timing,
    ) -> (Self, watch::Receiver<Term>) {
        let (term, rx) = watch::channel(Term::default());
        let elector = Self {
            api,
            name: name.to_string(),
            campaign: Campaign::new(identity, timing),
            timing,
            term,
        };
        (elector, rx)
    }

    /// Campaigns until `stop`; then, if it holds the Lease, ends its term and
    /// releases the Lease so a standby takes over without waiting. The caller
    /// stops its writes before cancelling `stop`.
    pub async fn run(mut self, stop: CancellationToken) {
        loop {
            let sent = Instant::now();
            let limit = self.attempt_limit(sent);
            let outcome = tokio::select! {
                _ = stop.cancelled() => break,
                r = tokio::time::timeout(limit, self.attempt(sent)) => {
                    r.unwrap_or(Err(LeaseError::Timeout(limit)))
                }
            };
            if let Err(error) = outcome {
                tracing::warn!(%error, lease = %self.name, leading = self.campaign.leading(Instant::now()), "lease attempt failed");
            }
            self.lapse();
            self.publish();
            // Wake for the next attempt, at the moment leadership would
            // lapse, or (standbys) when the Lease changes.
            let mut wake = sent + self.timing.retry;
            if let Some(until) = self.campaign.valid_until() {
                wake = wake.min(until);
            }
            let following = !self.campaign.holds();
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep_until(wake) => {}
                _ = self.api.changed(), if following => {}
            }
            self.lapse();
            self.publish();
        }
        self.step_down().await;
    }

    /// Ends the term once the renew deadline has passed: until a renewal is
    /// accepted again, this replica is a follower.
    fn lapse(&mut self) {
        if self
            .campaign
            .valid_until()
            .is_some_and(|until| until <= Instant::now())
        {
            self.campaign.lost();
        }
    }

    /// How long one attempt may take: the request timeout, and while leading
    /// no longer than leadership lasts.
    fn attempt_limit(&self, now: Instant) -> Duration {
        let mut limit = self.timing.request_timeout;
        if let Some(left) = self
            .campaign
            .valid_until()
            .and_then(|u| u.checked_duration_since(now))
            .filter(|d| !d.is_zero())
        {
            limit = limit.min(left);
        }
        limit
    }

    async fn attempt(&mut self, sent: Instant) -> Result<(), LeaseError> {
        let existing = self.api.get().await?;
        let record = existing.as_ref().map(Record::of);
        self.campaign.observe(record.as_ref(), Instant::now());
        let decision = self.campaign.decide(Instant::now());
        if let Decision::Follow(holder) = &decision {
            if self.campaign.holds() {
                tracing::warn!(lease = %self.name, %holder, "the Lease is held by another replica now");
            }
            self.campaign.lost();
            return Ok(());
        }
        let now = Timestamp::now();
        let lease = match existing {
            Some(mut lease) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                if decision == Decision::Acquire {
                    spec.acquire_time = Some(MicroTime(now));
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                self.fill(spec, now);
                self.api.replace(lease).await?
            }
            None => {
                let mut spec = LeaseSpec {
                    acquire_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                };
                self.fill(&mut spec, now);
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(spec),
                };
                self.api.create(lease).await?
            }
        };
        self.campaign.accepted(sent);
        self.campaign
            .observe(Some(&Record::of(&lease)), Instant::now());
        Ok(())
    }

    fn fill(&self, spec: &mut LeaseSpec, now: Timestamp) {
        spec.holder_identity = Some(self.campaign.me().to_string());
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(self.timing.lease.as_secs() as i32);
    }

    /// Publishes the term as the campaign sees it now; bumps the id on every
    /// gain and loss.
    fn publish(&self) {
        let leading = self.campaign.leading(Instant::now());
        let valid_until = self.campaign.valid_until().filter(|_| leading);
        self.term.send_if_modified(|t| {
            if t.leading != leading {
                t.id += 1;
                t.leading = leading;
                t.valid_until = valid_until;
                tracing::info!(identity = %self.campaign.me(), lease = %self.name, leading, term = t.id, "leadership changed");
                true
            } else if t.valid_until != valid_until {
                t.valid_until = valid_until;
                true
            } else {
                false
            }
        });
    }

    /// Ends the term, then releases the Lease if it is still ours.
    async fn step_down(&mut self) {
        let held = self.campaign.holds();
        self.campaign.lost();
        self.publish();
        if !held {
            return;
        }
        let release = async {
            let Some(mut lease) = self.api.get().await? else {
                return Ok(false);
            };
            let Some(spec) = lease.spec.as_mut() else {
                return Ok(false);
            };
            if spec.holder_identity.as_deref() != Some(self.campaign.me()) {
                return Ok(false);
            }
            // As client-go does: no holder, and a 1 s duration in case an
            // older replica ignores the empty holder.
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(MicroTime(Timestamp::now()));
            self.api.replace(lease).await.map(|_| true)
        };
        match tokio::time::timeout(self.timing.request_timeout, release).await {
            Ok(Ok(true)) => tracing::info!(lease = %self.name, "released the lease"),
            Ok(Ok(false)) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, lease = %self.name, "could not release the lease")
            }
            Err(_) => tracing::warn!(lease = %self.name, "releasing the lease timed out"),
        }
    }
}

/// The default Lease name: one per load-balancer class, so two installs
/// serving different classes in one namespace never share a Lease.
pub fn lease_name(class: &str) -> String {
    let mut slug: String = class
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    slug = slug
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string();
    let mut name = format!("ferrolb-controller-{slug}");
    name.truncate(253);
    name.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(holder: &str, renewed: i64) -> Record {
        Record {
            holder: Some(holder.into()),
            duration: Duration::from_secs(15),
            acquired: None,
            renewed: Some(Timestamp::from_second(1_800_000_000 + renewed).unwrap()),
            transitions: Some(1),
        }
    }

    fn campaign() -> (Campaign, Instant) {
        (Campaign::new("me", Timing::default()), Instant::now())
    }

    #[test]
    fn no_lease_is_acquired() {
        let (mut c, t0) = campaign();
        c.observe(None, t0);
        assert_eq!(c.decide(t0), Decision::Acquire);
    }

    #[test]
    fn our_own_lease_is_renewed_at_once_after_a_restart() {
        let (mut c, t0) = campaign();
        c.observe(Some(&record("me", 0)), t0);
        assert_eq!(c.decide(t0), Decision::Renew);
    }

    #[test]
    fn expiry_counts_from_when_we_saw_the_record_change() {
        let (mut c, t0) = campaign();
        // A renewTime far in the future (a skewed clock) changes nothing.
        c.observe(Some(&record("other", 3600)), t0);
        let s = Duration::from_secs(1);
        assert_eq!(c.decide(t0 + 14 * s), Decision::Follow("other".into()));
        // Re-reading the same record does not restart the clock.
        c.observe(Some(&record("other", 3600)), t0 + 10 * s);
        assert_eq!(c.decide(t0 + 15 * s), Decision::Acquire);
        // A holder far in the past that keeps renewing is never taken over.
        let (mut c, t0) = campaign();
        for i in 0..20 {
            c.observe(Some(&record("other", -3600 + i * 2)), t0 + 2 * i as u32 * s);
            assert_eq!(
                c.decide(t0 + (2 * i as u32 + 1) * s),
                Decision::Follow("other".into())
            );
        }
    }

    #[test]
    fn leadership_lapses_at_the_renew_deadline_of_the_last_accepted_send() {
        let (mut c, t0) = campaign();
        c.accepted(t0);
        assert!(c.leading(t0 + Duration::from_millis(9999)));
        assert!(!c.leading(t0 + Duration::from_secs(10)));
        c.lost();
        assert!(!c.leading(t0));
    }

    #[test]
    fn released_lease_is_taken_at_once() {
        let (mut c, t0) = campaign();
        let mut r = record("other", 0);
        r.holder = None;
        c.observe(Some(&r), t0);
        assert_eq!(c.decide(t0), Decision::Acquire);
    }

    #[tokio::test(start_paused = true)]
    async fn the_fence_admits_only_the_planned_fresh_term() {
        let (tx, rx) = watch::channel(Term::default());
        let stopping = CancellationToken::new();
        let fence = Fence::new(rx, stopping.clone());
        assert_eq!(fence.permits(0), None, "not leading");
        let until = Instant::now() + Duration::from_secs(10);
        tx.send_replace(Term {
            id: 1,
            leading: true,
            valid_until: Some(until),
        });
        assert_eq!(fence.permits(1), Some(Duration::from_secs(10)));
        assert_eq!(fence.permits(0), None, "planned in an older term");
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(fence.permits(1), None, "the lease lapsed");
        tx.send_replace(Term {
            id: 1,
            leading: true,
            valid_until: Some(Instant::now() + Duration::from_secs(10)),
        });
        assert!(fence.permits(1).is_some());
        stopping.cancel();
        assert_eq!(fence.permits(1), None, "shutting down");
    }

    #[test]
    fn timing_must_order_retry_deadline_lease() {
        assert!(Timing::default().validate().is_ok());
        let bad = Timing {
            renew_deadline: Duration::from_secs(15),
            ..Timing::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn lease_names_carry_the_class() {
        assert_eq!(
            lease_name("ferrolb.io/lb"),
            "ferrolb-controller-ferrolb.io-lb"
        );
        assert_eq!(
            lease_name("Example.COM/Other_LB"),
            "ferrolb-controller-example.com-other-lb"
        );
        assert_ne!(lease_name("a.io/x"), lease_name("a.io/y"));
    }
}
