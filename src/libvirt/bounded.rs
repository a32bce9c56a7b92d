//! Calls that may wait on one domain's QEMU, bounded in time.
//!
//! libvirt answers most calls at once, but a call that needs a domain's QEMU monitor (balloon
//! statistics and resizes, and even bulk vCPU statistics, which refresh each vCPU's halted state)
//! waits as long as that QEMU does not answer (stopped, or hung on its storage), and one that needs
//! a domain's job waits up to 30 s for whoever holds it (a migration, a dump, or our own stuck
//! call). [`Bounded`] runs such a call on a worker thread and waits for it at most a deadline. A
//! call still running then is left to finish on its own, and what it waits on is *stuck* until it
//! does: its [`Slot`] stays busy, and no other call is made on it meanwhile (each would only add a
//! blocked thread); a domain stuck is skipped by the daemons, said once, until it answers again.
//!
//! Each call holds one of libvirtd's worker threads until it returns, and a call to a hung QEMU
//! may never return: calls still running past their deadline pile up in libvirtd, whose pool is
//! small (20 workers by default), until it answers no client at all. So the calls running at once
//! are capped at a budget ([`Bounded::new`]); past it no call is made (the domain is not read this
//! cycle) until some return.
//!
//! Each call runs on a connection of its own, taken from a pool ([`Connections`]) and given back
//! when it returns: a call stuck in libvirt holds up every other call on its connection (measured
//! on real guests: with one stuck call on the daemon's connection, the others took 5 to 20 s), so
//! a stuck call keeps its connection to itself.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virt::connect::Connect;

/// Where bounded calls get a connection.
#[derive(Clone)]
pub enum Connections {
    /// One shared connection: for libvirt's test driver, whose calls run in-process and never
    /// wait, and whose `test:///FILE` hosts are private to each connection.
    Shared(Connect),
    /// A pool of connections to `uri`: each call takes an idle one, or opens one.
    Pool {
        uri: String,
        idle: Arc<Mutex<Vec<Connect>>>,
    },
}

impl Connections {
    /// The connections for bounded calls to the host at `uri`, whose daemon connection is
    /// `conn`.
    pub fn for_uri(uri: &str, conn: &Connect) -> Self {
        if uri.starts_with("test:") {
            Connections::Shared(conn.clone())
        } else {
            Connections::Pool {
                uri: uri.to_string(),
                idle: Arc::default(),
            }
        }
    }

    /// A connection for one call: an idle one, else a new one.
    fn take(&self) -> Result<Connect, virt::error::Error> {
        match self {
            Connections::Shared(conn) => Ok(conn.clone()),
            Connections::Pool { uri, idle } => {
                let taken = idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
                match taken {
                    Some(conn) => Ok(conn),
                    None => Connect::open(Some(uri)),
                }
            }
        }
    }

    /// Give `conn` back after a call that returned: kept for the next call while it is alive
    /// and fewer than `keep` are idle, else closed (a pool grown while calls were stuck shrinks
    /// once they return; a connection libvirtd dropped is not handed out again).
    fn give_back(&self, conn: Connect, keep: usize) {
        if let Connections::Pool { idle, .. } = self {
            let mut idle = idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < keep && conn.is_alive().unwrap_or(false) {
                idle.push(conn);
            }
        }
    }
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Connections::Shared(_) => f.write_str("Shared"),
            Connections::Pool { uri, .. } => write!(f, "Pool({uri})"),
        }
    }
}

/// What one call waits on (a domain, the listing, every domain's statistics), with room for one
/// call at a time: a call is made only while its slot is free, and a call past its deadline keeps
/// it busy until it returns. A domain's slot lives in the libvirt layer's record of that domain.
#[derive(Clone, Debug, Default)]
pub struct Slot(Arc<AtomicBool>);

