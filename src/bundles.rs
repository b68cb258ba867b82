//! VeraId bundles of signed pairing requests: verified for Letro, as letro-server does
//! (service OID 1.3.6.1.4.1.58708.2.0, valid at some point in the last 90 days), from
//! the configured trust anchors.

use std::time::Duration;

use veraid::{Period, TrustAnchors, Verified, Verifier, VerifyError};

use crate::domain::Timestamp;

/// Letro's VeraId service OID.
pub const LETRO_SERVICE_OID: &str = "1.3.6.1.4.1.58708.2.0";

/// How far back a signature may have been valid: letro-server's window, and the one
/// Letro for Android verifies the forwarded bundles with.
pub const VERIFICATION_WINDOW: Duration = Duration::from_secs(90 * 86_400);

/// Verifies the bundles of signed pairing requests, remembering each organisation's
/// verified DNSSEC chain and certificate, and each member certificate, within their
/// validity (`veraid::Verifier`): every member of an organisation carries the same
/// chain, and checking it again for each request would be most of the cost.
#[derive(Debug)]
pub struct BundleVerifier {
    verifier: Verifier,
}

impl BundleVerifier {
    /// A verifier that trusts `anchors`.
    pub fn new(anchors: TrustAnchors) -> Self {
        Self {
            verifier: Verifier::new(anchors),
        }
    }

    /// The trust anchors.
    pub fn anchors(&self) -> &TrustAnchors {
        self.verifier.anchors()
    }

    /// Verifies `bundle` as at `now`.
    pub fn verify(&self, bundle: &[u8], now: Timestamp) -> Result<Verified, VerifyError> {
        let now = now.0.div_euclid(1000);
        let window = i64::try_from(VERIFICATION_WINDOW.as_secs()).unwrap_or(i64::MAX);
        self.verifier.verify(
            bundle,
            LETRO_SERVICE_OID,
            Period::new(now.saturating_sub(window), now),
            now,
        )
    }
}
