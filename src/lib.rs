//! letro-server: the contact-pairing broker of Letro, on the Awala network.
//!
//! Module map (ARCHITECTURE.md has the dependency rule and a walkthrough):
//! - [`codec`]: wire formats (CloudEvents, pairing texts, Awala DER); pure.
//! - [`domain`]: identifiers and the pairing rules; pure.
//! - [`bundles`]: verification of signed pairing requests' VeraId bundles.
//! - [`flow`]: what a pairing request does to its pair, planned once for every backend; pure.
//! - [`store`]: the [`store::Store`] trait and its SQLite and PostgreSQL implementations.
//! - [`http`]: ingress, readiness, metrics, the status mapping.
//! - [`outbox`]: the dispatcher, the HTTP sink, backoff.
//! - [`cli`], [`config`], [`telemetry`], [`clock`]: the edges.
//! - [`app`]: the wiring; [`admin`]: the operator's commands; [`demo`]: two users pairing.
//! - [`fuzz`]: the properties the fuzz targets check.

pub mod admin;
pub mod app;
pub mod bundles;
pub mod cli;
pub mod client;
pub mod clock;
pub mod codec;
pub mod config;
pub mod demo;
pub mod domain;
pub mod flow;
pub mod fuzz;
pub mod http;
pub mod outbox;
pub mod store;
pub mod telemetry;
