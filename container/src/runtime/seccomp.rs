//! The default seccomp filter: a deny-list answering `EPERM`, modeled on the syscalls Docker's
//! default profile blocks. Compiled to BPF in the parent with `seccompiler`, once per
//! distinct filter (it depends only on whether `CAP_SYS_ADMIN` is kept) and cached;
//! installed in the child with `seccomp(2)` directly, because `seccompiler::apply_filter`
//! would also force `no_new_privs`.
//!
//! A deny-list must also close the other doors into the same syscalls. On x86_64 a
//! hand-written prefix ([`abi_prefix`]) runs before seccompiler's program:
//! - any architecture other than the native one (the i386 ABI: `int 0x80`, whose syscall
//!   numbers differ) kills the process, as seccompiler's own arch check does;
//! - x32 syscalls arrive with the native `AUDIT_ARCH_X86_64` and bit 30 set in the number
//!   (`0x40000000 | nr`): seccompiler's rules match exact numbers, so without the prefix
//!   they would fall through to the default allow. Every x32 syscall answers `EPERM`.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use super::report::{Context, Step};

/// Always denied: kernel modules, kexec, reboot, swap, clock setting, BPF, perf, keyrings,
/// userfaultfd, handle-based opens, accounting, quotas, syslog, vhangup, raw port access,
/// and io_uring (its rings perform operations seccomp never sees; Docker and containerd
/// block it too).
const DENIED: &[libc::c_long] = &[
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_userfaultfd,
    libc::SYS_open_by_handle_at,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_lookup_dcookie,
    libc::SYS_syslog,
    libc::SYS_vhangup,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_iopl,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_ioperm,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_uselib,
    #[cfg(target_arch = "x86_64")]
    libc::SYS__sysctl,
];

/// Denied unless `CAP_SYS_ADMIN` is kept: mounting (old and new API) and namespace changes.
const DENIED_WITHOUT_SYS_ADMIN: &[libc::c_long] = &[
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_mount_setattr,
    libc::SYS_unshare,
    libc::SYS_setns,
];

/// `clone` flags that create namespaces: `clone` with any of them is denied unless
/// `CAP_SYS_ADMIN` is kept (the `unshare` of [`DENIED_WITHOUT_SYS_ADMIN`] by another door;
/// `CLONE_NEWUSER` needs no capability at all).
const CLONE_NAMESPACE_FLAGS: &[libc::c_int] = &[
    libc::CLONE_NEWNS,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWCGROUP,
];

/// Bit 30 of the syscall number: the x32 ABI.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// `AUDIT_ARCH_X86_64`: `EM_X86_64` (62), 64-bit, little-endian.
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;

/// Offsets in `struct seccomp_data`.
#[cfg(target_arch = "x86_64")]
const DATA_NR: u32 = 0;
#[cfg(target_arch = "x86_64")]
const DATA_ARCH: u32 = 4;

