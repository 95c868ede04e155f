//! Starting a unit's process the way `posix_spawn` does: `clone(CLONE_VM | CLONE_VFORK)`, the
//! child running on a stack of its own in the agent's memory until it calls `execve`.
//!
//! Why not `std::process::Command`: the process runtime must set `PR_SET_PDEATHSIG` in the child
//! (see [`super::process`]), and a `pre_exec` hook makes the standard library `fork`. A fork of
//! the agent, a multi-threaded process, copies its page tables and write-protects every page it
//! has; each page the agent then writes faults and flushes the other cores' TLBs. On the
//! tiny-jobs benchmark that fork and its aftermath took about 40% of the agent's CPU. With
//! `CLONE_VM` nothing is copied and nothing faults afterwards.
//!
//! The child shares the agent's memory, so it only makes async-signal-safe system calls on data
//! prepared beforehand (no allocation, no locks): it resets signal handlers and the signal mask,
//! joins a new process group, asks for SIGKILL when its parent thread dies, wires stdin to
//! `/dev/null` and stdout/stderr to pipes, changes directory and calls `execve` for each
//! candidate path. On failure it stores `errno` where the parent reads it and exits; the parent,
//! suspended by `CLONE_VFORK` until then, reaps it and returns the error.
//!
//! The parent opens a pidfd for the child before anything could reap it, so waiting for the exit
//! is readiness on that descriptor ([`UnitProcess::wait`]), in the same tokio runtime as
//! everything else and without tokio's process driver.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicI32, Ordering};
use tokio::io::unix::AsyncFd;

/// Signals are numbered below this (Linux's `_NSIG`).
const SIGNAL_MAX: libc::c_int = 65;
/// The child's stack: it runs a few system calls and `execve`.
const CHILD_STACK_BYTES: usize = 128 * 1024;

/// What the unit's process is started with.
pub(crate) struct SpawnRequest<'a> {
    pub command: &'a [String],
    /// The whole environment (nothing of the agent's is added).
    pub env: Vec<(OsString, OsString)>,
    pub cwd: &'a Path,
    /// The process that must be the child's parent when `PR_SET_PDEATHSIG` is armed.
    pub agent_pid: libc::pid_t,
}

/// A started process: its pid (also its process group id), a pidfd, and the read ends of its
/// stdout and stderr.
pub(crate) struct Spawned {
    pub pid: libc::pid_t,
    pub pidfd: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// Everything the child reads, prepared by the parent.
struct ChildArgs {
    /// Paths to try with `execve`, in order (one, or one per `PATH` entry).
    candidates: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    cwd: CString,
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    agent_pid: libc::pid_t,
    /// Set by the child when it fails before or at `execve`.
    errno: AtomicI32,
}

fn cstring(bytes: &[u8], what: &str) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte"),
        )
    })
}