impl Slot {
    /// Is a call on it still running (past its deadline, as seen between calls)?
    pub fn is_busy(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// How long a host-wide call is waited for at least.
pub const HOST_DEADLINE: Duration = Duration::from_secs(5);

/// The least a listing is waited for, even past the cycle's time.
const HOST_GRACE: Duration = Duration::from_millis(500);

/// How often a wait looks whether the daemon was asked to stop.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// Runs calls on worker threads, each waited for at most a deadline.
#[derive(Debug)]
pub struct Bounded {
    deadline: Duration,
    /// Where each call gets its connection.
    connections: Connections,
    /// Calls running: waited for, or past their deadline (stuck).
    running: Arc<AtomicUsize>,
    /// The most calls running at once: what the daemon may hold of libvirtd's workers.
    budget: usize,
    /// When the current cycle's time is up: no call is waited for past it, and none is started
    /// after it, however many domains do not answer.
    cycle_end: Option<Instant>,
    /// The least a host-wide call is waited for ([`HOST_DEADLINE`]).
    host_floor: Duration,
}

/// Why a call gave no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unanswered {
    /// It did not return within the deadline, or a call on its slot is still running.
    Late,
    /// It was not made: the budget of calls running at once is spent.
    OverBudget,
    /// The daemon is stopping.
    Stopping,
    /// It was not made: the cycle's time is up.
    OutOfTime,
}

impl Bounded {
    /// Calls on `connections`, each waited for at most `deadline`, at most `budget` (at least
    /// one) running at once.
    pub fn new(deadline: Duration, connections: Connections, budget: usize) -> Self {
        Self {
            deadline,
            connections,
            running: Arc::default(),
            budget: budget.max(1),
            cycle_end: None,
            host_floor: HOST_DEADLINE,
        }
    }

    /// Start a cycle: from now on, calls together wait at most one deadline, until the next
    /// cycle (or [`Bounded::end_cycle`]).
    pub fn begin_cycle(&mut self) {
        self.cycle_end = Some(Instant::now() + self.deadline);
    }

    /// Out of any cycle: each call waits at most the deadline on its own.
    pub fn end_cycle(&mut self) {
        self.cycle_end = None;
    }

    /// Hold at most `budget` (at least one) calls running at once from now on.
    pub fn set_budget(&mut self, budget: usize) {
        self.budget = budget.max(1);
    }

    /// Calls running now: each holds one of libvirtd's workers.
    pub fn outstanding(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    /// How long a host-wide call is waited for: the deadline, and at least [`HOST_DEADLINE`].
    pub fn host_deadline(&self) -> Duration {
        self.deadline.max(self.host_floor)
    }

    /// Is there room in the budget for a call on domains?
    pub fn has_room_for_domains(&self) -> bool {
        self.outstanding() < self.room(Kind::Domains)
    }

    /// Make calls on `connections` from now on (a new connection to the host).
    pub fn set_connections(&mut self, connections: Connections) {
        self.connections = connections;
    }

    /// The deadline of each call.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// Wait at most `deadline` for each call from now on.
    pub fn set_deadline(&mut self, deadline: Duration) {
        self.deadline = deadline;
    }

    /// Run `call` on `slot` with a connection of its own, waiting at most the deadline (less
    /// when `stop` says the daemon is stopping). [`Unanswered`] when it did not return in time
    /// (it is then left to finish on its own), a call on `slot` is still running, or the budget
    /// is spent.
    pub fn run<T: Send + 'static>(
        &self,
        slot: &Slot,
        stop: impl Fn() -> bool,
        kind: Kind,
        call: impl FnOnce(&Connect) -> Result<T, virt::error::Error> + Send + 'static,
    ) -> Result<Result<T, virt::error::Error>, Unanswered> {
        let (connections, keep) = (self.connections.clone(), self.budget);
        self.run_plain(slot, stop, kind, move || {
            let conn = connections.take()?;
            let out = call(&conn);
            connections.give_back(conn, keep);
            out
        })
    }

    /// Run `call` on `conn` (the daemon's own connection), bounded like [`Bounded::run`].
    pub fn run_on<T: Send + 'static>(
        &self,
        conn: &Connect,
        slot: &Slot,
        stop: impl Fn() -> bool,
        call: impl FnOnce(&Connect) -> Result<T, virt::error::Error> + Send + 'static,
    ) -> Result<Result<T, virt::error::Error>, Unanswered> {
        let conn = conn.clone();
        self.run_plain(slot, stop, Kind::Host, move || call(&conn))
    }

