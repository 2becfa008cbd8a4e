//! The update payload: a directory holding the slot's `vmlinuz`, `initramfs.img` and
//! `root.img`, the manifest ([`MANIFEST`], [`UpdateManifest`]) and the manifest's detached
//! Ed25519 signature ([`SIGNATURE`], [`SignatureFile`]).
//!
//! [`verify`] is read-only: it refuses a payload without a signature, signed by a key not
//! among the trusted ones, whose manifest was altered after signing, for another OS or
//! architecture, not newer than the running version (unless downgrades are allowed), or
//! with an artifact whose size or sha256 differs from the manifest. Only a
//! [`VerifiedPayload`] can be written to a slot.
//!
//! Keys are PEM: the private key as `openssl genpkey -algorithm ed25519` writes it (PKCS#8,
//! `BEGIN PRIVATE KEY`), the public keys as SubjectPublicKeyInfo (`BEGIN PUBLIC KEY`, what
//! `openssl pkey -pubout` writes), baked into the image at [`TRUSTED_KEYS_DIR`].

use std::cmp::Ordering;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::{hex, sha256_file, IoError};

/// The manifest's file name in a payload directory.
pub const MANIFEST: &str = "manifest.json";
/// The detached signature of [`MANIFEST`].
pub const SIGNATURE: &str = "manifest.json.sig";
/// Where the image keeps the public keys it trusts (`*.pem`, several for rotation).
pub const TRUSTED_KEYS_DIR: &str = "/usr/lib/flotilla/update-keys";
/// The OS id of Flotilla's payloads (`ID=` of os-release).
pub const OS_ID: &str = "flotilla";
/// The signature algorithm named in [`SignatureFile`].
pub const ALGORITHM: &str = "ed25519";

/// The artifacts of a payload: `(name in the manifest, file name in the payload)`. All three
/// are required, nothing else is allowed.
pub const ARTIFACTS: [(&str, &str); 3] = [
    ("vmlinuz", "vmlinuz"),
    ("initramfs", "initramfs.img"),
    ("root", "root.img"),
];

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410); the 32 key bytes follow.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Why a payload, key or signature is refused.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// Reading or writing a file failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The payload has no signature file.
    #[error("the payload {} is not signed (no {SIGNATURE}): refused; sign it with `image-build os --sign KEY.pem`", dir.display())]
    Unsigned {
        /// The payload directory.
        dir: PathBuf,
    },
    /// The signature file is not what [`sign`] writes.
    #[error("the signature {} is malformed: {detail}", path.display())]
    BadSignatureFile {
        /// The signature file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The signature names a key this host does not trust and no trusted key verifies it.
    #[error("the payload is signed by key {key}, which is not among the {trusted} trusted keys of this host ({TRUSTED_KEYS_DIR}/*.pem): refused")]
    UntrustedKey {
        /// The key id in the signature.
        key: String,
        /// How many keys are trusted.
        trusted: usize,
    },
    /// The signature names a trusted key but does not verify: the manifest was changed.
    #[error("the signature by trusted key {key} does not match {}: the manifest was altered after signing: refused", path.display())]
    ManifestAltered {
        /// The key id.
        key: String,
        /// The manifest.
        path: PathBuf,
    },
    /// The manifest is not valid JSON of the expected shape.
    #[error("the manifest {} is malformed: {detail}", path.display())]
    BadManifest {
        /// The manifest.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The payload is for another OS.
    #[error("the payload is for OS {found:?}, this host runs {expected:?}: refused")]
    WrongOs {
        /// The manifest's OS id.
        found: String,
        /// This host's.
        expected: String,
    },
    /// The payload is for another architecture.
    #[error("the payload is for architecture {found:?}, this host is {expected:?}: refused")]
    WrongArchitecture {
        /// The manifest's architecture.
        found: String,
        /// This host's.
        expected: String,
    },
    /// A version that is not semver.
    #[error(
        "version {version:?} of {what} is not a semantic version (MAJOR.MINOR.PATCH): {detail}"
    )]
    BadVersion {
        /// The text.
        version: String,
        /// Whose version.
        what: &'static str,
        /// The parser's message.
        detail: String,
    },
    /// The payload is not newer than the running version.
    #[error("the payload's version {payload} is {relation} the running version {running}: refused (a downgrade needs --allow-downgrade)")]
    NotNewer {
        /// The payload's version.
        payload: String,
        /// The running version.
        running: String,
        /// `older than` or `equal to`.
        relation: &'static str,
    },
    /// An artifact's size differs from the manifest.
    #[error("artifact {name} ({}) is {actual} bytes, the signed manifest says {expected}: refused", path.display())]
    ArtifactSize {
        /// The artifact's name.
        name: String,
        /// Its file.
        path: PathBuf,
        /// The manifest's size.
        expected: u64,
        /// The file's.
        actual: u64,
    },
    /// An artifact's sha256 differs from the manifest.
    #[error("artifact {name} ({}) has sha256 {actual}, the signed manifest says {expected}: refused", path.display())]
    ArtifactDigest {
        /// The artifact's name.
        name: String,
        /// Its file.
        path: PathBuf,
        /// The manifest's digest.
        expected: String,
        /// The file's.
        actual: String,
    },
    /// A key file is not an Ed25519 key in the expected PEM form.
    #[error("{} is not an Ed25519 {kind} in PEM: {detail} (make one with `openssl genpkey -algorithm ed25519 -out key.pem`)", path.display())]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// `private key` or `public key`.
        kind: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// No trusted key at all.
    #[error("no trusted update keys in {} (*.pem): every payload is refused; bake a key in with `image-build os --sign KEY.pem`", dir.display())]
    NoTrustedKeys {
        /// The directory searched.
        dir: PathBuf,
    },
}

