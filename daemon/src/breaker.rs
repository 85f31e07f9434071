//! A circuit breaker per model: consecutive failures (loads or generations)
//! open it and requests fail fast; after a cooldown one trial request is let
//! through (half-open); its success closes the breaker, its failure opens it
//! again. Pure: the caller passes the time.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

/// What to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Allow,
    /// Let it through as the half-open trial.
    Trial,
    /// Fail fast; the breaker half-opens after this long.
    Reject {
        retry_in: Duration,
    },
}

#[derive(Debug, Clone)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    failures: u32,
    open_until: Option<Instant>,
    trial_in_flight: bool,
    /// The last failure's message (for the fail-fast error).
    last_error: Option<String>,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            failures: 0,
            open_until: None,
            trial_in_flight: false,
            last_error: None,
        }
    }

    pub fn state(&self, now: Instant) -> State {
        match self.open_until {
            None => State::Closed,
            Some(t) if now < t => State::Open,
            Some(_) => State::HalfOpen,
        }
    }

    pub fn admit(&mut self, now: Instant) -> Admission {
        match self.state(now) {
            State::Closed => Admission::Allow,
            State::Open => Admission::Reject {
                retry_in: self.open_until.map_or(Duration::ZERO, |t| t - now),
            },
            State::HalfOpen if self.trial_in_flight => Admission::Reject {
                retry_in: Duration::ZERO,
            },
            State::HalfOpen => {
                self.trial_in_flight = true;
                Admission::Trial
            }
        }
    }

    /// Time until the breaker half-opens (`None` unless open).
    pub fn admit_preview(&self, now: Instant) -> Option<std::time::Duration> {
        match self.open_until {
            Some(t) if now < t => Some(t - now),
            _ => None,
        }
    }

    /// A request (or load) succeeded: close.
    pub fn success(&mut self) {
        self.failures = 0;
        self.open_until = None;
        self.trial_in_flight = false;
        self.last_error = None;
    }

    /// A request (or load) failed. Returns `true` if this opened the breaker.
    pub fn failure(&mut self, now: Instant, message: &str) -> bool {
        self.last_error = Some(message.to_owned());
        let was_open = self.open_until.is_some();
        self.trial_in_flight = false;
        self.failures = self.failures.saturating_add(1);
        if was_open || self.failures >= self.threshold {
            // A failed trial re-opens for another cooldown.
            self.open_until = Some(now + self.cooldown);
            return !was_open || self.failures >= self.threshold;
        }
        false
    }

    /// A trial that ended without a verdict (cancelled): let another try.
    pub fn release_trial(&mut self) {
        self.trial_in_flight = false;
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }

    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_half_opens_after_cooldown_closes_on_success() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let mut b = Breaker::new(3, Duration::from_secs(10));
        assert_eq!(b.admit(t0), Admission::Allow);
        assert!(!b.failure(s(0), "boom"));
        assert!(!b.failure(s(1), "boom"));
        assert_eq!(b.state(s(1)), State::Closed);
        assert!(b.failure(s(2), "boom"), "the third failure opens it");
        assert_eq!(b.state(s(3)), State::Open);
        assert_eq!(
            b.admit(s(3)),
            Admission::Reject {
                retry_in: Duration::from_secs(9)
            }
        );
        assert_eq!(b.last_error(), Some("boom"));
        // After the cooldown: one trial, others still rejected.
        assert_eq!(b.state(s(12)), State::HalfOpen);
        assert_eq!(b.admit(s(12)), Admission::Trial);
        assert!(matches!(b.admit(s(12)), Admission::Reject { .. }));
        b.success();
        assert_eq!(b.state(s(12)), State::Closed);
        assert_eq!(b.admit(s(12)), Admission::Allow);
        assert_eq!(b.consecutive_failures(), 0);
    }

    #[test]
    fn a_failed_trial_reopens_and_a_success_resets_the_count() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let mut b = Breaker::new(2, Duration::from_secs(5));
        b.failure(s(0), "a");
        b.success();
        b.failure(s(1), "b");
        assert_eq!(b.state(s(1)), State::Closed, "the count restarted");
        b.failure(s(2), "c");
        assert_eq!(b.state(s(3)), State::Open);
        assert_eq!(b.admit(s(7)), Admission::Trial);
        b.failure(s(7), "d");
        assert_eq!(b.state(s(8)), State::Open);
        assert_eq!(b.state(s(12)), State::HalfOpen);
        // A trial that is cancelled lets the next request try.
        assert_eq!(b.admit(s(12)), Admission::Trial);
        b.release_trial();
        assert_eq!(b.admit(s(12)), Admission::Trial);
    }
}
