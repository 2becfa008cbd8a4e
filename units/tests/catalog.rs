//! Templates, `Catalog::load_dirs` and `Catalog::resolve`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::fs;
use std::path::{Path, PathBuf};

use flotilla_units::*;

fn unit_text(arg: &str) -> String {
    format!("[container]\ncommand = [\"/bin/echo\", \"{arg}\"]\n")
}

fn write(dir: &Path, file: &str, text: &str) -> PathBuf {
    let path = dir.join(file);
    fs::write(&path, text).unwrap();
    path
}

const WORKER: &str = r#"[unit]
description = "worker %i"
after = ["queue@%i"]
[container]
command = ["/bin/worker", "--id=%i", "--unit=%n", "--prefix=%p", "50%%"]
"#;

#[test]
fn template_instantiates_with_specifiers() {
    let t = Template::new(
        "worker",
        Some(Path::new("/etc/units/worker@.toml")),
        WORKER.into(),
    )
    .unwrap();
    assert_eq!(t.prefix, "worker");
    let u = t.instantiate("blue").unwrap();
    assert_eq!(u.name, "worker@blue");
    assert_eq!(
        u.path.as_deref(),
        Some(Path::new("/etc/units/worker@.toml"))
    );
    assert_eq!(u.source, WORKER);
    assert_eq!(u.unit.description.as_deref(), Some("worker blue"));
    assert_eq!(u.unit.after, vec!["queue@blue"]);
    assert_eq!(
        u.container.command,
        vec![
            "/bin/worker",
            "--id=blue",
            "--unit=worker@blue",
            "--prefix=worker",
            "50%"
        ]
    );
}

#[test]
fn template_errors() {
    let bad = "[container]\ncommand = [\"/bin/worker\", \"%x\"]\n";
    let err = Template::new("worker", Some(Path::new("worker@.toml")), bad.into()).unwrap_err();
    assert_eq!(err.file, "worker@.toml");
    assert_eq!(err.unit.as_deref(), Some("worker@"));
    assert_eq!((err.line, err.column), (Some(2), Some(27)));
    assert!(err.message.contains("unknown specifier `%x`"), "{err}");

    assert!(Template::new("a@b", None, WORKER.into()).is_err());
    assert!(Template::new("bad name", None, WORKER.into()).is_err());

    let t = Template::new("worker", None, WORKER.into()).unwrap();
    let err = t.instantiate("").unwrap_err();
    assert!(err.message.contains("empty instance"), "{err}");
    let err = t.instantiate("a b").unwrap_err();
    assert!(err.message.contains("invalid instance name"), "{err}");
    assert_eq!(err.unit.as_deref(), Some("worker@a b"));
    assert!(t.instantiate("a@b").is_err());
}

#[test]
fn template_self_dependency_is_caught_per_instance() {
    // `after = ["worker@%i"]` is the unit itself.
    let text = "[unit]\nafter = [\"%n\"]\n[container]\ncommand = [\"/bin/true\"]\n";
    let err = Template::new("worker", None, text.into()).unwrap_err();
    assert!(err.message.contains("lists itself in `after`"), "{err}");
}

#[test]
fn load_dirs_overrides_templates_and_errors() {
    let vendor = tempfile::tempdir().unwrap();
    let admin = tempfile::tempdir().unwrap();
    write(vendor.path(), "web.toml", &unit_text("vendor"));
    write(vendor.path(), "db.toml", &unit_text("vendor-db"));
    write(vendor.path(), "worker@.toml", WORKER);
    write(vendor.path(), "README.md", "not a unit");
    write(vendor.path(), ".web.toml", "hidden editor file = [");
    fs::create_dir(vendor.path().join("dir.toml")).unwrap();
    let admin_web = write(admin.path(), "web.toml", &unit_text("admin"));
    write(
        admin.path(),
        "getty@tty1.toml",
        "[container]\ncommand = [\"/sbin/agetty\", \"%i\"]\n",
    );
    let broken = write(
        admin.path(),
        "broken.toml",
        "[container]\ncomand = [\"/bin/true\"]\n",
    );
    write(admin.path(), "bad name.toml", &unit_text("x"));
    let missing = admin.path().join("does-not-exist");

    let catalog = Catalog::load_dirs(&[
        vendor.path().to_path_buf(),
        missing.clone(),
        admin.path().to_path_buf(),
    ]);

    // Later directory wins.
    let web = &catalog.units["web"];
    assert_eq!(web.container.command, vec!["/bin/echo", "admin"]);
    assert_eq!(web.path.as_deref(), Some(admin_web.as_path()));
    assert_eq!(catalog.units["db"].container.command[1], "vendor-db");
    // Concrete instance files are units, with specifiers expanded.
    assert_eq!(catalog.units["getty@tty1"].container.command[1], "tty1");
    assert_eq!(
        catalog.units.keys().collect::<Vec<_>>(),
        ["db", "getty@tty1", "web"]
    );
    assert_eq!(catalog.templates.keys().collect::<Vec<_>>(), ["worker"]);

    // Errors: the missing dir, the broken file (with unit set), the bad name; in that order.
    assert_eq!(catalog.errors.len(), 3, "{:#?}", catalog.errors);
    let dir_err = &catalog.errors[0];
    assert_eq!(dir_err.file, missing.display().to_string());
    assert!(
        dir_err.message.contains("cannot read unit directory"),
        "{dir_err}"
    );
    assert_eq!(dir_err.unit, None);
    let name_err = &catalog.errors[1];
    assert_eq!(name_err.unit.as_deref(), Some("bad name"));
    assert!(name_err.message.contains("invalid unit name"), "{name_err}");
    let file_err = &catalog.errors[2];
    assert_eq!(file_err.file, broken.display().to_string());
    assert_eq!(file_err.unit.as_deref(), Some("broken"));
    assert_eq!((file_err.line, file_err.column), (Some(2), Some(1)));
    assert_eq!(file_err.help.as_deref(), Some("did you mean `command`?"));
}

