//! [`ImageStore`]: import, list, resolve, remove + garbage collection.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use oci_spec::image::{ImageConfiguration, ImageManifest, MediaType};
use rustix::fs::{flock, FlockOperation};
use serde::{Deserialize, Serialize};

use super::docker;
use super::extract::{self, Options};
use super::layout::{self, blob_path, runtime_config};
use super::lease;
use super::source::open_regular;
use super::{
    parse_reference, sha256_hex, HashReader, ImageError, ImageInfo, ImportEvent, ResolvedImage,
};

/// Contents of `images.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Db {
    /// `name:tag` → manifest digest.
    images: BTreeMap<String, String>,
}

/// The local image store. See the [module docs](super).
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

/// Mode of an image store's root: only its owner (root) may enter it.
pub const STORE_MODE: u32 = 0o700;

/// Create `root` (and missing parents, with the usual mode) as a [`STORE_MODE`] directory, or
/// tighten an existing one to it.
fn create_private_dir(root: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(parent) = root.parent() {
        fs::create_dir_all(parent)
            .map_err(|e| ImageError::io("create store directory", parent, e))?;
    }
    match fs::DirBuilder::new().mode(STORE_MODE).create(root) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(ImageError::io("create store directory", root, e)),
    }
    let meta = fs::metadata(root).map_err(|e| ImageError::io("stat store directory", root, e))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode == STORE_MODE {
        return Ok(());
    }
    match fs::set_permissions(root, fs::Permissions::from_mode(STORE_MODE)) {
        Ok(()) => {
            log::warn!(
                "image store {}: mode was {mode:o}, open to other users; made it {STORE_MODE:o}",
                root.display()
            );
            Ok(())
        }
        // A read-only store (baked into the host image) is made private when built.
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {
            log::warn!(
                "image store {}: mode {mode:o} on a read-only filesystem cannot be tightened to {STORE_MODE:o}; rebuild it 0700",
                root.display()
            );
            Ok(())
        }
        Err(e) => Err(ImageError::io(
            "make the store private (chmod 0700)",
            root,
            e,
        )),
    }
}

/// Held while the store is being changed; dropping it releases the flock.
struct StoreLock {
    _file: File,
}

static STAGE_SEQ: AtomicU64 = AtomicU64::new(0);

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

impl ImageStore {
    /// Opens (creating its directories if needed) the store rooted at `root`.
    ///
    /// The root is private to its owner ([`STORE_MODE`], 0700): created so, and an existing
    /// store with a looser mode is tightened here. Layers keep their files' set-id bits (an
    /// image's `su` must work in its container) and a host user who could reach them could
    /// run them; through a 0700 root no user but root can. A store on a read-only
    /// filesystem (the system store) cannot be tightened here: it is made 0700 when built.
    pub fn open(root: &Path) -> Result<ImageStore, ImageError> {
        create_private_dir(root)?;
        for dir in [
            root.join("blobs").join("sha256"),
            root.join("layers"),
            root.join("tmp"),
        ] {
            fs::create_dir_all(&dir)
                .map_err(|e| ImageError::io("create store directory", &dir, e))?;
        }
        Ok(ImageStore {
            root: root.to_path_buf(),
        })
    }

