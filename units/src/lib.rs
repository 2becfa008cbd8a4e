//! Flotilla unit files. (Being written; see README.md.)
mod model;
pub use model::*;
