//! `unitctl image pull` against Debian's `docker-registry` (distribution 2.8) started by the
//! test on loopback: anonymous over plain HTTP, basic auth over TLS with a CA the test
//! makes, a wrong password, an unknown tag, a pulled image run as a container, a second pull
//! that downloads nothing, and a registry serving a blob that does not match its digest;
//! bearer-token auth through a token service written here (RS256 JWTs the registry checks),
//! and mirrors (one that has the image, one that lacks it, one that is down).
//! Images are pushed with `skopeo copy` from an OCI layout the test writes (static busybox).
//! And the manager pulling a unit's image before its start (`[container] pull`), with the
//! real `unitctl` as its helper.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::fs;
use std::io::Read;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use qemu_tests::pki::{Ca, Usage};
use qemu_tests::registry::TestRegistry;
use qemu_tests::{ensure_program, free_port};

/// The shared test registry (`qemu_tests::registry`), started on 127.0.0.1.
struct Registry;

impl Registry {
    fn start(dir: &Path, creds: Option<(&str, &str)>, tls: Option<(&Path, &Path)>) -> TestRegistry {
        TestRegistry::start(dir, creds, tls).unwrap()
    }
}

/// A one-layer OCI layout of a static busybox (`/bin/true`, `/bin/sh`); returns the layout
/// and its layer's compressed digest.
fn busybox_layout(dir: &Path) -> (PathBuf, String) {
    busybox_layout_saying(dir, "pulled from a registry\n")
}

/// [`busybox_layout`] whose `/hello` says `hello`.
fn busybox_layout_saying(dir: &Path, hello: &str) -> (PathBuf, String) {
    fs::create_dir_all(dir).unwrap();
    qemu_tests::registry::busybox_layout(dir, hello).unwrap()
}

/// `skopeo copy` of `layout` to `docker://HOST/REPO:TAG`.
fn push(layout: &Path, dest: &str, extra: &[&str]) {
    qemu_tests::registry::push(layout, dest, extra).unwrap();
}

fn unitctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_unitctl"))
        .args(args)
        .env_remove("FLOTILLA_IMAGES")
        .env_remove("FLOTILLA_REGISTRIES")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn pull(reference: &str, registries: &Path, store: &Path) -> Output {
    unitctl(&[
        "image",
        "pull",
        reference,
        "--registries",
        registries.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
    ])
}

fn write_settings(path: &Path, text: &str) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

/// Nothing of an image entered the store: no tag, no blob, no layer, no staging leftovers.
fn assert_store_empty(store: &Path) {
    let db = fs::read_to_string(store.join("images.json")).unwrap_or_default();
    assert!(!db.contains("app"), "an image was tagged: {db}");
    for sub in ["blobs/sha256", "layers", "tmp", "pull-tmp"] {
        let dir = store.join(sub);
        let left: Vec<_> = fs::read_dir(&dir)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{} is not empty: {left:?}", dir.display());
    }
}

#[test]
fn anonymous_pull_over_http_runs_and_a_second_pull_downloads_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let reg = Registry::start(
        &fs::create_dir_all(dir.join("reg"))
            .map(|_| dir.join("reg"))
            .unwrap(),
        None,
        None,
    );
    let (layout, layer) = busybox_layout(dir);
    push(
        &layout,
        &format!("{}/team/app:1", reg.host()),
        &["--dest-tls-verify=false"],
    );
    let store = dir.join("store");
    let reference = format!("{}/team/app:1", reg.host());

    // Without `insecure = true` plain HTTP is not used: the pull fails and says what to set.
    let settings = dir.join("registries.toml");
    write_settings(&settings, "");
    let (_, err) = text(&pull(&reference, &settings, &store));
    assert!(err.contains("insecure = true"), "{err}");
    assert_store_empty(&store);

    write_settings(
        &settings,
        &format!("[registry.\"{}\"]\ninsecure = true\n", reg.host()),
    );
    let out = pull(&reference, &settings, &store);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("downloaded 1 layers") && stdout.contains("0 already in the store"),
        "{stdout}"
    );
    assert!(stderr.contains(&format!("{layer} downloaded")), "{stderr}");
    assert_eq!(reg.blob_gets(&layer), 1, "{}", reg.log());

    let (list, _) = text(&unitctl(&[
        "image",
        "list",
        "--store",
        store.to_str().unwrap(),
    ]));
    assert!(list.contains(&format!("{}/team/app", reg.host())), "{list}");

    // The pulled image runs as a container under its reference.
    let out = unitctl(&[
        "run",
        "--store",
        store.to_str().unwrap(),
        "--image",
        &reference,
        "--",
        "/bin/cat",
        "/hello",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout, "pulled from a registry\n");

    // Again: the layer is in the store, so nothing is downloaded (the registry agrees).
    let out = pull(&reference, &settings, &store);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("downloaded 0 layers") && stdout.contains("1 already in the store"),
        "{stdout}"
    );
    assert_eq!(reg.blob_gets(&layer), 1, "{}", reg.log());

    // By digest, into a fresh store, with a mirror that is down tried first: the image is
    // tagged `REPO:sha256-<64 hex>` and runs under that name, and under the digest reference
    // itself (with a tag beside it, which the digest overrides).
    let (json, _) = text(&unitctl(&[
        "--json",
        "image",
        "list",
        "--store",
        store.to_str().unwrap(),
    ]));
    let list: serde_json::Value = serde_json::from_str(&json).unwrap();
    let digest = list[0]["digest"].as_str().unwrap().to_string();
    let down = format!("127.0.0.1:{}", free_port().unwrap());
    write_settings(
        &settings,
        &format!(
            "[registry.\"{host}\"]\ninsecure = true\nmirrors = [\"{down}\"]\n\
             [registry.\"{down}\"]\ninsecure = true\n",
            host = reg.host()
        ),
    );
    let store2 = dir.join("store2");
    let out = pull(
        &format!("{}/team/app@{digest}", reg.host()),
        &settings,
        &store2,
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains(&format!("from {}:", reg.host())),
        "{stdout}"
    );
    let name = format!(
        "{}/team/app:sha256-{}",
        reg.host(),
        &digest["sha256:".len()..]
    );
    for image in [name, format!("{}/team/app:9@{digest}", reg.host())] {
        let out = unitctl(&[
            "run",
            "--store",
            store2.to_str().unwrap(),
            "--image",
            &image,
            "--",
            "/bin/cat",
            "/hello",
        ]);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{image}: {stderr}");
        assert_eq!(stdout, "pulled from a registry\n");
    }

    // A digest the registry does not have: its answer, nothing stored.
    let store3 = dir.join("store3");
    let out = pull(
        &format!("{}/team/app@sha256:{}", reg.host(), "0".repeat(64)),
        &settings,
        &store3,
    );
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("check the repository and tag"), "{stderr}");
    assert_store_empty(&store3);
}

