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
    /// The message failed together with the others its handler held (an exec child wrote a line that
    /// is no reply, ended, or was restarted after a timeout; a web service's connection broke): it is
    /// not known to be this message's fault, so the step tries it again alone before it counts as an
    /// attempt (`Step::run_into`).
    pub suspect: bool,
    /// How long the other side asked to be left alone (an HTTP `Retry-After`), instead of the backoff.
    pub retry_after: Option<Duration>,
}

impl StepError {
    pub fn permanent(message: impl Into<String>) -> StepError {
        StepError {
            message: message.into(),
            retryable: false,
            suspect: false,
            retry_after: None,
        }
    }

    pub fn transient(message: impl Into<String>) -> StepError {
        StepError {
            message: message.into(),
            retryable: true,
            suspect: false,
            retry_after: None,
        }
    }

    /// A failure shared with the other messages a handler held: see `suspect`.
    pub fn suspect(message: impl Into<String>) -> StepError {
        StepError {
            suspect: true,
            ..StepError::transient(message)
        }
    }
}

/// The longest `Retry-After` honoured: a message is held (and kept from redelivery) meanwhile.
const LONGEST_RETRY_AFTER: Duration = Duration::from_secs(600);

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
}

impl<'a> Retrying<'a> {
    pub fn new(policy: &'a RetryConfig, who: &'a str) -> Retrying<'a> {
        Retrying {
            policy,
            who,
            attempts: 1,
        }
    }

    /// After a failed attempt: Ok once it is time for the next one, or the reason to give up.
    // A loop around an attempt rather than a function taking the attempt as a closure: an async
    // closure borrowing the message makes the caller's future lose `Send` (a rustc limitation).
    pub async fn after(&mut self, error: StepError) -> Result<(), GaveUp> {
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

/// `1.5s`, `250ms`: short and exact enough for error messages.
pub(crate) fn humanize(d: Duration) -> String {
    if d.as_millis() < 1000 {
        format!("{}ms", d.as_millis())
    } else if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}
