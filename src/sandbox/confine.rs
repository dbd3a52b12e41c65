//! The source child's confinement, applied to itself before it reads its request (so before
//! any untrusted byte): resource limits, no new privileges, a seccomp filter, and Landlock.
//!
//! * **Resource limits** (`sources.child_*`): address space, CPU time, open files, file size.
//!   The main thread's stack is the one the kernel gave at exec; every walk runs on threads
//!   whose stack size factoryd sets, and keeps its own stack (no recursion a tree can drive).
//! * **no_new_privs**: no set-uid gain through anything it could start.
//! * **seccomp** (x86_64 and aarch64): a deny list, not an allow list: `execve`/`execveat`,
//!   `ptrace`, `process_vm_*`, mounts and `pivot_root`/`chroot`, namespaces (`unshare`,
//!   `setns`), `bpf`, `perf_event_open`, kernel modules, `kexec_*`, keyrings, `userfaultfd`,
//!   `open_by_handle_at`, `swapon`/`swapoff`, `reboot` fail with `EPERM`; on x86_64 the x32 ABI
//!   is refused whole. An allow list of what libgit2, OpenSSL, libssh2 and tokio use would be
//!   tighter; it is not built yet.
//! * **Landlock** (where the kernel has it, ABI 1+): creating, writing, renaming into or
//!   removing anything outside the job's workspace fails with `EACCES`. Reads are not limited.
//!
//! Each layer reports whether it is in force; the child tells the parent, which logs it once.

use std::ffi::CString;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::ChildLimits;

/// Which layers are in force in this process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confinement {
    pub rlimits: bool,
    pub no_new_privs: bool,
    pub seccomp: bool,
    pub landlock: bool,
    /// Why a layer is missing, for the log.
    pub notes: Vec<String>,
}

/// Applies every layer it can to the calling process; `workspace` is the only tree it may
/// write to afterwards. Run before any other thread exists (the seccomp filter and Landlock
/// domain apply to threads created later).
pub fn confine(limits: &ChildLimits, workspace: &Path) -> Confinement {
    let mut c = Confinement::default();
    // seccomp and Landlock bind the calling thread and the threads it starts later: a thread
    // that already runs would stay outside. Say so if there is one (there should be none).
    let threads = std::fs::read_dir("/proc/self/task").map_or(1, |d| d.count());
    if threads > 1 {
        c.notes.push(format!(
            "{threads} threads ran before the confinement; all but this one are outside it"
        ));
    }
    match set_rlimits(limits) {
        Ok(()) => c.rlimits = true,
        Err(e) => c.notes.push(format!("resource limits: {e}")),
    }
    match no_new_privs() {
        Ok(()) => c.no_new_privs = true,
        Err(e) => c.notes.push(format!("no_new_privs: {e}")),
    }
    if c.no_new_privs {
        match landlock(workspace) {
            Ok(()) => c.landlock = true,
            Err(e) => c.notes.push(format!("landlock: {e}")),
        }
        // Last: the filter must not stop the calls above.
        match seccomp() {
            Ok(()) => c.seccomp = true,
            Err(e) => c.notes.push(format!("seccomp: {e}")),
        }
    }
    c
}

fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn set_rlimits(limits: &ChildLimits) -> std::io::Result<()> {
    let set = |resource, value: u64| {
        let limit = libc::rlimit {
            rlim_cur: value as libc::rlim_t,
            rlim_max: value as libc::rlim_t,
        };
        #[allow(unsafe_code)]
        // SAFETY: setrlimit reads the struct it is given and nothing else.
        let rc = unsafe { libc::setrlimit(resource, &limit) };
        if rc == 0 {
            Ok(())
        } else {
            Err(last_error())
        }
    };
    set(libc::RLIMIT_AS, limits.memory_bytes)?;
    // Soft limit first: SIGXCPU at the limit, SIGKILL a second later.
    let cpu = libc::rlimit {
        rlim_cur: limits.cpu_secs as libc::rlim_t,
        rlim_max: limits.cpu_secs.saturating_add(1) as libc::rlim_t,
    };
    #[allow(unsafe_code)]
    // SAFETY: as above.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_CPU, &cpu) };
    if rc != 0 {
        return Err(last_error());
    }
    set(libc::RLIMIT_NOFILE, limits.open_files)?;
    set(libc::RLIMIT_FSIZE, limits.file_size_bytes)?;
    // No core files of a process that held credentials.
    set(libc::RLIMIT_CORE, 0)
}

fn no_new_privs() -> std::io::Result<()> {
    #[allow(unsafe_code)]
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(last_error())
    }
}

