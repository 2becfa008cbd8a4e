//! `unitctl` end to end against the fake manager.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod api_common;

use std::process::{Command, Output};

use api_common::{Fake, BROKEN};
use flotilla_init_api::{ActiveState, LogStream};

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// One `unitctl: ...` line on stderr and exit status 1.
fn assert_one_line_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert!(err.starts_with("unitctl: "), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains(needle), "{needle:?} not in {err}");
}

#[test]
fn list_json() {
    let fake = Fake::start();
    let o = fake.unitctl(&["list", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let units = v.as_array().unwrap();
    assert_eq!(units.len(), 5);
    let web = units.iter().find(|u| u["name"] == "web").unwrap();
    for field in [
        "name",
        "state",
        "sub_state",
        "load_state",
        "pid",
        "restarts",
        "exit_code",
        "exit_signal",
        "since_us",
        "result",
        "message",
        "description",
    ] {
        assert!(web.get(field).is_some(), "{field} missing from {web}");
    }
    assert_eq!(web["state"], "active");
    assert_eq!(web["sub_state"], "running");
    assert_eq!(web["pid"], 4242);
    assert_eq!(web["since_us"], 1_700_000_000_123_456u64);
    assert_eq!(web["description"], "Web server");
}

#[test]
fn list_table() {
    let fake = Fake::start();
    let o = fake.unitctl(&["list"]);
    assert!(o.status.success());
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("UNIT"), "{out}");
    for col in ["LOAD", "ACTIVE", "SUB", "PID", "RESTARTS", "DESCRIPTION"] {
        assert!(lines[0].contains(col), "{out}");
    }
    // Columns line up: every row has ACTIVE's value where the header has ACTIVE.
    let active_col = lines[0].find("ACTIVE").unwrap();
    let web = lines.iter().find(|l| l.starts_with("web ")).unwrap();
    assert_eq!(&web[active_col..active_col + 6], "active");
    assert!(web.ends_with("Web server"), "{web}");
    assert!(out.contains("5 units listed."));
}

#[test]
fn status_text_and_json() {
    let fake = Fake::start();
    let o = fake.unitctl(&["status", "web"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("web - Web server"), "{out}");
    assert!(out.contains("Loaded: loaded"), "{out}");
    assert!(
        out.contains("Active: active (running) since 2023-11-14T22:13:20Z"),
        "{out}"
    );
    assert!(out.contains("Main PID: 4242"), "{out}");
    assert!(out.contains("Restarts: 0"), "{out}");
    // The last 10 of the 15 log lines.
    assert!(out.contains("stdout line 15"), "{out}");
    assert!(
        out.contains("2023-11-14T22:13:20.006Z stderr line 6"),
        "{out}"
    );
    assert!(!out.contains("line 5\n"), "{out}");

    let o = fake.unitctl(&["--json", "status", "web"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["name"], "web");
    assert_eq!(v["state"], "active");
}

#[test]
fn status_of_unknown_unit() {
    let fake = Fake::start();
    let o = fake.unitctl(&["status", "nosuch"]);
    assert_one_line_error(&o, "unit nosuch not found");
    assert!(stdout(&o).is_empty());
}

#[test]
fn unreachable_manager() {
    let o = Command::new(env!("CARGO_BIN_EXE_unitctl"))
        .args(["--api", "/nonexistent/sock", "list"])
        .output()
        .unwrap();
    assert_one_line_error(&o, "cannot reach the manager at /nonexistent/sock");
    assert!(stderr(&o).contains("FLOTILLA_API"));

    // The environment variable is honoured.
    let o = Command::new(env!("CARGO_BIN_EXE_unitctl"))
        .arg("list")
        .env("FLOTILLA_API", "/nonexistent/env.sock")
        .output()
        .unwrap();
    assert_one_line_error(&o, "/nonexistent/env.sock");
}

#[test]
fn api_from_environment() {
    let fake = Fake::start();
    let o = Command::new(env!("CARGO_BIN_EXE_unitctl"))
        .args(["list", "--json"])
        .env("FLOTILLA_API", &fake.socket)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn start_stop_restart_wait() {
    let fake = Fake::start();
    let o = fake.unitctl(&["start", "db"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        fake.model.lock().unwrap().units["db"].active_state,
        ActiveState::Active
    );

    let o = fake.unitctl(&["stop", "db", "web"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        fake.model.lock().unwrap().units["web"].active_state,
        ActiveState::Inactive
    );

    let o = fake.unitctl(&["--json", "restart", "web"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v[0]["state"], "active");

    let o = fake.unitctl(&["start", "nosuch"]);
    assert_one_line_error(&o, "unit nosuch not found");

    let o = fake.unitctl(&["start", "locked"]);
    assert_one_line_error(&o, "the manager is shutting down");
}

#[test]
fn failed_start_exits_3() {
    let fake = Fake::start();
    let o = fake.unitctl(&["start", BROKEN]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert_eq!(
        stderr(&o).trim_end(),
        "unitctl: broken failed: exit-code: main process exited with code 1"
    );
}

#[test]
fn no_block_returns_at_once() {
    let fake = Fake::start();
    let o = fake.unitctl(&["start", "--no-block", BROKEN]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The fake turns it failed only when asked again: unitctl did not poll.
    assert_eq!(
        fake.model.lock().unwrap().units[BROKEN].active_state,
        ActiveState::Activating
    );
}

#[test]
fn wait_times_out() {
    let fake = Fake::start();
    fake.model.lock().unwrap().stuck.push("web".into());
    let start = std::time::Instant::now();
    let o = fake.unitctl(&["stop", "--timeout", "0.3", "web"]);
    let took = start.elapsed();
    assert_one_line_error(&o, "timed out after 0.3 s waiting for web");
    assert!(
        stderr(&o).contains("deactivating (stop-sigterm)"),
        "{}",
        stderr(&o)
    );
    assert!(took >= std::time::Duration::from_millis(300), "{took:?}");
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    // Polling happened: GetUnit was asked several times.
    let polls = fake
        .model
        .lock()
        .unwrap()
        .seen
        .iter()
        .filter(|r| **r == flotilla_init::api::Request::GetUnit("web".into()))
        .count();
    assert!(polls >= 3, "{polls} polls");
}

#[test]
fn logs_cat_load_remove_reload() {
    let fake = Fake::start();
    let o = fake.unitctl(&["logs", "web", "-n", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "2023-11-14T22:13:20.014Z stderr line 14\n2023-11-14T22:13:20.015Z stdout line 15\n"
    );

    let o = fake.unitctl(&["cat", "web"]);
    assert_eq!(stdout(&o), "[unit]\ndescription = \"Web server\"\n");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("api-made.toml");
    // A whole unit: unitctl checks the file with the unit parser before sending it.
    const MADE: &str = "[unit]\ndescription = \"made\"\n[container]\ncommand = [\"/bin/true\"]\n";
    std::fs::write(&file, MADE).unwrap();
    let o = fake.unitctl(&["load", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "api-made: loaded, inactive (dead)\n");
    assert_eq!(fake.model.lock().unwrap().texts["api-made"], MADE);
    let o = fake.unitctl(&["load", file.to_str().unwrap(), "--name", "other"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(fake.model.lock().unwrap().units.contains_key("other"));

    let bad = dir.path().join("bad.toml");
    // A valid unit file (so unitctl sends it) that the fake manager refuses: its error is
    // printed on one line.
    std::fs::write(&bad, "[container]\ncommand = [\"/bin/true\"]\n").unwrap();
    let o = fake.unitctl(&["load", bad.to_str().unwrap()]);
    assert_one_line_error(&o, "bad: line 1, column 1: missing [unit] table");

    let o = fake.unitctl(&["load", "/nonexistent/x.toml"]);
    assert_one_line_error(&o, "cannot read /nonexistent/x.toml");

    let o = fake.unitctl(&["remove", "api-made"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!fake.model.lock().unwrap().units.contains_key("api-made"));

    let o = fake.unitctl(&["reload"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "added: new\nchanged: web\n");
    let o = fake.unitctl(&["reload", "--restart-changed"]);
    assert!(stdout(&o).contains("restarted: web"));

    fake.model.lock().unwrap().reload_errors =
        vec!["/etc/flotilla/units/x.toml: line 3: unknown key `imgae`".into()];
    let o = fake.unitctl(&["reload"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.starts_with("unitctl: reload: 1 unit file(s)"), "{err}");
    assert!(err.contains("unknown key `imgae`"), "{err}");
}

/// `unitctl load FILE` of a broken unit file names the user's FILE with line and column,
/// keeps the `help:` on its own line, and sends nothing to the manager (before, the error
/// named the manager's stored copy, `<state>/units/NAME.toml`, and the help arrived joined
/// to the message by a space).
#[test]
fn load_of_a_broken_file_names_the_users_file() {
    let fake = Fake::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("misspelt.toml");
    std::fs::write(
        &file,
        "[container]\ncommand = [\"/bin/true\"]\ncapabilities = [\"CAP_KILL\", \"CAP_NET_ADMN\"]\n",
    )
    .unwrap();
    let o = fake.unitctl(&["load", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(
        stderr(&o),
        format!(
            "unitctl: {}:3:29: unknown capability \"CAP_NET_ADMN\"\n  help: did you mean \"CAP_NET_ADMIN\"? (use capability names as in \
             capabilities(7), e.g. \"CAP_NET_BIND_SERVICE\" or \"NET_ADMIN\")\n",
            file.display()
        )
    );
    assert_eq!(stdout(&o), "");
    assert!(!fake.model.lock().unwrap().texts.contains_key("misspelt"));

    // A template is checked as a template (its name from --name).
    let template = dir.path().join("worker.toml");
    std::fs::write(&template, "[container]\ncommand = 5\n").unwrap();
    let o = fake.unitctl(&["load", template.to_str().unwrap(), "--name", "worker@"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).starts_with(&format!("unitctl: {}:2:", template.display())),
        "{}",
        stderr(&o)
    );
    assert!(!fake.model.lock().unwrap().texts.contains_key("worker@"));

    // The manager's own refusal of a unit (InvalidUnit) keeps its help on its own line too.
    let refused = dir.path().join("refused.toml");
    std::fs::write(
        &refused,
        "# the fake refuses this\n[container]\ncommand = [\"/bin/true\"]\n",
    )
    .unwrap();
    let o = fake.unitctl(&["load", refused.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(
        stderr(&o),
        "unitctl: <state>/units/refused.toml:1:1: refused\n  help: remove the line\n"
    );
}

/// A manager that closes the connection is an error (exit 1, one line), not the quiet
/// success of a closed stdout (`unitctl list | head`), which stays quiet.
#[test]
fn a_closed_connection_is_an_error_a_closed_stdout_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("closing.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
        }
    });
    for args in [&["list"][..], &["status", "web"], &["start", "web"]] {
        let o = Command::new(env!("CARGO_BIN_EXE_unitctl"))
            .arg("--api")
            .arg(&socket)
            .args(args)
            .env_remove("FLOTILLA_API")
            .output()
            .unwrap();
        assert_one_line_error(&o, "unitctl: ");
    }
    // stdout's reader gone before anything is written: quiet, exit 0.
    let fake = Fake::start();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let o = Command::new(env!("CARGO_BIN_EXE_unitctl"))
        .arg("--api")
        .arg(&fake.socket)
        .args(["logs", "-n", "1000", "web"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stderr(&o), "");
}

#[test]
fn logs_follow() {
    use std::io::BufRead;

    let fake = Fake::start();
    let mut child = Command::new(env!("CARGO_BIN_EXE_unitctl"))
        .arg("--api")
        .arg(&fake.socket)
        .args(["logs", "-f", "-n", "1", "web"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    // Kill the follower if the test gets stuck (std's Child never signals a reaped pid).
    let child = std::sync::Arc::new(std::sync::Mutex::new(child));
    {
        let child = std::sync::Arc::clone(&child);
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(20));
            let _ = child.lock().unwrap().kill();
        });
    }
    let first = lines.next().unwrap().unwrap();
    assert_eq!(first, "2023-11-14T22:13:20.015Z stdout line 15");
    fake.model
        .lock()
        .unwrap()
        .logs
        .get_mut("web")
        .unwrap()
        .push(flotilla_init_api::LogEntry {
            seq: 16,
            time_us: 1_700_000_001_000_000,
            stream: LogStream::Manager.into(),
            line: "followed".into(),
        });
    let second = lines.next().unwrap().unwrap();
    assert_eq!(second, "2023-11-14T22:13:21.000Z manager followed");
    let mut child = child.lock().unwrap();
    child.kill().unwrap();
    let _ = child.wait();
}