/// The paths `execve` tries for `program`, the way `execvp` searches: as given when it holds a
/// `/`, else in each directory of the unit's own `PATH`.
fn candidates(program: &str, env: &[(OsString, OsString)]) -> io::Result<Vec<CString>> {
    if program.contains('/') {
        return Ok(vec![cstring(program.as_bytes(), "the program")?]);
    }
    let path = env
        .iter()
        .rev()
        .find(|(name, _)| name == "PATH")
        .map(|(_, value)| value.as_os_str())
        .unwrap_or(OsStr::new("/usr/local/bin:/usr/bin:/bin"));
    std::env::split_paths(path)
        .map(|dir| {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".").to_path_buf()
            } else {
                dir
            };
            cstring(dir.join(program).as_os_str().as_bytes(), "PATH")
        })
        .collect()
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Starts the process. Blocks the calling thread until the child has called `execve` (or
/// failed); the calling thread is the child's parent for `PR_SET_PDEATHSIG`.
pub(crate) fn spawn(request: SpawnRequest<'_>) -> io::Result<Spawned> {
    let program = request
        .command
        .first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no command"))?;
    let argv_owned = request
        .command
        .iter()
        .map(|arg| cstring(arg.as_bytes(), "an argument"))
        .collect::<io::Result<Vec<_>>>()?;
    let envp_owned = request
        .env
        .iter()
        .map(|(name, value)| {
            let mut pair = name.as_bytes().to_vec();
            pair.push(b'=');
            pair.extend_from_slice(value.as_bytes());
            cstring(&pair, "an environment variable")
        })
        .collect::<io::Result<Vec<_>>>()?;
    let null_terminated = |strings: &[CString]| {
        strings
            .iter()
            .map(|s| s.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect::<Vec<_>>()
    };
    let stdin = std::fs::File::open("/dev/null")?;
    let (stdout_read, stdout_write) = pipe()?;
    let (stderr_read, stderr_write) = pipe()?;
    let args = ChildArgs {
        candidates: candidates(program, &request.env)?,
        argv: null_terminated(&argv_owned),
        envp: null_terminated(&envp_owned),
        cwd: cstring(request.cwd.as_os_str().as_bytes(), "the working directory")?,
        stdin: stdin.as_raw_fd(),
        stdout: stdout_write.as_raw_fd(),
        stderr: stderr_write.as_raw_fd(),
        agent_pid: request.agent_pid,
        errno: AtomicI32::new(0),
    };
    let mut stack = vec![0u8; CHILD_STACK_BYTES];
    // The stack grows down from its 16-byte-aligned top.
    let stack_top = {
        let end = stack.as_mut_ptr() as usize + stack.len();
        (end & !15) as *mut libc::c_void
    };

    // No signal handler of the agent may run in the child while it shares the agent's memory:
    // block every signal around the clone; the child resets the handlers, then its mask.
    // SAFETY: plain signal-set manipulation on local values.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    let mut previous: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut previous);
    }
    // SAFETY: `child_main` only reads `args` (alive until clone returns: CLONE_VFORK suspends
    // this thread until the child has exec'd or exited) and makes async-signal-safe calls; the
    // stack is ours and unused by anyone else.
    let pid = unsafe {
        libc::clone(
            child_main,
            stack_top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &args as *const ChildArgs as *mut libc::c_void,
        )
    };
    let clone_error = io::Error::last_os_error();
    // SAFETY: restores the mask saved above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut());
    }
    drop(stack);
    if pid < 0 {
        return Err(clone_error);
    }
    let errno = args.errno.load(Ordering::SeqCst);
    if errno != 0 {
        reap_blocking(pid);
        return Err(io::Error::from_raw_os_error(errno));
    }
    // SAFETY: pidfd_open takes a pid and flags; the child is not reaped yet, so the pid is ours.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
    if pidfd < 0 {
        let error = io::Error::last_os_error();
        // SAFETY: kill takes plain integers; the pid is our unreaped child.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        reap_blocking(pid);
        return Err(error);
    }
    Ok(Spawned {
        pid,
        // SAFETY: pidfd_open returned a new descriptor.
        pidfd: unsafe { OwnedFd::from_raw_fd(pidfd) },
        stdout: stdout_read,
        stderr: stderr_read,
    })
}

/// Waits for a child that has ended or was just killed.
pub(crate) fn reap_blocking(pid: libc::pid_t) {
    let mut status = 0;
    // SAFETY: waitpid on our own child.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0
        && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
    {}
}