    /// How many calls may be running for a call of `kind` to start: domains' calls leave one
    /// of the budget (when it has more than one) to the host-wide calls, so that calls stuck on
    /// domains never keep the daemon from reading the host.
    fn room(&self, kind: Kind) -> usize {
        match kind {
            Kind::Host => self.budget,
            Kind::Domains | Kind::Listing => self.budget.saturating_sub(1).max(1),
        }
    }

    /// Run `call` on `slot` on a worker thread, waiting at most the deadline (see
    /// [`Bounded::run`]).
    fn run_plain<T: Send + 'static>(
        &self,
        slot: &Slot,
        stop: impl Fn() -> bool,
        kind: Kind,
        call: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Unanswered> {
        // Only this thread starts calls, so the count can only fall between this look and the
        // start below.
        if self.outstanding() >= self.room(kind) {
            return Err(Unanswered::OverBudget);
        }
        let now = Instant::now();
        let until = match (self.cycle_end, kind) {
            // A host-wide call waits on no QEMU: it is only slow when libvirtd is (starved of CPU
            // by busy guests, or hung). It is waited for longer, past the cycle's time: a cycle
            // failed for a slow answer loses every decision, and only a hung libvirtd needs
            // giving up on.
            (_, Kind::Host) => now + self.host_deadline(),
            // A listing gets a moment even when the domains' calls spent the cycle's time.
            (Some(end), Kind::Listing) => end.max(now + HOST_GRACE).min(now + self.deadline),
            (Some(end), Kind::Domains) if end <= now => return Err(Unanswered::OutOfTime),
            (Some(end), Kind::Domains) => end.min(now + self.deadline),
            (None, _) => now + self.deadline,
        };
        if slot.0.swap(true, Ordering::AcqRel) {
            return Err(Unanswered::Late);
        }
        self.running.fetch_add(1, Ordering::AcqRel);
        let (tx, rx) = mpsc::channel();
        // Frees the slot and the budget when the call ends, even by a panic.
        let finished = Finished {
            busy: Arc::clone(&slot.0),
            running: Arc::clone(&self.running),
        };
        let spawned = std::thread::Builder::new()
            .name("libvirt-call".into())
            .spawn(move || {
                let value = call();
                drop(finished);
                // The caller may have given up waiting: then the value is dropped.
                let _ = tx.send(value);
            });
        if let Err(e) = spawned {
            log::warn!("cannot start a thread for a libvirt call ({e}); skipped");
            return Err(Unanswered::Late);
        }
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if stop() {
                return Err(Unanswered::Stopping);
            }
            if left.is_zero() {
                return Err(Unanswered::Late);
            }
            match rx.recv_timeout(left.min(STOP_CHECK)) {
                Ok(value) => return Ok(value),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(Unanswered::Late),
            }
        }
    }
}

/// What a call reads, which sets its share of the budget and of the cycle's time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// One or more domains' figures (on a pooled connection): within the domains' share of the
    /// budget and the cycle's time.
    Domains,
    /// The listing of the domains (on a pooled connection): within the domains' share of the
    /// budget, but given a moment even past the cycle's time, since a cycle without it knows no
    /// domain.
    Listing,
    /// The host (on the daemon's own connection): within the whole budget, and waited for
    /// [`Bounded::host_deadline`] whatever the cycle's time.
    Host,
}

/// A call's claim on its slot and on the budget, given up when the call ends (however it ends).
struct Finished {
    busy: Arc<AtomicBool>,
    running: Arc<AtomicUsize>,
}

