//! VeraId signature bundles, verified offline.
//!
//! [VeraId](https://veraid.net) ties a signature to a user of a domain (`alice@example.com`)
//! or to the domain's bot, through a DNSSEC-signed TXT record at `_veraid.<domain>`, the
//! organisation's certificate and the member's certificate, all carried in the bundle: a
//! verifier needs no network, only the DNSSEC trust anchors and the time.
//!
//! [`verify`] checks a bundle as the reference implementation (veraid-js 3.x) does: the
//! CMS signature and its signature metadata (service, validity period), the member
//! certificate against the organisation's, the organisation key's VeraId TXT record, the
//! DNSSEC chain of that record from the trust anchors, and that all of their validity
//! periods meet within the period asked about. It returns the signer and the plaintext.
//!
//! ```
//! use veraid::{Period, TrustAnchors, Verification, verify};
//!
//! /// The VeraId of whoever signed `bundle` for Letro within the last 90 days.
//! fn signer(bundle: &[u8], now: i64) -> Result<String, veraid::VerifyError> {
//!     let anchors = TrustAnchors::iana();
//!     let verification = Verification {
//!         service: "1.3.6.1.4.1.58708.2.0",
//!         period: Period::new(now - 90 * 86_400, now),
//!         now,
//!         anchors: &anchors,
//!     };
//!     Ok(verify(bundle, &verification)?.member.veraid_id())
//! }
//!
//! assert!(signer(b"not a bundle", 1_796_228_866).is_err());
//! ```
//!
//! Everything is pure: no I/O, no clock (the time is an input), no global state. Hostile
//! input is bounded: the bundle's size ([`MAX_BUNDLE_OCTETS`]), the DNS messages in its
//! chain ([`MAX_CHAIN_MESSAGES`]), the signature checks of one DNSSEC validation
//! ([`dnssec::MAX_SIGNATURE_CHECKS`]) and the zones it passes ([`dnssec::MAX_ZONE_DEPTH`]).
//!
//! The lower layers are public for those who need them: [`dns`] (the wire format of the
//! chain's messages) and [`dnssec`] (validation of any RRset from DS trust anchors over
//! a set of responses, within a window of time).

mod anchors;
mod asn1;
mod bundle;
mod cache;
mod cms;
pub mod dns;
pub mod dnssec;
mod pki;
mod record;
#[cfg(feature = "testing")]
pub mod testing;

pub use anchors::{AnchorError, TrustAnchors};
pub use asn1::Asn1Error;
pub use bundle::{
    MAX_BUNDLE_OCTETS, MAX_CHAIN_MESSAGES, Member, Period, SignedBy, Verification, Verified,
    Verifier, VerifyError, verify,
};
pub use record::{MAX_TTL_OVERRIDE, RecordError, VeraidRecord};
