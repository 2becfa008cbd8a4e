//! `docker save` / `podman save` archives in Docker's legacy format, turned into the image
//! the OCI import path takes.
//!
//! Such an archive (once unpacked into the staging area) holds `manifest.json`: a list of
//! `{"Config": PATH, "RepoTags": [...], "Layers": [PATH...]}`, the paths relative to the
//! archive (`<hex>.json` and `<id>/layer.tar`, or `blobs/sha256/<hex>` since Docker 25,
//! which also writes an OCI `index.json`: such archives go through the OCI path). There is
//! no manifest with layer digests: the config's `rootfs.diff_ids` (the sha256 of each
//! uncompressed layer tar) are the only statement of the layers' content, so every layer is
//! hashed and checked against its diff_id here, before anything is staged for the store.
//! A manifest is then synthesized (layer digests = the files' sha256) and each layer file is
//! hard-linked to `blobs/sha256/<hex>` of the unpacked archive, where the OCI path reads
//! blobs; extraction is the OCI path's, with the same refusals.

use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use oci_spec::image::{
    DescriptorBuilder, Digest, ImageConfiguration, ImageManifestBuilder, MediaType,
};
use serde::Deserialize;

use super::layout::{SourceImage, MAX_JSON};
use super::source::open_regular;
use super::{parse_reference, sha256_hex, HashReader, ImageError};

/// The legacy archive's index.
const MANIFEST: &str = "manifest.json";
/// How many symlinks a path in the archive may go through (Docker links duplicate layers).
const MAX_LINKS: usize = 8;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// One image of `manifest.json`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Entry {
    /// Path of the image config.
    config: String,
    /// `name:tag` references (`docker.io/library/busybox:latest`, `localhost/app:1`).
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    /// Paths of the layer tars, lowest first.
    layers: Vec<String>,
}

/// True when the unpacked archive at `dir` is a legacy `docker save` archive: it has a
/// `manifest.json` and no OCI `index.json`.
pub(crate) fn is_legacy(dir: &Path) -> bool {
    !dir.join("index.json").exists() && dir.join(MANIFEST).is_file()
}

/// `name:tag` of a repo tag, with the registry and namespace dropped as for the
/// `io.containerd.image.name` annotation (`docker.io/library/busybox:1` → `busybox:1`).
fn short_tag(repo_tag: &str) -> Result<(String, String), ImageError> {
    let (name, tag) = parse_reference(repo_tag)?;
    let short = name.rsplit('/').next().unwrap_or(&name).to_string();
    Ok((short, tag))
}

fn read_small(path: &Path, what: &str) -> Result<Vec<u8>, ImageError> {
    let file = open_regular(path, what)?;
    let mut bytes = Vec::new();
    file.take(MAX_JSON + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ImageError::io(format!("read {what}"), path, e))?;
    if bytes.len() as u64 > MAX_JSON {
        return Err(ImageError::Layout(format!(
            "{what} {} is more than the {MAX_JSON} bytes allowed for a JSON document",
            path.display()
        )));
    }
    Ok(bytes)
}

fn parse<T: serde::de::DeserializeOwned>(
    what: &str,
    path: &Path,
    bytes: &[u8],
) -> Result<T, ImageError> {
    serde_json::from_slice(bytes).map_err(|e| ImageError::Json {
        what: what.to_string(),
        path: path.to_path_buf(),
        detail: format!("{e} (expected a `docker save` {what})"),
    })
}

fn read_entries(dir: &Path) -> Result<Vec<Entry>, ImageError> {
    let path = dir.join(MANIFEST);
    let bytes = read_small(&path, "archive manifest")?;
    parse("archive manifest", &path, &bytes)
}

