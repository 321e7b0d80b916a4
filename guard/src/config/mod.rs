//! Configuration: the typed model and its YAML loader. Pure: no I/O beyond
//! the caller handing in the text.

mod model;

pub use model::*;
