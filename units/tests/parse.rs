//! Unit file parsing: valid files, defaults, and the exact location and wording of errors.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::result_large_err
)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use flotilla_units::*;

const MINIMAL: &str = "[container]\ncommand = [\"/bin/true\"]\n";

fn parse(text: &str) -> Result<Unit, UnitError> {
    parse_unit("web", Some(Path::new("web.toml")), text)
}

#[test]
fn minimal_unit_gets_defaults() {
    let unit = parse(MINIMAL).unwrap();
    assert_eq!(unit.name, "web");
    assert_eq!(unit.path.as_deref(), Some(Path::new("web.toml")));
    assert_eq!(unit.source, MINIMAL);
    assert_eq!(unit.unit, UnitSection::default());
    assert_eq!(unit.container.command, vec!["/bin/true"]);
    assert_eq!(unit.container.image, None);
    assert_eq!(unit.container.network, NetworkMode::Host);
    assert!(unit.container.env.is_empty() && unit.container.mounts.is_empty());
    let s = &unit.service;
    assert_eq!(s.kind, ServiceType::Simple);
    assert_eq!(s.restart, RestartPolicy::No);
    assert_eq!(s.restart_sec, Duration::from_millis(100));
    assert_eq!(s.restart_max_sec, Duration::from_secs(30));
    assert_eq!(s.stop_timeout, Duration::from_secs(10));
    assert_eq!(s.start_limit_burst, 5);
    assert_eq!(s.start_limit_interval, Duration::from_secs(10));
    assert_eq!((s.memory_max, s.cpu_max, s.pids_max), (None, None, None));
    assert_eq!(unit.fleet, FleetSection::default());
}

#[test]
fn control_api_is_off_unless_granted() {
    assert!(!parse(MINIMAL).unwrap().container.control_api);
    let granted = parse("[container]\ncommand = [\"/bin/true\"]\ncontrol_api = true\n").unwrap();
    assert!(granted.container.control_api);
    let typo = parse("[container]\ncommand = [\"/bin/true\"]\ncontrol_apis = true\n").unwrap_err();
    assert!(
        typo.to_string().contains("did you mean `control_api`?"),
        "{typo}"
    );
}

#[test]
fn registry_images_are_told_by_their_spelling() {
    let image = |i: &str| {
        let text = format!("[container]\nimage = \"{i}\"\ncommand = [\"/bin/true\"]\n");
        parse(&text)
            .unwrap()
            .container
            .registry_image()
            .map(str::to_string)
    };
    for r in [
        "127.0.0.1:5000/team/app:1.4",
        "registry.example/app",
        "localhost/app:1",
    ] {
        assert_eq!(image(r).as_deref(), Some(r));
    }
    // By digest, with or without a tag beside it.
    let hex = "ab".repeat(32);
    for r in [
        format!("127.0.0.1:5000/team/app@sha256:{hex}"),
        format!("127.0.0.1:5000/team/app:1.4@sha256:{hex}"),
    ] {
        assert_eq!(image(&r).as_deref(), Some(r.as_str()));
    }
    for local in ["nginx:1.25", "team/app:1", "busybox"] {
        assert_eq!(image(local), None, "{local}");
    }
}