/// The syscalls the filter refuses.
fn denied() -> Vec<libc::c_long> {
    let mut out = vec![
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_keyctl,
        libc::SYS_userfaultfd,
        libc::SYS_open_by_handle_at,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_reboot,
        libc::SYS_fsopen,
        libc::SYS_fsmount,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
    ];
    out.sort_unstable();
    out
}

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E; // AUDIT_ARCH_X86_64
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7; // AUDIT_ARCH_AARCH64

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn seccomp() -> std::io::Result<()> {
    // Classic BPF over struct seccomp_data { int nr; u32 arch; u64 ip; u64 args[6]; }.
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const RET_ALLOW: u32 = 0x7fff_0000; // SECCOMP_RET_ALLOW
    const RET_KILL: u32 = 0x8000_0000; // SECCOMP_RET_KILL_PROCESS
    const RET_EPERM: u32 = 0x0005_0000 | libc::EPERM as u32; // SECCOMP_RET_ERRNO | EPERM
    let stmt = |code, k| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code, k, jt, jf| libc::sock_filter { code, jt, jf, k };

    let denied = denied();
    let mut program = vec![
        stmt(LD_W_ABS, 4), // arch
        jump(JEQ_K, AUDIT_ARCH, 1, 0),
        stmt(RET_K, RET_KILL), // another ABI: nothing here was written for it
        stmt(LD_W_ABS, 0),     // nr
    ];
    if cfg!(target_arch = "x86_64") {
        // The x32 ABI (nr | 0x40000000) reaches the same calls under other numbers.
        program.push(jump(JGE_K, 0x4000_0000, 0, 1));
        program.push(stmt(RET_K, RET_EPERM));
    }
    // One comparison per denied call; a match jumps to the EPERM return after the list.
    let n = denied.len();
    for (i, nr) in denied.iter().enumerate() {
        let to_eperm = (n - i) as u8; // skip the rest of the list and the ALLOW
        program.push(jump(JEQ_K, *nr as u32, to_eperm, 0));
    }
    program.push(stmt(RET_K, RET_ALLOW));
    program.push(stmt(RET_K, RET_EPERM));

    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    #[allow(unsafe_code)]
    // SAFETY: the kernel copies the filter program during the call; `program` outlives it.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &prog as *const libc::sock_fprog,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(last_error())
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn seccomp() -> std::io::Result<()> {
    Err(std::io::Error::other("no filter for this architecture"))
}

/// Landlock ABI 1 write rights: everything that creates, changes or removes a file.
const LANDLOCK_WRITE_ACCESS: u64 = (1 << 1) // WRITE_FILE
    | (1 << 4)  // REMOVE_DIR
    | (1 << 5)  // REMOVE_FILE
    | (1 << 6)  // MAKE_CHAR
    | (1 << 7)  // MAKE_DIR
    | (1 << 8)  // MAKE_REG
    | (1 << 9)  // MAKE_SOCK
    | (1 << 10) // MAKE_FIFO
    | (1 << 11) // MAKE_BLOCK
    | (1 << 12); // MAKE_SYM

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

fn landlock(workspace: &Path) -> std::io::Result<()> {
    let attr = RulesetAttr {
        handled_access_fs: LANDLOCK_WRITE_ACCESS,
    };
    #[allow(unsafe_code)]
    // SAFETY: landlock_create_ruleset reads `attr` (its size is passed) and returns a new fd.
    let ruleset = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const RulesetAttr,
            std::mem::size_of::<RulesetAttr>(),
            0u32,
        )
    };
    if ruleset < 0 {
        return Err(last_error());
    }
    let ruleset = ruleset as libc::c_int;
    let result = (|| {
        let path = CString::new(workspace.as_os_str().as_encoded_bytes())
            .map_err(std::io::Error::other)?;
        #[allow(unsafe_code)]
        // SAFETY: opens a path the caller gave, as O_PATH; the fd is closed below.
        let dir = unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
        if dir < 0 {
            return Err(last_error());
        }
        let rule = PathBeneathAttr {
            allowed_access: LANDLOCK_WRITE_ACCESS,
            parent_fd: dir,
        };
        #[allow(unsafe_code)]
        // SAFETY: landlock_add_rule reads `rule`; `dir` and `ruleset` are open fds.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_landlock_add_rule,
                ruleset,
                1u32, // LANDLOCK_RULE_PATH_BENEATH
                &rule as *const PathBeneathAttr,
                0u32,
            )
        };
        #[allow(unsafe_code)]
        // SAFETY: closes the fd opened above.
        unsafe {
            libc::close(dir)
        };
        if rc < 0 {
            return Err(last_error());
        }
        #[allow(unsafe_code)]
        // SAFETY: restricts this process with the ruleset fd; no memory is passed.
        let rc = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32) };
        if rc < 0 {
            return Err(last_error());
        }
        Ok(())
    })();
    #[allow(unsafe_code)]
    // SAFETY: closes the ruleset fd created above.
    unsafe {
        libc::close(ruleset)
    };
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deny_list_is_sorted_without_duplicates_and_has_the_named_calls() {
        let list = denied();
        let mut dedup = list.clone();
        dedup.dedup();
        assert_eq!(list, dedup);
        for nr in [libc::SYS_execve, libc::SYS_ptrace, libc::SYS_mount] {
            assert!(list.contains(&nr));
        }
        // Jump offsets are one byte.
        assert!(list.len() < 250);
    }
}
