//! Switchyard's application API, free of IO: the message values and ASGI 1.0 message types,
//! their codecs, channel-name rules, and (in later modules) the router and consumer traits that a
//! worker runs. Nothing here touches a socket, Redis or a runtime, so user code and its unit tests
//! build fast and the framework crate (`switchyard`) depends on this one, never the reverse.

pub mod asgi;
pub mod codec;
pub mod names;
pub mod value;

pub use value::{ByteString, Map, Value};
