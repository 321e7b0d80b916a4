//! One file per command group; each parses its arguments (clap), calls the
//! library and renders the result through [`crate::cli::output`].

pub mod ca;
pub mod egress;
pub mod events;
pub mod gateway;
mod probe;
pub mod report;
pub mod run;
pub mod secrets;
pub mod service;
