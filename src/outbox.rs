//! Delivery of committed messages to the sink: at least once, oldest first, with stable
//! ids, retried with capped exponential backoff until their expiry.

pub mod backoff;
pub mod dispatcher;
pub mod sink;

pub use backoff::Backoff;
pub use dispatcher::{DispatchReport, Dispatcher};
pub use sink::{DeliveryError, HttpSink};