/// The child, between clone and exec. Only async-signal-safe calls on prepared data.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points at the parent's `ChildArgs`, alive while the parent is suspended.
    let args = unsafe { &*(arg as *const ChildArgs) };
    fn fail_with(args: &ChildArgs, errno: i32) -> ! {
        args.errno.store(errno.max(1), Ordering::SeqCst);
        // SAFETY: _exit ends this process without running anything of the parent's.
        unsafe { libc::_exit(127) }
    }
    let fail = |errno: i32| fail_with(args, errno);
    let last_errno = || {
        io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EINVAL)
    };
    // SAFETY: every call below is async-signal-safe and only reads `args`.
    unsafe {
        // Handlers are the agent's code: back to the defaults (ignored signals stay ignored,
        // except SIGPIPE, which Rust ignores in the agent and a unit expects at its default).
        for signal in 1..SIGNAL_MAX {
            if signal == libc::SIGKILL || signal == libc::SIGSTOP {
                continue;
            }
            let mut current: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signal, std::ptr::null(), &mut current) != 0 {
                continue;
            }
            let ignored = current.sa_sigaction == libc::SIG_IGN;
            if current.sa_sigaction != libc::SIG_DFL && (!ignored || signal == libc::SIGPIPE) {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(signal, &default, std::ptr::null_mut());
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());

        // Its own group, so `stop` reaches what the unit starts.
        if libc::setpgid(0, 0) != 0 {
            fail(last_errno());
        }
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            fail(last_errno());
        }
        // The agent may have died before the prctl; then the signal never comes.
        if libc::getppid() != args.agent_pid {
            fail(libc::ESRCH);
        }
        for (from, to) in [(args.stdin, 0), (args.stdout, 1), (args.stderr, 2)] {
            let wired = if from == to {
                // dup2 onto itself keeps close-on-exec: clear it instead.
                libc::fcntl(from, libc::F_SETFD, 0)
            } else {
                libc::dup2(from, to)
            };
            if wired < 0 {
                fail(last_errno());
            }
        }
        if libc::chdir(args.cwd.as_ptr()) != 0 {
            fail(last_errno());
        }
        // Like execvp: a permission error is remembered while later directories are tried.
        let mut errno = libc::ENOENT;
        for candidate in &args.candidates {
            libc::execve(candidate.as_ptr(), args.argv.as_ptr(), args.envp.as_ptr());
            match last_errno() {
                libc::ENOENT | libc::ENOTDIR => {}
                libc::EACCES => errno = libc::EACCES,
                other => {
                    errno = other;
                    break;
                }
            }
        }
        fail(errno)
    }
}

/// A started unit process, waited for through its pidfd. Reaped once [`UnitProcess::wait`]
/// returns; if dropped before that, a task reaps it when it ends (so no zombie stays behind).
pub(crate) struct UnitProcess {
    pid: libc::pid_t,
    pidfd: Option<AsyncFd<OwnedFd>>,
}

impl UnitProcess {
    /// Must be called within a tokio runtime.
    pub(crate) fn new(pid: libc::pid_t, pidfd: OwnedFd) -> io::Result<Self> {
        Ok(Self {
            pid,
            // SAFETY: an OwnedFd stays open and keeps its descriptor for as long as it lives.
            pidfd: Some(unsafe {
                AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
                    .map_err(io::Error::from)?
            }),
        })
    }

    /// Waits for the process to end and reaps it.
    pub(crate) async fn wait(&mut self) -> io::Result<ExitStatus> {
        let pidfd = self
            .pidfd
            .as_ref()
            .ok_or_else(|| io::Error::other("the process was already reaped"))?;
        loop {
            let mut ready = pidfd.readable().await?;
            let mut status = 0;
            // SAFETY: waitpid on our own, not yet reaped, child.
            match unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) } {
                0 => ready.clear_ready(),
                pid if pid == self.pid => {
                    self.pidfd = None;
                    return Ok(ExitStatus::from_raw(status));
                }
                _ => {
                    let error = io::Error::last_os_error();
                    if error.kind() != io::ErrorKind::Interrupted {
                        return Err(error);
                    }
                }
            }
        }
    }
}

impl Drop for UnitProcess {
    fn drop(&mut self) {
        let Some(pidfd) = self.pidfd.take() else {
            return;
        };
        let mut process = UnitProcess {
            pid: self.pid,
            pidfd: Some(pidfd),
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if process.wait().await.is_err() {
                    // Not waitable (already reaped elsewhere): nothing to do again on drop.
                    drop(process.pidfd.take());
                }
            });
        } else {
            // No runtime left to wait in: do not block; the zombie goes with the agent.
            process.pidfd = None;
        }
    }
}
