//! Checking basic-auth passwords so that logins cannot be used against the registry:
//!
//! - argon2 runs on the blocking pool under a small semaphore, so a burst of logins takes
//!   at most that many threads and never starves blob I/O, which shares the pool;
//! - an unknown user costs the same argon2 run as a known one (against a hash of a random
//!   password made at start-up), so timing does not tell which users exist;
//! - failed logins are counted per client address; past the limit in one window, further
//!   logins from that address get 429 with Retry-After until the window ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use tokio::sync::Semaphore;

use crate::error::{RegistryError, Result};

/// Failed logins one address may make per window.
const MAX_FAILURES: u32 = 10;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses remembered at most; past it, expired windows are dropped, and if all are
/// live the oldest entry goes (a flood of addresses must not grow memory without bound).
const MAX_TRACKED_ADDRESSES: usize = 10_000;

pub(super) struct PasswordChecker {
    permits: Semaphore,
    /// Verified against for unknown users.
    decoy_hash: String,
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl PasswordChecker {
    pub(super) fn new() -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).expect("16 bytes encode");
        let decoy = rand::random::<[u8; 16]>();
        let decoy_hash = Argon2::default()
            .hash_password(&decoy, &salt)
            .expect("argon2 hashes any password")
            .to_string();
        PasswordChecker {
            permits: Semaphore::new(threads.div_ceil(2)),
            decoy_hash,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Refuses a login attempt from `client` while it is over its failure limit.
    pub(super) fn admit(&self, client: Option<IpAddr>) -> Result<()> {
        let Some(client) = client else { return Ok(()) };
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        match failures.get(&client) {
            Some((count, since)) if *count >= MAX_FAILURES && since.elapsed() < FAILURE_WINDOW => {
                let retry_after = FAILURE_WINDOW
                    .saturating_sub(since.elapsed())
                    .as_secs()
                    .max(1);
                Err(RegistryError::TooManyRequests {
                    message: format!(
                        "{MAX_FAILURES} failed logins from this address within {}s",
                        FAILURE_WINDOW.as_secs()
                    ),
                    retry_after_secs: retry_after,
                })
            }
            _ => Ok(()),
        }
    }

    /// Whether `password` matches `stored` (None: the user is unknown, and the decoy is
    /// checked instead, so that the answer takes as long). Failures count against `client`.
    pub(super) async fn verify(
        &self,
        client: Option<IpAddr>,
        stored: Option<&str>,
        password: &str,
    ) -> bool {
        let known = stored.is_some();
        let hash = stored.unwrap_or(&self.decoy_hash).to_string();
        let password = password.to_string();
        let matched = match self.permits.acquire().await {
            Ok(_permit) => tokio::task::spawn_blocking(move || {
                PasswordHash::new(&hash).is_ok_and(|hash| {
                    Argon2::default()
                        .verify_password(password.as_bytes(), &hash)
                        .is_ok()
                })
            })
            .await
            .unwrap_or(false),
            Err(_) => false,
        };
        let ok = known && matched;
        if !ok {
            if let Some(client) = client {
                self.count_failure(client);
            }
        }
        ok
    }

    fn count_failure(&self, client: IpAddr) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.len() >= MAX_TRACKED_ADDRESSES && !failures.contains_key(&client) {
            failures.retain(|_, (_, since)| since.elapsed() < FAILURE_WINDOW);
            if failures.len() >= MAX_TRACKED_ADDRESSES {
                let oldest = failures
                    .iter()
                    .min_by_key(|(_, (_, since))| *since)
                    .map(|(address, _)| *address);
                if let Some(oldest) = oldest {
                    failures.remove(&oldest);
                }
            }
        }
        let entry = failures.entry(client).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= FAILURE_WINDOW {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(password: &str) -> String {
        let salt = SaltString::encode_b64(b"kiln-test-salt").unwrap();
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .unwrap()
            .to_string()
    }

    #[tokio::test]
    async fn unknown_users_fail_and_failures_are_limited_per_address() {
        let checker = PasswordChecker::new();
        let stored = hash("right");
        let attacker: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(checker.verify(Some(other), Some(&stored), "right").await);
        assert!(!checker.verify(Some(attacker), None, "right").await);
        for _ in 1..MAX_FAILURES {
            checker.admit(Some(attacker)).unwrap();
            assert!(!checker.verify(Some(attacker), Some(&stored), "wrong").await);
        }
        let refused = checker.admit(Some(attacker)).unwrap_err();
        assert!(
            matches!(refused, RegistryError::TooManyRequests { retry_after_secs, .. } if retry_after_secs > 0),
            "{refused:?}"
        );
        // Another address is not affected.
        checker.admit(Some(other)).unwrap();
    }

    #[tokio::test]
    async fn an_unknown_user_costs_as_much_as_a_known_one() {
        let checker = PasswordChecker::new();
        let stored = hash("right");
        let time = |stored: Option<String>| {
            let checker = &checker;
            async move {
                let started = Instant::now();
                for _ in 0..3 {
                    checker.verify(None, stored.as_deref(), "guess").await;
                }
                started.elapsed()
            }
        };
        // The fastest of a few alternating rounds each: a busy machine slows single
        // rounds down at random, not every round of one kind.
        let (mut known, mut unknown) = (Duration::MAX, Duration::MAX);
        for _ in 0..3 {
            known = known.min(time(Some(stored.clone())).await);
            unknown = unknown.min(time(None).await);
        }
        // The same argon2 work either way: an unknown user is not answered much sooner,
        // where skipping the hash would be a thousand times faster.
        assert!(unknown * 4 > known, "known {known:?}, unknown {unknown:?}");
    }
}