/// One file of the payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadArtifact {
    /// `vmlinuz`, `initramfs` or `root` (see [`ARTIFACTS`]).
    pub name: String,
    /// File name inside the payload directory (no `/`).
    pub path: String,
    /// Hex sha256.
    pub sha256: String,
    /// Bytes.
    pub size: u64,
}

/// `manifest.json` of a payload: what is signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateManifest {
    /// The OS id, [`OS_ID`].
    pub os: String,
    /// The version (semver), `VERSION_ID` of the image's os-release.
    pub version: String,
    /// The kernel release.
    pub kernel: String,
    /// The architecture (Rust's `std::env::consts::ARCH`, e.g. `x86_64`).
    pub architecture: String,
    /// The files, one per entry of [`ARTIFACTS`].
    pub artifacts: Vec<PayloadArtifact>,
}

/// The detached signature file ([`SIGNATURE`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureFile {
    /// [`ALGORITHM`].
    pub algorithm: String,
    /// The signing key's id ([`key_id`]): which key to try first, and what the errors name.
    /// Not trusted by itself: every trusted key is tried.
    pub key: String,
    /// The signature over the exact bytes of [`MANIFEST`], base64.
    pub signature: String,
}

/// The id of a public key: `sha256:` and the first 16 hex digits of the sha256 of its 32
/// bytes.
pub fn key_id(public: &[u8]) -> String {
    let d = sha2::Sha256::digest(public);
    let h = hex(&d);
    format!("sha256:{}", h.get(..16).unwrap_or(&h))
}

/// A trusted public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    /// The 32 key bytes.
    pub public: Vec<u8>,
    /// Its id ([`key_id`]).
    pub id: String,
    /// Where it was read from.
    pub source: PathBuf,
}

/// A signing key (the private half).
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", self.id())
    }
}

/// The base64 body of the first PEM block labelled `label`.
fn pem_block(text: &str, label: &str) -> Result<Vec<u8>, String> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text
        .find(&begin)
        .ok_or_else(|| format!("no `{begin}` line"))?;
    let rest = text.get(start + begin.len()..).unwrap_or_default();
    let stop = rest.find(&end).ok_or_else(|| format!("no `{end}` line"))?;
    let body: String = rest
        .get(..stop)
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|e| format!("bad base64: {e}"))
}

