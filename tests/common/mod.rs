//! Helpers shared by the integration tests: running the `vmm` binary and
//! deciding what to do when the host has no KVM.

#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A `Command` for the `vmm` binary built for these tests.
pub fn vmm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmm"));
    c.env_remove("RUST_LOG").env_remove("VMM_KVM_DEVICE");
    c
}

/// Run `vmm` with `args` and capture everything.
pub fn run(args: &[&str]) -> Output {
    vmm().args(args).output().expect("spawn vmm")
}

/// Whether the tests that boot a guest can run. Without `/dev/kvm` they
/// say so loudly and are skipped — except on CI (`CI=true`), where a
/// missing KVM is a failure.
pub fn kvm_available() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("/dev/kvm is missing on CI: the boot tests cannot run, and that is a failure");
    }
    eprintln!("*** SKIPPED: /dev/kvm does not exist on this host; the tests that boot a guest did not run ***");
    false
}

/// Text of stdout.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Text of stderr.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A fresh temporary file path unique to this test process.
pub fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir.join(name)
}

/// Assert the process exited with `code`, showing its output otherwise.
#[track_caller]
pub fn assert_exit(o: &Output, code: i32) {
    assert_eq!(o.status.code(), Some(code), "exit status\n--- stdout:\n{}\n--- stderr:\n{}", stdout(o), stderr(o));
}

/// The last line of stderr: the one-line error.
pub fn error_line(o: &Output) -> String {
    stderr(o).lines().last().unwrap_or_default().to_string()
}

/// Run the `vmm` binary with `args` plus `--stats-json` into a temporary
/// file called `name`: the output, and the JSON (`null` when none was
/// written). Counts are read from here, never from `--stats` text.
pub fn stats_json(args: &[&str], name: &str) -> (Output, serde_json::Value) {
    let json = temp_path(name);
    let mut all = args.to_vec();
    all.extend_from_slice(&["--stats-json", json.to_str().unwrap()]);
    let o = run(&all);
    let v = serde_json::from_str(&std::fs::read_to_string(&json).unwrap_or_default()).unwrap_or_default();
    (o, v)
}
