//! The device filter's mechanism: a `BPF_PROG_TYPE_CGROUP_DEVICE` program assembled by hand
//! from a list of allow rules, loaded with `bpf(2)` and attached to a cgroup v2 directory
//! with `BPF_F_ALLOW_MULTI` (so it composes with programs attached higher up, e.g. by
//! systemd). The policy (which rules) lives in [`super::devices`].
//!
//! The kernel runs the program for every `mknod` and every `open` of a character or block
//! device by a process of the cgroup (or a descendant) with a `struct bpf_cgroup_dev_ctx`:
//! `access_type` (u32: `(access << 16) | type`), `major` (u32), `minor` (u32). The program
//! returns 1 to allow and 0 to deny (the syscall then fails with `EPERM`).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

use super::devices::{DeviceKind, DeviceRule, ACCESS_ALL};

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Insn {
    code: u8,
    /// `dst_reg` in the low nibble, `src_reg` in the high nibble.
    regs: u8,
    off: i16,
    imm: i32,
}

// Opcodes (linux/bpf_common.h, linux/bpf.h).
const LDX_MEM_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const ALU64_AND_K: u8 = 0x57; // BPF_ALU64 | BPF_AND | BPF_K
const ALU64_RSH_K: u8 = 0x77; // BPF_ALU64 | BPF_RSH | BPF_K
const ALU64_MOV_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const ALU64_MOV_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
const JMP_JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
const JMP_EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

// Registers.
const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R5: u8 = 5;

// `struct bpf_cgroup_dev_ctx` field offsets.
const CTX_ACCESS_TYPE: i16 = 0;
const CTX_MAJOR: i16 = 4;
const CTX_MINOR: i16 = 8;

// Device types in `access_type` (linux/bpf.h).
const DEVCG_DEV_BLOCK: i32 = 1;
const DEVCG_DEV_CHAR: i32 = 2;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (dst & 0x0f) | (src << 4),
        off,
        imm,
    }
}

/// Assemble the program for `rules` (allow rules; anything they do not match is denied).
///
/// ```text
///   r2 = ctx->access_type & 0xffff     ; device type
///   r3 = ctx->access_type >> 16        ; requested access (mknod/read/write bits)
///   r4 = ctx->major; r5 = ctx->minor
///   per rule:  if r2 != type goto next
///              r0 = r3; r0 &= ~allowed; if r0 != 0 goto next   (omitted for rwm)
///              if r4 != major goto next                        (omitted for *)
///              if r5 != minor goto next                        (omitted for *)
///              r0 = 1; exit
///   next: ...
///   r0 = 0; exit
/// ```
pub(crate) fn assemble(rules: &[DeviceRule]) -> Vec<Insn> {
    let mut prog = vec![
        insn(LDX_MEM_W, R2, R1, CTX_ACCESS_TYPE, 0),
        insn(ALU64_AND_K, R2, 0, 0, 0xffff),
        insn(LDX_MEM_W, R3, R1, CTX_ACCESS_TYPE, 0),
        insn(ALU64_RSH_K, R3, 0, 0, 16),
        insn(LDX_MEM_W, R4, R1, CTX_MAJOR, 0),
        insn(LDX_MEM_W, R5, R1, CTX_MINOR, 0),
    ];
    for rule in rules {
        let kind = match rule.kind {
            DeviceKind::Block => DEVCG_DEV_BLOCK,
            DeviceKind::Char => DEVCG_DEV_CHAR,
        };
        // Conditions as (instructions, each ending in a JNE to `next`).
        let mut block: Vec<Insn> = vec![insn(JMP_JNE_K, R2, 0, 0, kind)];
        let access = rule.access & ACCESS_ALL;
        if access != ACCESS_ALL {
            block.push(insn(ALU64_MOV_X, R0, R3, 0, 0));
            block.push(insn(ALU64_AND_K, R0, 0, 0, !(access as i32)));
            block.push(insn(JMP_JNE_K, R0, 0, 0, 0));
        }
        if let Some(major) = rule.major {
            block.push(insn(JMP_JNE_K, R4, 0, 0, major as i32));
        }
        if let Some(minor) = rule.minor {
            block.push(insn(JMP_JNE_K, R5, 0, 0, minor as i32));
        }
        block.push(insn(ALU64_MOV_K, R0, 0, 0, 1));
        block.push(insn(JMP_EXIT, 0, 0, 0, 0));
        // Point every jump past the end of this block (offsets are relative to the next
        // instruction).
        let len = block.len();
        for (i, ins) in block.iter_mut().enumerate() {
            if ins.code == JMP_JNE_K {
                ins.off = i16::try_from(len - i - 1).unwrap_or(i16::MAX);
            }
        }
        prog.extend(block);
    }
    prog.push(insn(ALU64_MOV_K, R0, 0, 0, 0));
    prog.push(insn(JMP_EXIT, 0, 0, 0, 0));
    prog
}

