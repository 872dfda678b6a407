//! Builds the example rooms in `examples/` as WebAssembly components.
//!
//! The host embeds `sharding.wasm` as its built-in default room, and the
//! end-to-end tests load the others from `PARTYHOST_EXAMPLES_DIR`. The guest
//! build runs a nested cargo with its own target directory
//! (`target/guest`), so it never waits on the lock of the outer build.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Example crates built for the host and its tests.
const EXAMPLES: &[&str] = &[
    "sharding", "echo", "chat", "faulty", "not-a-room", "counter", "presence", "auth",
];

const GUEST_TARGET: &str = "wasm32-wasip2";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir.parent().expect("the host crate sits inside the workspace");
    for watched in ["examples", "guest-sdk", "wit", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", workspace.join(watched).display());
    }

    let target_dir = workspace.join("target").join("guest");
    build_examples(workspace, &target_dir);

    let wasm_dir = target_dir.join(GUEST_TARGET).join("release");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let default_room = wasm_dir.join("sharding.wasm");
    std::fs::copy(&default_room, out_dir.join("sharding.wasm"))
        .unwrap_or_else(|err| panic!("failed to copy {}: {err}", default_room.display()));
    println!("cargo:rustc-env=PARTYHOST_EXAMPLES_DIR={}", wasm_dir.display());
}

fn build_examples(workspace: &Path, target_dir: &Path) {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(workspace)
        .args(["build", "--release", "--target", GUEST_TARGET, "--target-dir"])
        .arg(target_dir);
    for example in EXAMPLES {
        command.args(["-p", example]);
    }
    // Flags meant for the native build must not reach the guest build.
    for variable in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_TARGET_DIR", "CARGO_BUILD_TARGET"] {
        command.env_remove(variable);
    }

    let output = command
        .output()
        .unwrap_or_else(|err| panic!("failed to run cargo for the example rooms: {err}"));
    if !output.status.success() {
        panic!(
            "building the example rooms for {GUEST_TARGET} failed (is the target installed? \
             `rustup target add {GUEST_TARGET}`):\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
