//! Switchyard's application API, free of IO: the message values and ASGI 1.0 message types,
//! their codecs, channel-name rules, the router, the consumer traits and the context a worker
//! runs them with, and a test client. Nothing here touches a socket, Redis or a runtime, so user
//! code and its unit tests build fast and the framework crate (`switchyard`) depends on this one,
//! never the reverse.

pub mod asgi;
pub mod codec;
pub mod consumer;
pub mod csrf;
pub mod durable;
pub mod generic;
pub mod message;
pub mod names;
pub mod router;
pub mod settle;
pub mod testing;
pub mod value;

pub use consumer::{Action, BoxFuture, ConsumerError, Ctx, Handler, HttpSession, Kwargs};
pub use csrf::csrf_protect;
pub use durable::DurablePolicy;
pub use generic::{Json, JsonWebsocketConsumer, WebsocketConsumer, route_class, route_json};
pub use message::Message;
pub use router::{Resolved, Route, RouteError, RouteOptions, Router, include, route};
pub use value::{ByteString, Map, Value};