#[test]
fn basic_auth_over_tls_wrong_password_and_unknown_tag() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = dir.join("pki");
    fs::create_dir_all(&pki).unwrap();
    let ca = Ca::new(&pki, "registry").unwrap();
    let cert = ca
        .issue("registry", "server", Usage::Node("127.0.0.1"))
        .unwrap();
    fs::create_dir_all(dir.join("reg")).unwrap();
    let reg = Registry::start(
        &dir.join("reg"),
        Some(("alice", "s3cret-pw")),
        Some((&cert.cert, &cert.key)),
    );
    // skopeo trusts the CA from a directory of *.crt files.
    let certs = dir.join("certs");
    fs::create_dir_all(&certs).unwrap();
    fs::copy(ca.cert(), certs.join("ca.crt")).unwrap();
    let (layout, _) = busybox_layout(dir);
    let reference = format!("{}/team/app:1", reg.host());
    push(
        &layout,
        &reference,
        &[
            "--dest-creds",
            "alice:s3cret-pw",
            "--dest-cert-dir",
            certs.to_str().unwrap(),
        ],
    );
    let store = dir.join("store");
    let settings = dir.join("registries.toml");
    let with_password = |pw: &str| {
        format!(
            "[registry.\"{}\"]\nusername = \"alice\"\npassword = \"{pw}\"\nca_file = \"{}\"\n",
            reg.host(),
            ca.cert().display()
        )
    };

    // Credentials in a file others can read: refused before anything is sent.
    fs::write(&settings, with_password("s3cret-pw")).unwrap();
    fs::set_permissions(&settings, fs::Permissions::from_mode(0o644)).unwrap();
    let (_, err) = text(&pull(&reference, &settings, &store));
    assert!(
        err.contains(&format!("chmod 600 {}", settings.display())),
        "{err}"
    );
    assert!(!err.contains("s3cret-pw"), "{err}");

    // A wrong password: the registry's 401, named; nothing stored; no password shown.
    write_settings(&settings, &with_password("wrong-pw"));
    let out = pull(&reference, &settings, &store);
    let (stdout, err) = text(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("401 Unauthorized") && err.contains(&reg.host()),
        "{err}"
    );
    assert!(!format!("{stdout}{err}").contains("wrong-pw"), "{err}");
    assert_store_empty(&store);

    // An unknown tag: the registry's answer, and what to check.
    write_settings(&settings, &with_password("s3cret-pw"));
    let out = pull(
        &format!("{}/team/app:nosuch", reg.host()),
        &settings,
        &store,
    );
    let (_, err) = text(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("MANIFEST_UNKNOWN") || err.contains("ManifestUnknown"),
        "{err}"
    );
    assert!(err.contains("check the repository and tag"), "{err}");
    assert_store_empty(&store);

    // The right password over TLS with the CA from ca_file.
    let out = pull(&reference, &settings, &store);
    let (stdout, err) = text(&out);
    assert!(out.status.success(), "{err}");
    assert!(stdout.contains("downloaded 1 layers"), "{stdout}");
    assert!(!format!("{stdout}{err}").contains("s3cret-pw"));
}

/// Where rustls-native-certs (openssl-probe) and OpenSSL look for a machine's CA
/// certificates on Linux: the directories holding its candidate files and directories.
const CERT_PLACES: &[&str] = &[
    "/etc/ssl",
    "/etc/pki",
    "/etc/security/certificates",
    "/opt/etc/ssl",
    "/usr/lib/ssl",
    "/usr/local/ssl",
];

/// `unitctl image pull` (as [`pull`]) on this machine as it would be without a CA bundle:
/// in a private mount namespace (`unshare --mount`) where every existing [`CERT_PLACES`]
/// directory is under an empty tmpfs, with `SSL_CERT_FILE` and `SSL_CERT_DIR` unset.
fn pull_without_system_roots(reference: &str, registries: &Path, store: &Path) -> Output {
    let unshare = ensure_program("unshare", "util-linux").unwrap();
    ensure_program("mount", "mount").unwrap();
    let hide: Vec<&str> = CERT_PLACES
        .iter()
        .copied()
        .filter(|p| Path::new(p).is_dir())
        .collect();
    assert!(hide.contains(&"/etc/ssl"), "no /etc/ssl on this host");
    let script = "for d in $HIDE; do mount -t tmpfs -o mode=0755 flotilla-no-certs \"$d\"; done; \
                  if [ -e /etc/ssl/certs/ca-certificates.crt ]; then echo 'the CA bundle is not hidden' >&2; exit 99; fi; \
                  exec \"$@\"";
    Command::new(unshare)
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-ec",
            script,
            "sh",
        ])
        .arg(env!("CARGO_BIN_EXE_unitctl"))
        .args(["image", "pull", reference, "--registries"])
        .arg(registries)
        .arg("--store")
        .arg(store)
        .env("HIDE", hide.join(" "))
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR")
        .env_remove("FLOTILLA_IMAGES")
        .env_remove("FLOTILLA_REGISTRIES")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A machine without any CA bundle (a host image built without `[root] ca_bundle`): a
