//! The reference Switchyard app: its consumers and routes (`app`) and its load generator
//! (`bench`). The `switchyard` binary is [`switchyard::run::App`] on these routes plus `bench`.

pub mod app;
pub mod bench;
