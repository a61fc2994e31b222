//! What the operator remembers between reconciles, in this process only: names claimed, when each
//! Pipeline was last re-sent in full, credentials read from Secrets, the autoscaler's decisions.
//! Below `context.rs`, which holds one of each.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use switchyard_platform::credentials::NatsCredentials;

use crate::plan;

/// Everything is applied again this often (spread over ten more minutes per Pipeline).
pub const RESYNC: Duration = Duration::from_secs(3600);
/// A credentials Secret is read again after this long, so that a rotated one is picked up without
/// one API request per reconcile.
pub const CREDENTIALS_TTL: Duration = Duration::from_secs(300);

/// A mutex's guard, also after a thread panicked holding it: what it guards is a cache or a
/// record the next reconcile makes whole again.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// In-process claims on object names, so that two Pipelines reconciled at the same moment cannot both
/// create one name before either appears in a cache.
#[derive(Default)]
pub struct Claims {
    names: Mutex<HashMap<ClaimedName, Claimant>>,
}

/// The Pipeline that claimed a name first.
#[derive(Debug, PartialEq, Eq)]
pub struct ClaimedBy {
    pub pipeline: String,
}

impl std::fmt::Display for ClaimedBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pipeline {}", self.pipeline)
    }
}

/// (kind, namespace, name)
type ClaimedName = (&'static str, String, String);
/// (the Pipeline's uid, its name)
type Claimant = (String, String);

impl Claims {
    pub(super) fn claim(
        &self,
        kind: &'static str,
        namespace: &str,
        name: &str,
        uid: &str,
        pipeline: &str,
    ) -> Result<(), ClaimedBy> {
        let mut names = lock(&self.names);
        let key = (kind, namespace.to_string(), name.to_string());
        match names.get(&key) {
            Some((holder, holder_name)) if holder != uid => Err(ClaimedBy {
                pipeline: holder_name.clone(),
            }),
            _ => {
                names.insert(key, (uid.to_string(), pipeline.to_string()));
                Ok(())
            }
        }
    }

    /// Forgets what `uid` claimed, except the names in `keep`.
    pub fn release(&self, uid: &str, keep: &[String]) {
        let mut names = lock(&self.names);
        names.retain(|(_, _, name), (holder, _)| holder != uid || keep.contains(name));
    }
}

/// When each Pipeline last had everything re-sent.
#[derive(Default)]
pub struct Resyncs {
    last: Mutex<HashMap<String, Instant>>,
}

impl Resyncs {
    /// Whether `uid` is due for a full apply; the first look only starts its clock, so that an
    /// operator restart re-sends nothing that is current.
    pub(super) fn due(&self, uid: &str) -> bool {
        let mut last = lock(&self.last);
        let spread = u64::from_str_radix(&plan::checksum(uid), 16).unwrap_or_default();
        let jitter = Duration::from_secs(spread % 600);
        match last.get(uid) {
            None => {
                last.insert(uid.to_string(), Instant::now());
                false
            }
            Some(at) if at.elapsed() >= RESYNC + jitter => {
                last.insert(uid.to_string(), Instant::now());
                true
            }
            Some(_) => false,
        }
    }

    pub fn forget(&self, uid: &str) {
        lock(&self.last).remove(uid);
    }
}

#[derive(Default)]
pub struct CredentialsCache {
    entries: Mutex<HashMap<(String, String), (Instant, NatsCredentials)>>,
}

impl CredentialsCache {
    pub(super) fn get(&self, key: &(String, String)) -> Option<NatsCredentials> {
        let entries = lock(&self.entries);
        entries
            .get(key)
            .filter(|(at, _)| at.elapsed() < CREDENTIALS_TTL)
            .map(|(_, creds)| creds.clone())
    }

    pub(super) fn put(&self, key: (String, String), creds: NatsCredentials) {
        let mut entries = lock(&self.entries);
        entries.insert(key, (Instant::now(), creds));
    }
}

/// The latest decision for one switcher.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaleRecord {
    pub desired: u32,
    /// When the replicas last changed (None: not since the operator started).
    pub last_scale_time: Option<Time>,
    /// Why they changed, or why they hold.
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_claim_on_a_name_wins_until_released() {
        let claims = Claims::default();
        assert!(claims.claim("ConfigMap", "ns", "a-b-c", "u1", "a").is_ok());
        assert!(claims.claim("ConfigMap", "ns", "a-b-c", "u1", "a").is_ok());
        assert_eq!(
            claims.claim("ConfigMap", "ns", "a-b-c", "u2", "a-b"),
            Err(ClaimedBy {
                pipeline: "a".into()
            })
        );
        assert!(claims
            .claim("Deployment", "ns", "a-b-c", "u2", "a-b")
            .is_ok());
        claims.release("u1", &[]);
        assert!(claims
            .claim("ConfigMap", "ns", "a-b-c", "u2", "a-b")
            .is_ok());
    }

    #[test]
    fn a_resync_is_due_only_after_the_interval() {
        let resyncs = Resyncs::default();
        assert!(!resyncs.due("u1"));
        assert!(!resyncs.due("u1"));
        resyncs.last.lock().unwrap().insert(
            "u1".into(),
            Instant::now() - RESYNC - Duration::from_secs(601),
        );
        assert!(resyncs.due("u1"));
        assert!(!resyncs.due("u1"));
    }
}