/// registry's `ca_file` stands in for the machine's roots (`fallback_roots`), and the TLS
/// pull works; without one the pull refuses with `NoRoots` (oci-client could not even build
/// its client), asks the registry nothing and stores nothing.
#[test]
fn without_system_roots_a_ca_file_stands_in_and_without_one_the_pull_refuses() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = dir.join("pki");
    fs::create_dir_all(&pki).unwrap();
    let ca = Ca::new(&pki, "registry").unwrap();
    let cert = ca
        .issue("registry", "server", Usage::Node("127.0.0.1"))
        .unwrap();
    fs::create_dir_all(dir.join("reg")).unwrap();
    let reg = Registry::start(&dir.join("reg"), None, Some((&cert.cert, &cert.key)));
    let certs = dir.join("certs");
    fs::create_dir_all(&certs).unwrap();
    fs::copy(ca.cert(), certs.join("ca.crt")).unwrap();
    let (layout, layer) = busybox_layout(dir);
    let reference = format!("{}/team/app:1", reg.host());
    push(
        &layout,
        &reference,
        &["--dest-cert-dir", certs.to_str().unwrap()],
    );
    let settings = dir.join("registries.toml");

    // The registry's ca_file: the only roots this process has, and enough.
    write_settings(
        &settings,
        &format!(
            "[registry.\"{}\"]\nca_file = \"{}\"\n",
            reg.host(),
            ca.cert().display()
        ),
    );
    let store = dir.join("store");
    let out = pull_without_system_roots(&reference, &settings, &store);
    let (stdout, err) = text(&out);
    assert!(out.status.success(), "{stdout}{err}");
    assert!(stdout.contains("downloaded 1 layers"), "{stdout}");
    assert_eq!(reg.blob_gets(&layer), 1, "{}", reg.log());

    // No ca_file: the clear NoRoots error, naming the registry and the two ways out.
    write_settings(&settings, "");
    let bare = dir.join("bare-store");
    let out = pull_without_system_roots(&reference, &settings, &bare);
    let (stdout, err) = text(&out);
    assert!(!out.status.success(), "{stdout}{err}");
    assert!(
        err.contains(&format!(
            "cannot pull from {}: this machine has no CA certificates",
            reg.host()
        )) && err.contains("install a CA bundle")
            && err.contains("`ca_file`"),
        "{stdout}{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert_store_empty(&bare);
    assert_eq!(reg.blob_gets(&layer), 1, "{}", reg.log());
}

#[test]
fn a_blob_that_does_not_match_its_digest_is_refused_and_nothing_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fs::create_dir_all(dir.join("reg")).unwrap();
    let reg = Registry::start(&dir.join("reg"), None, None);
    let (layout, layer) = busybox_layout(dir);
    let reference = format!("{}/team/app:1", reg.host());
    push(&layout, &reference, &["--dest-tls-verify=false"]);
    // Tamper with the registry's copy of the layer: same size, one byte changed.
    let data = reg.blob_file(&layer);
    let mut bytes = fs::read(&data).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    fs::write(&data, &bytes).unwrap();

    let store = dir.join("store");
    let settings = dir.join("registries.toml");
    write_settings(
        &settings,
        &format!("[registry.\"{}\"]\ninsecure = true\n", reg.host()),
    );
    let out = pull(&reference, &settings, &store);
    let (stdout, err) = text(&out);
    assert!(
        !out.status.success(),
        "a corrupted layer was accepted: {stdout}"
    );
    assert!(err.to_lowercase().contains("digest"), "{err}");
    assert!(err.contains(&layer), "{err}");
    assert_store_empty(&store);

    // A manifest pulled by digest whose bytes the registry altered: refused.
    let mdigest = manifest_digest(&layout);
    let data = reg.blob_file(&mdigest);
    let mut bytes = fs::read(&data).unwrap();
    let text_of = String::from_utf8(bytes.clone()).unwrap();
    assert!(text_of.contains("\"schemaVersion\":2"), "{text_of}");
    bytes = text_of
        .replace("\"schemaVersion\":2", "\"schemaVersion\": 2")
        .into_bytes();
    fs::write(&data, &bytes).unwrap();
    let out = pull(
        &format!("{}/team/app@{mdigest}", reg.host()),
        &settings,
        &store,
    );
    let (stdout, err) = text(&out);
    assert!(
        !out.status.success(),
        "an altered manifest was accepted: {stdout}"
    );
    assert!(
        err.contains("the manifest") && err.contains("does not match its digest"),
        "{err}"
    );
    assert_store_empty(&store);
}

