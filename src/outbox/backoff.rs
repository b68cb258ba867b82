//! Capped exponential backoff with jitter.

use std::time::Duration;

/// Delay before retry number `attempt` (1 for the first retry): `base * 2^(attempt-1)`,
/// capped, then jittered into its upper half so that retries of many messages spread
/// out without ever retrying sooner than half the nominal delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Nominal delay of the first retry.
    pub base: Duration,
    /// Longest delay.
    pub cap: Duration,
}

impl Backoff {
    /// The delay before retry `attempt`, with `jitter` in `[0, 1)`.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(32);
        let nominal = self
            .base
            .checked_mul(1u32 << exponent.min(31))
            .unwrap_or(self.cap)
            .min(self.cap);
        let half = nominal / 2;
        half + half.mul_f64(jitter.clamp(0.0, 1.0))
    }

    /// The delay before retry `attempt`, honouring a `Retry-After` the sink sent, but
    /// never waiting longer than the cap.
    pub fn delay_with_hint(
        &self,
        attempt: u32,
        jitter: f64,
        retry_after: Option<Duration>,
    ) -> Duration {
        let delay = self.delay(attempt, jitter);
        match retry_after {
            Some(hint) => delay.max(hint.min(self.cap)),
            None => delay,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const B: Backoff = Backoff {
        base: Duration::from_millis(100),
        cap: Duration::from_secs(10),
    };

    #[test]
    fn doubles_then_caps() {
        assert_eq!(B.delay(1, 1.0), Duration::from_millis(100));
        assert_eq!(B.delay(2, 1.0), Duration::from_millis(200));
        assert_eq!(B.delay(4, 1.0), Duration::from_millis(800));
        assert_eq!(B.delay(20, 1.0), Duration::from_secs(10));
        assert_eq!(B.delay(u32::MAX, 1.0), Duration::from_secs(10));
        assert_eq!(B.delay(1, 0.0), Duration::from_millis(50));
    }

    #[test]
    fn retry_after_is_honoured_up_to_the_cap() {
        assert_eq!(
            B.delay_with_hint(1, 1.0, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
        assert_eq!(
            B.delay_with_hint(1, 1.0, Some(Duration::from_secs(60))),
            Duration::from_secs(10)
        );
        assert_eq!(
            B.delay_with_hint(1, 1.0, Some(Duration::ZERO)),
            Duration::from_millis(100)
        );
    }

    proptest! {
        #[test]
        fn bounded(attempt in 0u32..100, jitter in 0.0f64..1.0) {
            let d = B.delay(attempt, jitter);
            prop_assert!(d <= B.cap);
            prop_assert!(d >= B.base / 2);
            prop_assert!(B.delay(attempt + 1, 1.0) >= B.delay(attempt, 1.0));
        }
    }
}
