//! Flotilla's containers: the runtime that starts a process in its own namespaces over an
//! overlayfs root ([`runtime`]), and the local content-addressed image store ([`image`]).

pub mod image;
pub mod runtime;
