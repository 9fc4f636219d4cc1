//! Throttling password guesses, per account name and per source address.
//!
//! A password is the one credential a person chooses, so it is the one worth guessing. Each
//! failed login counts against the account name it named (whether or not that account
//! exists, so the throttle itself tells nothing) and against the address it came from. After
//! a failure the next attempt on the same key must wait an exponentially growing delay
//! (`base`, `2 * base`, `4 * base`, ...), and after `lockout_failure_attempts` failures the
//! key is locked for `lockout_duration`, as Keystone's options of those names do. A source
//! is allowed more failures than an account (several people may share an address). A
//! success clears the account's count but not the source's, so one valid account cannot be
//! used to reset an address that is guessing others. Counts older than the lockout duration
//! are forgotten, and the table is bounded so that guessing random names cannot grow it
//! without limit.
//!
//! The counts live in memory: a restart forgets them, which costs an attacker a restart of
//! the management node per `lockout_failure_attempts` guesses, nothing they can cause.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How many failures lock, and for how long.
#[derive(Clone, Copy, Debug)]
pub struct LoginPolicy {
    /// Failures of one account name before it is locked.
    pub lockout_failure_attempts: u32,
    /// Failures from one address before it is locked.
    pub source_failure_attempts: u32,
    /// How long a lock lasts, and how long a failure is remembered.
    pub lockout_duration: Duration,
    /// The wait after the first failure; it doubles with each further failure.
    pub base_delay: Duration,
}

impl Default for LoginPolicy {
    fn default() -> Self {
        LoginPolicy {
            lockout_failure_attempts: 5,
            source_failure_attempts: 30,
            lockout_duration: Duration::from_secs(300),
            base_delay: Duration::from_millis(200),
        }
    }
}

/// Why an attempt is not even tried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Too soon after the last failure; try again after the duration.
    Throttled(Duration),
    /// Locked after too many failures, for the duration.
    Locked(Duration),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Account(String),
    Source(IpAddr),
}

#[derive(Clone, Copy, Debug)]
struct Failures {
    count: u32,
    last: Instant,
}

/// The most keys remembered; past it, the oldest failures are forgotten first.
const MAX_KEYS: usize = 100_000;

/// Failed logins by account name and by source address.
#[derive(Debug, Default)]
pub struct LoginThrottle {
    policy: LoginPolicy,
    failures: Mutex<HashMap<Key, Failures>>,
}

impl LoginThrottle {
    /// A throttle enforcing `policy`.
    pub fn new(policy: LoginPolicy) -> LoginThrottle {
        LoginThrottle { policy, failures: Mutex::default() }
    }

    fn keys(account: &str, source: Option<IpAddr>) -> impl Iterator<Item = Key> {
        std::iter::once(Key::Account(account.to_owned())).chain(source.map(Key::Source))
    }

    fn limit(&self, key: &Key) -> u32 {
        match key {
            Key::Account(_) => self.policy.lockout_failure_attempts,
            Key::Source(_) => self.policy.source_failure_attempts,
        }
    }

    /// Whether an attempt for `account` from `source` may be tried now.
    pub fn check(&self, account: &str, source: Option<IpAddr>) -> Result<(), Refusal> {
        self.check_at(account, source, Instant::now())
    }

    fn check_at(&self, account: &str, source: Option<IpAddr>, now: Instant) -> Result<(), Refusal> {
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let mut refusal = None;
        for key in Self::keys(account, source) {
            let Some(f) = failures.get(&key) else { continue };
            let since = now.saturating_duration_since(f.last);
            if since >= self.policy.lockout_duration {
                continue;
            }
            let this = if f.count >= self.limit(&key) {
                Refusal::Locked(self.policy.lockout_duration - since)
            } else {
                let shift = f.count.saturating_sub(1).min(16);
                let wait = self.policy.base_delay.saturating_mul(1 << shift);
                if since >= wait {
                    continue;
                }
                Refusal::Throttled(wait - since)
            };
            refusal = Some(match (refusal, this) {
                (Some(Refusal::Locked(a)), Refusal::Locked(b)) => Refusal::Locked(a.max(b)),
                (Some(locked @ Refusal::Locked(_)), Refusal::Throttled(_)) => locked,
                (Some(Refusal::Throttled(a)), Refusal::Throttled(b)) => {
                    Refusal::Throttled(a.max(b))
                }
                (_, this) => this,
            });
        }
        refusal.map_or(Ok(()), Err)
    }

    /// Counts a failed attempt.
    pub fn failed(&self, account: &str, source: Option<IpAddr>) {
        self.failed_at(account, source, Instant::now());
    }

    fn failed_at(&self, account: &str, source: Option<IpAddr>, now: Instant) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.len() >= MAX_KEYS {
            let window = self.policy.lockout_duration;
            failures.retain(|_, f| now.saturating_duration_since(f.last) < window);
            if failures.len() >= MAX_KEYS {
                // Everything is recent: forget the oldest half.
                let mut ages: Vec<Instant> = failures.values().map(|f| f.last).collect();
                ages.sort_unstable();
                let cutoff = ages[ages.len() / 2];
                failures.retain(|_, f| f.last > cutoff);
            }
        }
        for key in Self::keys(account, source) {
            let entry = failures.entry(key).or_insert(Failures { count: 0, last: now });
            if now.saturating_duration_since(entry.last) >= self.policy.lockout_duration {
                entry.count = 0;
            }
            entry.count = entry.count.saturating_add(1);
            entry.last = now;
        }
    }

    /// Forgets the account's failures after a successful login.
    pub fn succeeded(&self, account: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.remove(&Key::Account(account.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle() -> LoginThrottle {
        LoginThrottle::new(LoginPolicy {
            lockout_failure_attempts: 3,
            source_failure_attempts: 5,
            lockout_duration: Duration::from_secs(60),
            base_delay: Duration::from_secs(1),
        })
    }

    #[test]
    fn delays_double_then_the_account_locks_until_the_duration_passes() {
        let t = throttle();
        let start = Instant::now();
        let source = Some(IpAddr::from([127, 0, 0, 1]));
        assert_eq!(t.check_at("a", source, start), Ok(()));
        t.failed_at("a", source, start);
        assert_eq!(t.check_at("a", source, start), Err(Refusal::Throttled(Duration::from_secs(1))));
        let later = start + Duration::from_secs(1);
        assert_eq!(t.check_at("a", source, later), Ok(()));
        t.failed_at("a", source, later);
        assert_eq!(t.check_at("a", source, later), Err(Refusal::Throttled(Duration::from_secs(2))));
        t.failed_at("a", source, later);
        assert_eq!(t.check_at("a", source, later), Err(Refusal::Locked(Duration::from_secs(60))));
        // Another name from another address is not held back by this one.
        assert_eq!(t.check_at("b", Some(IpAddr::from([10, 0, 0, 1])), later), Ok(()));
        assert_eq!(t.check_at("a", source, later + Duration::from_secs(60)), Ok(()));
    }

    #[test]
    fn a_source_guessing_many_names_locks_and_a_success_does_not_reset_it() {
        let t = throttle();
        let source = Some(IpAddr::from([127, 0, 0, 2]));
        let mut now = Instant::now();
        for name in ["a", "b", "c", "d", "e"] {
            now += Duration::from_secs(30);
            t.failed_at(name, source, now);
        }
        t.succeeded("e");
        assert!(matches!(t.check_at("f", source, now), Err(Refusal::Locked(_))));
    }
}
