//! Builds `guard-ebpf` for the BPF target and leaves the object in OUT_DIR,
//! where `capture` embeds it.
//!
//! Toolchain choice (see `cargo xtask setup`): `KT_EBPF_TOOLCHAIN` when set;
//! else a rustup toolchain named `debian` (Debian's rustc with its library
//! source, linked by setup; it needs `RUSTC_BOOTSTRAP=1` for `-Z build-std`);
//! else the default toolchain, which must then be a nightly with `rust-src`.

use std::process::Command;

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn has_toolchain(name: &str) -> bool {
    Command::new("rustup")
        .args(["run", name, "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=KT_EBPF_TOOLCHAIN");
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("guard has no parent directory"))?
        .join("guard-ebpf");
    // aya-build only rebuilds when told; the common crate is part of the object too.
    println!("cargo:rerun-if-changed={}", ebpf_dir.display());
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?
        .to_owned();

    let chosen = std::env::var("KT_EBPF_TOOLCHAIN")
        .ok()
        .filter(|t| !t.is_empty())
        .or_else(|| has_toolchain("debian").then(|| "debian".to_owned()));
    let toolchain = match chosen.as_deref() {
        Some(name) => {
            // Lets a stable rustc take `-Z build-std=core`; scoped to this
            // build script's own children.
            // SAFETY: this build script runs no other threads.
            unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
            Toolchain::Custom(name)
        }
        None => Toolchain::default(),
    };
    let package = Package {
        name: "guard-ebpf",
        root_dir: &root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], toolchain).context(
        "building the eBPF object failed; run `cargo xtask setup` to install the toolchain it needs",
    )
}
