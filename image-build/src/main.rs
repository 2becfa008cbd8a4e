//! `image-build`: builds Flotilla container images from TOML specs.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use flotilla_container::image::DEFAULT_STORE;
use image_build::{build, BuildOptions, DEFAULT_CACHE};

/// Builds Flotilla images.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build a container image from a spec (see image-build/README.md) and import it.
    Container {
        /// The spec file (TOML).
        spec: PathBuf,
        /// Image store to import into.
        #[arg(long, default_value = DEFAULT_STORE)]
        store: PathBuf,
        /// Also write the OCI image layout to this directory.
        #[arg(long)]
        oci_out: Option<PathBuf>,
        /// Do not import into the store (needs --oci-out).
        #[arg(long)]
        no_import: bool,
        /// Cache directory (layer tars keyed by the spec).
        #[arg(long, default_value = DEFAULT_CACHE)]
        cache: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Container {
            spec,
            store,
            oci_out,
            no_import,
            cache,
        } => {
            let opts = BuildOptions {
                spec: spec.clone(),
                store,
                oci_out,
                no_import,
                cache,
                progress: std::io::stderr().is_terminal(),
            };
            build(&opts).with_context(|| format!("building {}", spec.display()))?;
        }
    }
    Ok(())
}
