#![allow(unreachable_pub)]
//! Integration tests: the real server on a real socket, a temporary SQLite file, and a
//! fake sink server standing in for the Knative broker.

mod abuse;
mod authorisation;
mod cli;
mod deploy;
mod docs;
mod faults;
mod fresh_params;
mod ingress;
mod letro_2023;
mod observability;
mod ops;
mod outbox;
mod pairing;
mod replicas;
mod signed;
mod store_contract;
mod support;
mod tls_sink;
mod upgrade;