// bpf(2) commands, program and attach types, flags (linux/bpf.h).
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_PROG_ATTACH: libc::c_int = 8;
const BPF_PROG_DETACH: libc::c_int = 9;
const BPF_PROG_GET_FD_BY_ID: libc::c_int = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_int = 15;
const BPF_PROG_QUERY: libc::c_int = 16;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// `union bpf_attr` for `BPF_PROG_LOAD` (the fields used, the rest zero).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for `BPF_PROG_ATTACH` / `BPF_PROG_DETACH`.
#[repr(C)]
#[derive(Default)]
struct AttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
    _pad: u32,
}

/// `union bpf_attr` for `BPF_PROG_QUERY`.
#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
}

/// `union bpf_attr` for `BPF_PROG_GET_FD_BY_ID`.
#[repr(C)]
#[derive(Default)]
struct GetFdAttr {
    prog_id: u32,
    next_id: u32,
    open_flags: u32,
    _pad: u32,
}

/// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The start of `struct bpf_prog_info`, up to the name (the kernel fills only `info_len`
/// bytes, and copies no instructions while their pointers are zero).
#[repr(C)]
#[derive(Default)]
struct ProgInfo {
    prog_type: u32,
    id: u32,
    tag: [u8; 8],
    jited_prog_len: u32,
    xlated_prog_len: u32,
    jited_prog_insns: u64,
    xlated_prog_insns: u64,
    load_time: u64,
    created_by_uid: u32,
    nr_map_ids: u32,
    map_ids: u64,
    name: [u8; 16],
}

/// `bpf(cmd, attr, sizeof attr)`; the return value (an fd for loads) or the error.
fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, properly sized `repr(C)` prefix of `union bpf_attr` whose
    // unused fields are zero; pointers inside it point to buffers that outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Take ownership of an fd returned by `bpf(2)`.
