//! The guest kernel must execute no instruction the host cannot emulate.
//!
//! KVM on these machines emulates the guest instruction by instruction and
//! cannot emulate SSE/AVX arithmetic, x87, `popcnt`, BMI1/2 (`tzcnt`...),
//! `adcx`, `movbe`, `cmpxchg16b`, `rdpid`, `xsave` and friends (docs/host.md).
//! This test disassembles the bundled guest ELF with iced-x86 and checks:
//!
//! 1. every function containing such an instruction is on an explicit
//!    allowlist, with the reason it is there;
//! 2. no such function is reachable from the kernel's own code through
//!    direct calls and jumps, except the one deliberate SSE probe — so
//!    precompiled `core` functions that our code never calls may stay in
//!    the image, but the moment our code starts calling one (directly or
//!    through other `core` code), this test fails;
//! 3. `core::fmt::write` — the only caller of the formatting functions
//!    whose addresses sit in `fmt::Arguments` — is unreachable, so those
//!    indirect calls cannot happen either.

use iced_x86::{CpuidFeature, Decoder, DecoderOptions, FlowControl, Instruction, OpKind};
use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Functions allowed to contain unemulatable instructions (matched as a
/// substring of the demangled name), with why.
const ALLOWED: &[(&str, &str)] = &[
    ("deliberate_sse_instruction", "crash=sse: executes pxor on purpose to test the VMM's emulation-failure report"),
    (
        "core::fmt::",
        "precompiled core::fmt, linked because panic paths build fmt::Arguments; never run: the panic handler \
         prints as_str() only and check 3 proves core::fmt::write unreachable",
    ),
    (
        "core::str::count::do_count_chars",
        "precompiled; used by core::fmt's padding (Formatter::pad) only, and must stay unreachable from our code",
    ),
];

/// Allowed functions that our code does reach on purpose.
const REACHABLE_ON_PURPOSE: &[&str] = &["deliberate_sse_instruction"];

/// Prefixes of the names of our own code (plus our unmangled symbols).
const OWN: &[&str] = &["guest_kernel::", "guest_abi::", "guest_mm::", "ufmt", "<guest_"];
const OWN_SYMBOLS: &[&str] = &["_start", "memcpy", "memmove", "memset", "memcmp", "bcmp", "ud_probe", "isr_"];

fn is_own(name: &str) -> bool {
    OWN.iter().any(|p| name.starts_with(p)) || OWN_SYMBOLS.iter().any(|p| name.starts_with(p))
}

fn allowed(name: &str) -> bool {
    ALLOWED.iter().any(|(pat, _)| name.contains(pat))
}

fn forbidden_feature(f: CpuidFeature) -> bool {
    use CpuidFeature::*;
    let name = format!("{f:?}");
    matches!(f, FPU | FPU287 | FPU387 | POPCNT | BMI1 | BMI2 | ADX | MOVBE | RDPID | XSAVE | CMPXCHG16B)
        || name.starts_with("SSE")
        || name.starts_with("SSSE")
        || name.starts_with("AVX")
        || name.starts_with("FMA")
        || name.starts_with("F16C")
}

/// `tzcnt` shares its encoding with `rep bsf` (F3 0F BC), which LLVM emits
/// for `trailing_zeros` on baseline x86-64 where the input cannot be zero:
/// a CPU (or emulator) without BMI1 executes it as `bsf`, which gives the
/// same answer there. The guest test `arch::rep_bsf_is_emulated` checks
/// that KVM's emulator does so. It is the only BMI instruction allowed.
fn is_rep_bsf(i: &Instruction) -> bool {
    matches!(i.mnemonic(), iced_x86::Mnemonic::Tzcnt)
}

fn uses_vector_registers(i: &Instruction) -> bool {
    (0..i.op_count()).any(|n| {
        i.op_kind(n) == OpKind::Register && {
            let r = i.op_register(n);
            r.is_xmm() || r.is_ymm() || r.is_zmm()
        }
    })
}

struct Function {
    name: String,
    bad: Vec<String>,
    edges: BTreeSet<u64>,
}

/// Decode `.text`, attributing each instruction to the closest symbol at
/// or before it.
fn functions(elf: &[u8]) -> BTreeMap<u64, Function> {
    // `object` reads ELF structures in place and needs them 8-byte aligned;
    // `include_bytes!` data is not, so copy it into u64-aligned storage.
    let mut words = vec![0u64; elf.len().div_ceil(8)];
    for (w, chunk) in words.iter_mut().zip(elf.chunks(8)) {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        *w = u64::from_ne_bytes(b);
    }
    // SAFETY: `words` holds `elf.len()` initialised bytes (and a few zero
    // padding bytes); u8 has no alignment or validity requirements.
    let aligned = unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), elf.len()) };
    let file = object::File::parse(aligned).expect("guest ELF parses");
    let text = file.section_by_name(".text").expect("guest has .text");
    let data = text.data().expect(".text data");
    let mut funcs: BTreeMap<u64, Function> = BTreeMap::new();
    for sym in file.symbols() {
        let in_text = sym.address() >= text.address() && sym.address() < text.address() + text.size();
        if in_text && matches!(sym.kind(), SymbolKind::Text | SymbolKind::Unknown | SymbolKind::Label) {
            let name = format!("{:#}", rustc_demangle::demangle(sym.name().unwrap_or("?")));
            funcs.entry(sym.address()).or_insert(Function { name, bad: vec![], edges: BTreeSet::new() });
        }
    }
    assert!(!funcs.is_empty(), "no symbols: the guest ELF must keep its symbol table");
    let mut decoder = Decoder::with_ip(64, data, text.address(), DecoderOptions::NONE);
    let mut insn = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut insn);
        let Some((_, f)) = funcs.range_mut(..=insn.ip()).next_back() else { continue };
        if insn.is_invalid() {
            continue;
        }
        let forbidden = insn.cpuid_features().iter().any(|&c| forbidden_feature(c)) && !is_rep_bsf(&insn);
        if forbidden || uses_vector_registers(&insn) {
            f.bad.push(format!("{:#x}: {insn}", insn.ip()));
        }
        match insn.flow_control() {
            FlowControl::Call | FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch
                if insn.op0_kind() == OpKind::NearBranch64 =>
            {
                f.edges.insert(insn.near_branch_target());
            }
            _ => {}
        }
    }
    funcs
}

