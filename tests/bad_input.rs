//! Bad input: each gets a one-line error and a non-zero exit, never a
//! panic. None of these needs KVM except the permission check, because the
//! VMM validates its input before it opens `/dev/kvm`.

mod common;
use common::*;
use std::process::Output;

/// A minimal ELF64 with one PT_LOAD segment of `memsz` bytes at physical
/// `paddr`, linked at the kernel window, for machine `machine`.
fn elf(machine: u16, paddr: u64, memsz: u64) -> Vec<u8> {
    let vaddr = 0xffff_ffff_8000_0000u64.wrapping_add(paddr);
    let mut b = vec![0u8; 0x200];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2; // 64-bit
    b[5] = 1; // little-endian
    b[6] = 1;
    b[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    b[18..20].copy_from_slice(&machine.to_le_bytes());
    b[20..24].copy_from_slice(&1u32.to_le_bytes());
    b[24..32].copy_from_slice(&vaddr.to_le_bytes()); // entry
    b[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    b[52..54].copy_from_slice(&64u16.to_le_bytes());
    b[54..56].copy_from_slice(&56u16.to_le_bytes());
    b[56..58].copy_from_slice(&1u16.to_le_bytes());
    let p = &mut b[64..120];
    p[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    p[4..8].copy_from_slice(&5u32.to_le_bytes());
    p[8..16].copy_from_slice(&0x100u64.to_le_bytes());
    p[16..24].copy_from_slice(&vaddr.to_le_bytes());
    p[24..32].copy_from_slice(&paddr.to_le_bytes());
    p[32..40].copy_from_slice(&0x10u64.to_le_bytes());
    p[40..48].copy_from_slice(&memsz.to_le_bytes());
    b
}

fn run_kernel(name: &str, bytes: &[u8], extra: &[&str]) -> Output {
    let path = temp_path(name);
    std::fs::write(&path, bytes).unwrap();
    let mut args = vec!["run", "--kernel", path.to_str().unwrap()];
    args.extend_from_slice(extra);
    run(&args)
}

/// The error is exactly one line on stderr, starts with "error: ",
/// contains `needle`, and the exit code is `code`.
#[track_caller]
fn assert_one_line_error(o: &Output, code: i32, needle: &str) {
    assert_exit(o, code);
    let err = stderr(o);
    assert_eq!(err.lines().count(), 1, "one line expected:\n{err}");
    assert!(err.starts_with("error: ") && err.contains(needle), "wanted {needle:?} in:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn missing_kvm_device() {
    let o = vmm().env("VMM_KVM_DEVICE", "/nonexistent/kvm").arg("run").output().unwrap();
    assert_one_line_error(&o, 3, "/dev/kvm does not exist");
}

#[test]
fn no_permission_to_open_kvm() {
    // As root, drop to an unprivileged user; /dev/kvm must then refuse us.
    let is_root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    let setpriv = std::path::Path::new("/usr/bin/setpriv").exists();
    if !is_root || !setpriv || !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("*** SKIPPED: the permission test needs root, setpriv and /dev/kvm ***");
        return;
    }
    let o = std::process::Command::new("/usr/bin/setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", env!("CARGO_BIN_EXE_vmm"), "run"])
        .output()
        .unwrap();
    if stderr(&o).contains("Permission denied") && o.status.code() != Some(3) {
        eprintln!("*** SKIPPED: the vmm binary is not executable by an unprivileged user here ***");
        return;
    }
    assert_one_line_error(&o, 3, "no permission to open /dev/kvm");
}

#[test]
fn kernel_file_missing() {
    let o = run(&["run", "--kernel", "/nonexistent/kernel.elf"]);
    assert_one_line_error(&o, 3, "cannot read kernel /nonexistent/kernel.elf");
}

#[test]
fn kernel_not_elf() {
    let o = run_kernel("not-elf", b"#!/bin/sh\necho hello\n", &[]);
    assert_one_line_error(&o, 3, "is not an ELF file");
}

#[test]
fn kernel_for_another_machine() {
    let o = run_kernel("aarch64.elf", &elf(183, 0x20_0000, 0x1000), &[]);
    assert_one_line_error(&o, 3, "is not an x86-64 ELF executable: its machine is 183");
}

#[test]
fn kernel_that_is_a_host_program() {
    // A dynamically linked, position-independent Linux program.
    let o = run(&["run", "--kernel", "/bin/true"]);
    assert_one_line_error(&o, 3, "a statically linked executable is needed");
}

#[test]
fn kernel_segment_outside_guest_ram() {
    let o = run_kernel("far.elf", &elf(62, 1 << 40, 0x1000), &[]);
    assert_one_line_error(&o, 3, "lies outside guest RAM");
}

#[test]
fn memory_too_small_for_the_kernel() {
    // A kernel image that ends at 40 MiB, in a 32 MiB guest.
    let o = run_kernel("big.elf", &elf(62, 24 << 20, 16 << 20), &["--memory", "32M"]);
    assert_one_line_error(&o, 3, "memory size 32 MiB is too small for kernel");
    assert!(stderr(&o).contains("use --memory 40M or more"), "{}", stderr(&o));
}

#[test]
fn kernel_over_the_page_table_zone() {
    let o = run_kernel("zone.elf", &elf(62, 15 << 20, 2 << 20), &[]);
    assert_one_line_error(&o, 3, "overlaps the page-table zone");
}

#[test]
fn memory_size_unparsable() {
    let o = run(&["run", "--memory", "lots"]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("invalid size 'lots'"), "{}", stderr(&o));
}

#[test]
fn memory_size_too_small() {
    let o = run(&["run", "--memory", "8M"]);
    assert_one_line_error(&o, 3, "memory size 8 MiB is too small: the minimum is 32 MiB");
}

#[test]
fn memory_size_too_large_or_unaligned() {
    let o = run(&["run", "--memory", "1T"]);
    assert_one_line_error(&o, 3, "is too large: the maximum is 64 GiB");
    let o = run(&["run", "--memory", "33M"]);
    assert_one_line_error(&o, 3, "not a multiple of 2 MiB");
}

#[test]
fn bad_timeout_is_a_usage_error() {
    let o = run(&["run", "--timeout", "soon"]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("invalid duration"), "{}", stderr(&o));
}

#[test]
fn guest_command_line_typos_are_refused_naming_the_word() {
    if !kvm_available() {
        return;
    }
    for (cmdline, word, why) in [
        ("worklaod=fault", "worklaod=fault", "unknown word"),
        ("workload=fault size=abc", "size=abc", "needs a number greater than zero"),
        ("workload=nosuch", "workload=nosuch", "expected one of: fault fork"),
        ("crash=nosuch", "crash=nosuch", "unknown value"),
        ("anon=8k workload=fault", "anon=8k", "expected one of: 4k 16k 64k 2m"),
    ] {
        let o = run(&["run", "--memory", "64M", "--cmdline", cmdline]);
        assert_exit(&o, 2);
        let line = error_line(&o);
        assert!(line.contains(&format!("refused the command-line word '{word}'")), "{cmdline}: {line}");
        assert!(stdout(&o).contains(why), "{cmdline}: {}", stdout(&o));
    }
}

#[test]
fn a_test_filter_that_matches_nothing_is_an_error() {
    if !kvm_available() {
        return;
    }
    let o = run(&["test", "--filter", "nosuch"]);
    assert_exit(&o, 2);
    assert!(error_line(&o).contains("no in-guest test name contains 'nosuch'"), "{}", error_line(&o));
}

#[test]
fn zero_counts_are_usage_errors() {
    for args in [&["bench", "--repeat", "0"][..], &["bench", "--size", "0"], &["info", "--calibration-loops", "0"]] {
        let o = run(args);
        assert_exit(&o, 2);
        assert!(stderr(&o).contains(args[1]) && stderr(&o).contains("'0'"), "{}", stderr(&o));
    }
}

#[test]
fn output_paths_are_checked_before_the_run() {
    // A file where a folder should be: nothing can be written below it.
    let file = temp_path("not-a-folder");
    std::fs::write(&file, b"x").unwrap();
    let below = file.join("out.json");
    let below = below.to_str().unwrap();
    for args in [
        vec!["run", "--stats-json", below],
        vec!["test", "--json", below],
        vec!["bench", "--json", below],
        vec!["bench", "--out", below],
        vec!["bench", "--svg", below],
    ] {
        let o = run(&args);
        assert_exit(&o, 2);
        let line = error_line(&o);
        assert!(line.starts_with("error: --") && line.contains("not-a-folder"), "{args:?}: {line}");
        // Refused up front: the guest never ran.
        assert!(stdout(&o).is_empty(), "{args:?}: {}", stdout(&o));
    }
}

#[test]
fn a_one_mode_bench_leaves_no_earlier_chart() {
    if !kvm_available() {
        return;
    }
    let dir = temp_path("bench-stale");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("report.svg"), b"<svg/>").unwrap();
    let o = run(&[
        "bench",
        "--mmu",
        "ept",
        "--workload",
        "tlb",
        "--size",
        "10",
        "--repeat",
        "1",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert_exit(&o, 0);
    assert!(dir.join("report.json").exists());
    assert!(!dir.join("report.svg").exists(), "an earlier run's chart sits beside the new report");
}

#[test]
fn messages_use_units_and_give_hints() {
    let o = run(&["run", "--memory", "33M"]);
    assert_one_line_error(&o, 3, "memory size 33 MiB is not a multiple of 2 MiB");
    let o = run(&["run", "--memory", "64"]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("give a unit, like 64M"), "{}", stderr(&o));
    let o = run(&["run", "--timeout", "99999999999999999999s"]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("too long (at most"), "{}", stderr(&o));
    let o = run(&["run", "--mmu", "both"]);
    assert_exit(&o, 2);
    let o = run(&["run", "--help"]);
    assert!(!stdout(&o).contains("both"), "{}", stdout(&o));
}

#[test]
fn hugetlb_1g_with_too_little_memory_names_the_size_to_use() {
    if !kvm_available() {
        return;
    }
    let o = run(&["run", "--backing", "hugetlb-1g"]);
    assert_one_line_error(&o, 3, "use --memory 1G");
}

#[test]
fn fractional_timeout_is_accepted() {
    if !kvm_available() {
        return;
    }
    let o = run(&["run", "--memory", "64M", "--timeout", "1.5s", "--cmdline", "crash=hang"]);
    assert_exit(&o, 5);
    assert_eq!(error_line(&o), "error: timeout: the guest was still running after 1500ms");
}

#[test]
fn an_empty_segment_with_file_bytes_is_refused_before_anything_is_copied() {
    // p_memsz = 0 but 16 file bytes, aimed at the boot page tables.
    let o = run_kernel("smuggle.elf", &elf(62, 0x9000, 0), &[]);
    assert_one_line_error(&o, 3, "segment 0 has more file bytes (0x10) than memory bytes (0x0)");
}

/// Run `vmm` with `args`, ending it after `secs` seconds and capping its
/// address space at `as_bytes` (so that a VMM that reads without end fails
/// the test instead of the machine). `None` when it had to be killed.
fn run_bounded(args: &[&str], secs: u64, as_bytes: u64) -> Option<Output> {
    use std::os::unix::process::CommandExt;
    let mut cmd = vmm();
    cmd.args(args).stdin(std::process::Stdio::null());
    cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    // SAFETY: the closure runs in the forked child before exec and calls
    // only setrlimit, which is async-signal-safe; it touches no memory of
    // the parent beyond the stack value it passes.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit { rlim_cur: as_bytes, rlim_max: as_bytes };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn vmm");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if child.try_wait().expect("wait").is_some() {
            return Some(child.wait_with_output().expect("collect output"));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Issue 22, item 8: `--kernel /dev/zero` grew the VMM until the OOM
/// killer and a FIFO blocked it forever. Only a regular file is read.
#[test]
fn a_kernel_that_is_not_a_regular_file_is_refused_without_reading_it() {
    let fifo = temp_path("kernel.fifo");
    // A FIFO left by an earlier run would make mkfifo fail with EEXIST.
    let _ = std::fs::remove_file(&fifo);
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    for (path, what) in
        [("/dev/zero", "a character device"), (fifo.to_str().unwrap(), "a FIFO"), ("/tmp", "a directory")]
    {
        let o = run_bounded(&["run", "--memory", "64M", "--kernel", path], 10, 4 << 30)
            .unwrap_or_else(|| panic!("--kernel {path} still running after 10 s"));
        assert_one_line_error(&o, 3, &format!("kernel {path} is {what}, not a regular file"));
    }
}

/// Issue 22, item 8: a kernel file larger than the documented limit
/// (guest RAM, at most 1 GiB) is refused from its size, before it is read.
#[test]
fn a_kernel_file_larger_than_guest_ram_is_refused_before_it_is_read() {
    let path = temp_path("huge-kernel.elf");
    std::fs::write(&path, elf(62, 0x20_0000, 0x1000)).unwrap();
    // Extended with a hole: a valid ELF header, 96 MiB long, no disk used.
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(96 << 20).unwrap();
    let o = run(&["run", "--memory", "64M", "--kernel", path.to_str().unwrap()]);
    assert_one_line_error(
        &o,
        3,
        &format!(
            "kernel {} is 96 MiB, larger than the 64 MiB limit (the guest RAM size, at most 1 GiB)",
            path.display()
        ),
    );
}

/// Issue 22, item 7: `--shadow-pool` has a documented maximum (1 GiB) and a
/// larger one is refused at once, before anything is allocated — as a
/// `--memory` beyond its maximum is. (`--shadow-pool 1T` was still setting
/// up after 60 s on a 24 GB machine.)
#[test]
fn a_shadow_pool_beyond_the_maximum_is_refused_at_once() {
    for mmu in ["shadow", "pv"] {
        let o = run_bounded(&["run", "--mmu", mmu, "--memory", "64M", "--shadow-pool", "1T"], 10, 16 << 30)
            .unwrap_or_else(|| panic!("{mmu}: --shadow-pool 1T still setting up after 10 s"));
        assert_one_line_error(&o, 3, "shadow pool of 1 TiB is too large: the maximum is 1 GiB");
    }
    // `vmm test` checks it the same way.
    let o = run(&["test", "--mmu", "shadow", "--memory", "64M", "--shadow-pool", "2G", "--filter", "boot"]);
    assert_one_line_error(&o, 3, "shadow pool of 2 GiB is too large: the maximum is 1 GiB");
}

/// Issue 22, item 7: `--shadow-pool` with `--mmu ept` was ignored without a
/// word; now the VMM says so (one warning line) and runs.
#[test]
fn a_shadow_pool_with_ept_mode_is_said_to_be_ignored() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("*** SKIPPED: needs /dev/kvm ***");
        return;
    }
    let o = run(&["run", "--mmu", "ept", "--memory", "64M", "--shadow-pool", "64M"]);
    assert_exit(&o, 0);
    assert_eq!(
        stderr(&o).lines().filter(|l| l.contains("--shadow-pool")).collect::<Vec<_>>(),
        ["warning: --shadow-pool is ignored with --mmu ept (only shadow and pv mode have a shadow pool)"]
    );
    // Without it, nothing is said.
    let o = run(&["run", "--mmu", "ept", "--memory", "64M"]);
    assert_exit(&o, 0);
    assert!(!stderr(&o).contains("--shadow-pool"), "{}", stderr(&o));
}
