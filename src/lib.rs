//! letro-server: the contact-pairing broker of Letro, on the Awala network.
//!
//! Module map (see ARCHITECTURE.md for the dependency rule and a walkthrough):
//! - [`codec`]: wire formats (CloudEvents, pairing texts, Awala DER); pure.
//! - [`domain`]: identifiers and pairing rules; pure.

pub mod codec;
pub mod domain;