/// The digest of the one manifest in `layout`.
fn manifest_digest(layout: &Path) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn an_index_resolves_to_this_hosts_platform() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fs::create_dir_all(dir.join("reg")).unwrap();
    let reg = Registry::start(&dir.join("reg"), None, None);
    let (here, other) = match std::env::consts::ARCH {
        "aarch64" => ("arm64", "amd64"),
        _ => ("amd64", "arm64"),
    };
    let (mine, _) = busybox_layout_saying(&dir.join("mine"), &format!("linux/{here}\n"));
    let (theirs, _) = busybox_layout_saying(&dir.join("theirs"), &format!("linux/{other}\n"));
    // One layout holding both images under a nested index, the other platform FIRST.
    let multi = dir.join("multi");
    let blobs = multi.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let mut entries = Vec::new();
    for (layout, arch) in [(&theirs, other), (&mine, here)] {
        for e in fs::read_dir(layout.join("blobs/sha256")).unwrap() {
            let e = e.unwrap();
            fs::copy(e.path(), blobs.join(e.file_name())).unwrap();
        }
        let digest = manifest_digest(layout);
        let size = fs::metadata(
            layout
                .join("blobs/sha256")
                .join(digest.strip_prefix("sha256:").unwrap()),
        )
        .unwrap()
        .len();
        entries.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": size,
            "platform": {"os": "linux", "architecture": arch},
        }));
    }
    let nested = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": entries,
    }))
    .unwrap();
    let tmp_nested = dir.join("nested.json");
    fs::write(&tmp_nested, &nested).unwrap();
    let sum = Command::new("sha256sum").arg(&tmp_nested).output().unwrap();
    let nested_digest = String::from_utf8(sum.stdout).unwrap()[..64].to_string();
    fs::write(blobs.join(&nested_digest), &nested).unwrap();
    fs::write(
        multi.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    fs::write(
        multi.join("index.json"),
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": format!("sha256:{nested_digest}"),
                "size": nested.len(),
                "annotations": {"org.opencontainers.image.ref.name": "multi"},
            }],
        }))
        .unwrap(),
    )
    .unwrap();
    let reference = format!("{}/team/multi:1", reg.host());
    let skopeo = ensure_program("skopeo", "skopeo").unwrap();
    let out = Command::new(skopeo)
        .args([
            "--insecure-policy",
            "copy",
            "--all",
            "--dest-tls-verify=false",
        ])
        .arg(format!("oci:{}:multi", multi.display()))
        .arg(format!("docker://{reference}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo copy --all: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let store = dir.join("store");
    let settings = dir.join("registries.toml");
    write_settings(
        &settings,
        &format!("[registry.\"{}\"]\ninsecure = true\n", reg.host()),
    );
    let out = pull(&reference, &settings, &store);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains(&manifest_digest(&mine)),
        "not this host's manifest: {stdout}"
    );
    let out = unitctl(&[
        "run",
        "--store",
        store.to_str().unwrap(),
        "--image",
        &reference,
        "--",
        "/bin/cat",
        "/hello",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout, format!("linux/{here}\n"));

    // Pinned to the index's digest (as `fleetctl` pins a tag): the pull checks the index
    // against it and stores this host's image under the index digest, where the pinned
    // reference finds it.
    let pinned = format!("{reference}@sha256:{nested_digest}");
    let store2 = dir.join("store2");
    let out = pull(&pinned, &settings, &store2);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains(&manifest_digest(&mine)), "{stdout}");
    let out = unitctl(&[
        "run",
        "--store",
        store2.to_str().unwrap(),
        "--image",
        &pinned,
        "--",
        "/bin/cat",
        "/hello",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout, format!("linux/{here}\n"));
}

/// A TCP proxy in front of a registry that lets `limit` response bytes through per
/// connection, then cuts the connection (`stall` false) or holds it open (`stall` true);
/// only `cuts` connections are cut, the others pass whole.
struct Proxy {
    port: u16,
    limit: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stall: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cuts: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Proxy {
    fn start(upstream: u16) -> Proxy {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let limit = Arc::new(AtomicU64::new(u64::MAX));
        let stall = Arc::new(AtomicBool::new(false));
        let cuts = Arc::new(AtomicU64::new(u64::MAX));
        let (l, s, c) = (limit.clone(), stall.clone(), cuts.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (mut c_read, mut s_write) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_read, &mut s_write);
                });
                let (mut limit, stall) = (l.load(Ordering::SeqCst), s.load(Ordering::SeqCst));
                let cuts = c.clone();
                std::thread::spawn(move || {
                    use std::io::Write;
                    let (mut server, mut client) = (server, client);
                    let mut sent: u64 = 0;
                    let mut buf = [0u8; 16384];
                    loop {
                        let n = match server.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let mut allowed = usize::try_from(limit.saturating_sub(sent))
                            .unwrap_or(n)
                            .min(n);
                        // At the limit: cut this connection if cuts are left, or let it
                        // through whole.
                        if allowed < n
                            && cuts
                                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
                                    c.checked_sub(1)
                                })
                                .is_err()
                        {
                            limit = u64::MAX;
                            allowed = n;
                        }
                        if client.write_all(&buf[..allowed]).is_err() {
                            break;
                        }
                        sent += allowed as u64;
                        if allowed < n {
                            if stall {
                                // Hold the connection open (bounded: the test kills the
                                // client long before).
                                std::thread::sleep(Duration::from_secs(300));
                            }
                            break;
                        }
                    }
                    let _ = client.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Proxy {
            port,
            limit,
            stall,
            cuts,
        }
    }

    /// Every connection is cut (or stalls) after `limit` response bytes.
    fn set(&self, limit: u64, stall: bool) {
        self.set_cuts(limit, stall, u64::MAX);
    }

    /// The next `cuts` connections that reach `limit` response bytes are cut (or stall).
    fn set_cuts(&self, limit: u64, stall: bool, cuts: u64) {
        use std::sync::atomic::Ordering;
        self.limit.store(limit, Ordering::SeqCst);
        self.stall.store(stall, Ordering::SeqCst);
        self.cuts.store(cuts, Ordering::SeqCst);
    }
}

/// A registry holding the busybox image as `team/app:1`, reached through a [`Proxy`]
/// (`reference` names it there; `settings` mark the proxy insecure), and an empty store.
struct Proxied {
    reg: TestRegistry,
    proxy: Proxy,
    reference: String,
    store: PathBuf,
    settings: PathBuf,
    /// The image's layer digest.
    layer: String,
}

impl Proxied {
    fn start(dir: &Path) -> Proxied {
        fs::create_dir_all(dir.join("reg")).unwrap();
        let reg = Registry::start(&dir.join("reg"), None, None);
        let (layout, layer) = busybox_layout(dir);
        push(
            &layout,
            &format!("{}/team/app:1", reg.host()),
            &["--dest-tls-verify=false"],
        );
        let proxy = Proxy::start(reg.port());
        let host = format!("127.0.0.1:{}", proxy.port);
        let settings = dir.join("registries.toml");
        write_settings(
            &settings,
            &format!("[registry.\"{host}\"]\ninsecure = true\n"),
        );
        Proxied {
            reg,
            proxy,
            reference: format!("{host}/team/app:1"),
            store: dir.join("store"),
            settings,
            layer,
        }
    }
}

