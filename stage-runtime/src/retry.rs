//! Attempts and retries: how a step or a sink that failed on a message tries it again.

use std::time::Duration;

use switchyard_crds::unit::RetryConfig;

/// Why one attempt at a message failed.
#[derive(Clone, Debug, PartialEq)]
pub struct StepError {
    pub message: String,
    /// Worth another attempt: the same input might succeed later (a handler's error, a 503), unlike a
    /// jq error on the same JSON.
    pub retryable: bool,
    /// The exec child died while it held the message: the message is not to blame, so this does not use
    /// up an attempt.
    pub child_exited: bool,
    /// How long the other side asked to be left alone (an HTTP `Retry-After`), instead of the backoff.
    pub retry_after: Option<Duration>,
}

impl StepError {
    pub fn permanent(message: impl Into<String>) -> StepError {
        StepError {
            message: message.into(),
            retryable: false,
            child_exited: false,
            retry_after: None,
        }
    }

    pub fn transient(message: impl Into<String>) -> StepError {
        StepError {
            message: message.into(),
            retryable: true,
            child_exited: false,
            retry_after: None,
        }
    }
}

/// The longest `Retry-After` honoured: a message is held (and kept from redelivery) meanwhile.
const LONGEST_RETRY_AFTER: Duration = Duration::from_secs(600);

/// How often a message whose exec child died under it is tried again on the restarted child before it
/// counts as a failed attempt: a message that kills its handler every time must not loop forever.
const CHILD_EXIT_RETRIES: u32 = 3;

/// The last error of a message that used up its attempts (or failed for good), and how many it had.
#[derive(Debug)]
pub struct GaveUp {
    pub error: StepError,
    pub attempts: u32,
}

/// The retry policy of one message at one step or sink: after each failed attempt it says whether to
/// try again (and waits the backoff first) or to give up.
pub struct Retrying<'a> {
    policy: &'a RetryConfig,
    /// The step or sink, for logs.
    who: &'a str,
    attempts: u32,
    child_exits: u32,
}

impl<'a> Retrying<'a> {
    pub fn new(policy: &'a RetryConfig, who: &'a str) -> Retrying<'a> {
        Retrying {
            policy,
            who,
            attempts: 1,
            child_exits: 0,
        }
    }

    /// After a failed attempt: Ok once it is time for the next one, or the reason to give up.
    // A loop around an attempt rather than a function taking the attempt as a closure: an async
    // closure borrowing the message makes the caller's future lose `Send` (a rustc limitation).
    pub async fn after(&mut self, error: StepError) -> Result<(), GaveUp> {
        if error.child_exited && self.child_exits < CHILD_EXIT_RETRIES {
            self.child_exits += 1;
            tracing::debug!(who = %self.who, "handler exited while holding a message; trying it again");
            return Ok(());
        }
        if error.retryable && self.attempts < self.policy.max_attempts {
            let delay = match error.retry_after {
                Some(asked) => asked.min(LONGEST_RETRY_AFTER),
                None => self.policy.delay_after(self.attempts),
            };
            tracing::debug!(who = %self.who, attempt = self.attempts, error = %error.message, ?delay, "failed; retrying");
            tokio::time::sleep(delay).await;
            self.attempts += 1;
            return Ok(());
        }
        Err(GaveUp {
            error,
            attempts: self.attempts,
        })
    }
}