fn owned_fd(rc: libc::c_long) -> io::Result<OwnedFd> {
    let fd = libc::c_int::try_from(rc).map_err(|_| io::Error::other("bpf returned a bad fd"))?;
    // SAFETY: `bpf(2)` returned this new fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Why loading or attaching the program failed.
#[derive(Debug)]
pub(crate) struct BpfFailure {
    /// What was being done.
    pub step: &'static str,
    /// The system error.
    pub source: io::Error,
    /// The verifier's log, when loading failed.
    pub log: String,
}

fn fail(step: &'static str) -> impl FnOnce(io::Error) -> BpfFailure {
    move |source| BpfFailure {
        step,
        source,
        log: String::new(),
    }
}

/// The name a device program for `prog` carries (`fldev_` and 9 hex digits of the SHA-256
/// of its instructions, NUL-padded): a program attached by an earlier process with the same
/// name holds the same instructions and is reused instead of loaded again.
fn program_name(prog: &[Insn]) -> [u8; 16] {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for i in prog {
        hasher.update([i.code, i.regs]);
        hasher.update(i.off.to_le_bytes());
        hasher.update(i.imm.to_le_bytes());
    }
    let digest = hasher.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let mut name = [0u8; 16];
    for (d, s) in name.iter_mut().zip(format!("fldev_{hex}").bytes().take(15)) {
        *d = s;
    }
    name
}

/// Load `prog` as a cgroup device program named `name`.
fn load(prog: &[Insn], name: [u8; 16]) -> Result<OwnedFd, BpfFailure> {
    let license = c"Apache-2.0";
    let attr = |log: &mut Vec<u8>, level: u32| ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: u32::try_from(prog.len()).unwrap_or(u32::MAX),
        insns: prog.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: level,
        log_size: u32::try_from(log.len()).unwrap_or(0),
        log_buf: if level == 0 {
            0
        } else {
            log.as_mut_ptr() as u64
        },
        prog_name: name,
        expected_attach_type: BPF_CGROUP_DEVICE,
        ..Default::default()
    };
    let mut no_log = Vec::new();
    match bpf(BPF_PROG_LOAD, &mut attr(&mut no_log, 0)) {
        Ok(rc) => owned_fd(rc).map_err(fail("load the device filter (bpf PROG_LOAD)")),
        Err(source) => {
            // Again with the verifier's log, for the message.
            let mut log = vec![0u8; 64 * 1024];
            let _ = bpf(BPF_PROG_LOAD, &mut attr(&mut log, 1));
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            log.truncate(end);
            Err(BpfFailure {
                step: "load the device filter (bpf PROG_LOAD)",
                source,
                log: String::from_utf8_lossy(&log).trim().to_string(),
            })
        }
    }
}

/// What the kernel says of a loaded program (its id, type, name, loader).
fn prog_info(prog: BorrowedFd<'_>) -> io::Result<ProgInfo> {
    let mut info = ProgInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: fd_u32(prog),
        info_len: std::mem::size_of::<ProgInfo>() as u32,
        info: &mut info as *mut ProgInfo as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

/// An fd for the loaded program with id `id`.
fn prog_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut get = GetFdAttr {
        prog_id: id,
        ..Default::default()
    };
    owned_fd(bpf(BPF_PROG_GET_FD_BY_ID, &mut get)?)
}

/// Whether the program with id `id` is a device program named `name` loaded by root.
fn is_named(id: u32, name: &[u8; 16]) -> bool {
    prog_by_id(id)
        .and_then(|fd| prog_info(fd.as_fd()))
        .is_ok_and(|info| {
            info.prog_type == BPF_PROG_TYPE_CGROUP_DEVICE
                && info.created_by_uid == 0
                && &info.name == name
        })
}

fn fd_u32(fd: BorrowedFd<'_>) -> u32 {
    // A valid fd is never negative.
    fd.as_raw_fd() as u32
}

