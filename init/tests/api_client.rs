//! The typed client against the fake manager: every method, error mapping, signals and
//! concurrency.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod api_common;

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use api_common::{Fake, BROKEN, LOCKED, SLOW};
use flotilla_init::api::Request;
use flotilla_init_api::client::{Client, ClientError};
use flotilla_init_api::{ActiveState, Event, LoadState, LogStream, SubState, UnitResult};

#[test]
fn round_trips() {
    let fake = Fake::start();
    let c = Client::connect(&fake.socket).unwrap();
    assert_eq!(c.socket(), fake.socket.as_path());

    let units = c.list_units().unwrap();
    let names: Vec<&str> = units.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["broken", "db", "locked", "slow", "web"]);

    let web = c.get_unit("web").unwrap();
    assert_eq!(web, fake.model.lock().unwrap().units["web"]);
    assert_eq!(web.since_us, 1_700_000_000_123_456);

    let db = c.start_unit("db").unwrap();
    assert_eq!(
        (db.active_state.as_str(), db.sub_state.as_str()),
        ("active", "running")
    );
    assert_eq!(db.main_pid, 4242);
    let db = c.stop_unit("db").unwrap();
    assert_eq!(
        (db.active_state.as_str(), db.sub_state.as_str()),
        ("inactive", "dead")
    );
    let db = c.restart_unit("db").unwrap();
    assert_eq!(db.active_state, ActiveState::Active);

    let toml = "[unit]\ndescription = \"x\"\n";
    let new = c.load_unit("extra", toml).unwrap();
    assert_eq!(new.name, "extra");
    assert_eq!(new.load_state, LoadState::Loaded);
    assert_eq!(c.cat_unit("extra").unwrap(), toml);
    c.remove_unit("extra").unwrap();
    assert!(c.get_unit("extra").is_err());

    let images = c.list_images().unwrap();
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].name, "registry.example:5000/team/app:1");
    assert_eq!(images[0].digest, format!("sha256:{}", "ab".repeat(32)));

    let report = c.reload(false).unwrap();
    assert_eq!(report.added, ["new"]);
    assert_eq!(report.changed, ["web"]);
    assert!(report.restarted.is_empty());
    let report = c.reload(true).unwrap();
    assert_eq!(report.restarted, ["web"]);

    let logs = c.logs("web", 3).unwrap();
    let seqs: Vec<u64> = logs.iter().map(|l| l.seq).collect();
    assert_eq!(seqs, [13, 14, 15]);
    assert_eq!(logs[0].line, "line 13");
    assert_eq!(logs[0].stream, LogStream::Stdout);
    let logs = c.logs_after("web", 12, 100).unwrap();
    assert_eq!(logs.len(), 3);
    assert!(c.logs_after("web", 15, 100).unwrap().is_empty());

    let seen = fake.model.lock().unwrap().seen.clone();
    assert!(seen.contains(&Request::Logs {
        name: "web".into(),
        lines: 100,
        after_seq: 12
    }));
    assert!(seen.contains(&Request::Logs {
        name: "web".into(),
        lines: 3,
        after_seq: 0
    }));
    assert!(seen.contains(&Request::Reload {
        restart_changed: true
    }));
}

