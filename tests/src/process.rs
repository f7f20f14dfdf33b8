//! Starting, finding and killing the lab's processes.
//!
//! Every process the lab starts carries `FERROLB_LAB=<prefix>` in its
//! environment. That marker, not a pid file, is how cleanup finds them: it
//! survives a SIGKILLed supervisor and a lost state directory, and it can never
//! match a process the lab did not start.

use std::fs;
use std::path::Path;
use std::process::Stdio;

use crate::names::Prefix;

pub const MARKER_ENV: &str = "FERROLB_LAB";

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot open log {path}: {source}")]
    Log {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
}

/// A command for `program`, run inside `netns` if given (through
/// `ip netns exec`, which execs in place so the pid is the program's), with
/// stdout and stderr appended to `log`.
pub fn command(
    prefix: &Prefix,
    netns: Option<&str>,
    program: &Path,
    args: &[String],
    log: &Path,
) -> Result<tokio::process::Command, ProcessError> {
    let open = || {
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|source| ProcessError::Log {
                path: log.display().to_string(),
                source,
            })
    };
    let (out, err) = (open()?, open()?);
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = tokio::process::Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => tokio::process::Command::new(program),
    };
    cmd.args(args)
        .env(MARKER_ENV, prefix.as_str())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // Dropped children are reaped by tokio, so killed processes don't linger as zombies.
        .kill_on_drop(false);
    Ok(cmd)
}

pub fn spawn(
    prefix: &Prefix,
    netns: Option<&str>,
    program: &Path,
    args: &[String],
    log: &Path,
) -> Result<tokio::process::Child, ProcessError> {
    command(prefix, netns, program, args, log)?
        .spawn()
        .map_err(|source| ProcessError::Spawn {
            program: program.display().to_string(),
            source,
        })
}

/// Runs blocking work (a child process such as kubectl or ip, a blocking
/// socket) on tokio's blocking pool, so it never stalls the async runtime.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Pids of live processes carrying this lab's marker, except our own.
pub fn lab_processes(prefix: &Prefix) -> Vec<u32> {
    let needle = format!("{MARKER_ENV}={}\0", prefix.as_str());
    let me = std::process::id();
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me || !alive(pid) {
            continue;
        }
        let Ok(env) = fs::read(entry.path().join("environ")) else {
            continue;
        };
        // The marker is a whole NUL-terminated entry; match at an entry start.
        let found = env.split(|b| *b == 0).any(|e| {
            let mut e = e.to_vec();
            e.push(0);
            e == needle.as_bytes()
        });
        if found {
            pids.push(pid);
        }
    }
    pids
}

/// True if the process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

/// Sends signal `sig` ("TERM", "KILL", ...) to `pid`; a direct syscall, so it
/// never blocks an async runtime.
pub fn signal(pid: u32, sig: &str) -> bool {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let Ok(signal) = format!("SIG{sig}").parse::<Signal>() else {
        return false;
    };
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    kill(Pid::from_raw(pid), signal).is_ok()
}

/// SIGKILLs every process of the lab until none is left (a dying supervisor
/// may still be starting one). Returns how many were killed.
pub fn kill_all(prefix: &Prefix) -> usize {
    let mut killed = 0;
    for _ in 0..50 {
        let pids = lab_processes(prefix);
        if pids.is_empty() {
            break;
        }
        for pid in &pids {
            if signal(*pid, "KILL") {
                killed += 1;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_marked_processes_only() {
        let prefix: Prefix = "zzproc".parse().unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env(MARKER_ENV, prefix.as_str())
            .spawn()
            .unwrap();
        let pid = child.id();
        assert!(alive(pid));
        // Until the child has exec'd, /proc shows the parent's environment.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while lab_processes(&prefix).is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(lab_processes(&prefix), vec![pid]);
        let other: Prefix = "zzproc2".parse().unwrap();
        assert!(
            lab_processes(&other).is_empty(),
            "a longer prefix must not match"
        );
        assert!(signal(pid, "KILL"));
        child.wait().unwrap();
        assert!(!alive(pid));
        assert!(lab_processes(&prefix).is_empty());
    }
}
