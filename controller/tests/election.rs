//! `Elector::run` against a scripted Lease API, in paused tokio time: the
//! API server's answers (errors, hangs, conflicts, a third party editing the
//! Lease, a holder with a skewed clock) are chosen by the test, and every
//! term change is recorded with its instant.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrolb_controller::election::{Elector, LeaseApi, LeaseError, Term, Timing};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::ObjectMeta;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const NAME: &str = "ferrolb-controller-test";
const S: Duration = Duration::from_secs(1);

/// How a client's calls are answered.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Ok,
    /// Every call fails with this HTTP status.
    Fail(u16),
    /// Every call hangs forever.
    Hang,
    /// Reads work, writes fail with this status (e.g. RBAC revoked).
    WritesFail(u16),
}

#[derive(Default)]
struct Server {
    lease: Option<Lease>,
    version: u64,
    changed: Arc<Notify>,
}

impl Server {
    fn store(&mut self, mut lease: Lease) -> Lease {
        self.version += 1;
        lease.metadata.resource_version = Some(self.version.to_string());
        self.lease = Some(lease.clone());
        self.changed.notify_waiters();
        lease
    }
}

#[derive(Clone)]
struct Client {
    server: Arc<Mutex<Server>>,
    mode: Arc<Mutex<Mode>>,
    /// One-shot answers that take precedence over `mode`, per call.
    script: Arc<Mutex<VecDeque<LeaseError>>>,
    changed: Arc<Notify>,
}

impl Client {
    fn new(server: &Arc<Mutex<Server>>) -> Self {
        let changed = server.lock().unwrap().changed.clone();
        Self {
            server: server.clone(),
            mode: Arc::new(Mutex::new(Mode::Ok)),
            script: Arc::default(),
            changed,
        }
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    async fn gate(&self, write: bool) -> Result<(), LeaseError> {
        if let Some(e) = self.script.lock().unwrap().pop_front() {
            return Err(e);
        }
        let mode = *self.mode.lock().unwrap();
        match mode {
            Mode::Ok => Ok(()),
            Mode::Fail(code) => Err(LeaseError::Api(format!("HTTP {code}"))),
            Mode::WritesFail(code) if write => Err(LeaseError::Api(format!("HTTP {code}"))),
            Mode::WritesFail(_) => Ok(()),
            Mode::Hang => std::future::pending().await,
        }
    }
}

impl LeaseApi for Client {
    async fn get(&self) -> Result<Option<Lease>, LeaseError> {
        self.gate(false).await?;
        Ok(self.server.lock().unwrap().lease.clone())
    }

    async fn create(&self, lease: Lease) -> Result<Lease, LeaseError> {
        self.gate(true).await?;
        let mut s = self.server.lock().unwrap();
        if s.lease.is_some() {
            return Err(LeaseError::AlreadyExists);
        }
        Ok(s.store(lease))
    }

    async fn replace(&self, lease: Lease) -> Result<Lease, LeaseError> {
        self.gate(true).await?;
        let mut s = self.server.lock().unwrap();
        let current = s
            .lease
            .as_ref()
            .and_then(|l| l.metadata.resource_version.clone());
        if current != lease.metadata.resource_version {
            return Err(LeaseError::Conflict);
        }
        Ok(s.store(lease))
    }

    async fn changed(&self) {
        self.changed.notified().await
    }
}

/// One replica: its client handle, its term history and its stop token.
struct Replica {
    client: Client,
    terms: Arc<Mutex<Vec<(Instant, Term)>>>,
    rx: watch::Receiver<Term>,
    stop: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

impl Replica {
    fn start(server: &Arc<Mutex<Server>>, identity: &str) -> Self {
        let client = Client::new(server);
        let (elector, rx) = Elector::new(client.clone(), NAME, identity, Timing::default());
        let stop = CancellationToken::new();
        let done = tokio::spawn(elector.run(stop.clone()));
        let terms = Arc::new(Mutex::new(vec![(Instant::now(), *rx.borrow())]));
        let (mut watch_rx, log) = (rx.clone(), terms.clone());
        tokio::spawn(async move {
            while watch_rx.changed().await.is_ok() {
                let t = *watch_rx.borrow_and_update();
                log.lock().unwrap().push((Instant::now(), t));
            }
        });
        Self {
            client,
            terms,
            rx,
            stop,
            done,
        }
    }

    fn leading(&self) -> bool {
        self.rx.borrow().leading
    }