/// Functions reachable from our own code through direct calls and jumps.
fn reachable_from_own_code(funcs: &BTreeMap<u64, Function>) -> BTreeSet<u64> {
    let start_of = |addr: u64| funcs.range(..=addr).next_back().map(|(a, _)| *a);
    let mut seen = BTreeSet::new();
    let mut queue: VecDeque<u64> = funcs.iter().filter(|(_, f)| is_own(&f.name)).map(|(a, _)| *a).collect();
    assert!(!queue.is_empty(), "no functions of our own crates found");
    while let Some(a) = queue.pop_front() {
        if !seen.insert(a) {
            continue;
        }
        queue.extend(funcs[&a].edges.iter().filter_map(|&t| start_of(t)));
    }
    seen
}

#[test]
fn guest_kernel_executes_only_instructions_the_host_emulates() {
    let funcs = functions(vmm::vm::BUNDLED_KERNEL);

    let offenders: Vec<String> = funcs
        .values()
        .filter(|f| !f.bad.is_empty() && !allowed(&f.name))
        .map(|f| format!("{}:\n    {}", f.name, f.bad.join("\n    ")))
        .collect();
    assert!(offenders.is_empty(), "functions with instructions the host cannot emulate:\n{}", offenders.join("\n"));

    let reachable = reachable_from_own_code(&funcs);
    for (addr, f) in &funcs {
        let on_purpose = REACHABLE_ON_PURPOSE.iter().any(|p| f.name.contains(p));
        if reachable.contains(addr) && !f.bad.is_empty() && !on_purpose {
            panic!("{} contains instructions the host cannot emulate and our code reaches it", f.name);
        }
        if reachable.contains(addr) && f.name.starts_with("core::fmt::write") {
            panic!("our code reaches core::fmt::write: the guest must not format with core::fmt");
        }
    }
}

#[test]
fn the_checker_sees_the_deliberate_sse_instruction() {
    // Guards against a checker that finds nothing because it decodes nothing.
    let funcs = functions(vmm::vm::BUNDLED_KERNEL);
    let f = funcs.values().find(|f| f.name == "deliberate_sse_instruction").expect("symbol present");
    assert!(f.bad.iter().any(|b| b.contains("pxor")), "{:?}", f.bad);
    assert!(funcs.values().any(|f| f.name.starts_with("guest_kernel::")), "own functions are named");
}