#[test]
fn every_key() {
    let text = r#"
[unit]
description = "Web server %n"
requires = ["db"]
wants = ["cache"]
after = ["db", "cache"]
before = ["proxy"]

[container]
image = "nginx:1.25"
command = ["/usr/sbin/nginx", "-g", "daemon off;"]
env = { KEY = "value", _X1 = "100%%" }
workdir = "/srv"
user = "www-data:www-data"
network = "private"
hostname = "web-1"
init = false
capabilities = ["CAP_NET_BIND_SERVICE", "KILL"]
read_only = true
rlimits = { nofile = [1024, 4096], RLIMIT_CORE = 0 }
user_namespace = { host_id = 100000, size = 65536 }
mounts = [
    { host = "/var/lib/web", path = "/data", create = true },
    { host = "/etc/web", path = "/etc/web", read_only = true },
]

[service]
type = "oneshot"
restart = "on-failure"
restart_sec = "1m30s"
restart_max_sec = 3600
stop_timeout = 2.5
start_limit_burst = 3
start_limit_interval = "1h"
memory_max = "512MiB"
cpu_max = 1.5
pids_max = 100

[fleet]
machine_id = "abc123"
machine_of = ["db"]
machine_metadata = ["region=us-east", "disk = ssd"]
conflicts = ["web@*"]
global = false
replaces = ["old-web"]
"#;
    let u = parse(text).unwrap();
    assert_eq!(u.unit.description.as_deref(), Some("Web server web"));
    assert_eq!(u.unit.requires, vec!["db"]);
    assert_eq!(u.unit.wants, vec!["cache"]);
    assert_eq!(u.unit.after, vec!["db", "cache"]);
    assert_eq!(u.unit.before, vec!["proxy"]);
    let c = &u.container;
    assert_eq!(c.image.as_deref(), Some("nginx:1.25"));
    assert_eq!(c.command, vec!["/usr/sbin/nginx", "-g", "daemon off;"]);
    assert_eq!(
        c.env,
        BTreeMap::from([
            ("KEY".to_string(), "value".to_string()),
            ("_X1".to_string(), "100%".to_string())
        ])
    );
    assert_eq!(c.workdir.as_deref(), Some(Path::new("/srv")));
    assert_eq!(c.user.as_deref(), Some("www-data:www-data"));
    assert_eq!(c.network, NetworkMode::Private);
    assert_eq!(c.hostname.as_deref(), Some("web-1"));
    assert!(!c.init && c.read_only);
    assert_eq!(
        c.rlimits,
        vec![
            Rlimit {
                resource: RlimitResource::Nofile,
                soft: 1024,
                hard: 4096
            },
            Rlimit {
                resource: RlimitResource::Core,
                soft: 0,
                hard: 0
            },
        ]
    );
    assert_eq!(
        c.user_namespace,
        Some(IdMap {
            container_id: 0,
            host_id: 100000,
            size: 65536
        })
    );
    assert_eq!(
        c.capabilities,
        Some(vec![Capability::NetBindService, Capability::Kill])
    );
    assert_eq!(
        c.mounts,
        vec![
            Mount {
                host: "/var/lib/web".into(),
                path: "/data".into(),
                read_only: false,
                create: true
            },
            Mount {
                host: "/etc/web".into(),
                path: "/etc/web".into(),
                read_only: true,
                create: false
            },
        ]
    );
    let s = &u.service;
    assert_eq!(s.kind, ServiceType::Oneshot);
    assert_eq!(s.restart, RestartPolicy::OnFailure);
    assert_eq!(s.restart_sec, Duration::from_secs(90));
    assert_eq!(s.restart_max_sec, Duration::from_secs(3600));
    assert_eq!(s.stop_timeout, Duration::from_millis(2500));
    assert_eq!(s.start_limit_burst, 3);
    assert_eq!(s.start_limit_interval, Duration::from_secs(3600));
    assert_eq!(s.memory_max, Some(512 << 20));
    assert_eq!(
        s.cpu_max,
        Some(CpuMax {
            quota_us: 150_000,
            period_us: 100_000
        })
    );
    assert_eq!(s.pids_max, Some(100));
    let f = &u.fleet;
    assert_eq!(f.machine_id.as_deref(), Some("abc123"));
    assert_eq!(f.machine_of, vec!["db"]);
    assert_eq!(
        f.machine_metadata,
        vec![
            MetadataRule {
                key: "region".into(),
                value: "us-east".into()
            },
            MetadataRule {
                key: "disk".into(),
                value: "ssd".into()
            },
        ]
    );
    assert_eq!(f.conflicts, vec!["web@*"]);
    assert!(!f.global);
    assert_eq!(f.replaces, vec!["old-web"]);
}

#[test]
fn valid_value_forms() {
    // (service line, check)
    type Check = fn(&ServiceSection) -> bool;
    let cases: &[(&str, Check)] = &[
        ("memory_max = 1048576", |s| s.memory_max == Some(1 << 20)),
        ("memory_max = \"1G\"", |s| s.memory_max == Some(1 << 30)),
        ("memory_max = \"512M\"", |s| s.memory_max == Some(512 << 20)),
        ("memory_max = \"64KiB\"", |s| s.memory_max == Some(64 << 10)),
        ("memory_max = \"2TB\"", |s| s.memory_max == Some(2 << 40)),
        ("cpu_max = \"150%\"", |s| {
            s.cpu_max.map(|c| c.quota_us) == Some(150_000)
        }),
        ("cpu_max = 2", |s| {
            s.cpu_max.map(|c| c.quota_us) == Some(200_000)
        }),
        ("cpu_max = 0.25", |s| {
            s.cpu_max.map(|c| c.quota_us) == Some(25_000)
        }),
        ("stop_timeout = 0", |s| s.stop_timeout.is_zero()),
        ("stop_timeout = \"500ms\"", |s| {
            s.stop_timeout == Duration::from_millis(500)
        }),
        ("stop_timeout = \"1.5s\"", |s| {
            s.stop_timeout == Duration::from_millis(1500)
        }),
        ("stop_timeout = \"1h\"", |s| {
            s.stop_timeout == Duration::from_secs(3600)
        }),
        ("stop_timeout = \"250us\"", |s| {
            s.stop_timeout == Duration::from_micros(250)
        }),
        ("restart = \"always\"", |s| {
            s.restart == RestartPolicy::Always
        }),
        ("type = \"simple\"", |s| s.kind == ServiceType::Simple),
        ("pids_max = 1", |s| s.pids_max == Some(1)),
    ];
    for (line, check) in cases {
        let text = format!("{MINIMAL}[service]\n{line}\n");
        let unit = parse(&text).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert!(check(&unit.service), "{line}: {:?}", unit.service);
    }
}