impl Drop for Finished {
    fn drop(&mut self) {
        self.busy.store(false, Ordering::Release);
        self.running.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Calls waited for at most `deadline` (host-wide ones too), on libvirt's test driver.
    fn bounded(deadline: Duration) -> Bounded {
        let conn = Connect::open(Some("test:///default")).expect("the test driver opens");
        Bounded {
            host_floor: Duration::ZERO,
            ..Bounded::new(deadline, Connections::for_uri("test:///default", &conn), 4)
        }
    }

    #[test]
    fn a_quick_call_returns_its_value() {
        let b = bounded(Duration::from_secs(5));
        let slot = Slot::default();
        assert_eq!(b.run_plain(&slot, || false, Kind::Domains, || 7), Ok(7));
        assert!(b.outstanding() == 0 && !slot.is_busy());
        // A call with a connection of its own, on the test driver.
        let listed = b.run(&slot, || false, Kind::Listing, |c| c.list_all_domains(0));
        assert_eq!(listed.map(|r| r.map(|l| l.len())), Ok(Ok(1)));
    }

    #[test]
    fn a_call_past_its_deadline_leaves_its_target_stuck_until_it_returns() {
        let b = bounded(Duration::from_millis(50));
        let (release, held) = mpsc::channel::<()>();
        let started = Instant::now();
        let (domain, other) = (Slot::default(), Slot::default());
        let out = b.run_plain(
            &domain,
            || false,
            Kind::Domains,
            move || held.recv().is_ok(),
        );
        assert_eq!(out, Err(Unanswered::Late));
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(domain.is_busy() && b.outstanding() == 1);
        // No second call is made on a stuck slot; others go on.
        assert_eq!(
            b.run_plain(&domain, || false, Kind::Domains, || 1),
            Err(Unanswered::Late)
        );
        assert_eq!(b.run_plain(&other, || false, Kind::Domains, || 2), Ok(2));
        // A copy of the slot (the record that holds it) sees the same call.
        assert_eq!(
            b.run_plain(&domain.clone(), || false, Kind::Domains, || 1),
            Err(Unanswered::Late)
        );
        // Once the stuck call returns, the slot answers again.
        release.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while b.outstanding() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!domain.is_busy());
        assert_eq!(b.run_plain(&domain, || false, Kind::Domains, || 3), Ok(3));
    }

