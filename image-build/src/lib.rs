//! Builds Flotilla container images from a TOML spec: a root filesystem from debootstrap,
//! a few Debian packages, or a directory; then a deterministic layer tar (cached), an OCI
//! image layout, and an import into the local image store. Also the bootable host image
//! ([`os`]): a Debian kernel, a deterministic initramfs, a read-only erofs root
//! ([`hostroot`], [`disk`]), an empty ext4 `/var` and the QEMU arguments to boot them.

//!
//! The crate root only declares the modules and re-exports the public surface: errors in
//! `error`, progress output in `progress`, subprocesses in [`process`], the container build
//! in [`container`], the host image in [`os`], the static build of its
//! binaries in [`static_build`].

pub mod apt;
pub mod container;
pub mod disk;
mod error;
pub mod hostroot;
pub mod initramfs;
pub mod kernel;
pub mod os;
pub mod process;
mod progress;
pub mod rootfs;
pub mod spec;
pub mod static_build;

pub use container::{build, BuildOptions, BuildOutcome, DEFAULT_CACHE};
pub use error::{BuildError, PathIoError};
pub use progress::human;
pub use spec::{Source, Spec};
