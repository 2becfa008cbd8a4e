//! Flotilla unit files: the TOML format, its validation with precise errors, templates and
//! `%` specifiers, loading unit directories, and the ordering graph.
//!
//! Pure: the only I/O is reading files in [`Catalog::load_dirs`]. See `README.md` for the
//! format reference.

// `UnitError` is a plain public struct by design (other crates read its fields); errors are
// rare, so the size of `Result<_, UnitError>` does not matter.
#![allow(clippy::result_large_err)]

mod catalog;
mod error;
mod graph;
mod model;
mod names;
mod parse;
mod pin;
mod specifier;
mod store_name;
mod template;
mod text;
mod values;

pub use catalog::Catalog;
pub use error::UnitError;
pub use graph::{break_cycles, format_cycle, order_predecessors, ordering_cycles, predecessor_map};
pub use model::*;
pub use names::{Capability, NetworkMode, PullPolicy, RlimitResource, UnknownName};
pub use parse::{check_name, parse_unit, split_instance, API_FILE_LABEL, MAX_NAME_LEN};
pub use pin::{pin_image, pinned_digest, sha256_hex, wants_pin, PinError};
pub use store_name::{digest_tag, split_reference, ReferenceParts};
pub use template::Template;
pub use text::{decode_unit_text, read_unit_file};
pub use values::parse_duration;
