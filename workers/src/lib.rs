//! The deployable Switchyard app: the reference consumers and their routes (`app`), the command
//! line of the `switchyard` binary (`cli`) and its long-running roles (`roles`).

pub mod app;
pub mod cli;
pub mod roles;
