//! VeraId signature bundles, verified offline.
//!
//! [VeraId](https://veraid.net) ties a signature to a user of a domain (`alice@example.com`)
//! or to the domain's bot, through a DNSSEC-signed TXT record at `_veraid.<domain>`, the
//! organisation's certificate and the member's certificate, all carried in the bundle: a
//! verifier needs no network, only the DNSSEC trust anchors and the time.
//!
//! This crate is being built in layers, each pure and bounded against hostile input:
//!
//! - [`dns`]: the DNS wire format that a bundle's DNSSEC chain is made of (messages,
//!   DNSKEY/DS/RRSIG/TXT data, key tags, DS digests, what an RRSIG signs).
//! - [`dnssec`]: validation of an RRset from DS trust anchors over the responses a chain
//!   carries, within a window of time, with every DNSSEC algorithm of RFC 8624 but the
//!   deprecated ones, and a bounded number of signature checks.
//!
//! The certificates, the CMS signature and the bundle-level `verify` come next (see the
//! workspace's issue tracker).

pub mod dns;
pub mod dnssec;