    /// The store root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock(&self) -> Result<StoreLock, ImageError> {
        let path = self.root.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| ImageError::io("open lock file", &path, e))?;
        flock(&file, FlockOperation::LockExclusive)
            .map_err(|e| ImageError::io("lock", &path, e))?;
        Ok(StoreLock { _file: file })
    }

    fn db_path(&self) -> PathBuf {
        self.root.join("images.json")
    }

    fn read_db(&self) -> Result<Db, ImageError> {
        let path = self.db_path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ImageError::Json {
                what: "image table".into(),
                path,
                detail: e.to_string(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Db::default()),
            Err(e) => Err(ImageError::io("read", &path, e)),
        }
    }

    /// The tagged images as `(name:tag, manifest digest)`, sorted by name, from the image
    /// table alone: no blob is opened, so it costs one small file read however many images
    /// there are (for a caller that asks often, such as the manager's `ListImages`).
    pub fn tags(&self) -> Result<Vec<(String, String)>, ImageError> {
        Ok(self.read_db()?.images.into_iter().collect())
    }

    /// Replaces images.json atomically (tmp + fsync + rename). Call with the lock held.
    fn write_db(&self, db: &Db) -> Result<(), ImageError> {
        let path = self.db_path();
        let tmp = self
            .root
            .join(format!("images.json.tmp-{}", std::process::id()));
        let bytes = serde_json::to_vec_pretty(db).map_err(|e| ImageError::Json {
            what: "image table".into(),
            path: path.clone(),
            detail: e.to_string(),
        })?;
        let mut f = File::create(&tmp).map_err(|e| ImageError::io("create", &tmp, e))?;
        f.write_all(&bytes)
            .and_then(|()| f.write_all(b"\n"))
            .and_then(|()| f.sync_all())
            .map_err(|e| ImageError::io("write", &tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| ImageError::io("replace", &path, e))
    }

    /// Removes leftovers of interrupted imports. Call with the lock held.
    fn clean_tmp(&self) {
        let tmp = self.root.join("tmp");
        if let Ok(rd) = fs::read_dir(&tmp) {
            for e in rd.flatten() {
                let p = e.path();
                let r = if p.is_dir() && !p.is_symlink() {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_file(&p)
                };
                if let Err(err) = r {
                    log::warn!("image store: cannot remove leftover {}: {err}", p.display());
                }
            }
        }
    }

    fn new_stage(&self, what: &str) -> Result<PathBuf, ImageError> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let seq = STAGE_SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = self
            .root
            .join("tmp")
            .join(format!("{what}-{}-{seq}-{nanos}", std::process::id()));
        fs::create_dir_all(&dir)
            .map_err(|e| ImageError::io("create staging directory", &dir, e))?;
        Ok(dir)
    }

    /// Imports an OCI image layout (a directory, or a tar of one, possibly gzipped) and tags
    /// it `name` (`name` or `name:tag`; default: the layout's ref annotation).
    pub fn import_oci_layout(
        &self,
        src: &Path,
        name: Option<&str>,
        progress: &mut dyn FnMut(ImportEvent),
    ) -> Result<ImageInfo, ImageError> {
        let want = name.map(parse_reference).transpose()?;
        let _lock = self.lock()?;
        self.clean_tmp();
        let stage = self.new_stage("import")?;
        let result = self.import_staged(src, want, progress, &stage);
        if let Err(e) = fs::remove_dir_all(&stage) {
            log::warn!("image store: cannot remove {}: {e}", stage.display());
        }
        result
    }

    fn import_staged(
        &self,
        src: &Path,
        want: Option<(String, String)>,
        progress: &mut dyn FnMut(ImportEvent),
        stage: &Path,
    ) -> Result<ImageInfo, ImageError> {
        let meta = fs::metadata(src).map_err(|e| ImageError::io("read image source", src, e))?;
        let dir = if meta.is_dir() {
            src.to_path_buf()
        } else if !meta.is_file() {
            // A FIFO or device given as the archive would block or never end.
            return Err(ImageError::NotRegular {
                what: "image archive".into(),
                path: src.to_path_buf(),
                kind: "not a regular file or directory (a FIFO, device or socket)",
            });
        } else {
            let dir = stage.join("src");
            fs::create_dir(&dir).map_err(|e| ImageError::io("create", &dir, e))?;
            let file = File::open(src).map_err(|e| ImageError::io("open", src, e))?;
            let mut reader = BufReader::with_capacity(1 << 20, file);
            let label = src.display().to_string();
            let opts = Options {
                overlay: false,
                owners: false,
            };
            if sniff(&mut reader, src)?.starts_with(&GZIP_MAGIC) {
                extract::extract(
                    flate2::read::MultiGzDecoder::new(reader),
                    &dir,
                    &label,
                    opts,
                )?;
            } else {
                extract::extract(reader, &dir, &label, opts)?;
            }
            dir
        };
        let (img, tags) = if docker::is_legacy(&dir) {
            docker::read_legacy(&dir, want.as_ref())?
        } else {
            let img = layout::read_layout(&dir, want.as_ref())?;
            let tags = match (&want, &img.ref_name) {
                (Some(w), _) => vec![w.clone()],
                (None, Some(r)) => vec![parse_reference(r)?],
                // Docker 25+ also writes manifest.json, whose RepoTags name the image.
                (None, None) => {
                    docker::tags_for_config(&dir, img.manifest.config().digest().as_ref())
                }
            };
            (img, tags)
        };
        let Some((name, tag)) = tags.first().cloned() else {
            return Err(ImageError::NeedName(src.to_path_buf()));
        };

        let layers = img.manifest.layers();
        let diff_ids = img.config.rootfs().diff_ids();
        if diff_ids.len() != layers.len() {
            return Err(ImageError::Layout(format!(
                "image {}: the manifest lists {} layers but the config {} diff_ids",
                img.manifest_digest,
                layers.len(),
                diff_ids.len()
            )));
        }
        let staged_blobs = stage.join("blobs");
        let staged_layers = stage.join("layers");
        for d in [&staged_blobs, &staged_layers] {
            fs::create_dir_all(d).map_err(|e| ImageError::io("create", d, e))?;
        }
        // JSON documents: already verified in memory.
        let config_digest = img.manifest.config().digest().to_string();
        for (digest, bytes) in [
            (&img.manifest_digest, &img.manifest_bytes),
            (&config_digest, &img.config_bytes),
        ] {
            let hex = hex_of(digest)?;
            let p = staged_blobs.join(hex);
            fs::write(&p, bytes).map_err(|e| ImageError::io("write", &p, e))?;
        }
        let count = layers.len();
        for (index, (desc, diff_id)) in layers.iter().zip(diff_ids).enumerate() {
            let digest = desc.digest().to_string();
            let what = format!("layer {}/{count}", index + 1);
            if matches!(
                desc.media_type(),
                MediaType::ImageLayerZstd | MediaType::ImageLayerNonDistributableZstd
            ) {
                return Err(zstd_refused(&digest));
            }
            let hex = hex_of(&digest)?;
            let diff_hex = sha256_hex(diff_id).ok_or_else(|| {
                ImageError::Unsupported(format!(
                    "{what}: diff_id '{diff_id}' is not sha256:<64 hex>"
                ))
            })?;
            let stored = self.root.join("blobs").join("sha256").join(hex);
            let blob = if stored.is_file() {
                stored
            } else {
                let staged = staged_blobs.join(hex);
                copy_verified(
                    &blob_path(&dir, &digest)?,
                    &staged,
                    &digest,
                    desc.size(),
                    &what,
                )?;
                staged
            };
            if !self.root.join("layers").join(diff_hex).is_dir()
                && !staged_layers.join(diff_hex).is_dir()
            {
                let target = staged_layers.join(diff_hex);
                fs::create_dir(&target).map_err(|e| ImageError::io("create", &target, e))?;
                let actual = extract_layer(&blob, &target, &digest)?;
                if actual != *diff_id {
                    return Err(ImageError::DigestMismatch {
                        what: format!("diff_id of {what}"),
                        expected: diff_id.clone(),
                        actual,
                    });
                }
            }
            progress(ImportEvent::Layer {
                index,
                count,
                digest,
                bytes: desc.size(),
            });
        }

        // Commit: everything verified; move into place, then tag.
        commit_dir(&staged_blobs, &self.root.join("blobs").join("sha256"))?;
        commit_dir(&staged_layers, &self.root.join("layers"))?;
        let mut db = self.read_db()?;
        for (n, t) in &tags {
            db.images
                .insert(format!("{n}:{t}"), img.manifest_digest.clone());
        }
        self.write_db(&db)?;
        progress(ImportEvent::Done);
        Ok(info_of(
            name,
            tag,
            img.manifest_digest,
            &img.manifest,
            &img.config,
        ))
    }

    fn load(&self, digest: &str) -> Result<(ImageManifest, ImageConfiguration), ImageError> {
        let mpath = blob_path(&self.root, digest)?;
        let manifest = ImageManifest::from_file(&mpath).map_err(|e| {
            ImageError::Damaged(format!("manifest {digest} ({}): {e}", mpath.display()))
        })?;
        let cdigest = manifest.config().digest().to_string();
        let cpath = blob_path(&self.root, &cdigest)?;
        let config = ImageConfiguration::from_file(&cpath).map_err(|e| {
            ImageError::Damaged(format!("config {cdigest} ({}): {e}", cpath.display()))
        })?;
        Ok((manifest, config))
    }

    /// Lists the tagged images, sorted by name:tag. Entries whose blobs are damaged are
    /// skipped with a warning.
    pub fn list(&self) -> Result<Vec<ImageInfo>, ImageError> {
        let db = self.read_db()?;
        let mut out = Vec::new();
        for (reference, digest) in &db.images {
            let (name, tag) = match parse_reference(reference) {
                Ok(nt) => nt,
                Err(e) => {
                    log::warn!("image store: skipping {reference}: {e}");
                    continue;
                }
            };
            match self.load(digest) {
                Ok((m, c)) => out.push(info_of(name, tag, digest.clone(), &m, &c)),
                Err(e) => log::warn!("image store: skipping {reference}: {e}"),
            }
        }
        Ok(out)
    }

    /// Finds the `(name:tag, digest)` entries a reference designates.
    fn matches(db: &Db, reference: &str) -> Result<Vec<(String, String)>, ImageError> {
        if let Some(prefix) = reference.strip_prefix("sha256:") {
            if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ImageError::BadReference {
                    reference: reference.into(),
                    reason: "expected sha256:<hex prefix>".into(),
                });
            }
            let prefix = prefix.to_ascii_lowercase();
            Ok(db
                .images
                .iter()
                .filter(|(_, d)| {
                    d.strip_prefix("sha256:")
                        .is_some_and(|h| h.starts_with(&prefix))
                })
                .map(|(r, d)| (r.clone(), d.clone()))
                .collect())
        } else {
            let (name, tag) = parse_reference(reference)?;
            let key = format!("{name}:{tag}");
            Ok(db
                .images
                .get(&key)
                .map(|d| vec![(key, d.clone())])
                .unwrap_or_default())
        }
    }

    /// Resolves `name`, `name:tag` or `sha256:<prefix>` to an image ready to mount.
    pub fn resolve(&self, reference: &str) -> Result<ResolvedImage, ImageError> {
        let db = self.read_db()?;
        let found = Self::matches(&db, reference)?;
        let digests: BTreeSet<&String> = found.iter().map(|(_, d)| d).collect();
        let Some((key, digest)) = found.first() else {
            return Err(ImageError::NotFound(reference.to_string()));
        };
        if digests.len() > 1 {
            return Err(ImageError::Ambiguous {
                reference: reference.to_string(),
                candidates: found.iter().map(|(r, _)| r.clone()).collect(),
            });
        }
        let (name, tag) = parse_reference(key)?;
        let (manifest, config) = self.load(digest)?;
        let mut layers = Vec::new();
        for diff_id in config.rootfs().diff_ids() {
            let hex = sha256_hex(diff_id)
                .ok_or_else(|| ImageError::Damaged(format!("diff_id '{diff_id}' of {key}")))?;
            let dir = self.root.join("layers").join(hex);
            if !dir.is_dir() {
                return Err(ImageError::Damaged(format!(
                    "layer {} of {key} is missing",
                    dir.display()
                )));
            }
            layers.push(dir);
        }
        Ok(ResolvedImage {
            info: info_of(name, tag, digest.clone(), &manifest, &config),
            layers,
            config: runtime_config(&config),
        })
    }

    /// Deletes the compressed layer blobs of every image, keeping the manifests, the configs
    /// and the extracted layers: all that listing and resolving read. For a store about to
    /// become read-only (the system store of a host image), where nothing else would use
    /// them; an import of the same image brings them back. Returns the bytes freed.
    pub fn drop_layer_blobs(&self) -> Result<u64, ImageError> {
        let _lock = self.lock()?;
        let db = self.read_db()?;
        let mut freed = 0;
        for digest in db.images.values() {
            let (manifest, _) = self.load(digest)?;
            for layer in manifest.layers() {
                let path = blob_path(&self.root, layer.digest().as_ref())?;
                match fs::symlink_metadata(&path) {
                    Ok(meta) => {
                        fs::remove_file(&path)
                            .map_err(|e| ImageError::io("remove layer blob", &path, e))?;
                        freed += meta.len();
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(ImageError::io("stat", &path, e)),
                }
            }
        }
        Ok(freed)
    }

    /// Removes a tag (`name[:tag]`), or every tag of an image (`sha256:<prefix>`), then
    /// deletes the blobs and layers no remaining image uses.
    pub fn remove(&self, reference: &str) -> Result<(), ImageError> {
        let _lock = self.lock()?;
        let mut db = self.read_db()?;
        let found = Self::matches(&db, reference)?;
        let digests: BTreeSet<&String> = found.iter().map(|(_, d)| d).collect();
        if found.is_empty() {
            return Err(ImageError::NotFound(reference.to_string()));
        }
        if digests.len() > 1 {
            return Err(ImageError::Ambiguous {
                reference: reference.to_string(),
                candidates: found.iter().map(|(r, _)| r.clone()).collect(),
            });
        }
        for (key, _) in &found {
            db.images.remove(key);
        }
        self.write_db(&db)?;
        self.clean_tmp();
        self.gc(&db)
    }

    /// Deletes the blobs and layers no tagged image uses and no running container has
    /// mounted (see [`ImageStore::lease`]), and leftovers of interrupted imports.
    pub fn prune(&self) -> Result<(), ImageError> {
        let _lock = self.lock()?;
        let db = self.read_db()?;
        self.clean_tmp();
        self.gc(&db)
    }

    /// Deletes unreferenced blobs and layers. Call with the lock held.
    fn gc(&self, db: &Db) -> Result<(), ImageError> {
        let mut blobs = BTreeSet::new();
        let mut diffs = BTreeSet::new();
        for (reference, digest) in &db.images {
            // If any image cannot be read, keep everything: deleting blindly could break it.
            let (manifest, config) = self.load(digest).map_err(|e| {
                ImageError::Damaged(format!(
                    "garbage collection skipped, cannot read {reference}: {e}"
                ))
            })?;
            blobs.insert(hex_of(digest)?.to_string());
            blobs.insert(hex_of(manifest.config().digest().as_ref())?.to_string());
            for l in manifest.layers() {
                blobs.insert(hex_of(l.digest().as_ref())?.to_string());
            }
            for d in config.rootfs().diff_ids() {
                if let Some(h) = sha256_hex(d) {
                    diffs.insert(h.to_string());
                }
            }
        }
        let blob_dir = self.root.join("blobs").join("sha256");
        for entry in read_names(&blob_dir)? {
            if !blobs.contains(&entry) {
                let p = blob_dir.join(&entry);
                fs::remove_file(&p).map_err(|e| ImageError::io("remove unused blob", &p, e))?;
            }
        }
        // Layers a running container has mounted stay, tagged or not.
        let Some(leased) = lease::leased_layers(&self.root) else {
            return Ok(());
        };
        let layer_dir = self.root.join("layers");
        for entry in read_names(&layer_dir)? {
            if !diffs.contains(&entry) && !leased.contains(&entry) {
                // Rename first, so a half-deleted layer never sits under a valid name.
                let p = layer_dir.join(&entry);
                let trash = self.new_stage("gc")?.join(&entry);
                fs::rename(&p, &trash).map_err(|e| ImageError::io("remove unused layer", &p, e))?;
                if let Some(parent) = trash.parent() {
                    fs::remove_dir_all(parent)
                        .map_err(|e| ImageError::io("remove unused layer", &trash, e))?;
                }
            }
        }
        Ok(())
    }
}