#[test]
fn a_cut_or_killed_pull_leaves_nothing_and_the_next_pull_starts_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let Proxied {
        reg: _reg,
        proxy,
        reference,
        store,
        settings,
        layer,
    } = Proxied::start(dir);

    // Every connection is cut 100 KiB into its answer: each resume of the (1 MiB) layer
    // gets 100 KiB further, and the pull gives up after its resumes: an error, nothing
    // stored.
    proxy.set(100 << 10, false);
    let out = pull(&reference, &settings, &store);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "a cut pull succeeded: {stdout}");
    assert!(
        stderr.contains(&layer) && stderr.contains("resumes"),
        "{stderr}"
    );
    assert_store_empty(&store);

    // The connection stalls 200 KiB into the layer and unitctl is killed: its partial
    // download is in its staging directory, nothing else in the store.
    proxy.set(200 << 10, true);
    let mut child = Command::new(env!("CARGO_BIN_EXE_unitctl"))
        .args(["image", "pull", &reference, "--registries"])
        .arg(&settings)
        .arg("--store")
        .arg(&store)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let partial = store.join("pull-tmp").join(format!("{}-", child.id()));
    let deadline = Instant::now() + Duration::from_secs(120);
    let found = loop {
        let hit = fs::read_dir(store.join("pull-tmp")).ok().and_then(|rd| {
            rd.flatten()
                .map(|e| e.path().join("blobs/sha256"))
                .flat_map(|d| fs::read_dir(d).into_iter().flatten().flatten())
                .map(|e| e.path())
                .find(|p| {
                    p.to_string_lossy().ends_with(".partial")
                        && fs::metadata(p).map(|m| m.len() > 0).unwrap_or(false)
                })
        });
        if let Some(p) = hit {
            break p;
        }
        assert!(Instant::now() < deadline, "no partial download appeared");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        found
            .to_string_lossy()
            .contains(&partial.to_string_lossy().to_string()),
        "{}",
        found.display()
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let db = fs::read_to_string(store.join("images.json")).unwrap_or_default();
    assert!(!db.contains("app"), "{db}");
    assert!(
        fs::read_dir(store.join("blobs/sha256"))
            .unwrap()
            .next()
            .is_none(),
        "a blob entered the store"
    );

    // The next pull removes the dead pull's leftovers and completes.
    proxy.set(u64::MAX, false);
    let out = pull(&reference, &settings, &store);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("downloaded 1 layers"), "{stdout}");
    let left: Vec<_> = fs::read_dir(store.join("pull-tmp"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// `grep -c`: lines of `text` that contain `what`.
fn count_lines(text: &str, what: &str) -> usize {
    text.lines().filter(|l| l.contains(what)).count()
}

/// The manager pulls a unit's registry image before its first start (activating (pull) in
/// the unit's log), runs it from the store once the registry is gone (`pull = "missing"`),
/// and with `pull = "always"` and the registry gone fails the start with result `pull` and
/// the connection failure in the message. The helper is the real `unitctl` beside
/// `flotilla-init`.
#[test]
fn the_manager_pulls_a_units_image_before_its_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fs::create_dir_all(dir.join("reg")).unwrap();
    let reg = Registry::start(&dir.join("reg"), None, None);
    let (layout, layer) = busybox_layout_saying(&dir.join("layout"), "ran from the pull\n");
    let reference = format!("{}/team/app:1", reg.host());
    push(&layout, &reference, &["--dest-tls-verify=false"]);
    let settings = dir.join("registries.toml");
    write_settings(
        &settings,
        &format!("[registry.\"{}\"]\ninsecure = true\n", reg.host()),
    );
    let store = dir.join("store");
    let unit = |policy: &str| {
        format!(
            "[container]\nimage = \"{reference}\"\npull = \"{policy}\"\n\
             command = [\"/bin/cat\", \"/hello\"]\n[service]\ntype = \"oneshot\"\n"
        )
    };
    let mut m = common::Machine::start_with(
        &[("web", &unit("missing"))],
        &[
            "--images",
            store.to_str().unwrap(),
            "--registries",
            settings.to_str().unwrap(),
        ],
    );
    let status = m.wait_state("web", "active");
    assert_eq!(status["sub_state"], "exited", "{status}");
    let logs = m.logs("web");
    assert!(logs.contains("activating (pull)"), "{logs}");
    assert!(
        logs.contains("pull: "),
        "the helper's output is in the log: {logs}"
    );
    assert_eq!(count_lines(&logs, "ran from the pull"), 1, "{logs}");
    assert_eq!(reg.blob_gets(&layer), 1, "{}", reg.log());

    // The registry is gone; the image is in the store: a restart does not pull.
    drop(reg);
    m.ok(&["restart", "web"]);
    m.wait_until("the second run's output", || {
        count_lines(&m.logs("web"), "ran from the pull") == 2
    });
    assert_eq!(m.state("web"), "active");
    let logs = m.logs("web");
    assert_eq!(count_lines(&logs, "activating (pull)"), 1, "{logs}");

    // `pull = "always"` with the registry gone: the start fails (pull), saying why.
    fs::write(
        m.units.join("web.toml"),
        common::with_dir_mount(&unit("always")).replace("$DIR", m.dir.path().to_str().unwrap()),
    )
    .unwrap();
    m.ok(&["reload"]);
    let _ = m.unitctl(&["restart", "web"]);
    let status = m.wait_state("web", "failed");
    assert_eq!(status["result"], "pull", "{status}");
    let message = status["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&reference) && message.to_lowercase().contains("connect"),
        "{status}\n{}",
        m.logs("web")
    );
    let logs = m.logs("web");
    assert_eq!(count_lines(&logs, "activating (pull)"), 2, "{logs}");
    assert_eq!(count_lines(&logs, "ran from the pull"), 2, "{logs}");
    m.terminate();
}

/// The pid in the manager's line "Pulling image IMAGE for the restart, helper pid N; ...".
fn prepull_helper_pid(logs: &str, image: &str) -> Option<i32> {
    let line = logs
        .lines()
        .rev()
        .find(|l| l.contains(&format!("Pulling image {image} for the restart")))?;
    let rest = line.split("helper pid ").nth(1)?;
    rest.split(';').next()?.trim().parse().ok()
}

/// Where `what` first appears in `logs` (panics with the log if it does not).
fn position(logs: &str, what: &str) -> usize {
    logs.find(what)
        .unwrap_or_else(|| panic!("{what:?} is not in the log:\n{logs}"))
}

/// A restart pulls the new body's image while the old copy keeps running: a running unit's
/// body moves to a new tag and `unitctl reload --restart-changed` restarts it. The pull is
/// held mid-layer by a proxy: meanwhile the unit is active (running) on its old main pid.
/// The helper is killed: the pull failed, the old copy still runs; the retry (restart
/// backoff) pulls, then the old copy is stopped and the new one runs the new image, with no
/// second pull at its start. Then, with the registry stopped, a restart to a missing image
/// leaves the running copy alone (result `pull`, the message says so), and a stop still
/// stops it.
#[test]
fn a_restart_pulls_the_new_image_before_it_stops_the_old_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fs::create_dir_all(dir.join("reg")).unwrap();
    let mut reg = Registry::start(&dir.join("reg"), None, None);
    let (first, _) = busybox_layout_saying(&dir.join("one"), "the first image\n");
    let (second, layer2) = busybox_layout_saying(&dir.join("two"), "the second image\n");
    push(
        &first,
        &format!("{}/team/app:1", reg.host()),
        &["--dest-tls-verify=false"],
    );
    push(
        &second,
        &format!("{}/team/app:2", reg.host()),
        &["--dest-tls-verify=false"],
    );
    let proxy = Proxy::start(reg.port());
    let host = format!("127.0.0.1:{}", proxy.port);
    let settings = dir.join("registries.toml");
    write_settings(
        &settings,
        &format!("[registry.\"{host}\"]\ninsecure = true\n"),
    );
    let store = dir.join("store");
    let unit = |tag: &str| {
        format!(
            "[container]\nimage = \"{host}/team/app:{tag}\"\n\
             command = [\"/bin/sh\", \"-c\", \"cat /hello; exec /bin/busybox sleep 100000\"]\n\
             [service]\nrestart_sec = \"1s\"\n"
        )
    };
    let mut m = common::Machine::start_with(
        &[("web", &unit("1"))],
        &[
            "--images",
            store.to_str().unwrap(),
            "--registries",
            settings.to_str().unwrap(),
        ],
    );
    let status = m.wait_state("web", "active");
    assert_eq!(status["sub_state"], "running", "{status}");
    let old_pid = status["pid"].as_i64().unwrap() as i32;
    m.wait_until("the first copy's output", || {
        m.logs("web").contains("the first image")
    });
    let rewrite = |m: &common::Machine, tag: &str| {
        fs::write(
            m.units.join("web.toml"),
            common::with_dir_mount(&unit(tag)).replace("$DIR", m.dir.path().to_str().unwrap()),
        )
        .unwrap();
    };

    // The new image's layer stalls 200 KiB in: the restart's pull hangs mid-layer.
    proxy.set(200 << 10, true);
    rewrite(&m, "2");
    m.ok(&["reload", "--restart-changed"]);
    m.wait_until("a partial download of the new layer", || {
        fs::read_dir(store.join("pull-tmp"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("blobs/sha256"))
            .flat_map(|d| fs::read_dir(d).into_iter().flatten().flatten())
            .any(|e| {
                e.path().to_string_lossy().ends_with(".partial")
                    && e.metadata().map(|md| md.len() > 0).unwrap_or(false)
            })
    });
    let status = m.status("web");
    assert_eq!(
        (&status["state"], &status["sub_state"]),
        (&"active".into(), &"running".into()),
        "{status}"
    );
    assert_eq!(status["pid"].as_i64(), Some(i64::from(old_pid)), "{status}");
    assert!(common::alive(old_pid), "the old copy runs during the pull");
    let image2 = format!("{host}/team/app:2");
    let logs = m.logs("web");
    let helper = prepull_helper_pid(&logs, &image2).unwrap_or_else(|| panic!("{logs}"));
    assert!(!logs.contains("Stopping"), "{logs}");

    // The pull fails (its helper is killed); the old copy keeps running; the retry, after
    // the restart backoff, gets the layer in full.
    proxy.set(u64::MAX, false);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(helper),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    m.wait_until("the new copy's output", || {
        m.logs("web").contains("the second image")
    });
    let status = m.wait_state("web", "active");
    let new_pid = status["pid"].as_i64().unwrap() as i32;
    assert_ne!(new_pid, old_pid, "{status}");
    assert_eq!(status["result"], "success", "{status}");
    let logs = m.logs("web");
    let failed = position(&logs, &format!("pulling {image2} for the restart failed: "));
    let failure = logs[failed..].lines().next().unwrap_or_default();
    assert!(
        failure.contains("the pull helper was killed by SIGKILL")
            && failure.contains("the old copy keeps running"),
        "{failure}"
    );
    let done = position(&logs, "Pull done; stopping the old copy for the restart.");
    let stopping = position(&logs, "Stopping (SIGTERM).");
    let new_output = position(&logs, "the second image");
    assert!(
        failed < done && done < stopping && stopping < new_output,
        "{logs}"
    );
    assert_eq!(count_lines(&logs, "activating (pull)"), 1, "{logs}");
    assert!(reg.blob_gets(&layer2) >= 1, "{}", reg.log());
    m.wait_until("the old copy to be gone", || !common::alive(old_pid));

    // ListImages (org.flotilla.Manager1) names both images with their manifest digests.
    let client = flotilla_init_api::client::Client::connect(&m.api).unwrap();
    let images = client.list_images().unwrap();
    for (tag, layout) in [("1", &first), ("2", &second)] {
        let entry = flotilla_init_api::ImageEntry {
            name: format!("{host}/team/app:{tag}"),
            digest: manifest_digest(layout),
        };
        assert!(images.contains(&entry), "{entry:?} not in {images:?}");
    }
    drop(client);

    // The registry is stopped: a restart to an image the store lacks leaves the copy that
    // runs alone, and says why.
    reg.stop();
    rewrite(&m, "3");
    m.ok(&["reload", "--restart-changed"]);
    let image3 = format!("{host}/team/app:3");
    m.wait_until("the failed pull for the restart", || {
        m.logs("web")
            .contains(&format!("pulling {image3} for the restart failed"))
    });
    let status = m.status("web");
    assert_eq!(
        (&status["state"], &status["sub_state"], &status["result"]),
        (&"active".into(), &"running".into(), &"pull".into()),
        "{status}"
    );
    assert_eq!(status["pid"].as_i64(), Some(i64::from(new_pid)), "{status}");
    let message = status["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&image3) && message.contains("the old copy keeps running"),
        "{status}"
    );
    assert!(common::alive(new_pid));
    // A stop ends the pending restart and the copy.
    m.ok(&["stop", "web"]);
    m.wait_state("web", "inactive");
    m.wait_until("the copy to be gone", || !common::alive(new_pid));
    assert_eq!(count_lines(&m.logs("web"), "the second image"), 1);
    m.terminate();
}

/// A request the test's token service answered.
#[derive(Debug, Clone)]
struct TokenRequest {
    /// `scope` and `service` of the query, percent-decoded.
    scopes: Vec<String>,
    service: String,
    /// Whether its basic credentials were the right ones.
    authorized: bool,
}

/// A bearer-token service of distribution's token auth, written here: it checks the basic
/// credentials of each token request (wrong or none → 401 with a JSON error) and answers
/// `{"token": JWT}`, a JWT signed RS256 (`openssl dgst -sha256 -sign`) with a key whose
/// certificate (issued by a CA the registry's `rootcertbundle` trusts) is in the header's
/// `x5c`; the claims are the ones distribution 2.8 checks (`iss`, `aud` = the service,
/// `exp`, `nbf`) and `access` grants the actions the scope asks for.
struct TokenServer {
    port: u16,
    seen: std::sync::Arc<std::sync::Mutex<Vec<TokenRequest>>>,
}

const TOKEN_ISSUER: &str = "flotilla-test-token-issuer";
const TOKEN_SERVICE: &str = "flotilla-test-registry";

impl TokenServer {
    fn start(user: &str, password: &str, key: &Path, cert_der: &[u8]) -> TokenServer {
        use base64::Engine as _;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let x5c = base64::engine::general_purpose::STANDARD.encode(cert_der);
        let (user, key, log) = (user.to_string(), key.to_path_buf(), seen.clone());
        std::thread::spawn(move || {
            let mut jti = 0u64;
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                // Patience bound only: a client that sends nothing does not hold it forever.
                let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
                jti += 1;
                let req = read_head(&mut conn);
                let target = req.split_whitespace().nth(1).unwrap_or_default();
                let query = target.split_once('?').map(|(_, q)| q).unwrap_or_default();
                let mut scopes = Vec::new();
                let mut service = String::new();
                for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
                    match k {
                        "scope" => scopes.push(percent_decode(v)),
                        "service" => service = percent_decode(v),
                        _ => {}
                    }
                }
                let authorized = req.lines().any(|l| {
                    l.split_once(':').is_some_and(|(h, v)| {
                        h.eq_ignore_ascii_case("authorization") && v.trim() == expected
                    })
                });
                log.lock().unwrap().push(TokenRequest {
                    scopes: scopes.clone(),
                    service: service.clone(),
                    authorized,
                });
                let (status, body) = if !authorized {
                    (
                        "401 Unauthorized",
                        r#"{"details":"flotilla test token service: wrong username or password"}"#
                            .to_string(),
                    )
                } else {
                    let token = mint_token(&key, &x5c, &user, &service, &scopes, jti);
                    (
                        "200 OK",
                        serde_json::json!({"token": token, "expires_in": 300}).to_string(),
                    )
                };
                let _ = std::io::Write::write_all(
                    &mut conn,
                    format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
            }
        });
        TokenServer { port, seen }
    }

    fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    fn requests(&self) -> Vec<TokenRequest> {
        self.seen.lock().unwrap().clone()
    }
}

