//! Subprocesses of a build: running a command with its output logged, finding a program,
//! installing a missing one from Debian, copying a tree with `cp -a`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use indicatif::ProgressBar;

use crate::error::io_err;
use crate::progress::Steps;
use crate::BuildError;

/// Runs a command; its output goes to `log` (and the last line to the spinner).
pub(crate) fn run(cmd: &mut Command, pb: &ProgressBar, log: &Path) -> Result<(), BuildError> {
    let shown = format!("{cmd:?}").replace('"', "");
    let mut logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| io_err("open log", log, e))?;
    let _ = writeln!(logf, "$ {shown}");
    let err_log = logf.try_clone().map_err(|e| io_err("open log", log, e))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(err_log))
        .spawn()
        .map_err(|e| BuildError::Command {
            command: shown.clone(),
            status: format!("cannot start: {e}"),
            tail: vec![],
            log: None,
        })?;
    let mut tail: Vec<String> = Vec::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = writeln!(logf, "{line}");
            pb.set_message(line.clone());
            tail.push(line);
            if tail.len() > 200 {
                tail.drain(..100);
            }
        }
    }
    let status = child
        .wait()
        .map_err(|e| io_err("wait for", Path::new(&shown), e))?;
    if status.success() {
        return Ok(());
    }
    // stderr went to the log: show its end.
    let all = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<String> = all.lines().map(str::to_string).collect();
    let tail = lines
        .get(lines.len().saturating_sub(12)..)
        .unwrap_or_default()
        .to_vec();
    Err(BuildError::Command {
        command: shown,
        status: status.to_string(),
        tail,
        log: Some(log.to_path_buf()),
    })
}

/// Finds a program in PATH, or in /usr/sbin and /sbin (root's tools when PATH lacks them).
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Installs a Debian package on the host with apt-get (updating the lists once on failure).
pub(crate) fn apt_install(package: &str, pb: &ProgressBar, log: &Path) -> Result<(), BuildError> {
    let install = || {
        let mut c = Command::new("apt-get");
        // Tests build images in parallel: wait for another install's dpkg lock, don't fail.
        c.args(["-o", "DPkg::Lock::Timeout=600"])
            .args(["install", "-y", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    if run(&mut install(), pb, log).is_ok() {
        return Ok(());
    }
    run(Command::new("apt-get").arg("update"), pb, log)?;
    run(&mut install(), pb, log)
}

/// Copies a directory tree (preserving modes, ownership, symlinks) with `cp -a`.
pub(crate) fn copy_tree(
    src: &Path,
    dst: &Path,
    pb: &ProgressBar,
    log: &Path,
) -> Result<(), BuildError> {
    let mut from = src.as_os_str().to_owned();
    from.push("/.");
    run(Command::new("cp").arg("-a").arg(from).arg(dst), pb, log)
}

/// A program, installing its Debian package with apt-get (said on the output) if missing.
pub(crate) fn ensure_program(
    program: &str,
    package: &str,
    steps: &Steps,
    pb: &indicatif::ProgressBar,
    log: &Path,
) -> Result<PathBuf, BuildError> {
    if let Some(p) = find_program(program) {
        return Ok(p);
    }
    steps.note(
        pb,
        &format!(
            "{program} is not installed: installing the Debian package `{package}` with apt-get"
        ),
    );
    apt_install(package, pb, log)?;
    find_program(program).ok_or_else(|| {
        BuildError::Usage(format!("{package} is installed but there is no {program}"))
    })
}