fn read_names(dir: &Path) -> Result<Vec<String>, ImageError> {
    let rd = fs::read_dir(dir).map_err(|e| ImageError::io("list", dir, e))?;
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(|e| ImageError::io("list", dir, e))?;
        if let Some(n) = e.file_name().to_str() {
            out.push(n.to_string());
        }
    }
    Ok(out)
}

fn hex_of(digest: &str) -> Result<&str, ImageError> {
    sha256_hex(digest).ok_or_else(|| {
        ImageError::Unsupported(format!(
            "digest '{digest}' is not sha256:<64 hex>; only sha256 is supported"
        ))
    })
}

fn zstd_refused(digest: &str) -> ImageError {
    ImageError::Unsupported(format!(
        "layer {digest} is zstd-compressed, which this store does not read; re-export the image with gzip layers (e.g. `skopeo copy --dest-compress-format gzip`)"
    ))
}

fn info_of(
    name: String,
    tag: String,
    digest: String,
    manifest: &ImageManifest,
    config: &ImageConfiguration,
) -> ImageInfo {
    ImageInfo {
        name,
        tag,
        digest,
        size: manifest.layers().iter().map(|l| l.size()).sum(),
        created: config.created().clone(),
        layers: manifest.layers().len(),
    }
}

/// The first bytes of a buffered reader, without consuming them.
fn sniff<'a, R: BufRead>(reader: &'a mut R, path: &Path) -> Result<&'a [u8], ImageError> {
    reader
        .fill_buf()
        .map_err(|e| ImageError::io("read", path, e))
}