/// A path of the archive (`a/b`), relative and without `..`, resolved through symlinks
/// inside the archive (never out of it): the path below `dir`.
fn resolve_in(dir: &Path, given: &str) -> Result<PathBuf, ImageError> {
    let refuse = |why: &str| {
        ImageError::Layout(format!(
            "{MANIFEST} names '{given}': {why}; the archive is corrupt or hostile, nothing was imported"
        ))
    };
    let mut rel =
        normal(Path::new(given)).ok_or_else(|| refuse("not a path inside the archive"))?;
    for _ in 0..MAX_LINKS {
        let full = dir.join(&rel);
        match fs::symlink_metadata(&full) {
            Ok(m) if m.file_type().is_symlink() => {
                let target =
                    fs::read_link(&full).map_err(|e| ImageError::io("read link", &full, e))?;
                let base = rel.parent().map(Path::to_path_buf).unwrap_or_default();
                rel = normal(&base.join(target))
                    .ok_or_else(|| refuse("a symlink pointing out of the archive"))?;
            }
            _ => return Ok(full),
        }
    }
    Err(refuse("too many symlinks"))
}

/// `p` with `.` dropped and `..` applied, if it is relative and never climbs above its start.
fn normal(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// Picks the image of the archive: the one tagged `want`, else the only one.
fn select<'a>(
    entries: &'a [Entry],
    want: Option<&(String, String)>,
    dir: &Path,
) -> Result<&'a Entry, ImageError> {
    let tags_of = |e: &Entry| e.repo_tags.clone().unwrap_or_default();
    if let Some((name, tag)) = want {
        let full = format!("{name}:{tag}");
        let hit = entries.iter().find(|e| {
            tags_of(e)
                .iter()
                .any(|t| *t == full || short_tag(t).is_ok_and(|(n, tg)| n == *name && tg == *tag))
        });
        if let Some(e) = hit {
            return Ok(e);
        }
    }
    match entries {
        [one] => Ok(one),
        [] => Err(ImageError::Layout(format!(
            "{} lists no image",
            dir.join(MANIFEST).display()
        ))),
        many => Err(ImageError::Layout(format!(
            "the archive holds {} images ({}): pick one with --name NAME:TAG (one of its tags)",
            many.len(),
            many.iter()
                .map(|e| tags_of(e).join(" "))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Hashes a layer file: `(sha256 of the file, sha256 of its uncompressed tar, size,
/// gzipped)`. A gzipped layer (rare in legacy archives) is read twice.
fn hash_layer(path: &Path, what: &str) -> Result<(String, String, u64, bool), ImageError> {
    let read_err = |e| ImageError::io(format!("read {what}"), path, e);
    let mut raw = BufReader::with_capacity(1 << 20, open_regular(path, what)?);
    let gzip = raw.fill_buf().map_err(read_err)?.starts_with(&GZIP_MAGIC);
    let mut hashed = HashReader::new(raw);
    io::copy(&mut hashed, &mut io::sink()).map_err(read_err)?;
    let (digest, size) = hashed.finish();
    if !gzip {
        return Ok((digest.clone(), digest, size, false));
    }
    let file = BufReader::with_capacity(1 << 20, open_regular(path, what)?);
    let mut tar = HashReader::new(flate2::read::MultiGzDecoder::new(file));
    io::copy(&mut tar, &mut io::sink()).map_err(read_err)?;
    Ok((digest, tar.finish().0, size, true))
}

fn spec_err(what: &str, e: impl std::fmt::Display) -> ImageError {
    ImageError::Layout(format!(
        "cannot build the {what} of the archive's image: {e}"
    ))
}

/// Reads the legacy archive unpacked at `dir`: picks the image (`want`, else the only one),
/// verifies every layer against the config's diff_ids, links the layers to
/// `dir/blobs/sha256/<hex>`, and returns the image with a synthesized manifest and the
/// tags it gets (`want`, else its RepoTags shortened like `io.containerd.image.name`).
pub(crate) fn read_legacy(
    dir: &Path,
    want: Option<&(String, String)>,
) -> Result<(SourceImage, Vec<(String, String)>), ImageError> {
    let entries = read_entries(dir)?;
    let entry = select(&entries, want, dir)?;
    let config_path = resolve_in(dir, &entry.config)?;
    let config_bytes = read_small(&config_path, "image config")?;
    let mut hasher = HashReader::new(config_bytes.as_slice());
    io::copy(&mut hasher, &mut io::sink()).map_err(|e| ImageError::io("hash", &config_path, e))?;
    let (config_digest, config_size) = hasher.finish();
    // Docker names the config by its digest (`<hex>.json`, `blobs/sha256/<hex>`): check it.
    let named = Path::new(&entry.config)
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.trim_end_matches(".json").to_string());
    if let Some(hex) = named.filter(|n| sha256_hex(&format!("sha256:{n}")).is_some()) {
        if config_digest != format!("sha256:{hex}") {
            return Err(ImageError::DigestMismatch {
                what: format!("image config {}", entry.config),
                expected: format!("sha256:{hex}"),
                actual: config_digest,
            });
        }
    }
    let config: ImageConfiguration = parse("image config", &config_path, &config_bytes)?;
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != entry.layers.len() {
        return Err(ImageError::Layout(format!(
            "{MANIFEST} lists {} layers for {} but its config has {} diff_ids; the archive is corrupt, nothing was imported",
            entry.layers.len(),
            entry.config,
            diff_ids.len()
        )));
    }
    let blobs = dir.join("blobs").join("sha256");
    fs::create_dir_all(&blobs).map_err(|e| ImageError::io("create", &blobs, e))?;
    let count = entry.layers.len();
    let mut descs = Vec::new();
    for (i, (layer, diff_id)) in entry.layers.iter().zip(diff_ids).enumerate() {
        let what = format!("layer {}/{count} ({layer})", i + 1);
        let path = resolve_in(dir, layer)?;
        let (digest, tar_digest, size, gzip) = hash_layer(&path, &what)?;
        if tar_digest != *diff_id {
            return Err(ImageError::DigestMismatch {
                what: format!("diff_id of {what}"),
                expected: diff_id.clone(),
                actual: tar_digest,
            });
        }
        let hex = sha256_hex(&digest).unwrap_or_default();
        let link = blobs.join(hex);
        if !link.exists() {
            fs::hard_link(&path, &link).map_err(|e| ImageError::io("link layer", &link, e))?;
        }
        let media = if gzip {
            MediaType::ImageLayerGzip
        } else {
            MediaType::ImageLayer
        };
        descs.push(
            DescriptorBuilder::default()
                .media_type(media)
                .digest(Digest::from_str(&digest).map_err(|e| spec_err("descriptor", e))?)
                .size(size)
                .build()
                .map_err(|e| spec_err("descriptor", e))?,
        );
    }
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(
            DescriptorBuilder::default()
                .media_type(MediaType::ImageConfig)
                .digest(Digest::from_str(&config_digest).map_err(|e| spec_err("descriptor", e))?)
                .size(config_size)
                .build()
                .map_err(|e| spec_err("descriptor", e))?,
        )
        .layers(descs)
        .build()
        .map_err(|e| spec_err("manifest", e))?;
    let manifest_bytes = serde_json::to_vec(&manifest).map_err(|e| spec_err("manifest", e))?;
    let mut hasher = HashReader::new(manifest_bytes.as_slice());
    io::copy(&mut hasher, &mut io::sink()).map_err(|e| ImageError::io("hash", dir, e))?;
    let (manifest_digest, _) = hasher.finish();
    let tags = match want {
        Some(w) => vec![w.clone()],
        None => repo_tags(entry)?,
    };
    Ok((
        SourceImage {
            manifest_digest,
            manifest_bytes,
            manifest,
            config_bytes,
            config,
            ref_name: None,
        },
        tags,
    ))
}

fn repo_tags(entry: &Entry) -> Result<Vec<(String, String)>, ImageError> {
    let mut tags = Vec::new();
    for t in entry.repo_tags.iter().flatten() {
        let short = short_tag(t)?;
        if !tags.contains(&short) {
            tags.push(short);
        }
    }
    Ok(tags)
}

/// The RepoTags `manifest.json` gives the image whose config is `config_digest`, for an
/// OCI layout that also has one (Docker 25+) but no name annotation in its index.
pub(crate) fn tags_for_config(dir: &Path, config_digest: &str) -> Vec<(String, String)> {
    let Some(hex) = sha256_hex(config_digest) else {
        return Vec::new();
    };
    let Ok(entries) = read_entries(dir) else {
        return Vec::new();
    };
    entries
        .iter()
        .find(|e| Path::new(&e.config).file_name().and_then(|n| n.to_str()) == Some(hex))
        .and_then(|e| repo_tags(e).ok())
        .unwrap_or_default()
}
