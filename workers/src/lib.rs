//! The deployable Switchyard app: the reference consumers and their routes (`app`), the command
//! line of the `switchyard` binary (`cli`), its long-running roles (`roles`) and its load
//! generator (`bench`), and `switchyard jobs` (`jobs_cmd`).

pub mod app;
pub mod bench;
pub mod cli;
pub mod edge;
pub mod jobs_cmd;
pub mod roles;