/// Copies a blob, checking its sha256 and size.
fn copy_verified(
    src: &Path,
    dst: &Path,
    digest: &str,
    size: u64,
    what: &str,
) -> Result<(), ImageError> {
    let file = open_regular(src, &format!("{what} blob"))?;
    let mut reader = HashReader::new(BufReader::with_capacity(1 << 20, file));
    let mut out = File::create(dst).map_err(|e| ImageError::io("create", dst, e))?;
    io::copy(&mut reader, &mut out)
        .map_err(|e| ImageError::io(format!("copy {what} blob"), src, e))?;
    let (actual, n) = reader.finish();
    if actual != digest {
        return Err(ImageError::DigestMismatch {
            what: what.to_string(),
            expected: digest.to_string(),
            actual,
        });
    }
    if n != size {
        return Err(ImageError::DigestMismatch {
            what: format!("{what} size"),
            expected: size.to_string(),
            actual: n.to_string(),
        });
    }
    Ok(())
}

/// Extracts a layer blob (gzip or plain tar) into `target`; returns the diff_id found.
fn extract_layer(blob: &Path, target: &Path, digest: &str) -> Result<String, ImageError> {
    let file = open_regular(blob, "layer blob")?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let head = sniff(&mut reader, blob)?;
    let opts = Options {
        overlay: true,
        owners: true,
    };
    if head.starts_with(&GZIP_MAGIC) {
        let r = HashReader::new(flate2::read::MultiGzDecoder::new(reader));
        Ok(extract::extract(r, target, digest, opts)?.finish().0)
    } else if head.starts_with(&ZSTD_MAGIC) {
        Err(zstd_refused(digest))
    } else {
        let r = HashReader::new(reader);
        Ok(extract::extract(r, target, digest, opts)?.finish().0)
    }
}

/// Moves each entry of `from` into `to`, unless `to` already has it (content-addressed:
/// same name, same content).
fn commit_dir(from: &Path, to: &Path) -> Result<(), ImageError> {
    for name in read_names(from)? {
        let dst = to.join(&name);
        if dst.exists() {
            continue;
        }
        let src = from.join(&name);
        fs::rename(&src, &dst).map_err(|e| ImageError::io("move into the store", &dst, e))?;
    }
    Ok(())
}
