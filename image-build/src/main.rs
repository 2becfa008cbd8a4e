//! `image-build`: builds Flotilla container images from TOML specs.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use flotilla_container::image::DEFAULT_STORE;
use image_build::os::{build_os_with, OsOptions, UpdateOptions};
use image_build::static_build::{workspace_root, StaticBuild};
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
    /// Build the bootable host image (kernel, initramfs, root.img, var.img, manifest.json).
    Os {
        /// The spec file (TOML), e.g. image-build/specs/host.toml.
        spec: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// The init binary (default: BIN_DIR/flotilla-init, or `[init] binary`).
        #[arg(long)]
        init: Option<PathBuf>,
        /// Directory of the static binaries `[root] binaries` (overrides `[root] bin_dir`).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Cache directory (the kernel goes to CACHE/kernel/).
        #[arg(long, default_value = DEFAULT_CACHE)]
        cache: PathBuf,
        /// The OS version (semver): os-release VERSION_ID and the update manifest
        /// (overrides the spec's `[os] version`; default the crate version).
        #[arg(long)]
        os_version: Option<String>,
        /// Sign: write the update payload to OUT/update/ signed with this Ed25519 private
        /// key (PEM, `openssl genpkey -algorithm ed25519`) and bake its public key into
        /// the root image's /usr/lib/flotilla/update-keys/.
        #[arg(long, value_name = "KEY.pem")]
        sign: Option<PathBuf>,
    },
    /// Build the host image's binaries statically (flotilla-init, unitctl, fleetd, fleetctl)
    /// into target/static (or $FLOTILLA_STATIC_TARGET_DIR) of the workspace this image-build
    /// was built in, and print their directory (the `os --bin-dir`).
    StaticBinaries,
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
        Cmd::Os {
            spec,
            out,
            init,
            bin_dir,
            cache,
            os_version,
            sign,
        } => {
            let opts = OsOptions {
                spec: spec.clone(),
                out,
                init,
                bin_dir,
                extra: Vec::new(),
                cache,
                progress: std::io::stderr().is_terminal(),
            };
            let up = UpdateOptions { os_version, sign };
            build_os_with(&opts, &up).with_context(|| format!("building {}", spec.display()))?;
        }
        Cmd::StaticBinaries => {
            let recipe = StaticBuild::new(&workspace_root());
            println!("{}", recipe.shell_line());
            let dir = recipe.run().context("building the static binaries")?;
            println!("{}", dir.display());
        }
    }
    Ok(())
}
