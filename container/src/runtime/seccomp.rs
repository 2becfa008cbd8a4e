//! The default seccomp filter: a deny-list answering `EPERM`, modeled on the syscalls Docker's
//! default profile blocks. Compiled to BPF in the parent with `seccompiler` (arch check
//! included); installed in the child with `seccomp(2)` directly, because
//! `seccompiler::apply_filter` would also force `no_new_privs`.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

use super::report::{Context, Step};

/// Always denied: kernel modules, kexec, reboot, swap, clock setting, BPF, perf, keyrings,
/// userfaultfd, handle-based opens, accounting, quotas, syslog, vhangup, raw port access.
const DENIED: &[libc::c_long] = &[
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

/// Compile the default filter for this architecture.
pub(crate) fn compile(keep_caps: u64) -> Result<BpfProgram, String> {
    let mut rules = BTreeMap::new();
    let admin = keep_caps & super::caps::SYS_ADMIN_BIT != 0;
    let extra: &[libc::c_long] = if admin { &[] } else { DENIED_WITHOUT_SYS_ADMIN };
    for nr in DENIED.iter().chain(extra) {
        // An empty rule list matches the syscall unconditionally.
        rules.insert(*nr, Vec::new());
    }
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| format!("seccomp: unsupported architecture: {e}"))?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| format!("seccomp: {e}"))?;
    BpfProgram::try_from(filter).map_err(|e| format!("seccomp: {e}"))
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
}