    #[test]
    fn a_stop_request_ends_the_wait_at_once() {
        let b = bounded(Duration::from_secs(60));
        let started = Instant::now();
        let out = b.run_plain(
            &Slot::default(),
            || started.elapsed() > Duration::from_millis(200),
            Kind::Domains,
            || std::thread::sleep(Duration::from_secs(5)),
        );
        assert_eq!(out, Err(Unanswered::Stopping));
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_cycle_waits_one_deadline_whatever_the_number_of_calls_that_hang() {
        let mut b = bounded(Duration::from_millis(300));
        b.set_budget(8);
        let (release, held) = mpsc::channel::<()>();
        let held = Arc::new(Mutex::new(held));
        b.begin_cycle();
        let started = Instant::now();
        let outcomes: Vec<_> = (0..6)
            .map(|_| {
                let held = Arc::clone(&held);
                b.run_plain(
                    &Slot::default(),
                    || false,
                    Kind::Domains,
                    move || {
                        let _ = held.lock().map(|h| h.recv());
                    },
                )
            })
            .collect();
        let took = started.elapsed();
        // The first call waits out the cycle's time; the others are not even made.
        assert_eq!(outcomes[0], Err(Unanswered::Late));
        assert!(
            outcomes[1..]
                .iter()
                .all(|o| *o == Err(Unanswered::OutOfTime))
        );
        assert_eq!(b.outstanding(), 1);
        assert!(took < Duration::from_millis(600), "{took:?}");
        // A host-wide call still gets a moment, so the domains' calls do not fail the cycle.
        let host = b.run_plain(&Slot::default(), || false, Kind::Host, || 2);
        assert_eq!(host, Ok(2));
        // A new cycle has its own time.
        b.begin_cycle();
        assert_eq!(
            b.run_plain(&Slot::default(), || false, Kind::Domains, || 1),
            Ok(1)
        );
        drop(release);
    }

    #[test]
    fn a_slow_host_wide_call_is_waited_for_longer_than_a_domains() {
        let b = Bounded {
            host_floor: Duration::from_secs(2),
            ..bounded(Duration::from_millis(50))
        };
        let slow = || std::thread::sleep(Duration::from_millis(300));
        let domain = b.run_plain(&Slot::default(), || false, Kind::Domains, slow);
        assert_eq!(domain, Err(Unanswered::Late));
        let host = b.run_plain(&Slot::default(), || false, Kind::Host, slow);
        assert_eq!(host, Ok(()));
    }

    #[test]
    fn calls_stuck_on_domains_leave_room_for_the_host() {
        let b = bounded(Duration::from_millis(20));
        let gates: Vec<_> = (0..3)
            .map(|_| {
                let (release, held) = mpsc::channel::<()>();
                let out = b.run_plain(
                    &Slot::default(),
                    || false,
                    Kind::Domains,
                    move || held.recv().is_ok(),
                );
                assert_eq!(out, Err(Unanswered::Late));
                release
            })
            .collect();
        // The budget of 4 less one is held by domains: no more domain calls, but the host's.
        let domain = b.run_plain(&Slot::default(), || false, Kind::Domains, || 1);
        assert_eq!(domain, Err(Unanswered::OverBudget));
        let host = b.run_plain(&Slot::default(), || false, Kind::Host, || 2);
        assert_eq!(host, Ok(2));
        drop(gates);
    }

    #[test]
    fn a_call_that_panics_gives_its_slot_and_budget_back() {
        let b = bounded(Duration::from_secs(5));
        let slot = Slot::default();
        let out = b.run_plain(
            &slot,
            || false,
            Kind::Domains,
            || -> u32 { panic!("a bug in a call") },
        );
        assert_eq!(out, Err(Unanswered::Late));
        assert!(!slot.is_busy() && b.outstanding() == 0);
    }

    /// What a step of a trace does: start a call on slot `n` that hangs until released, or one
    /// that returns at once, or release every hung call on slot `n`. Slot 5 is the host's.
    #[derive(Clone, Copy, Debug)]
    enum Step {
        Hangs(usize),
        Returns(usize),
        Release(usize),
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            (0..6usize).prop_map(Step::Hangs),
            (0..6usize).prop_map(Step::Returns),
            (0..6usize).prop_map(Step::Release),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Over any trace of domains hanging and answering, the calls running never exceed the
        /// budget; a call on a free slot under the budget is made, and answers when its domain
        /// does.
        #[test]
        fn the_calls_running_never_exceed_the_budget(
            budget in 1..4usize,
            steps in proptest::collection::vec(step(), 1..40),
        ) {
            let b = bounded(Duration::from_millis(20));
            let b = Bounded { budget, ..b };
            let slots: Vec<Slot> = (0..6).map(|_| Slot::default()).collect();
            let mut gates: Vec<Vec<mpsc::Sender<()>>> = (0..6).map(|_| Vec::new()).collect();
            for step in steps {
                let before = b.outstanding();
                let kind = |n: usize| if n == 5 { Kind::Host } else { Kind::Domains };
                match step {
                    Step::Hangs(n) => {
                        let (release, held) = mpsc::channel::<()>();
                        let out = b.run_plain(&slots[n], || false, kind(n), move || held.recv().is_ok());
                        let expected = if before >= b.room(kind(n)) {
                            Err(Unanswered::OverBudget)
                        } else {
                            Err(Unanswered::Late)
                        };
                        proptest::prop_assert_eq!(out, expected);
                        gates[n].push(release);
                    }
                    Step::Returns(n) => {
                        let out = b.run_plain(&slots[n], || false, kind(n), || 7);
                        if before >= b.room(kind(n)) {
                            proptest::prop_assert_eq!(out, Err(Unanswered::OverBudget));
                        } else if slots[n].is_busy() {
                            proptest::prop_assert_eq!(out, Err(Unanswered::Late));
                        } else {
                            proptest::prop_assert_eq!(out, Ok(7));
                        }
                    }
                    Step::Release(n) => {
                        for gate in gates[n].drain(..) {
                            let _ = gate.send(());
                        }
                        let deadline = Instant::now() + Duration::from_secs(5);
                        while slots[n].is_busy() && Instant::now() < deadline {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
                proptest::prop_assert!(b.outstanding() <= budget, "{} > {budget}", b.outstanding());
            }
            for gate in gates.into_iter().flatten() {
                let _ = gate.send(());
            }
        }
    }
}