/// The request line and headers of one HTTP request (bounded).
fn read_head(conn: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 3 <= b.len() => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A JWT for `sub` granting `scopes` (`repository:NAME:ACTIONS`), signed RS256 by `key`.
fn mint_token(key: &Path, x5c: &str, sub: &str, aud: &str, scopes: &[String], jti: u64) -> String {
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let access: Vec<serde_json::Value> = scopes
        .iter()
        .filter_map(|s| {
            let mut parts = s.splitn(3, ':');
            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            let actions: Vec<&str> = actions
                .split(',')
                .filter(|a| *a == "pull" || *a == "push")
                .collect();
            Some(serde_json::json!({"type": kind, "name": name, "actions": actions}))
        })
        .collect();
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [x5c]});
    let claims = serde_json::json!({
        "iss": TOKEN_ISSUER,
        "sub": sub,
        "aud": aud,
        "exp": now + 300,
        "nbf": now,
        "iat": now,
        "jti": format!("flotilla-test-{jti}"),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    // PKCS#1 v1.5 over SHA-256: RS256.
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), signing_input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "openssl dgst: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!("{signing_input}.{}", b64(&out.stdout))
}

/// Bearer-token auth (distribution's `auth: token:`) with a token service in the test: the
/// registry answers 401 with a `Bearer realm=…,service=…` challenge, the pull asks the realm
/// with the credentials from registries.toml and the repository's pull scope, and uses the
/// JWT it gets; wrong credentials fail the pull with the token service's answer, nothing
/// stored and no password shown.
#[test]
fn bearer_token_auth_through_a_token_service() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // The token signer: an RSA key (RS256) with a certificate from a CA the registry trusts.
    let pki = dir.join("pki");
    fs::create_dir_all(&pki).unwrap();
    let ca = Ca::new(&pki, "token").unwrap();
    let openssl = ensure_program("openssl", "openssl").unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(&openssl)
            .args(args)
            .current_dir(&pki)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-new",
        "-nodes",
        "-newkey",
        "rsa:2048",
        "-subj",
        "/O=flotilla/CN=token signer",
        "-keyout",
        "signer.key",
        "-out",
        "signer.csr",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "signer.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-out",
        "signer.crt",
    ]);
    run(&[
        "x509",
        "-in",
        "signer.crt",
        "-outform",
        "DER",
        "-out",
        "signer.der",
    ]);
    let (user, password) = ("alice", "t0ken-pw");
    let tokens = TokenServer::start(
        user,
        password,
        &pki.join("signer.key"),
        &fs::read(pki.join("signer.der")).unwrap(),
    );
    let auth = format!(
        "auth:\n  token:\n    realm: {}\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    \
         rootcertbundle: {}\n",
        tokens.realm(),
        ca.cert().display()
    );
    fs::create_dir_all(dir.join("reg")).unwrap();
    let reg = TestRegistry::start_with(
        &dir.join("reg"),
        &qemu_tests::registry::RegistryOptions {
            extra_yaml: Some(&auth),
            ..Default::default()
        },
    )
    .unwrap();
    let (layout, layer) = busybox_layout(dir);
    let reference = format!("{}/team/app:1", reg.host());
    // skopeo goes through the same token service (pull,push scope).
    push(
        &layout,
        &reference,
        &[
            "--dest-tls-verify=false",
            "--dest-creds",
            &format!("{user}:{password}"),
        ],
    );
    let store = dir.join("store");
    let settings = dir.join("registries.toml");
    let with_password = |pw: &str| {
        format!(
            "[registry.\"{}\"]\ninsecure = true\nusername = \"{user}\"\npassword = \"{pw}\"\n",
            reg.host()
        )
    };

    // Wrong credentials: the token service's 401 and its words, the registry named,
    // nothing stored, no password shown.
    write_settings(&settings, &with_password("wrong-pw"));
    let before = tokens.requests().len();
    let out = pull(&reference, &settings, &store);
    let (stdout, err) = text(&out);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        err.contains(&reg.host())
            && err.contains("token service refused")
            && err.contains("wrong username or password"),
        "{err}"
    );
    assert!(!format!("{stdout}{err}").contains("wrong-pw"), "{err}");
    assert!(
        tokens.requests()[before..].iter().all(|r| !r.authorized),
        "{:?}",
        tokens.requests()
    );
    assert_eq!(reg.blob_gets(&layer), 0, "{}", reg.log());
    assert_store_empty(&store);

    // The right credentials: the pull asked the token service for the repository's pull
    // scope on the registry's service, and the registry accepted the JWT.
    write_settings(&settings, &with_password(password));
    let before = tokens.requests().len();
    let out = pull(&reference, &settings, &store);
    let (stdout, err) = text(&out);
    assert!(out.status.success(), "{err}\n{}", reg.log());
    assert!(stdout.contains("downloaded 1 layers"), "{stdout}");
    assert!(!format!("{stdout}{err}").contains(password), "{err}");
    let asked = tokens.requests()[before..].to_vec();
    assert!(
        asked.iter().any(|r| r.authorized
            && r.service == TOKEN_SERVICE
            && r.scopes == ["repository:team/app:pull"]),
        "{asked:?}"
    );
    assert!(
        asked
            .iter()
            .all(|r| r.scopes.iter().all(|s| !s.contains("push"))),
        "{asked:?}"
    );
    assert_eq!(reg.blob_gets(&layer), 1, "{}", reg.log());
    let out = unitctl(&[
        "run",
        "--store",
        store.to_str().unwrap(),
        "--image",
        &reference,
        "--",
        "/bin/cat",
        "/hello",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout, "pulled from a registry\n");
}