#[test]
fn errors_are_mapped() {
    let fake = Fake::start();
    let c = Client::connect(&fake.socket).unwrap();

    let err = c.get_unit("nosuch").unwrap_err();
    match &err {
        ClientError::Manager { name, message } => {
            assert_eq!(name, "org.flotilla.Error.NoSuchUnit");
            assert_eq!(
                message,
                "unit nosuch not found; `unitctl list` shows the loaded units"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "unit nosuch not found; `unitctl list` shows the loaded units"
    );
    assert_eq!(
        err.manager_error_name(),
        Some("org.flotilla.Error.NoSuchUnit")
    );

    for result in [
        c.start_unit("nosuch"),
        c.stop_unit("nosuch"),
        c.restart_unit("nosuch"),
    ] {
        assert_eq!(
            result.unwrap_err().manager_error_name(),
            Some("org.flotilla.Error.NoSuchUnit")
        );
    }
    assert!(c.cat_unit("nosuch").is_err());
    assert!(c.remove_unit("nosuch").is_err());
    assert!(c.logs("nosuch", 10).is_err());

    let err = c.load_unit("bad", "nonsense").unwrap_err();
    assert_eq!(
        err.manager_error_name(),
        Some("org.flotilla.Error.InvalidUnit")
    );
    assert_eq!(
        err.to_string(),
        "bad: line 1, column 1: missing [unit] table"
    );

    let err = c.start_unit(LOCKED).unwrap_err();
    assert_eq!(err.manager_error_name(), Some("org.flotilla.Error.Refused"));
    assert_eq!(err.to_string(), "the manager is shutting down");
}

#[test]
fn unreachable_socket() {
    let err = Client::connect(std::path::Path::new("/nonexistent/flotilla.sock")).unwrap_err();
    assert!(matches!(err, ClientError::Unreachable { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with("cannot reach the manager at /nonexistent/flotilla.sock: "),
        "{msg}"
    );
    assert!(
        msg.ends_with("(is flotilla-init running? pass --api PATH or set FLOTILLA_API)"),
        "{msg}"
    );
}

#[test]
fn signals_reach_subscribers() {
    let fake = Fake::start();
    let c = Client::connect(&fake.socket).unwrap();
    let mut changes = c.subscribe().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for change in changes.by_ref() {
            if tx.send(change).is_err() {
                break;
            }
        }
    });
    // The server registers a connection for signals right after the handshake; a round trip
    // makes that all but certain, and the loop below covers the rest.
    c.list_units().unwrap();
    let want = Event::UnitStateChanged {
        name: "web".into(),
        active_state: ActiveState::Deactivating.into(),
        sub_state: SubState::StopSigterm.into(),
    };
    let mut got = None;
    for _ in 0..20 {
        fake.events.send(want.clone()).unwrap();
        if let Ok(change) = rx.recv_timeout(Duration::from_millis(250)) {
            got = Some(change.unwrap());
            break;
        }
    }
    assert_eq!(got, Some(want));
    while rx.try_recv().is_ok() {}

    // A state change made through the API is published too (the fake emits it).
    c.stop_unit("web").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen_stop = false;
    while Instant::now() < deadline && !seen_stop {
        if let Ok(Ok(Event::UnitStateChanged {
            name,
            active_state,
            sub_state,
        })) = rx.recv_timeout(Duration::from_millis(100))
        {
            seen_stop = name == "web"
                && active_state == ActiveState::Inactive
                && sub_state == SubState::Dead;
        }
    }
    assert!(seen_stop);
    assert!(fake.server.connections() >= 1);
}

#[test]
fn signals_reach_every_client() {
    let fake = Fake::start();
    let clients: Vec<Client> = (0..3)
        .map(|_| Client::connect(&fake.socket).unwrap())
        .collect();
    let (tx, rx) = mpsc::channel();
    for (i, c) in clients.iter().enumerate() {
        let mut changes = c.subscribe().unwrap();
        c.list_units().unwrap();
        let tx = tx.clone();
        thread::spawn(move || {
            for change in changes.by_ref() {
                if tx.send((i, change)).is_err() {
                    break;
                }
            }
        });
    }
    let mut heard = [false; 3];
    for _ in 0..20 {
        fake.events
            .send(Event::UnitStateChanged {
                name: "db".into(),
                active_state: ActiveState::Activating.into(),
                sub_state: SubState::Start.into(),
            })
            .unwrap();
        while let Ok((i, change)) = rx.recv_timeout(Duration::from_millis(250)) {
            assert!(change.is_ok());
            heard[i] = true;
        }
        if heard.iter().all(|h| *h) {
            break;
        }
    }
    assert_eq!(heard, [true; 3]);
}

#[test]
fn dead_connections_are_dropped() {
    let fake = Fake::start();
    let c = Client::connect(&fake.socket).unwrap();
    c.list_units().unwrap();
    assert_eq!(fake.server.connections(), 1);
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(5);
    while fake.server.connections() > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(fake.server.connections(), 0);
    // Events with no listener are fine.
    fake.events
        .send(Event::UnitStateChanged {
            name: "web".into(),
            active_state: ActiveState::Active.into(),
            sub_state: SubState::Running.into(),
        })
        .unwrap();
    let c = Client::connect(&fake.socket).unwrap();
    assert_eq!(c.list_units().unwrap().len(), 5);
}

/// Wait until `f` holds (at most 10 s).
fn eventually(f: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(5));
    }
    false
}

#[test]
fn concurrent_clients_do_not_serialize() {
    let fake = Fake::start();
    let a = Client::connect(&fake.socket).unwrap();
    let b = Client::connect(&fake.socket).unwrap();
    // Hold the (200 ms late) answers until both requests reached the manager: a transport
    // that served one client at a time would never get there.
    fake.slow.hold.store(true, Ordering::SeqCst);
    let start = Instant::now();
    let (ra, rb) = thread::scope(|s| {
        let ta = s.spawn(|| a.get_unit(SLOW));
        let tb = s.spawn(|| b.get_unit(SLOW));
        let both = eventually(|| fake.slow.in_flight.load(Ordering::SeqCst) == 2);
        fake.slow.hold.store(false, Ordering::SeqCst);
        assert!(both, "the two calls never were in the manager at once");
        (ta.join().unwrap(), tb.join().unwrap())
    });
    assert_eq!(ra.unwrap().name, SLOW);
    assert_eq!(rb.unwrap().name, SLOW);
    assert_eq!(fake.slow.max_in_flight.load(Ordering::SeqCst), 2);
    assert!(start.elapsed() >= Duration::from_millis(200));
}

