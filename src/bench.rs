//! The benchmark's parts: a cached pool of real endpoint keys, a lean keep-alive HTTP/1.1
//! load generator (closed and open loop, latency in an HDR histogram), and a sink that
//! counts and checks the matches it receives. `src/bin/letro-bench.rs` runs them against
//! the real server binary; `bench/RESULTS.md` holds the table it writes.

pub mod keys;
pub mod load;
pub mod sink;