/// Requests of `reg`'s access log for repository `repo` (`GET /v2/REPO/...`).
fn repo_requests(reg: &TestRegistry, repo: &str) -> Vec<String> {
    reg.log()
        .lines()
        .filter(|l| l.contains(&format!(" /v2/{repo}/")) && l.contains("HTTP/1.1\" "))
        .map(str::to_string)
        .collect()
}

/// `mirrors = [...]`: a pull asks the mirrors in order and then the registry. A mirror that
/// has the image serves it (after one that is down), and the registry (which lacks it) is
/// not asked; a mirror that lacks the image (404) falls through to the registry. Either way
/// the image is stored under the registry's name.
#[test]
fn a_mirror_that_has_the_image_serves_it_and_one_that_lacks_it_falls_through() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fs::create_dir_all(dir.join("full")).unwrap();
    fs::create_dir_all(dir.join("empty")).unwrap();
    let full = Registry::start(&dir.join("full"), None, None);
    let empty = Registry::start(&dir.join("empty"), None, None);
    let (layout, layer) = busybox_layout(dir);
    push(
        &layout,
        &format!("{}/team/app:1", full.host()),
        &["--dest-tls-verify=false"],
    );
    let down = format!("127.0.0.1:{}", free_port().unwrap());
    let settings = dir.join("registries.toml");
    let configure = |origin: &TestRegistry, mirrors: &[&str]| {
        let mut s = format!(
            "[registry.\"{}\"]\ninsecure = true\nmirrors = [{}]\n",
            origin.host(),
            mirrors
                .iter()
                .map(|m| format!("\"{m}\""))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for m in mirrors {
            s.push_str(&format!("[registry.\"{m}\"]\ninsecure = true\n"));
        }
        write_settings(&settings, &s);
    };
    let image_list = |store: &Path| {
        text(&unitctl(&[
            "image",
            "list",
            "--store",
            store.to_str().unwrap(),
        ]))
        .0
    };

    // The registry lacks the image; the mirrors: one down, then one that has it.
    configure(&empty, &[&down, &full.host()]);
    let store = dir.join("store");
    let reference = format!("{}/team/app:1", empty.host());
    let out = pull(&reference, &settings, &store);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains(&format!("from {}:", full.host())),
        "{stdout}"
    );
    assert!(
        stderr.contains(&format!("mirror {down} failed")),
        "{stderr}"
    );
    assert_eq!(full.blob_gets(&layer), 1, "{}", full.log());
    assert!(
        repo_requests(&empty, "team/app").is_empty(),
        "the registry was asked although a mirror had the image: {}",
        empty.log()
    );
    assert!(
        image_list(&store).contains(&format!("{}/team/app ", empty.host())),
        "{}",
        image_list(&store)
    );
    let out = unitctl(&[
        "run",
        "--store",
        store.to_str().unwrap(),
        "--image",
        &reference,
        "--",
        "/bin/cat",
        "/hello",
    ]);
    assert_eq!(text(&out).0, "pulled from a registry\n", "{}", text(&out).1);

    // The mirror lacks the image (404): the registry serves it, into a fresh store.
    configure(&full, &[&empty.host()]);
    let store2 = dir.join("store2");
    let reference = format!("{}/team/app:1", full.host());
    let out = pull(&reference, &settings, &store2);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains(&format!("from {}:", full.host())),
        "{stdout}"
    );
    assert!(
        stderr.contains(&format!("mirror {} failed", empty.host()))
            && stderr.contains("ManifestUnknown"),
        "{stderr}"
    );
    let asked = repo_requests(&empty, "team/app");
    assert!(
        !asked.is_empty() && asked.iter().all(|l| l.contains("\" 404 ")),
        "the mirror was not asked, or did not answer 404: {asked:?}"
    );
    assert_eq!(full.blob_gets(&layer), 2, "{}", full.log());
    assert!(
        image_list(&store2).contains(&format!("{}/team/app ", full.host())),
        "{}",
        image_list(&store2)
    );
}

/// A layer download cut mid-way resumes where it stopped (an HTTP Range request for the
/// rest, which the registry answers 206), the digest is checked over the whole, and the
/// image runs.
#[test]
fn a_cut_layer_download_resumes_where_it_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let Proxied {
        reg,
        proxy,
        reference,
        store,
        settings,
        layer,
    } = Proxied::start(dir);

    // One connection is cut 200 KiB in (into the layer); the next ones pass.
    proxy.set_cuts(200 << 10, false, 1);
    let out = pull(&reference, &settings, &store);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("downloaded 1 layers"), "{stdout}");
    assert!(stderr.contains("resuming there"), "{stderr}");
    let ranged: Vec<String> = reg
        .log()
        .lines()
        .filter(|l| l.contains(&format!("/blobs/{layer} ")) && l.contains("\" 206 "))
        .map(str::to_string)
        .collect();
    assert_eq!(
        ranged.len(),
        1,
        "no Range request answered 206: {}",
        reg.log()
    );
    let out = unitctl(&[
        "run",
        "--store",
        store.to_str().unwrap(),
        "--image",
        &reference,
        "--",
        "/bin/cat",
        "/hello",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout, "pulled from a registry\n");
}