#[test]
fn concurrent_calls_on_one_connection() {
    let fake = Fake::start();
    let c = Client::connect(&fake.socket).unwrap();
    fake.slow.hold.store(true, Ordering::SeqCst);
    thread::scope(|s| {
        let slow = s.spawn(|| c.get_unit(SLOW));
        let pending = eventually(|| fake.slow.in_flight.load(Ordering::SeqCst) == 1);
        // While the slow answer is held back, other calls on the same connection go through.
        let fast = c.list_units();
        let still_pending = fake.slow.in_flight.load(Ordering::SeqCst) == 1;
        let second_slow = s.spawn(|| c.get_unit(SLOW));
        let two = eventually(|| fake.slow.in_flight.load(Ordering::SeqCst) == 2);
        fake.slow.hold.store(false, Ordering::SeqCst);
        assert!(pending);
        assert_eq!(fast.unwrap().len(), 5);
        assert!(still_pending, "a fast call waited behind a slow one");
        assert!(
            two,
            "two slow calls on one connection were not forwarded together"
        );
        assert!(slow.join().unwrap().is_ok());
        assert!(second_slow.join().unwrap().is_ok());
    });
}

#[test]
fn failing_start_is_visible() {
    let fake = Fake::start();
    let c = Client::connect(&fake.socket).unwrap();
    let u = c.start_unit(BROKEN).unwrap();
    assert_eq!(u.active_state, ActiveState::Activating);
    let u = c.get_unit(BROKEN).unwrap();
    assert_eq!(u.active_state, ActiveState::Failed);
    assert_eq!(u.result, UnitResult::ExitCode);
}

#[test]
fn machine_id_is_the_hosts() {
    let fake = Fake::start();
    let c = Client::connect(&fake.socket).unwrap();
    let expected = flotilla_init::api::read_machine_id(std::path::Path::new(
        flotilla_init::api::MACHINE_ID_PATH,
    ));
    match (c.machine_id(), expected) {
        (Ok(id), Ok(want)) => {
            assert_eq!(id, want);
            assert_eq!(id, id.trim());
            assert!(!id.is_empty());
        }
        (Err(err), Err(want)) => {
            assert_eq!(err.manager_error_name(), Some("org.flotilla.Error.Refused"));
            assert_eq!(err.to_string(), want.to_string());
        }
        (got, want) => panic!("GetMachineId answered {got:?}, the file says {want:?}"),
    }
    // Answered by the server itself: the manager never sees it.
    assert!(fake.model.lock().unwrap().seen.is_empty());
}

#[test]
fn machine_id_is_trimmed_and_never_empty() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("machine-id");
    std::fs::write(&path, "  0123456789abcdef0123456789abcdef\n").unwrap();
    assert_eq!(
        flotilla_init::api::read_machine_id(&path).unwrap(),
        "0123456789abcdef0123456789abcdef"
    );
    std::fs::write(&path, "\n").unwrap();
    let err = flotilla_init::api::read_machine_id(&path).unwrap_err();
    assert!(err.to_string().contains("is empty"), "{err}");
    let err = flotilla_init::api::read_machine_id(&dir.path().join("none")).unwrap_err();
    assert!(
        err.to_string().contains("cannot read the machine id"),
        "{err}"
    );
}

/// A state this client does not know (from a newer manager) is kept as its text; the call
/// does not fail.
#[test]
fn a_state_the_client_does_not_know_is_kept_as_text() {
    let fake = Fake::start();
    {
        let mut model = fake.model.lock().unwrap();
        let db = model.units.get_mut("db").unwrap();
        db.active_state = flotilla_init_api::Wire::Unknown("reloading".into());
        db.result = flotilla_init_api::Wire::Unknown("watchdog".into());
    }
    let c = Client::connect(&fake.socket).unwrap();
    let units = c.list_units().unwrap();
    assert_eq!(units.len(), 5);
    let db = units.iter().find(|u| u.name == "db").unwrap();
    assert_eq!(db.active_state.as_str(), "reloading");
    assert_eq!(db.active_state.known(), None);
    assert_eq!(db.result.as_str(), "watchdog");
    assert_eq!(db.sub_state, SubState::Dead);
    let web = c.get_unit("web").unwrap();
    assert_eq!(web.active_state, ActiveState::Active);
}