/// Ids of the device programs attached directly to `cgroup` (not inherited ones).
fn attached(cgroup: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    // The kernel allows at most 64 programs per cgroup and attach type.
    let mut ids = [0u32; 64];
    let mut attr = QueryAttr {
        target_fd: fd_u32(cgroup),
        attach_type: BPF_CGROUP_DEVICE,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    bpf(BPF_PROG_QUERY, &mut attr)?;
    let n = (attr.prog_cnt as usize).min(ids.len());
    Ok(ids.iter().take(n).copied().collect())
}

/// Detach the program with id `id` from `cgroup`.
fn detach(cgroup: BorrowedFd<'_>, id: u32) -> io::Result<()> {
    let prog = prog_by_id(id)?;
    let mut attr = AttachAttr {
        target_fd: fd_u32(cgroup),
        attach_bpf_fd: fd_u32(prog.as_fd()),
        attach_type: BPF_CGROUP_DEVICE,
        ..Default::default()
    };
    bpf(BPF_PROG_DETACH, &mut attr).map(drop)
}

/// Loaded programs by rule set: a unit restarted (or many units with the same rules) reuse
/// one program. Bounded: cleared when it holds [`CACHE_MAX`] programs.
static CACHE: Mutex<Option<HashMap<Vec<DeviceRule>, OwnedFd>>> = Mutex::new(None);
const CACHE_MAX: usize = 64;

/// A loaded program for `rules` (assembled as `prog`, named `name`), from the cache or
/// freshly loaded.
fn program(rules: &[DeviceRule], prog: &[Insn], name: [u8; 16]) -> Result<OwnedFd, BpfFailure> {
    let dup = |fd: &OwnedFd| {
        fd.try_clone()
            .map_err(fail("duplicate the device filter's fd"))
    };
    let mut guard = CACHE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let cache = guard.get_or_insert_with(HashMap::new);
    if let Some(fd) = cache.get(rules) {
        return dup(fd);
    }
    let fd = load(prog, name)?;
    if cache.len() >= CACHE_MAX {
        cache.clear();
    }
    let copy = dup(&fd)?;
    cache.insert(rules.to_vec(), fd);
    Ok(copy)
}

/// Make the program for `rules` the one device program attached directly to the cgroup v2
/// directory open as `cgroup` (with `BPF_F_ALLOW_MULTI`, so it composes with programs
/// attached higher up). Where it is attached already (the same rules as the last run, even
/// by another process: it is recognised by its name, [`program_name`]), nothing is loaded;
/// otherwise it is loaded (or taken from this process's cache) and attached. Device programs
/// attached there before with other rules are detached afterwards, so the new rules replace
/// the old ones; during the switch both apply (the stricter result).
pub(crate) fn attach_device_program(
    cgroup: BorrowedFd<'_>,
    rules: &[DeviceRule],
) -> Result<(), BpfFailure> {
    let prog = assemble(rules);
    let name = program_name(&prog);
    let before = attached(cgroup).map_err(fail("list the cgroup's device programs"))?;
    let current = match before.iter().find(|id| is_named(**id, &name)) {
        Some(id) => *id,
        None => {
            let fd = program(rules, &prog, name)?;
            let id = prog_info(fd.as_fd())
                .map_err(fail("read the device filter's id"))?
                .id;
            // The kernel refuses to attach one program twice to a cgroup (EINVAL).
            if !before.contains(&id) {
                let mut attr = AttachAttr {
                    target_fd: fd_u32(cgroup),
                    attach_bpf_fd: fd_u32(fd.as_fd()),
                    attach_type: BPF_CGROUP_DEVICE,
                    attach_flags: BPF_F_ALLOW_MULTI,
                    ..Default::default()
                };
                bpf(BPF_PROG_ATTACH, &mut attr)
                    .map_err(fail("attach the device filter (bpf PROG_ATTACH)"))?;
            }
            id
        }
    };
    for old in before.into_iter().filter(|old| *old != current) {
        detach(cgroup, old).map_err(fail("detach an earlier device filter"))?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn jumps_land_on_the_next_rule() {
        let rules = [
            DeviceRule::new(DeviceKind::Char, Some(1), Some(3), 6),
            DeviceRule::new(DeviceKind::Char, Some(136), None, ACCESS_ALL),
        ];
        let prog = assemble(&rules);
        // Prologue 6, rule 1: type, 3 access, major, minor, mov, exit = 8; rule 2: type,
        // major, mov, exit = 4; epilogue 2.
        assert_eq!(prog.len(), 6 + 8 + 4 + 2);
        let first = &prog[6..14];
        for (i, ins) in first.iter().enumerate() {
            if ins.code == JMP_JNE_K {
                assert_eq!(i + 1 + ins.off as usize, first.len(), "jump at {i}");
            }
        }
        assert_eq!(prog[6].imm, DEVCG_DEV_CHAR);
        assert_eq!(prog[8].imm, !6);
        assert_eq!(prog.last().unwrap().code, JMP_EXIT);
        assert_eq!(prog[prog.len() - 2].imm, 0, "the default is deny");
    }
}
