//! The deployable Switchyard app: the reference consumers and their routes (`app`), and the
//! command line of the `switchyard` binary (`cli`).

pub mod app;
pub mod cli;
