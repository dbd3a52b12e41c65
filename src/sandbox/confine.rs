//! The source child's confinement, applied to itself before it reads its request (so before
//! any untrusted byte): resource limits, no new privileges, a seccomp filter, and Landlock.
//!
//! * **Resource limits** (`sources.child_*`): address space, CPU time, open files, file size.
//!   The main thread's stack is the one the kernel gave at exec; every walk runs on threads
//!   whose stack size factoryd sets, and keeps its own stack (no recursion a tree can drive).
//! * **no_new_privs**: no set-uid gain through anything it could start.
//! * **seccomp** (x86_64 and aarch64): an allow list ([`allowed`]) of what fetching and
//!   sealing use — memory, threads, files, sockets, waiting; every other call fails with `EPERM`
//!   (so `execve`, `fork`, `kill`, `ptrace`, mounts, namespaces, `bpf`, keyrings, ... do), and
//!   `tgkill` only reaches this process. A call of another ABI (32-bit) kills the process; the
//!   x32 ABI's numbers match no entry and fail.
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

/// The syscalls the confined child may make; every other call fails with `EPERM`. The list is
/// what the child was seen to use (`strace -f` over the integration tests' git over http, https
/// through the egress proxy, ssh, tar.gz and local sources) plus the calls of the same families
/// its runtime and libraries may take on other paths (the `*at` forms, `statx`, sleeping,
/// signal returns). Left out on purpose: `execve`, process creation (`clone` is allowed for
/// threads only, and `clone3` reports `ENOSYS`, both before this list), `kill` (and `tgkill`
/// outside this process, before this list),
/// `ptrace`, `process_vm_*`, mounts, namespaces, `bpf`, `perf_event_open`, modules, keyrings,
/// `userfaultfd`, `io_uring`, `chown`, `setuid`-family, `open_by_handle_at`.
fn allowed() -> Vec<libc::c_long> {
    let mut out = vec![
        // Memory and threads (std, tokio, the allocator).
        libc::SYS_brk,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mprotect,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_membarrier,
        libc::SYS_futex,
        // clone and clone3 (threads only) are filtered by their flags, before this list.
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_sched_getaffinity,
        libc::SYS_sched_yield,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_prctl,
        libc::SYS_getrandom,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_getppid,
        libc::SYS_getuid,
        libc::SYS_geteuid,
        libc::SYS_getgid,
        libc::SYS_getegid,
        libc::SYS_prlimit64,
        libc::SYS_getrusage,
        libc::SYS_uname,
        libc::SYS_clock_gettime,
        libc::SYS_clock_getres,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_gettimeofday,
        libc::SYS_restart_syscall,
        // Signals: handlers, masks, alternate stacks (stack overflow reports).
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sigaltstack,
        // Files: reading the source, writing the context into the workspace (Landlock bounds
        // where), libgit2's object store.
        libc::SYS_openat,
        libc::SYS_close,
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_pread64,
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_pwrite64,
        libc::SYS_lseek,
        libc::SYS_fcntl,
        libc::SYS_ioctl,
        libc::SYS_flock,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_ftruncate,
        libc::SYS_fallocate,
        libc::SYS_newfstatat,
        libc::SYS_fstat,
        libc::SYS_statx,
        libc::SYS_statfs,
        libc::SYS_fstatfs,
        libc::SYS_faccessat,
        libc::SYS_faccessat2,
        libc::SYS_getdents64,
        libc::SYS_getcwd,
        libc::SYS_readlinkat,
        libc::SYS_mkdirat,
        libc::SYS_unlinkat,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_linkat,
        libc::SYS_symlinkat,
        libc::SYS_fchmod,
        libc::SYS_fchmodat,
        libc::SYS_utimensat,
        libc::SYS_umask,
        libc::SYS_dup,
        libc::SYS_dup3,
        libc::SYS_pipe2,
        // Waiting (tokio's epoll driver, libgit2's and libssh2's poll).
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_pwait,
        libc::SYS_eventfd2,
        libc::SYS_ppoll,
        libc::SYS_pselect6,
        // Sockets: servers through the egress policy, and the loopback egress proxy.
        libc::SYS_socket,
        libc::SYS_socketpair,
        libc::SYS_connect,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_accept4,
        libc::SYS_sendto,
        libc::SYS_recvfrom,
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
        libc::SYS_shutdown,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        libc::SYS_getsockopt,
        libc::SYS_setsockopt,
    ];
    #[cfg(target_arch = "x86_64")]
    out.extend([
        // The older forms of the calls above, which x86_64 still has and its libraries use.
        libc::SYS_open,
        libc::SYS_stat,
        libc::SYS_lstat,
        libc::SYS_access,
        libc::SYS_readlink,
        libc::SYS_mkdir,
        libc::SYS_rmdir,
        libc::SYS_unlink,
        libc::SYS_rename,
        libc::SYS_link,
        libc::SYS_symlink,
        libc::SYS_chmod,
        libc::SYS_dup2,
        libc::SYS_pipe,
        libc::SYS_poll,
        libc::SYS_select,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_create,
        libc::SYS_eventfd,
        libc::SYS_getdents,
        libc::SYS_arch_prctl,
        libc::SYS_getrlimit,
        libc::SYS_time,
        libc::SYS_accept,
    ]);
    out.sort_unstable();
    out.dedup();
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
    const JSET_K: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const RET_ALLOW: u32 = 0x7fff_0000; // SECCOMP_RET_ALLOW
    const RET_KILL: u32 = 0x8000_0000; // SECCOMP_RET_KILL_PROCESS
    const RET_EPERM: u32 = 0x0005_0000 | libc::EPERM as u32; // SECCOMP_RET_ERRNO | EPERM
    const RET_ENOSYS: u32 = 0x0005_0000 | libc::ENOSYS as u32;
    let stmt = |code, k| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code, k, jt, jf| libc::sock_filter { code, jt, jf, k };

    let allowed = allowed();
    let pid = std::process::id();
    let mut program = vec![
        /* 0 */ stmt(LD_W_ABS, 4), // arch
        /* 1 */ jump(JEQ_K, AUDIT_ARCH, 1, 0),
        /* 2 */ stmt(RET_K, RET_KILL), // another ABI: nothing here was written for it
        /* 3 */ stmt(LD_W_ABS, 0), // nr
        // tgkill(tgid, tid, sig) is how a thread raises a signal (abort, a stack overflow
        // report): only with this process as the target, so the child cannot signal the worker.
        /* 4 */
        jump(JEQ_K, libc::SYS_tgkill as u32, 0, 6),
        /* 5 */ stmt(LD_W_ABS, 20), // args[0], high word
        /* 6 */ jump(JEQ_K, 0, 0, 2),
        /* 7 */ stmt(LD_W_ABS, 16), // args[0], low word
        /* 8 */ jump(JEQ_K, pid, 1, 0),
        /* 9 */ stmt(RET_K, RET_EPERM),
        /* 10 */ stmt(RET_K, RET_ALLOW),
        // clone3's flags are behind a pointer the filter cannot read: say it does not exist,
        // and the C library falls back to clone, whose flags it can.
        /* 11 */
        jump(JEQ_K, libc::SYS_clone3 as u32, 0, 1),
        /* 12 */ stmt(RET_K, RET_ENOSYS),
        // clone only for threads (CLONE_THREAD): no new processes.
        /* 13 */
        jump(JEQ_K, libc::SYS_clone as u32, 0, 4),
        /* 14 */ stmt(LD_W_ABS, 16), // args[0] (flags), low word
        /* 15 */ jump(JSET_K, libc::CLONE_THREAD as u32, 1, 0),
        /* 16 */ stmt(RET_K, RET_EPERM),
        /* 17 */
        stmt(RET_K, RET_ALLOW),
        // 18: the list, with the syscall number still loaded.
    ];
    // One comparison per allowed call; a match jumps to the ALLOW return after the list, and a
    // call that matches none falls through to EPERM (the x32 ABI's numbers, with bit 30 set,
    // match none).
    let n = allowed.len();
    for (i, nr) in allowed.iter().enumerate() {
        let to_allow = (n - i) as u8; // skip the rest of the list and the EPERM
        program.push(jump(JEQ_K, *nr as u32, to_allow, 0));
    }
    program.push(stmt(RET_K, RET_EPERM));
    program.push(stmt(RET_K, RET_ALLOW));

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
    fn the_allow_list_is_sorted_and_leaves_out_what_a_source_must_never_do() {
        let list = allowed();
        let mut dedup = list.clone();
        dedup.dedup();
        assert_eq!(list, dedup);
        for nr in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_kill,
            libc::SYS_tgkill,
            libc::SYS_mount,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_bpf,
            libc::SYS_process_vm_readv,
            libc::SYS_io_uring_setup,
            libc::SYS_keyctl,
            libc::SYS_setuid,
            libc::SYS_clone,
            libc::SYS_clone3,
        ] {
            assert!(!list.contains(&nr), "{nr} is allowed");
        }
        #[cfg(target_arch = "x86_64")]
        assert!(!list.contains(&libc::SYS_fork) && !list.contains(&libc::SYS_vfork));
        // Jump offsets are one byte.
        assert!(list.len() < 250);
    }
}
