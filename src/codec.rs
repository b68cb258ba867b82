//! Wire formats, as pure functions over bytes: CloudEvents in HTTP binary and structured
//! mode, the pairing message texts, the signed pairing protocol's DER, Awala keys in DER, and RFC 3339 timestamps.
//!
//! Imports no framework types (no axum, reqwest or database types); may use `domain`.

pub mod awala;
pub mod cloudevent;
pub mod connparams;
pub mod contact_pairing;
pub mod pairing;
pub mod timestamp;
