//! The pairing domain: validated identifiers and the pairing rules as pure functions.
//!
//! Nothing here performs I/O, reads the clock or draws random numbers: callers pass in
//! `now` and secrets. This module imports nothing from the rest of the crate.

pub mod authorisation;
pub mod hex;
pub mod ids;
pub mod message;
pub mod pairing;
pub mod privacy;
pub mod refusal;
pub mod signed;

pub use authorisation::{Authorisation, AuthorityKeyId, PdaFacts};
pub use ids::{EndpointId, EventKey, VeraId};
pub use message::{MessageId, MessageKind, OutgoingMessage, Timestamp};
pub use pairing::{
    Decision, Offer, PairingMatch, PairingRequest, PendingCounts, PendingLimits, PendingRequest,
    Protocol,
};
pub use privacy::{VeraIdDigest, VeraIdDigester};
pub use refusal::Refusal;