impl SigningKey {
    /// Parses a PKCS#8 PEM private key (`openssl genpkey -algorithm ed25519`).
    pub fn from_pem(text: &str, path: &Path) -> Result<SigningKey, PayloadError> {
        let bad = |detail: String| PayloadError::BadKey {
            path: path.to_path_buf(),
            kind: "private key",
            detail,
        };
        let der = pem_block(text, "PRIVATE KEY").map_err(bad)?;
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map_err(|e| bad(format!("not an Ed25519 PKCS#8 key ({e})")))?;
        Ok(SigningKey { pair })
    }

    /// Reads a PEM private key file.
    pub fn load(path: &Path) -> Result<SigningKey, PayloadError> {
        let text = std::fs::read_to_string(path).map_err(|e| IoError::new("read", path, e))?;
        SigningKey::from_pem(&text, path)
    }

    /// The public key's id.
    pub fn id(&self) -> String {
        key_id(self.pair.public_key().as_ref())
    }

    /// The public key as SubjectPublicKeyInfo PEM (what [`TRUSTED_KEYS_DIR`] holds).
    pub fn public_pem(&self) -> String {
        let mut der = ED25519_SPKI_PREFIX.to_vec();
        der.extend_from_slice(self.pair.public_key().as_ref());
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        format!("-----BEGIN PUBLIC KEY-----\n{b64}\n-----END PUBLIC KEY-----\n")
    }

    /// The signature file of `manifest` (its exact bytes).
    pub fn sign(&self, manifest: &[u8]) -> SignatureFile {
        let sig = self.pair.sign(manifest);
        SignatureFile {
            algorithm: ALGORITHM.into(),
            key: self.id(),
            signature: base64::engine::general_purpose::STANDARD.encode(sig.as_ref()),
        }
    }
}

impl TrustedKey {
    /// Parses a SubjectPublicKeyInfo PEM public key.
    pub fn from_pem(text: &str, path: &Path) -> Result<TrustedKey, PayloadError> {
        let bad = |detail: String| PayloadError::BadKey {
            path: path.to_path_buf(),
            kind: "public key",
            detail,
        };
        let der = pem_block(text, "PUBLIC KEY").map_err(bad)?;
        let public = der
            .strip_prefix(&ED25519_SPKI_PREFIX[..])
            .filter(|k| k.len() == 32)
            .ok_or_else(|| bad("not an Ed25519 SubjectPublicKeyInfo".into()))?
            .to_vec();
        Ok(TrustedKey {
            id: key_id(&public),
            public,
            source: path.to_path_buf(),
        })
    }
}

/// Reads the trusted keys: every `*.pem` of `dir`, in name order. None is an error (every
/// payload would be refused); so is a file that is not a public key.
pub fn load_trusted_keys(dir: &Path) -> Result<Vec<TrustedKey>, PayloadError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(PayloadError::NoTrustedKeys {
                dir: dir.to_path_buf(),
            })
        }
        Err(e) => return Err(IoError::new("read directory", dir, e).into()),
    };
    let mut paths = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| IoError::new("read directory", dir, e))?;
        let path = entry.path();
        if path.extension().is_some_and(|x| x == "pem") {
            paths.push(path);
        }
    }
    paths.sort();
    let mut keys = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path).map_err(|e| IoError::new("read", &path, e))?;
        keys.push(TrustedKey::from_pem(&text, &path)?);
    }
    if keys.is_empty() {
        return Err(PayloadError::NoTrustedKeys {
            dir: dir.to_path_buf(),
        });
    }
    Ok(keys)
}