    /// Instants at which leadership started or ended, after `from`.
    fn flips(&self, from: Instant) -> Vec<(Instant, bool)> {
        let terms = self.terms.lock().unwrap();
        let mut out = Vec::new();
        // The first entry is the starting state, not a flip.
        let mut last = terms.first().map(|(_, t)| t.leading);
        for (at, t) in terms.iter().skip(1) {
            if last != Some(t.leading) {
                if *at >= from {
                    out.push((*at, t.leading));
                }
                last = Some(t.leading);
            }
        }
        out
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.done.await;
    }
}

fn held_by(holder: &str, renewed: Timestamp) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(NAME.into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(renewed)),
            ..Default::default()
        }),
    }
}

async fn settle(d: Duration) {
    tokio::time::sleep(d).await;
}

/// A leads, B stands by; then `fault` hits A's requests. A must end its
/// term before B starts one, and B must take over within a lease and a
/// retry of A's last accepted renewal.
async fn leader_fault(fault: Mode) {
    let server = Arc::new(Mutex::new(Server::default()));
    let a = Replica::start(&server, "a");
    settle(S).await;
    assert!(a.leading(), "a leads first");
    let b = Replica::start(&server, "b");
    settle(5 * S).await;
    assert!(a.leading() && !b.leading());

    let cut = Instant::now();
    a.client.set(fault);
    settle(30 * S).await;

    let a_flips = a.flips(cut);
    let b_flips = b.flips(cut);
    let a_lost = a_flips
        .iter()
        .find(|(_, l)| !l)
        .unwrap_or_else(|| panic!("{fault:?}: a never stopped leading: {a_flips:?}"))
        .0;
    let b_won = b_flips
        .iter()
        .find(|(_, l)| *l)
        .unwrap_or_else(|| panic!("{fault:?}: b never took over: {b_flips:?}"))
        .0;
    assert!(
        a_lost < b_won,
        "{fault:?}: two leaders: a lost at +{:?}, b won at +{:?}",
        a_lost - cut,
        b_won - cut
    );
    // A renewed at most one retry before the cut, so it stops by 10 s after.
    assert!(
        a_lost - cut <= 10 * S,
        "{fault:?}: a led {:?} past the cut",
        a_lost - cut
    );
    assert!(b_won - cut <= 17 * S, "{fault:?}: b took {:?}", b_won - cut);
    assert!(
        !a_flips.iter().any(|(at, l)| *l && *at > a_lost),
        "{fault:?}: a came back while cut off"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn server_errors_end_the_term_before_the_standby_starts() {
    leader_fault(Mode::Fail(500)).await;
}

#[tokio::test(start_paused = true)]
async fn throttling_ends_the_term_before_the_standby_starts() {
    leader_fault(Mode::Fail(429)).await;
}

#[tokio::test(start_paused = true)]
async fn hanging_requests_end_the_term_before_the_standby_starts() {
    leader_fault(Mode::Hang).await;
}

#[tokio::test(start_paused = true)]
async fn a_forbidden_lease_write_ends_the_term_before_the_standby_starts() {
    leader_fault(Mode::WritesFail(403)).await;
}

#[tokio::test(start_paused = true)]
async fn a_conflict_is_retried_and_the_term_goes_on() {
    let server = Arc::new(Mutex::new(Server::default()));
    let a = Replica::start(&server, "a");
    settle(S).await;
    let id = a.rx.borrow().id;
    a.client
        .script
        .lock()
        .unwrap()
        .extend([LeaseError::Conflict, LeaseError::Conflict]);
    settle(20 * S).await;
    assert!(a.leading());
    assert_eq!(a.rx.borrow().id, id, "two conflicts must not end the term");
    a.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_third_party_taking_the_lease_ends_our_term_within_a_retry() {
    let server = Arc::new(Mutex::new(Server::default()));
    let a = Replica::start(&server, "a");
    settle(S).await;
    assert!(a.leading());
    let taken = Instant::now();
    {
        let mut s = server.lock().unwrap();
        let mut lease = s.lease.clone().unwrap();
        lease.spec.as_mut().unwrap().holder_identity = Some("intruder".into());
        s.store(lease);
    }
    settle(5 * S).await;
    let lost = a.flips(taken);
    assert!(
        matches!(lost.first(), Some((at, false)) if *at - taken <= 2 * S),
        "{lost:?}"
    );
    a.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_third_party_editing_labels_changes_nothing() {
    let server = Arc::new(Mutex::new(Server::default()));
    let a = Replica::start(&server, "a");
    settle(S).await;
    let b = Replica::start(&server, "b");
    let id = a.rx.borrow().id;
    for i in 0..20 {
        settle(S).await;
        let mut s = server.lock().unwrap();
        let mut lease = s.lease.clone().unwrap();
        lease.metadata.labels = Some([("edit".to_string(), i.to_string())].into());
        s.store(lease);
    }
    settle(5 * S).await;
    assert!(a.leading() && !b.leading());
    assert_eq!(a.rx.borrow().id, id);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_holder_with_a_future_renew_time_is_taken_after_one_lease_of_silence() {
    let server = Arc::new(Mutex::new(Server::default()));
    let future = Timestamp::now()
        .checked_add(SignedDuration::from_hours(1))
        .unwrap();
    server.lock().unwrap().store(held_by("ghost", future));
    let start = Instant::now();
    let a = Replica::start(&server, "a");
    settle(20 * S).await;
    let won = a.flips(start);
    let at = won.first().map(|(at, _)| *at - start);
    assert!(
        at.is_some_and(|d| d >= 15 * S && d <= 17 * S),
        "took over at {at:?}, expected 15-17 s after first seeing it"
    );
    a.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_live_holder_with_a_past_renew_time_is_never_taken() {
    let server = Arc::new(Mutex::new(Server::default()));
    let past = Timestamp::now()
        .checked_sub(SignedDuration::from_hours(1))
        .unwrap();
    server.lock().unwrap().store(held_by("skewed", past));
    let a = Replica::start(&server, "a");
    // The skewed holder renews every 2 s with its own (hour-late) clock.
    for i in 0..30 {
        settle(2 * S).await;
        let renewed = past
            .checked_add(SignedDuration::from_secs(2 * i + 2))
            .unwrap();
        let mut s = server.lock().unwrap();
        let mut lease = s.lease.clone().unwrap();
        lease.spec.as_mut().unwrap().renew_time = Some(MicroTime(renewed));
        s.store(lease);
    }
    assert!(
        a.flips(Instant::now() - 60 * S).is_empty(),
        "stole a live lease"
    );
    a.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_same_identity_takes_its_lease_back_at_once() {
    let server = Arc::new(Mutex::new(Server::default()));
    server
        .lock()
        .unwrap()
        .store(held_by("controller-0", Timestamp::now()));
    let start = Instant::now();
    let a = Replica::start(&server, "controller-0");
    settle(S).await;
    let won = a.flips(start);
    assert!(
        matches!(won.first(), Some((at, true)) if *at - start < S),
        "{won:?}"
    );
    a.stop().await;
}

#[tokio::test(start_paused = true)]
async fn stepping_down_releases_the_lease_and_the_standby_leads_at_once() {
    let server = Arc::new(Mutex::new(Server::default()));
    let a = Replica::start(&server, "a");
    settle(S).await;
    let b = Replica::start(&server, "b");
    settle(3 * S + Duration::from_millis(300)).await;
    assert!(a.leading() && !b.leading());
    let stopped = Instant::now();
    let a_terms = a.terms.clone();
    a.stop().await;
    let a_lost = a_terms
        .lock()
        .unwrap()
        .iter()
        .find(|(at, t)| *at >= stopped && !t.leading)
        .map(|(at, _)| *at)
        .expect("a's term ends");
    settle(3 * S).await;
    let won = b.flips(stopped);
    let b_won = won.first().map(|(at, _)| *at).expect("b leads");
    assert!(a_lost <= b_won);
    assert!(
        b_won - stopped < Duration::from_millis(500),
        "the standby took {:?}; it should wake on the release, not wait a retry",
        b_won - stopped
    );
    let holder = server
        .lock()
        .unwrap()
        .lease
        .as_ref()
        .and_then(|l| l.spec.as_ref()?.holder_identity.clone());
    assert_eq!(holder.as_deref(), Some("b"));
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn terms_bump_on_every_gain_and_loss() {
    let server = Arc::new(Mutex::new(Server::default()));
    let a = Replica::start(&server, "a");
    settle(S).await;
    let first = *a.rx.borrow();
    assert!(first.leading && first.id == 1);
    a.client.set(Mode::Fail(503));
    settle(12 * S).await;
    let lost = *a.rx.borrow();
    assert!(!lost.leading && lost.id == 2, "{lost:?}");
    a.client.set(Mode::Ok);
    settle(3 * S).await;
    let again = *a.rx.borrow();
    assert!(again.leading && again.id == 3, "{again:?}");
    a.stop().await;
}
