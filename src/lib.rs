//! Switchyard: a channel-layer realtime server in the shape of Django Channels 1.x (daphne +
//! asgi_redis + runworker), in Rust.
//!
//! This crate is the framework: the channel layer ([`layer`]: in-memory and Redis backends,
//! process inboxes) and, in their own modules, the interface server, the worker runtime, the
//! CLI and the Django integration ([`django`], feature `django`, on by default: web sessions). The IO-free application API (messages, codecs, names, router, consumers) lives in
//! [`switchyard_routing`], re-exported here as [`routing`].

#[cfg(feature = "django")]
pub mod django;
pub mod jobs;
pub mod layer;
pub mod prometheus;
#[cfg(feature = "cli")]
pub mod run;
pub mod server;
pub mod worker;

pub use switchyard_routing as routing;
pub use switchyard_routing::{ByteString, Map, Value, asgi, codec, names};