#[test]
fn valid_container_forms() {
    for (line, check) in [
        ("user = \"1000\"", "1000"),
        ("user = \"1000:1000\"", "1000:1000"),
        ("user = \"nobody\"", "nobody"),
    ] {
        let text = format!("[container]\ncommand = [\"/bin/true\"]\n{line}\n");
        assert_eq!(parse(&text).unwrap().container.user.as_deref(), Some(check));
    }
    for (word, want) in [
        ("host", NetworkMode::Host),
        ("none", NetworkMode::None),
        ("private", NetworkMode::Private),
    ] {
        let text = format!("[container]\ncommand = [\"/bin/true\"]\nnetwork = \"{word}\"\n");
        assert_eq!(parse(&text).unwrap().container.network, want);
    }
    for (word, want) in [
        ("missing", PullPolicy::Missing),
        ("always", PullPolicy::Always),
        ("never", PullPolicy::Never),
    ] {
        let text = format!("[container]\ncommand = [\"/bin/true\"]\npull = \"{word}\"\n");
        assert_eq!(parse(&text).unwrap().container.pull, want);
    }
    assert_eq!(parse(MINIMAL).unwrap().container.pull, PullPolicy::Missing);
    let text = "[container]\ncommand = [\"/bin/true\"]\n\
                devices = [\"/dev/fuse\", \"c 10:229 rw\", \"b *:* m\", \"c 136:* r\"]\n";
    assert_eq!(
        parse(text).unwrap().container.devices,
        [
            Device::Path("/dev/fuse".into()),
            Device::Rule(DeviceRule {
                kind: DeviceKind::Char,
                major: Some(10),
                minor: Some(229),
                read: true,
                write: true,
                mknod: false,
            }),
            Device::Rule(DeviceRule {
                kind: DeviceKind::Block,
                major: None,
                minor: None,
                read: false,
                write: false,
                mknod: true,
            }),
            Device::Rule(DeviceRule {
                kind: DeviceKind::Char,
                major: Some(136),
                minor: None,
                read: true,
                write: false,
                mknod: false,
            }),
        ]
    );
    // Array-of-tables and sub-table syntax work too.
    let text = "[container]\ncommand = [\"/bin/true\"]\n[container.env]\nA = \"1\"\n\
                [[container.mounts]]\nhost = \"/a\"\npath = \"/b\"\n";
    let c = parse(text).unwrap().container;
    assert_eq!(c.env.get("A").map(String::as_str), Some("1"));
    assert_eq!(c.mounts.len(), 1);
}

/// (text, line, column, key, message substring, help substring)
type Case = (
    &'static str,
    usize,
    usize,
    Option<&'static str>,
    &'static str,
    Option<&'static str>,
);