#[cfg(target_arch = "x86_64")]
fn stmt(code: u32, k: u32) -> sock_filter {
    sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

#[cfg(target_arch = "x86_64")]
fn jump(code: u32, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

/// Instructions run before seccompiler's program (see the module doc): a foreign ABI is
/// killed, x32 numbers answer `EPERM`; without `CAP_SYS_ADMIN`, `clone3` answers `ENOSYS`
/// (its flags are behind a pointer a filter cannot read; libc then falls back to `clone`,
/// whose flags are checked), as in Docker's profile.
#[cfg(target_arch = "x86_64")]
fn abi_prefix(admin: bool) -> Vec<sock_filter> {
    use libc::{
        BPF_ABS, BPF_JEQ, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_RET, BPF_W, SECCOMP_RET_ERRNO,
        SECCOMP_RET_KILL_PROCESS,
    };
    let mut p = vec![
        stmt(BPF_LD | BPF_W | BPF_ABS, DATA_ARCH),
        // Native: skip the kill.
        jump(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        stmt(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        stmt(BPF_LD | BPF_W | BPF_ABS, DATA_NR),
        // x32: fall into the EPERM; else skip it.
        jump(BPF_JMP | BPF_JSET | BPF_K, X32_SYSCALL_BIT, 0, 1),
        stmt(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | libc::EPERM as u32),
    ];
    if !admin {
        p.extend([
            jump(BPF_JMP | BPF_JEQ | BPF_K, libc::SYS_clone3 as u32, 0, 1),
            stmt(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        ]);
    }
    p
}

#[cfg(not(target_arch = "x86_64"))]
fn abi_prefix(_admin: bool) -> Vec<sock_filter> {
    // seccompiler's arch check already kills compat (32-bit) syscalls; no x32 here.
    Vec::new()
}

/// The filter compiled for capability sets without `CAP_SYS_ADMIN`.
static WITHOUT_ADMIN: OnceLock<Result<Arc<BpfProgram>, String>> = OnceLock::new();
/// The filter compiled for capability sets with `CAP_SYS_ADMIN`.
static WITH_ADMIN: OnceLock<Result<Arc<BpfProgram>, String>> = OnceLock::new();

/// The default filter for a container keeping `keep_caps`: compiled on first use for that
/// kind of capability set (the filter depends only on `CAP_SYS_ADMIN`), then shared.
pub(crate) fn filter_for(keep_caps: u64) -> Result<Arc<BpfProgram>, String> {
    let admin = keep_caps & super::caps::SYS_ADMIN_BIT != 0;
    let cell = if admin { &WITH_ADMIN } else { &WITHOUT_ADMIN };
    cell.get_or_init(|| compile(keep_caps).map(Arc::new))
        .clone()
}

/// Compile the default filter for this architecture.
pub(crate) fn compile(keep_caps: u64) -> Result<BpfProgram, String> {
    let mut rules = BTreeMap::new();
    let admin = keep_caps & super::caps::SYS_ADMIN_BIT != 0;
    let extra: &[libc::c_long] = if admin { &[] } else { DENIED_WITHOUT_SYS_ADMIN };
    for nr in DENIED.iter().chain(extra) {
        // An empty rule list matches the syscall unconditionally.
        rules.insert(*nr, Vec::new());
    }
    if !admin {
        // One rule per flag: rules of a syscall match when any of them does.
        let clone_rules = CLONE_NAMESPACE_FLAGS
            .iter()
            .map(|flag| {
                let flag = u64::from(flag.unsigned_abs());
                SeccompCondition::new(
                    0,
                    SeccompCmpArgLen::Qword,
                    SeccompCmpOp::MaskedEq(flag),
                    flag,
                )
                .and_then(|c| SeccompRule::new(vec![c]))
                .map_err(|e| format!("seccomp: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        rules.insert(libc::SYS_clone, clone_rules);
    }
    #[cfg(target_arch = "x86_64")]
    let screen = screen(&rules.keys().copied().collect::<Vec<_>>());
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| format!("seccomp: unsupported architecture: {e}"))?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| format!("seccomp: {e}"))?;
    let program = BpfProgram::try_from(filter).map_err(|e| format!("seccomp: {e}"))?;
    let mut full = abi_prefix(admin);
    #[cfg(target_arch = "x86_64")]
    full.extend(screen);
    full.extend(program);
    Ok(full)
}

/// Where a [`screen`] instruction jumps.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum Target {
    /// The `RET ALLOW` right after the screen.
    Allow,
    /// seccompiler's program, right after that.
    Rules,
    /// An instruction of the screen, by index.
    At(usize),
}

/// A binary search on the syscall number (in the accumulator, after [`abi_prefix`]) that
/// allows at once every syscall `rules` does not name, and sends the others on to
/// seccompiler's program. It changes no verdict (seccompiler allows what it does not name),
/// but seccompiler tests the numbers one after another: every other syscall walked the
/// whole list, and the kernel walks the filter for each of ~450 numbers when it is installed
/// (to cache the ones always allowed), on every container start. The search takes about
/// `2 log2 n` instructions. Empty (no screen) should an offset not fit cBPF's 8 bits.
#[cfg(target_arch = "x86_64")]
fn screen(named: &[libc::c_long]) -> Vec<sock_filter> {
    use libc::{BPF_JEQ, BPF_JGE, BPF_JMP, BPF_K, BPF_RET, SECCOMP_RET_ALLOW};
    let mut keys: Vec<u32> = named
        .iter()
        .filter_map(|n| u32::try_from(*n).ok())
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let mut tree: Vec<(u32, u32, Target, Target)> = Vec::new();
    fn build(keys: &[u32], tree: &mut Vec<(u32, u32, Target, Target)>) {
        const SMALL: usize = 3;
        if keys.len() <= SMALL {
            for (i, k) in keys.iter().enumerate() {
                let next = if i + 1 == keys.len() {
                    Target::Allow
                } else {
                    Target::At(tree.len() + 1)
                };
                tree.push((BPF_JMP | BPF_JEQ | BPF_K, *k, Target::Rules, next));
            }
            if keys.is_empty() {
                tree.push((BPF_JMP | BPF_JEQ | BPF_K, 0, Target::Allow, Target::Allow));
            }
            return;
        }
        let (low, high) = keys.split_at(keys.len() / 2);
        let node = tree.len();
        let pivot = high.first().copied().unwrap_or_default();
        tree.push((
            BPF_JMP | BPF_JGE | BPF_K,
            pivot,
            Target::Allow,
            Target::At(node + 1),
        ));
        build(low, tree);
        let right = tree.len();
        if let Some(n) = tree.get_mut(node) {
            n.2 = Target::At(right);
        }
        build(high, tree);
    }
    build(&keys, &mut tree);
    let allow = tree.len();
    let offset = |at: usize, t: Target| {
        let to = match t {
            Target::Allow => allow,
            Target::Rules => allow + 1,
            Target::At(i) => i,
        };
        to.checked_sub(at + 1).and_then(|o| u8::try_from(o).ok())
    };
    let mut out = Vec::with_capacity(tree.len() + 1);
    for (at, (code, k, jt, jf)) in tree.into_iter().enumerate() {
        let (Some(jt), Some(jf)) = (offset(at, jt), offset(at, jf)) else {
            return Vec::new();
        };
        out.push(jump(code, k, jt, jf));
    }
    out.push(stmt(BPF_RET | BPF_K, SECCOMP_RET_ALLOW));
    out
}

/// Install the filter on this process (needs `no_new_privs` or `CAP_SYS_ADMIN`).
pub(crate) fn install(program: &BpfProgram) -> Step {
    let len = u16::try_from(program.len()).map_err(|_| {
        super::report::Failure::new("install the seccomp filter", None, libc::E2BIG)
    })?;
    let prog = libc::sock_fprog {
        len,
        // seccompiler's sock_filter is #[repr(C)] with the kernel's layout, like libc's.
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prog points to a valid BPF program that outlives the call; the kernel copies it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &prog as *const libc::sock_fprog,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).step("install the seccomp filter");
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn compiles() {
        let without = compile(0).unwrap();
        let with = compile(super::super::caps::SYS_ADMIN_BIT).unwrap();
        assert!(without.len() > with.len());
    }

    /// Run a screen (jumps and returns only) for syscall `nr`: true when it sends `nr` on to
    /// the rules, false when it allows it at once.
    #[cfg(target_arch = "x86_64")]
    fn screened(prog: &[sock_filter], nr: u32) -> bool {
        let mut pc = 0usize;
        loop {
            let i = &prog[pc];
            if u32::from(i.code) == libc::BPF_RET | libc::BPF_K {
                return false;
            }
            let taken = match u32::from(i.code) & 0xf0 {
                c if c == libc::BPF_JEQ => nr == i.k,
                c if c == libc::BPF_JGE => nr >= i.k,
                other => panic!("unexpected op {other:#x}"),
            };
            pc += 1 + usize::from(if taken { i.jt } else { i.jf });
            if pc == prog.len() {
                return true;
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn screen_sends_exactly_the_named_syscalls_to_the_rules() {
        for n in [0usize, 1, 2, 3, 4, 7, 45, 57] {
            let named: Vec<libc::c_long> = (0..n as libc::c_long).map(|i| 3 * i + 5).collect();
            let prog = screen(&named);
            assert!(!prog.is_empty());
            for nr in 0..600u32 {
                let expect = named.contains(&libc::c_long::from(nr));
                assert_eq!(screened(&prog, nr), expect, "n={n} nr={nr}");
            }
            assert!(
                prog.len() <= 2 * n + 2,
                "n={n}: {} instructions",
                prog.len()
            );
        }
        // The real lists.
        let named: Vec<libc::c_long> = DENIED
            .iter()
            .chain(DENIED_WITHOUT_SYS_ADMIN)
            .chain(&[libc::SYS_clone])
            .copied()
            .collect();
        let prog = screen(&named);
        for nr in 0..1024u32 {
            assert_eq!(screened(&prog, nr), named.contains(&libc::c_long::from(nr)));
        }
    }

    #[test]
    fn compiled_once_per_kind_of_capability_set() {
        let admin = super::super::caps::SYS_ADMIN_BIT;
        let a = filter_for(0).unwrap();
        let b = filter_for(1 << 5).unwrap();
        assert!(
            Arc::ptr_eq(&a, &b),
            "same filter for sets without SYS_ADMIN"
        );
        let c = filter_for(admin).unwrap();
        let d = filter_for(admin | 1).unwrap();
        assert!(Arc::ptr_eq(&c, &d));
        assert!(!Arc::ptr_eq(&a, &c));
    }
}
