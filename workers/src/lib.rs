//! The deployable Switchyard app: the command line (`cli`) and, alongside it, the reference
//! consumers that the `switchyard` binary serves (chat rooms, echo, relay, background jobs).

pub mod bench;
pub mod cli;