#[test]
fn a_fixed_override_hides_the_broken_original() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    write(a.path(), "web.toml", "[container]\ncommand = []\n");
    write(b.path(), "web.toml", &unit_text("fixed"));
    let catalog = Catalog::load_dirs(&[a.path().into(), b.path().into()]);
    assert!(catalog.errors.is_empty(), "{:?}", catalog.errors);
    assert_eq!(catalog.units["web"].container.command[1], "fixed");

    // And a broken override is reported rather than silently falling back.
    let catalog = Catalog::load_dirs(&[b.path().into(), a.path().into()]);
    assert!(!catalog.units.contains_key("web"));
    assert_eq!(catalog.errors.len(), 1);
    assert_eq!(catalog.errors[0].unit.as_deref(), Some("web"));
}

#[test]
fn broken_template_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "worker@.toml",
        "[container]\ncommand = [\"%q\"]\n",
    );
    let catalog = Catalog::load_dirs(&[dir.path().into()]);
    assert!(catalog.templates.is_empty());
    assert_eq!(catalog.errors.len(), 1);
    assert_eq!(catalog.errors[0].unit.as_deref(), Some("worker@"));
    assert!(catalog.resolve("worker@1").is_none());
}

#[test]
fn resolve_prefers_concrete_units_then_templates() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "worker@.toml", WORKER);
    write(dir.path(), "worker@special.toml", &unit_text("special"));
    write(dir.path(), "web.toml", &unit_text("web"));
    let catalog = Catalog::load_dirs(&[dir.path().into()]);
    assert!(catalog.errors.is_empty(), "{:?}", catalog.errors);

    let special = catalog.resolve("worker@special").unwrap().unwrap();
    assert_eq!(special.container.command[1], "special");
    let seven = catalog.resolve("worker@7").unwrap().unwrap();
    assert_eq!(seven.name, "worker@7");
    assert_eq!(seven.container.command[1], "--id=7");
    assert_eq!(catalog.resolve("web").unwrap().unwrap().name, "web");

    assert!(catalog.resolve("nothing").is_none());
    assert!(catalog.resolve("other@1").is_none());
    let err = catalog.resolve("worker@").unwrap().unwrap_err();
    assert!(err.message.contains("empty instance name"), "{err}");
    let err = catalog.resolve("worker@a b").unwrap().unwrap_err();
    assert!(err.message.contains("invalid instance name"), "{err}");
}

/// `%i` in a bind path must stay one component: `.` would bind the parent of every instance's
/// directory, `..` the one above it. Both are refused as instance names everywhere.
#[test]
fn dot_instances_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "worker@.toml", WORKER);
    // A unit file named `worker@..toml` is the instance `worker@.`.
    write(dir.path(), "worker@..toml", &unit_text("dot"));
    let catalog = Catalog::load_dirs(&[dir.path().into()]);
    assert_eq!(catalog.errors.len(), 1, "{:?}", catalog.errors);
    let e = &catalog.errors[0];
    assert!(
        e.message.contains("instance name `.` is not allowed"),
        "{e}"
    );
    assert!(e.file.ends_with("worker@..toml"), "{e}");
    for bad in ["worker@.", "worker@.."] {
        let err = catalog.resolve(bad).unwrap().unwrap_err();
        assert!(err.message.contains("is not allowed"), "{bad}: {err}");
        assert!(err.to_string().contains("worker@1"), "{bad}: {err}");
        assert!(flotilla_units::check_name(bad).is_err(), "{bad}");
        assert!(flotilla_units::parse_unit(bad, None, &unit_text("x")).is_err());
    }
    // Still fine: dots inside an instance name.
    assert!(catalog.resolve("worker@a.b").unwrap().is_ok());
    assert!(catalog.resolve("worker@...").unwrap().is_ok());
}
