# Shared by scripts/demo and scripts/test: say what is done, install what is missing.
# shellcheck shell=bash

step() { printf '\n==> %s\n' "$*"; }

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "run this as root: it uses namespaces, cgroups and apt-get" >&2
        exit 1
    fi
}

# ensure_packages PACKAGE ... — install the Debian packages that are not installed yet.
ensure_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        step "installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    fi
}

ensure_rust() {
    [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
    if ! command -v cargo >/dev/null 2>&1; then
        ensure_packages rustup
        step "installing the stable Rust toolchain with rustup"
        rustup default stable
    fi
    if command -v rustup >/dev/null 2>&1; then
        local c
        for c in rustfmt clippy; do
            if ! rustup component list --installed 2>/dev/null | grep -q "^$c"; then
                step "adding Rust component $c"
                rustup component add "$c"
            fi
        done
    fi
}

# build_static — the host image's binaries (flotilla-init, unitctl, fleetd, fleetctl),
# statically linked, into target/static/x86_64-unknown-linux-gnu/release (image-build's
# default bin_dir). The recipe is defined once, in image-build's static_build module:
# `image-build static-binaries` prints the cargo command it runs, then runs it
# (qemu_tests::static_binaries() runs the same).
build_static() {
    step "building static flotilla-init, unitctl, fleetd and fleetctl (image-build static-binaries)"
    cargo run --locked -q -p image-build -- static-binaries
}