#[test]
fn invalid_files() {
    let cases: Vec<Case> = vec![
        (
            "[container]\ncommand = [\"/bin/true\"]\nimage = \"reg.example/app:1@sha256:0a0a\"\n",
            3,
            9,
            Some("container.image"),
            "invalid image digest in \"reg.example/app:1@sha256:0a0a\"",
            Some("`name[:tag]@sha256:<64 lower-case hex digits>`"),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\npull = \"alway\"\n",
            3,
            8,
            Some("container.pull"),
            "invalid pull \"alway\"",
            Some("did you mean \"always\"?"),
        ),
        // Unknown keys and sections.
        (
            "[container]\ncomand = [\"/bin/true\"]\n",
            2,
            1,
            Some("container.comand"),
            "unknown key `comand` in [container]",
            Some("did you mean `command`?"),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\nrestart = \"always\"\n",
            3,
            1,
            Some("container.restart"),
            "unknown key `restart` in [container]",
            Some("`restart` belongs in [service]"),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\nxyzzy = 1\n",
            3,
            1,
            Some("container.xyzzy"),
            "unknown key `xyzzy`",
            Some("valid keys here are `image`, `command`"),
        ),
        (
            "[container]\ncmd = [\"/bin/true\"]\n",
            2,
            1,
            None,
            "unknown key `cmd`",
            Some("did you mean `command`?"),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\nmemory = \"1G\"\n",
            3,
            1,
            Some("container.memory"),
            "unknown key `memory` in [container]",
            Some("did you mean `memory_max` in [service]?"),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\n[service]\nstop_timout = 5\n",
            4,
            1,
            Some("service.stop_timout"),
            "unknown key `stop_timout` in [service]",
            Some("did you mean `stop_timeout`?"),
        ),
        (
            "[contaner]\ncommand = [\"/bin/true\"]\n",
            1,
            2,
            Some("contaner"),
            "unknown section [contaner]",
            Some("did you mean [container]?"),
        ),
        (
            "command = [\"/bin/true\"]\n",
            1,
            1,
            Some("command"),
            "key `command` is outside any section",
            Some("put it under [container]"),
        ),
        (
            "service = 1\n",
            1,
            1,
            Some("service"),
            "`service` must be a section",
            Some("write [service]"),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\nmounts = [{ host = \"/a\", path = \"/b\", readonly = true }]\n",
            3,
            39,
            Some("container.mounts[0].readonly"),
            "unknown key `readonly` in container.mounts[0]",
            Some("did you mean `read_only`?"),
        ),
        // TOML syntax.
        (
            "[container]\ncommand = [\"/bin/true\"\n",
            2,
            23,
            None,
            "",
            None,
        ),
        (
            "[container]\ncommand = /bin/true\n",
            2,
            11,
            None,
            "",
            None,
        ),
        // Missing pieces.
        (
            "[unit]\ndescription = \"x\"\n",
            1,
            1,
            Some("container"),
            "missing [container] section",
            Some("command = [\"/bin/sleep\", \"60\"]"),
        ),
        (
            "[unit]\n\n[container]\nimage = \"x\"\n",
            3,
            1,
            Some("container.command"),
            "[container] has no `command`",
            Some("command = [\"/bin/sleep\", \"60\"]"),
        ),
        // Command.
        (
            "[container]\ncommand = []\n",
            2,
            11,
            Some("container.command"),
            "command must not be empty",
            Some("give the program and its arguments, e.g. command = [\"/bin/sleep\", \"60\"]"),
        ),
        (
            "[container]\ncommand = [\"\", \"x\"]\n",
            2,
            12,
            Some("container.command"),
            "the program (first element of command) must not be empty",
            None,
        ),
        (
            "[container]\ncommand = \"/bin/sleep 60\"\n",
            2,
            11,
            Some("container.command"),
            "`command` must be a list of strings, not a string",
            Some("[\"/bin/sh\", \"-c\", \"/bin/sleep 60\"]"),
        ),
        (
            "[container]\ncommand = [\"/bin/sleep\", 60]\n",
            2,
            26,
            Some("container.command"),
            "`command` must contain only strings, not an integer (60)",
            Some("quote each element"),
        ),
        // Container values.
        (
            "[container]\ncommand = [\"/bin/true\"]\nworkdir = \"srv\"\n",
            3,
            11,
            Some("container.workdir"),
            "`workdir` must be an absolute path, not \"srv\"",
            Some("workdir = \"/srv\""),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\nnetwork = \"bridge\"\n",
            3,
            11,
            Some("container.network"),
            "invalid network \"bridge\"",
            Some("use one of \"host\", \"none\" or \"private\""),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\nnetwork = \"hots\"\n",
            3,
            11,
            Some("container.network"),
            "invalid network \"hots\"",
            Some("did you mean \"host\"?"),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\nenv = { 1X = \"a\" }\n",
            3,
            9,
            Some("container.env.1X"),
            "invalid environment variable name \"1X\"",
            None,
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\nenv = { PORT = 8080 }\n",
            3,
            16,
            Some("container.env.PORT"),
            "environment variable `PORT` must be a string, not an integer",
            Some("quote the value: PORT = \"8080\""),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\nuser = \"a:b:c\"\n",
            3,
            8,
            Some("container.user"),
            "invalid user \"a:b:c\": more than one `:`",
            Some("\"user:group\""),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\nrlimits = { nofiles = 10 }\n",
            3,
            13,
            Some("container.rlimits.nofiles"),
            "unknown key `nofiles` in container.rlimits",
            Some("`nofile`"),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\nrlimits = { nofile = [10, 5] }\n",
            3,
            22,
            Some("container.rlimits.nofile"),
            "invalid limit for nofile",
            Some("soft <= hard"),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\nuser_namespace = { host_id = 1000 }\n",
            3,
            18,
            Some("container.user_namespace"),
            "user_namespace needs `host_id` and `size`",
            Some("size = 65536"),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\ncapabilities = [\"CAP_KILL\", \"net admin\"]\n",
            3,
            29,
            Some("container.capabilities"),
            "invalid capability \"net admin\"",
            Some("capabilities(7)"),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\ndevices = [\"/dev/fuse\", \"x 1:2 r\"]\n",
            3,
            25,
            Some("container.devices"),
            "invalid device \"x 1:2 r\": unknown device type \"x\"",
            Some("\"c 10:229 rw\""),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\ndevices = [\"c 10:229 rwx\"]\n",
            3,
            12,
            Some("container.devices"),
            "unknown access 'x'",
            Some("some of r, w, m"),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\ndevices = [\"b 7 r\"]\n",
            3,
            12,
            Some("container.devices"),
            "\"7\" is not MAJOR:MINOR",
            Some("TYPE MAJOR:MINOR ACCESS"),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\ndevices = [\"c 4096:1 r\"]\n",
            3,
            12,
            Some("container.devices"),
            "major \"4096\" must be * or a number up to 4095",
            None,
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\ndevices = [\"a *:* rwm\"]\n",
            3,
            12,
            Some("container.devices"),
            "type `a` (all devices) is not allowed",
            Some("name the devices"),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\ndevices = [\"/dev/../etc/shadow\"]\n",
            3,
            12,
            Some("container.devices"),
            "must name a node under /dev",
            Some("/dev/fuse"),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\ndevices = [\"/etc/passwd\"]\n",
            3,
            12,
            Some("container.devices"),
            "must name a node under /dev",
            None,
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\ndevices = [\"c 1:3 rw\", \"c 1:3  rw\"]\n",
            3,
            24,
            Some("container.devices"),
            "is listed twice",
            None,
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\ndevices = \"/dev/fuse\"\n",
            3,
            11,
            Some("container.devices"),
            "must be a list of strings",
            None,
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\nhostname = \"web_1\"\n",
            3,
            12,
            Some("container.hostname"),
            "invalid hostname \"web_1\"",
            None,
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\nimage = \"\"\n",
            3,
            9,
            Some("container.image"),
            "`image` must not be empty",
            None,
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\nmounts = [{ host = \"/a\" }]\n",
            3,
            11,
            Some("container.mounts[0].path"),
            "mount is missing `path`",
            Some("each mount needs `host` and `path`"),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\nmounts = [{ host = \"/a\", path = \"data\" }]\n",
            3,
            33,
            Some("container.mounts[0].path"),
            "`path` must be an absolute path",
            None,
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\nmounts = [{ host = \"/a/../b\", path = \"/d\" }]\n",
            3,
            20,
            Some("container.mounts[0].host"),
            "must not contain `..`",
            None,
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\nmounts = [{ host = \"/a\", path = \"/d\" }, { host = \"/b\", path = \"/d\" }]\n",
            3,
            63,
            Some("container.mounts[1].path"),
            "two mounts use the same path \"/d\"",
            None,
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\nmounts = [{ host = \"/a\", path = \"/d\", read_only = \"yes\" }]\n",
            3,
            51,
            Some("container.mounts[0].read_only"),
            "`read_only` must be true or false, not a string",
            None,
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\ncontrol_api = \"yes\"\n",
            3,
            15,
            Some("container.control_api"),
            "`control_api` must be true or false, not a string",
            Some("control_api = true"),
        ),
        // Service values.
        (
            "[container]\ncommand = [\"/bin/true\"]\n[service]\nstop_timeout = -5\n",
            4,
            16,
            Some("service.stop_timeout"),
            "invalid stop_timeout -5: durations cannot be negative",
            Some("\"1m30s\""),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\n[service]\nstop_timeout = \"10 min\"\n",
            4,
            16,
            Some("service.stop_timeout"),
            "invalid stop_timeout \"10 min\": unknown unit \"min\"",
            Some("units us, ms, s, m or h"),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\n[service]\nstop_timeout = true\n",
            4,
            16,
            Some("service.stop_timeout"),
            "`stop_timeout` must be a duration, not a boolean",
            Some("stop_timeout = \"10s\""),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\n[service]\nmemory_max = \"12XB\"\n",
            4,
            14,
            Some("service.memory_max"),
            "invalid memory_max \"12XB\": unknown unit \"XB\"",
            Some("use bytes or a size with K, M, G or T, e.g. \"512M\""),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\n[service]\nmemory_max = \"max\"\n",
            4,
            14,
            Some("service.memory_max"),
            "invalid memory_max \"max\"",
            Some("remove `memory_max` for no limit"),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\n[service]\nmemory_max = 0\n",
            4,
            14,
            Some("service.memory_max"),
            "the limit must be greater than 0",
            None,
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\n[service]\ncpu_max = \"1.5\"\n",
            4,
            11,
            Some("service.cpu_max"),
            "invalid cpu_max \"1.5\": a CPU limit string must end with %",
            Some("\"150%\""),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\n[service]\ncpu_max = 0.001\n",
            4,
            11,
            Some("service.cpu_max"),
            "the smallest CPU limit is 1%",
            None,
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\n[service]\npids_max = 0\n",
            4,
            12,
            Some("service.pids_max"),
            "`pids_max` must be at least 1, not 0",
            Some("pids_max = 100"),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\n[service]\nstart_limit_burst = 0\n",
            4,
            21,
            Some("service.start_limit_burst"),
            "`start_limit_burst` must be at least 1",
            None,
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\n[service]\nrestart = \"onfailure\"\n",
            4,
            11,
            Some("service.restart"),
            "invalid restart \"onfailure\"",
            Some("did you mean \"on-failure\"?"),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\n[service]\nrestart = false\n",
            4,
            11,
            Some("service.restart"),
            "`restart` must be one of \"no\", \"on-failure\" or \"always\", not a boolean",
            Some("restart = \"no\""),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\n[service]\ntype = \"oneshot\"\nrestart = \"always\"\n",
            5,
            11,
            Some("service.restart"),
            "a oneshot unit cannot use restart = \"always\"",
            Some("on-failure"),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\n[service]\nrestart_sec = \"5s\"\nrestart_max_sec = \"1s\"\n",
            5,
            19,
            Some("service.restart_max_sec"),
            "restart_max_sec (1s) is shorter than restart_sec (5s)",
            None,
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\n[service]\nstart_limit_interval = 0\n",
            4,
            24,
            Some("service.start_limit_interval"),
            "the interval must be longer than 0",
            None,
        ),
        // Dependencies.
        (
            "[unit]\nrequires = [\"db\", \"web\"]\n[container]\ncommand = [\"/bin/true\"]\n",
            2,
            19,
            Some("unit.requires"),
            "unit `web` lists itself in `requires`",
            Some("remove \"web\" from `requires`"),
        ),
        (
            "[unit]\nafter = [\"%n\"]\n[container]\ncommand = [\"/bin/true\"]\n",
            2,
            10,
            Some("unit.after"),
            "unit `web` lists itself in `after`",
            None,
        ),
        (
            "[unit]\nwants = [\"bad name\"]\n[container]\ncommand = [\"/bin/true\"]\n",
            2,
            10,
            Some("unit.wants"),
            "invalid unit name \"bad name\" in `wants`: the character ' ' is not allowed",
            Some("unit names use letters"),
        ),
        (
            "[unit]\nrequires = [\"getty@\"]\n[container]\ncommand = [\"/bin/true\"]\n",
            2,
            13,
            Some("unit.requires"),
            "`getty@` in `requires` is a template, not a unit",
            Some("\"getty@1\""),
        ),
        (
            "[unit]\nrequires = \"db\"\n[container]\ncommand = [\"/bin/true\"]\n",
            2,
            12,
            Some("unit.requires"),
            "`requires` must be a list of strings, not a string",
            None,
        ),
        // Specifiers.
        (
            "[container]\ncommand = [\"/bin/echo\", \"%z\"]\n",
            2,
            25,
            Some("container.command"),
            "unknown specifier `%z`",
            Some("write `%%` for a literal percent sign"),
        ),
        (
            "[container]\ncommand = [\"/bin/echo\", \"%i\"]\n",
            2,
            25,
            Some("container.command"),
            "`%i` needs an instance name, but `web` is not a template instance",
            Some("web@.toml"),
        ),
        // Fleet.
        (
            "[container]\ncommand = [\"/bin/true\"]\n[fleet]\nmachine_metadata = [\"region\"]\n",
            4,
            21,
            Some("fleet.machine_metadata"),
            "invalid machine_metadata rule \"region\": expected key=value",
            Some("\"region=us-east\""),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\n[fleet]\nmachine_metadata = [\"=x\"]\n",
            4,
            21,
            Some("fleet.machine_metadata"),
            "expected key=value",
            None,
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\n[fleet]\nconflicts = [\"\"]\n",
            4,
            14,
            Some("fleet.conflicts"),
            "a conflicts pattern must not be empty",
            None,
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\n[fleet]\nglobal = \"yes\"\n",
            4,
            10,
            Some("fleet.global"),
            "`global` must be true or false, not a string",
            Some("global = true"),
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\n[fleet]\nglobal = true\nmachine_id = \"abc\"\n",
            5,
            14,
            Some("fleet.machine_id"),
            "a global unit cannot use `machine_id`",
            None,
        ),
    ];
    let mut failures = Vec::new();
    for (text, line, column, key, message, help) in cases {
        let err = parse(text).expect_err(text);
        let ok = err.file == "web.toml"
            && err.unit.as_deref() == Some("web")
            && (err.line, err.column) == (Some(line), Some(column))
            && (key.is_none() || err.key.as_deref() == key)
            && err.message.contains(message)
            && help.is_none_or(|h| err.help.as_deref().unwrap_or("").contains(h))
            && err
                .to_string()
                .starts_with(&format!("web.toml:{line}:{column}: "));
        if !ok {
            failures.push(format!(
                "input:\n{text}want {line}:{column} {key:?} {message:?} help {help:?}\ngot {err:?}\n"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn display_matches_the_documented_format() {
    let err = parse("[container]\ncomand = [\"/bin/true\"]\n").unwrap_err();
    assert_eq!(
        err.to_string(),
        "web.toml:2:1: unknown key `comand` in [container]\n  help: did you mean `command`?"
    );
    let err = parse("[container]\ncommand = [\"/bin/true\"]\n[service]\nmemory_max = \"12XB\"\n")
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "web.toml:4:14: invalid memory_max \"12XB\": unknown unit \"XB\"\n  help: use bytes or a size with K, M, G or T, e.g. \"512M\" (1024-based; \"512MiB\" works too)"
    );
}

/// Capability names are checked against the one table at parse time: a misspelt one is
/// refused at its own position with the closest name, never passed on to fail at start.
#[test]
fn a_misspelt_capability_is_refused_at_its_position() {
    let text = "[container]\ncommand = [\"/bin/true\"]\n\
                capabilities = [\"CAP_KILL\", \"CAP_NET_ADMN\"]\n";
    let err = parse(text).unwrap_err();
    assert_eq!((err.line, err.column), (Some(3), Some(29)));
    assert_eq!(err.key.as_deref(), Some("container.capabilities"));
    assert_eq!(
        err.to_string(),
        "web.toml:3:29: unknown capability \"CAP_NET_ADMN\"\n  help: did you mean \
         \"CAP_NET_ADMIN\"? (use capability names as in capabilities(7), e.g. \
         \"CAP_NET_BIND_SERVICE\" or \"NET_ADMIN\")"
    );
    // Without the prefix the hint is without it too; lower case is refused with the hint.
    for (word, column, message, hint) in [
        (
            "SYS_ADMN",
            17,
            "unknown capability \"SYS_ADMN\"",
            "did you mean \"SYS_ADMIN\"?",
        ),
        (
            "net_raw",
            17,
            "invalid capability \"net_raw\"",
            "did you mean \"NET_RAW\"?",
        ),
        (
            "CAP_BOGUS",
            17,
            "unknown capability \"CAP_BOGUS\"",
            "use capability names",
        ),
    ] {
        let text = format!("[container]\ncommand = [\"/bin/true\"]\ncapabilities = [\"{word}\"]\n");
        let err = parse(&text).unwrap_err();
        assert_eq!((err.line, err.column), (Some(3), Some(column)), "{err}");
        assert_eq!(err.message, message);
        assert!(err.help.as_deref().unwrap_or("").starts_with(hint), "{err}");
    }
    // Every name in capabilities(7) is known, with and without `CAP_`.
    for cap in Capability::ALL {
        for written in [cap.to_string(), cap.name().to_string()] {
            let text =
                format!("[container]\ncommand = [\"/bin/true\"]\ncapabilities = [\"{written}\"]\n");
            assert_eq!(
                parse(&text).unwrap().container.capabilities,
                Some(vec![*cap])
            );
        }
    }
}

/// Resource limits are typed at parse time, whichever way the name is written.
#[test]
fn rlimit_names_are_typed_at_parse() {
    for written in ["nofile", "NOFILE", "RLIMIT_NOFILE", "rlimit_nofile"] {
        let text =
            format!("[container]\ncommand = [\"/bin/true\"]\nrlimits = {{ {written} = 64 }}\n");
        let unit = parse(&text).unwrap();
        assert_eq!(
            unit.container.rlimits,
            vec![Rlimit {
                resource: RlimitResource::Nofile,
                soft: 64,
                hard: 64
            }],
            "{written}"
        );
    }
    let err = parse("[container]\ncommand = [\"/bin/true\"]\nrlimits = { nproc = 1, stak = 8 }\n")
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "web.toml:3:24: unknown key `stak` in container.rlimits\n  help: did you mean `stack`?"
    );
}

#[test]
fn syntax_errors_pass_through_tomls_message() {
    let err = parse("[container]\ncommand = /bin/true\n").unwrap_err();
    assert!(err.message.contains("quoted"), "{err}");
    assert!(err.key.is_none());
}

#[test]
fn text_without_a_file_uses_the_api_label() {
    let err = parse_unit("web", None, "[container]\ncommand = []\n").unwrap_err();
    assert_eq!(err.file, "<api>");
    assert!(err.to_string().starts_with("<api>:2:11: "), "{err}");
}

#[test]
fn unit_names() {
    for ok in ["web", "getty@tty1", "a.b:c-d_e", "x@", "A1"] {
        assert_eq!(check_name(ok), Ok(()), "{ok}");
    }
    let long = "a".repeat(201);
    for bad in [
        "",
        ".hidden",
        "-x",
        "@x",
        "a b",
        "a@b@c",
        "a/b",
        "é",
        long.as_str(),
    ] {
        assert!(check_name(bad).is_err(), "{bad}");
    }
    assert!(check_name(&"a".repeat(200)).is_ok());

    assert_eq!(split_instance("getty@tty1"), Some(("getty", "tty1")));
    assert_eq!(split_instance("getty@"), Some(("getty", "")));
    assert_eq!(split_instance("web"), None);

    let err = parse_unit("bad name", None, MINIMAL).unwrap_err();
    assert!(
        err.message.contains("invalid unit name `bad name`"),
        "{err}"
    );
    assert_eq!(err.unit.as_deref(), Some("bad name"));
    assert!(err.help.is_some());

    let err = parse_unit("worker@", None, MINIMAL).unwrap_err();
    assert!(err.message.contains("is a template"), "{err}");
}

#[test]
fn instance_files_expand_specifiers() {
    let text = r#"
[unit]
description = "getty on %I (%n, %p, %i, %N) 100%%"
after = ["setup@%i"]
[container]
command = ["/sbin/agetty", "%i"]
env = { TTY = "/dev/%i" }
workdir = "/run/%p"
[service]
memory_max = "1M"
[fleet]
conflicts = ["%p@*"]
"#;
    let u = parse_unit("getty@tty1", None, text).unwrap();
    assert_eq!(
        u.unit.description.as_deref(),
        Some("getty on tty1 (getty@tty1, getty, tty1, getty@tty1) 100%")
    );
    assert_eq!(u.unit.after, vec!["setup@tty1"]);
    assert_eq!(u.container.command, vec!["/sbin/agetty", "tty1"]);
    assert_eq!(u.container.env["TTY"], "/dev/tty1");
    assert_eq!(
        u.container.workdir.as_deref(),
        Some(Path::new("/run/getty"))
    );
    assert_eq!(u.fleet.conflicts, vec!["getty@*"]);
    // The source is kept as written.
    assert_eq!(u.source, text);
}

#[test]
fn every_example_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let catalog = Catalog::load_dirs(&[dir]);
    assert_eq!(catalog.errors, vec![], "{:#?}", catalog.errors);
    let names: Vec<&str> = catalog.units.keys().map(String::as_str).collect();
    assert_eq!(names, ["heartbeat", "setup", "web"]);
    assert_eq!(catalog.templates.keys().collect::<Vec<_>>(), ["worker"]);

    let web = &catalog.units["web"];
    assert_eq!(web.unit.requires, vec!["setup"]);
    assert_eq!(web.unit.after, vec!["setup"]);
    assert_eq!(web.service.restart, RestartPolicy::Always);
    assert_eq!(catalog.units["setup"].service.kind, ServiceType::Oneshot);
    let heartbeat = &catalog.units["heartbeat"];
    assert!(heartbeat.container.command[2].contains("date +%H:%M:%S"));

    let worker = catalog.resolve("worker@7").unwrap().unwrap();
    assert_eq!(worker.container.env["WORKER_ID"], "7");
    assert_eq!(worker.container.env["UNIT"], "worker@7");
    assert_eq!(worker.fleet.conflicts, vec!["worker@*"]);
    assert!(ordering_cycles(&catalog.units).is_empty());
}

/// A control character written as a TOML escape is valid TOML; the unit is refused at the
/// escape's line and column, in every string that reaches the wire.
#[test]
fn control_characters_are_refused_where_they_are() {
    let cases: &[(&str, usize, usize, &str)] = &[
        (
            "[unit]\ndescription = \"web\\u0000x\"\n[container]\ncommand = [\"/bin/true\"]\n",
            2,
            19,
            "`description` contains the control character U+0000 (NUL)",
        ),
        (
            "[unit]\ndescription = \"clear \\e[2J\"\n[container]\ncommand = [\"/bin/true\"]\n",
            2,
            22,
            "`description` contains the control character U+001B (ESC)",
        ),
        (
            "[unit]\ndescription = \"a\\rb\"\n[container]\ncommand = [\"/bin/true\"]\n",
            2,
            17,
            "U+000D (CR)",
        ),
        (
            "[unit]\ndescription = \"tab\\there\"\n[container]\ncommand = [\"/bin/true\"]\n",
            2,
            19,
            "U+0009 (TAB)",
        ),
        (
            "[container]\ncommand = [\"/bin/true\", \"a\\u0000\"]\n",
            2,
            27,
            "`command` contains the control character U+0000 (NUL)",
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\nenv = { K = \"\\u001b\" }\n",
            3,
            14,
            "`K` contains the control character U+001B (ESC)",
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\nworkdir = \"/srv\\n\"\n",
            3,
            16,
            "`workdir` contains the control character U+000A (LF)",
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\nmounts = [{ host = \"/a\\u007f\", path = \"/b\" }]\n",
            3,
            23,
            "`host` contains the control character U+007F (DEL)",
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\n[fleet]\nmachine_metadata = [\"region=\\u0085eu\"]\n",
            4,
            29,
            "`machine_metadata` contains the control character U+0085",
        ),
        (
            "[container]\ncommand = [\"/bin/true\"]\n\"bad\\u0000key\" = 1\n",
            3,
            5,
            "the key \"bad\\0key\" contains the control character U+0000 (NUL)",
        ),
    ];
    for (text, line, column, message) in cases {
        let e = parse(text).expect_err(text);
        assert_eq!(
            (e.line, e.column),
            (Some(*line), Some(*column)),
            "{text:?}: {e}"
        );
        assert!(e.message.contains(message), "{text:?}: {e}");
        assert!(
            e.help.as_deref().is_some_and(|h| h.contains("remove")),
            "{e}"
        );
        assert!(
            !e.to_string().contains('\0'),
            "the message itself must be clean: {e:?}"
        );
    }
}

/// Tab and newline are taken where they are legitimate: a script for `sh -c` and
/// environment values (a PEM certificate). Nothing else, not even there.
#[test]
fn tab_and_newline_in_command_and_env_only() {
    let unit = parse(
        "[container]\ncommand = [\"/bin/sh\", \"-c\", \"\"\"\necho a\n\techo b\n\"\"\"]\nenv = { PEM = \"-----BEGIN-----\\nAAA\\n\" }\n",
    )
    .unwrap();
    assert_eq!(unit.container.command[2], "echo a\n\techo b\n");
    assert_eq!(unit.container.env["PEM"], "-----BEGIN-----\nAAA\n");
    let e = parse("[container]\ncommand = [\"/bin/sh\", \"-c\", \"a\\rb\"]\n").unwrap_err();
    assert!(e.message.contains("U+000D (CR)"), "{e}");
    assert_eq!((e.line, e.column), (Some(2), Some(31)));
}

/// Invalid UTF-8 in a unit file is reported at the line and column of its first bad byte.
#[test]
fn invalid_utf8_has_a_position() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("web.toml");
    std::fs::write(
        &path,
        b"[unit]\ndescription = \"caf\xe9\"\n[container]\ncommand = [\"/bin/true\"]\n",
    )
    .unwrap();
    let e = read_unit_file(&path).unwrap_err();
    assert_eq!((e.line, e.column), (Some(2), Some(19)), "{e}");
    assert!(
        e.to_string().starts_with(&format!(
            "{}:2:19: the file is not valid UTF-8: byte 0xe9",
            path.display()
        )),
        "{e}"
    );
    let catalog = Catalog::load_dirs(&[dir.path().to_path_buf()]);
    assert_eq!(catalog.errors.len(), 1, "{:?}", catalog.errors);
    assert_eq!(catalog.errors[0].line, Some(2));
}