/// What [`verify`] checks a payload against.
#[derive(Debug, Clone)]
pub struct Policy<'a> {
    /// The keys this host trusts.
    pub trusted: &'a [TrustedKey],
    /// The running version; `None` skips the version check (a first install).
    pub running: Option<&'a semver::Version>,
    /// Accept a version older than or equal to the running one.
    pub allow_downgrade: bool,
    /// This host's OS id ([`OS_ID`]).
    pub os: &'a str,
    /// This host's architecture (`std::env::consts::ARCH`).
    pub architecture: &'a str,
}

/// A payload that passed [`verify`]: its directory, its manifest and the key that signed it.
#[derive(Debug, Clone)]
pub struct VerifiedPayload {
    /// The payload directory.
    pub dir: PathBuf,
    /// The signed manifest.
    pub manifest: UpdateManifest,
    /// The manifest's version.
    pub version: semver::Version,
    /// The id of the trusted key whose signature verified.
    pub key: String,
}

impl VerifiedPayload {
    /// The artifact named `name` (one of [`ARTIFACTS`]; verify guarantees all are there).
    pub fn artifact(&self, name: &str) -> Option<&PayloadArtifact> {
        self.manifest.artifacts.iter().find(|a| a.name == name)
    }

    /// The file of the artifact named `name`.
    pub fn artifact_path(&self, name: &str) -> Option<PathBuf> {
        self.artifact(name).map(|a| self.dir.join(&a.path))
    }
}

/// Parses a version (semver, a leading `v` allowed).
pub fn parse_version(text: &str, what: &'static str) -> Result<semver::Version, PayloadError> {
    let t = text.trim();
    semver::Version::parse(t.strip_prefix('v').unwrap_or(t)).map_err(|e| PayloadError::BadVersion {
        version: text.to_string(),
        what,
        detail: e.to_string(),
    })
}

/// `VERSION_ID` of an os-release file (quotes removed), parsed as semver.
pub fn os_release_version(path: &Path) -> Result<semver::Version, PayloadError> {
    let text = std::fs::read_to_string(path).map_err(|e| IoError::new("read", path, e))?;
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_ID="))
        .map(|v| v.trim().trim_matches('"').trim_matches('\'').to_string())
        .unwrap_or_default();
    parse_version(&value, "the running system (os-release VERSION_ID)")
}

/// Reads the payload's signature file: a missing one is [`PayloadError::Unsigned`].
fn read_signature(dir: &Path) -> Result<SignatureFile, PayloadError> {
    let sig_path = dir.join(SIGNATURE);
    let text = match std::fs::read_to_string(&sig_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(PayloadError::Unsigned {
                dir: dir.to_path_buf(),
            })
        }
        Err(e) => return Err(IoError::new("read", &sig_path, e).into()),
    };
    serde_json::from_str(&text).map_err(|e| PayloadError::BadSignatureFile {
        path: sig_path,
        detail: e.to_string(),
    })
}

