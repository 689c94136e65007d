//! Builds the freestanding guest kernel (`guest/kernel`) and embeds it.
//!
//! The guest is built by a nested `cargo build` with the flags of
//! `docs/host.md` (static, kernel code model, no red zone, no SSE, our
//! linker script), in a target directory of its own, `<target>/guest-build`,
//! shared by every profile and tool of the outer build (`cargo clippy`,
//! `cargo test`, `--release`: the guest is always built the same way, so
//! it is built once). The ELF is
//! exposed to the crate as `GUEST_KERNEL_ELF` (for `include_bytes!`) and
//! copied to `target/guest/guest-kernel.elf` for people and tools.
//!
//! The child inherits the outer build's environment, so everything that
//! would leak into it (`RUSTFLAGS`, the target dir, clippy's wrapper) is
//! removed and `CARGO_ENCODED_RUSTFLAGS` is set explicitly.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let root = manifest_dir.parent().expect("workspace root").to_path_buf();
    let kernel_dir = root.join("guest/kernel");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let guest_target = target_dir_of(&out_dir).map_or_else(|| out_dir.join("guest-target"), |t| t.join("guest-build"));

    for p in ["guest/kernel/src", "guest/kernel/Cargo.toml", "guest/kernel/Cargo.lock", "guest/kernel/linker.ld"] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    for p in ["guest/abi/src", "guest/abi/Cargo.toml", "guest/mm/src", "guest/mm/Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }

    let linker_script = kernel_dir.join("linker.ld");
    let flags = [
        "-C".to_string(),
        "relocation-model=static".to_string(),
        "-C".to_string(),
        "code-model=kernel".to_string(),
        "-C".to_string(),
        "no-redzone=yes".to_string(),
        "-C".to_string(),
        "target-feature=-sse,-sse2,-avx,-avx2".to_string(),
        "-C".to_string(),
        "link-arg=-nostartfiles".to_string(),
        "-C".to_string(),
        "link-arg=-nostdlib".to_string(),
        "-C".to_string(),
        "link-arg=-static".to_string(),
        "-C".to_string(),
        format!("link-arg=-T{}", linker_script.display()),
        "-C".to_string(),
        "link-arg=-Wl,--build-id=none".to_string(),
        // The guest's own functions are checked for SSE by tests/no_sse.rs,
        // which needs their symbols: keep the symbol table.
        "-C".to_string(),
        "strip=none".to_string(),
    ]
    .join("\x1f");

    let host = env::var("HOST").expect("HOST");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let status = Command::new(cargo)
        .current_dir(&kernel_dir)
        // An explicit --target keeps the flags off build scripts and proc
        // macros, which run on the host and must stay ordinary binaries.
        .args(["build", "--release", "--target", &host])
        .arg("--target-dir")
        .arg(&guest_target)
        .env("CARGO_ENCODED_RUSTFLAGS", flags)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO_PRIMARY_PACKAGE")
        .status()
        .expect("failed to run cargo for the guest kernel");
    if !status.success() {
        panic!("building the guest kernel failed ({status}); see the output above");
    }

    let built = guest_target.join(&host).join("release/guest-kernel");
    let embedded = out_dir.join("guest-kernel.elf");
    std::fs::copy(&built, &embedded).expect("copy guest kernel into OUT_DIR");
    println!("cargo:rustc-env=GUEST_KERNEL_ELF={}", embedded.display());

    if let Some(target_dir) = target_dir_of(&out_dir) {
        let stable = target_dir.join("guest");
        if std::fs::create_dir_all(&stable).is_ok() {
            // Best effort: the stable copy is a convenience, the embedded
            // one is what the VMM runs.
            let _ = std::fs::copy(&built, stable.join("guest-kernel.elf"));
        }
    }
}

/// The Cargo target directory that holds `out_dir`
/// (`<target>/[<triple>/]<profile>/build/<pkg>-<hash>/out`).
fn target_dir_of(out_dir: &Path) -> Option<PathBuf> {
    let build = out_dir.ancestors().find(|p| p.file_name().is_some_and(|n| n == "build"))?;
    let mut dir = build.parent()?.parent()?;
    if let Ok(triple) = env::var("TARGET")
        && dir.file_name().is_some_and(|n| n == triple.as_str())
    {
        dir = dir.parent()?;
    }
    Some(dir.to_path_buf())
}