/// Checks the signature `sig` of `manifest` (its bytes) against the trusted keys; returns
/// the id of the key that verified.
fn check_signature(
    dir: &Path,
    sig: &SignatureFile,
    manifest: &[u8],
    trusted: &[TrustedKey],
) -> Result<String, PayloadError> {
    let bad = |detail: String| PayloadError::BadSignatureFile {
        path: dir.join(SIGNATURE),
        detail,
    };
    if sig.algorithm != ALGORITHM {
        return Err(bad(format!(
            "algorithm {:?}, only {ALGORITHM:?} is accepted",
            sig.algorithm
        )));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(sig.signature.trim())
        .map_err(|e| bad(format!("bad base64: {e}")))?;
    // The named key first, then every other: the id is a hint, never trusted by itself.
    let mut order: Vec<&TrustedKey> = trusted.iter().filter(|k| k.id == sig.key).collect();
    order.extend(trusted.iter().filter(|k| k.id != sig.key));
    for key in order {
        if UnparsedPublicKey::new(&ED25519, &key.public)
            .verify(manifest, &bytes)
            .is_ok()
        {
            return Ok(key.id.clone());
        }
    }
    if trusted.iter().any(|k| k.id == sig.key) {
        Err(PayloadError::ManifestAltered {
            key: sig.key.clone(),
            path: dir.join(MANIFEST),
        })
    } else {
        Err(PayloadError::UntrustedKey {
            key: sig.key.clone(),
            trusted: trusted.len(),
        })
    }
}

/// An artifact's file name: a plain name inside the payload directory.
fn plain_name(path: &str) -> bool {
    !path.is_empty() && path != "." && path != ".." && !path.contains('/') && !path.contains('\0')
}

/// Checks the manifest's shape: exactly the [`ARTIFACTS`], plain file names, hex digests.
fn check_shape(m: &UpdateManifest, path: &Path) -> Result<(), PayloadError> {
    let bad = |detail: String| PayloadError::BadManifest {
        path: path.to_path_buf(),
        detail,
    };
    for a in &m.artifacts {
        if !ARTIFACTS.iter().any(|(n, _)| *n == a.name) {
            return Err(bad(format!("unknown artifact {:?}", a.name)));
        }
        if !plain_name(&a.path) {
            return Err(bad(format!(
                "artifact {}: path {:?} is not a file name in the payload directory",
                a.name, a.path
            )));
        }
        if a.sha256.len() != 64 || !a.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(format!(
                "artifact {}: sha256 {:?} is not 64 hex digits",
                a.name, a.sha256
            )));
        }
    }
    for (name, _) in ARTIFACTS {
        match m.artifacts.iter().filter(|a| a.name == name).count() {
            1 => {}
            0 => return Err(bad(format!("artifact {name} is missing"))),
            _ => return Err(bad(format!("artifact {name} is listed twice"))),
        }
    }
    Ok(())
}

/// Checks one artifact's size, then its sha256, against the manifest.
fn check_artifact(dir: &Path, a: &PayloadArtifact) -> Result<(), PayloadError> {
    let path = dir.join(&a.path);
    let meta = std::fs::metadata(&path).map_err(|e| IoError::new("stat", &path, e))?;
    if meta.len() != a.size {
        return Err(PayloadError::ArtifactSize {
            name: a.name.clone(),
            path,
            expected: a.size,
            actual: meta.len(),
        });
    }
    let (sha256, size) = sha256_file(&path)?;
    if size != a.size {
        return Err(PayloadError::ArtifactSize {
            name: a.name.clone(),
            path,
            expected: a.size,
            actual: size,
        });
    }
    if !sha256.eq_ignore_ascii_case(&a.sha256) {
        return Err(PayloadError::ArtifactDigest {
            name: a.name.clone(),
            path,
            expected: a.sha256.clone(),
            actual: sha256,
        });
    }
    Ok(())
}

/// Verifies the payload in `dir` against `policy`, in this order: the signature over the
/// manifest's bytes; the manifest's shape; OS id; architecture; version; each artifact's
/// size and sha256. Reads only; writes nothing.
pub fn verify(dir: &Path, policy: &Policy<'_>) -> Result<VerifiedPayload, PayloadError> {
    let manifest_path = dir.join(MANIFEST);
    let sig = read_signature(dir)?;
    let bytes =
        std::fs::read(&manifest_path).map_err(|e| IoError::new("read", &manifest_path, e))?;
    let key = check_signature(dir, &sig, &bytes, policy.trusted)?;
    let manifest: UpdateManifest =
        serde_json::from_slice(&bytes).map_err(|e| PayloadError::BadManifest {
            path: manifest_path.clone(),
            detail: e.to_string(),
        })?;
    check_shape(&manifest, &manifest_path)?;
    if manifest.os != policy.os {
        return Err(PayloadError::WrongOs {
            found: manifest.os,
            expected: policy.os.to_string(),
        });
    }
    if manifest.architecture != policy.architecture {
        return Err(PayloadError::WrongArchitecture {
            found: manifest.architecture,
            expected: policy.architecture.to_string(),
        });
    }
    let version = parse_version(&manifest.version, "the payload")?;
    if let Some(running) = policy.running {
        let relation = match version.cmp(running) {
            Ordering::Greater => None,
            Ordering::Equal => Some("equal to"),
            Ordering::Less => Some("older than"),
        };
        if let (Some(relation), false) = (relation, policy.allow_downgrade) {
            return Err(PayloadError::NotNewer {
                payload: version.to_string(),
                running: running.to_string(),
                relation,
            });
        }
    }
    for a in &manifest.artifacts {
        check_artifact(dir, a)?;
    }
    Ok(VerifiedPayload {
        dir: dir.to_path_buf(),
        manifest,
        version,
        key,
    })
}

/// What [`write_payload`] packs.
#[derive(Debug, Clone)]
pub struct PayloadSource<'a> {
    /// The version (semver).
    pub version: &'a str,
    /// The kernel release.
    pub kernel: &'a str,
    /// The architecture.
    pub architecture: &'a str,
    /// The kernel file.
    pub vmlinuz: &'a Path,
    /// The initramfs file.
    pub initramfs: &'a Path,
    /// The root image file.
    pub root: &'a Path,
}

/// Writes a file atomically enough for a build output: to a temporary name, then renamed.
fn write_file(path: &Path, bytes: &[u8]) -> Result<(), IoError> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| IoError::new("create", &tmp, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| IoError::new("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| IoError::new("rename into place", path, e))
}

/// Makes `dest` the same file as `src`: a hard link, else a copy.
fn link_or_copy(src: &Path, dest: &Path) -> Result<(), IoError> {
    match std::fs::remove_file(dest) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(IoError::new("remove", dest, e)),
    }
    if std::fs::hard_link(src, dest).is_err() {
        std::fs::copy(src, dest).map_err(|e| IoError::new("copy", src, e))?;
    }
    Ok(())
}

/// Writes the payload into `out` (created if needed): the three artifacts (hard links, or
/// copies across filesystems), [`MANIFEST`] with their digests, and [`SIGNATURE`] by `key`.
/// Returns the manifest.
pub fn write_payload(
    out: &Path,
    src: &PayloadSource<'_>,
    key: &SigningKey,
) -> Result<UpdateManifest, PayloadError> {
    parse_version(src.version, "the payload")?;
    std::fs::create_dir_all(out).map_err(|e| IoError::new("create", out, e))?;
    let mut artifacts = Vec::new();
    for ((name, file), from) in ARTIFACTS.iter().zip([src.vmlinuz, src.initramfs, src.root]) {
        let dest = out.join(file);
        link_or_copy(from, &dest)?;
        let (sha256, size) = sha256_file(&dest)?;
        artifacts.push(PayloadArtifact {
            name: (*name).to_string(),
            path: (*file).to_string(),
            sha256,
            size,
        });
    }
    let manifest = UpdateManifest {
        os: OS_ID.into(),
        version: src.version.to_string(),
        kernel: src.kernel.to_string(),
        architecture: src.architecture.to_string(),
        artifacts,
    };
    let mut bytes =
        serde_json::to_vec_pretty(&manifest).map_err(|e| PayloadError::BadManifest {
            path: out.join(MANIFEST),
            detail: e.to_string(),
        })?;
    bytes.push(b'\n');
    write_file(&out.join(MANIFEST), &bytes)?;
    sign(out, key)?;
    Ok(manifest)
}

/// Signs the [`MANIFEST`] of the payload in `dir` with `key`, writing [`SIGNATURE`].
pub fn sign(dir: &Path, key: &SigningKey) -> Result<SignatureFile, PayloadError> {
    let manifest = dir.join(MANIFEST);
    let bytes = std::fs::read(&manifest).map_err(|e| IoError::new("read", &manifest, e))?;
    let sig = key.sign(&bytes);
    let mut json = serde_json::to_vec_pretty(&sig).map_err(|e| PayloadError::BadSignatureFile {
        path: dir.join(SIGNATURE),
        detail: e.to_string(),
    })?;
    json.push(b'\n');
    write_file(&dir.join(SIGNATURE), &json)?;
    Ok(sig)
}
