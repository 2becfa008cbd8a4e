//! Reading and writing OCI image layouts (`oci-layout`, `index.json`, `blobs/sha256/...`).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, DescriptorBuilder, Digest, ImageConfiguration,
    ImageConfigurationBuilder, ImageIndex, ImageIndexBuilder, ImageManifest, ImageManifestBuilder,
    MediaType, Os, RootFsBuilder, ANNOTATION_REF_NAME,
};

use super::source::open_regular;
use super::{sha256_hex, HashReader, HashWriter, ImageError, RuntimeConfig};

/// JSON documents (index, manifest, config) larger than this are refused.
pub(crate) const MAX_JSON: u64 = 8 << 20;
/// Annotation containerd (and `docker save`) put the full image name in.
const CONTAINERD_NAME: &str = "io.containerd.image.name";

/// The architecture of this host, in OCI terms.
pub(crate) fn host_arch() -> Arch {
    match std::env::consts::ARCH {
        "x86_64" => Arch::Amd64,
        "aarch64" => Arch::ARM64,
        "x86" => Arch::i386,
        "riscv64" => Arch::RISCV64,
        other => Arch::Other(other.to_string()),
    }
}

/// The image picked from a layout, with its JSON documents verified against their digests.
pub(crate) struct SourceImage {
    /// Manifest digest `sha256:<hex>`.
    pub manifest_digest: String,
    /// Manifest bytes, as in the layout.
    pub manifest_bytes: Vec<u8>,
    /// Parsed manifest.
    pub manifest: ImageManifest,
    /// Config bytes, as in the layout.
    pub config_bytes: Vec<u8>,
    /// Parsed config.
    pub config: ImageConfiguration,
    /// Default `name[:tag]` from the index annotations, if any.
    pub ref_name: Option<String>,
}

/// Path of a blob in a layout (or the store: same shape).
pub(crate) fn blob_path(root: &Path, digest: &str) -> Result<PathBuf, ImageError> {
    let hex = sha256_hex(digest).ok_or_else(|| {
        ImageError::Unsupported(format!(
            "digest '{digest}' is not sha256:<64 hex>; only sha256 blobs are supported"
        ))
    })?;
    Ok(root.join("blobs").join("sha256").join(hex))
}

/// Reads a (small, JSON) blob and checks its digest and size.
fn read_blob(root: &Path, desc: &Descriptor, what: &str) -> Result<Vec<u8>, ImageError> {
    let digest = desc.digest().to_string();
    let path = blob_path(root, &digest)?;
    if desc.size() > MAX_JSON {
        return Err(ImageError::Layout(format!(
            "{what} {digest} is {} bytes, more than the {MAX_JSON} allowed for a JSON document",
            desc.size()
        )));
    }
    let file = open_regular(&path, &format!("{what} blob"))?;
    let mut reader = HashReader::new(file.take(MAX_JSON + 1));
    let mut bytes = Vec::new();
    reader
        .read_to_end(&mut bytes)
        .map_err(|e| ImageError::io(format!("read {what} blob"), &path, e))?;
    let (actual, size) = reader.finish();
    if actual != digest {
        return Err(ImageError::DigestMismatch {
            what: what.to_string(),
            expected: digest,
            actual,
        });
    }
    if size != desc.size() {
        return Err(ImageError::DigestMismatch {
            what: format!("{what} size"),
            expected: desc.size().to_string(),
            actual: size.to_string(),
        });
    }
    Ok(bytes)
}

/// Parses the JSON document `what` (read from `path`) with serde_json itself, so a
/// malformed one is reported with serde's line, column and what it expected (oci-spec's own
/// readers only say `serde failed`).
fn parse_json<T: serde::de::DeserializeOwned>(
    what: &str,
    path: &Path,
    bytes: &[u8],
) -> Result<T, ImageError> {
    serde_json::from_slice(bytes).map_err(|e| {
        let full = e.to_string();
        let suffix = format!(" at line {} column {}", e.line(), e.column());
        let message = full.strip_suffix(&suffix).unwrap_or(&full);
        ImageError::Json {
            what: what.to_string(),
            path: path.to_path_buf(),
            detail: format!(
                "line {}, column {}: {message} (expected an OCI image-spec {what} document)",
                e.line(),
                e.column()
            ),
        }
    })
}

/// Reads the layout's `index.json`: a regular file of at most [`MAX_JSON`] bytes.
fn read_index(dir: &Path, index_path: &Path) -> Result<ImageIndex, ImageError> {
    let file = match open_regular(index_path, "index") {
        Err(ImageError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Err(ImageError::Layout(format!(
                "{} is not an OCI image layout (no index.json); write one with `skopeo copy ... oci:DIR:TAG`, `docker save` (Docker >= 25) or image-build",
                dir.display()
            )))
        }
        other => other?,
    };
    let mut bytes = Vec::new();
    file.take(MAX_JSON + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ImageError::io("read index", index_path, e))?;
    if bytes.len() as u64 > MAX_JSON {
        return Err(ImageError::Layout(format!(
            "{} is more than the {MAX_JSON} bytes allowed for a JSON document",
            index_path.display()
        )));
    }
    parse_json("index", index_path, &bytes)
}

fn is_index(bytes: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v.get("manifests").map(|_| ()))
        .is_some()
}

fn ref_of(desc: &Descriptor) -> Option<String> {
    let ann = desc.annotations().as_ref()?;
    if let Some(full) = ann.get(CONTAINERD_NAME) {
        // "docker.io/library/busybox:latest" -> "busybox:latest"
        return full.rsplit('/').next().map(str::to_string);
    }
    ann.get(ANNOTATION_REF_NAME).cloned()
}

fn describe(d: &Descriptor) -> String {
    let r = ref_of(d).unwrap_or_else(|| "no ref".into());
    let p = d
        .platform()
        .as_ref()
        .map(|p| format!(" {}/{}", p.os(), p.architecture()))
        .unwrap_or_default();
    format!("{} ({r}{p})", d.digest())
}

/// Picks one descriptor among an index's manifests: the host platform when platforms are
/// given, then the one whose ref matches `want` (name:tag or tag).
fn select<'a>(
    descs: &'a [Descriptor],
    want: Option<&(String, String)>,
    path: &Path,
) -> Result<&'a Descriptor, ImageError> {
    let mut c: Vec<&Descriptor> = descs.iter().collect();
    if c.len() > 1 {
        let arch = host_arch();
        c.retain(|d| match d.platform() {
            None => true,
            Some(p) => *p.os() == Os::Linux && *p.architecture() == arch,
        });
    }
    if c.len() > 1 {
        if let Some((name, tag)) = want {
            let full = format!("{name}:{tag}");
            let matching: Vec<&Descriptor> = c
                .iter()
                .copied()
                .filter(|d| ref_of(d).is_some_and(|r| r == *tag || r == full || r == *name))
                .collect();
            if !matching.is_empty() {
                c = matching;
            }
        }
    }
    match c.as_slice() {
        [one] => Ok(one),
        [] => Err(ImageError::Layout(format!(
            "{} lists no image for linux/{}",
            path.display(),
            host_arch()
        ))),
        many => Err(ImageError::Layout(format!(
            "{} lists {} images: {}; pick one with --name NAME:TAG where TAG is its ref",
            path.display(),
            many.len(),
            many.iter()
                .map(|d| describe(d))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Reads the layout at `dir`: index → (nested index →) manifest → config, all verified.
pub(crate) fn read_layout(
    dir: &Path,
    want: Option<&(String, String)>,
) -> Result<SourceImage, ImageError> {
    let index_path = dir.join("index.json");
    let index = read_index(dir, &index_path)?;
    let mut desc = select(index.manifests(), want, &index_path)?.clone();
    let ref_name = ref_of(&desc);
    for _depth in 0..4 {
        let bytes = read_blob(dir, &desc, "manifest")?;
        let blob = blob_path(dir, desc.digest().as_ref())?;
        if is_index(&bytes) {
            let nested: ImageIndex = parse_json("index", &blob, &bytes)?;
            desc = select(nested.manifests(), want, &blob)?.clone();
            continue;
        }
        let manifest: ImageManifest = parse_json("manifest", &blob, &bytes)?;
        let config_bytes = read_blob(dir, manifest.config(), "config")?;
        let config_path = blob_path(dir, manifest.config().digest().as_ref())?;
        let config: ImageConfiguration = parse_json("image config", &config_path, &config_bytes)?;
        return Ok(SourceImage {
            manifest_digest: desc.digest().to_string(),
            manifest_bytes: bytes,
            manifest,
            config_bytes,
            config,
            ref_name,
        });
    }
    Err(ImageError::Layout(format!(
        "{}: indexes nested more than 4 deep",
        dir.display()
    )))
}

/// The runtime settings of an image config.
pub(crate) fn runtime_config(config: &ImageConfiguration) -> RuntimeConfig {
    let Some(c) = config.config() else {
        return RuntimeConfig::default();
    };
    RuntimeConfig {
        env: c.env().clone().unwrap_or_default(),
        entrypoint: c.entrypoint().clone().unwrap_or_default(),
        cmd: c.cmd().clone().unwrap_or_default(),
        working_dir: c.working_dir().clone().filter(|s| !s.is_empty()),
        user: c.user().clone().filter(|s| !s.is_empty()),
    }
}

fn spec_err(what: &str, e: impl std::fmt::Display) -> ImageError {
    ImageError::Layout(format!("cannot build the {what}: {e}"))
}

/// Writes `bytes` as a blob of the layout at `out`; returns its descriptor.
fn put_json_blob(out: &Path, bytes: &[u8], media: MediaType) -> Result<Descriptor, ImageError> {
    let mut w = HashWriter::new(io::sink());
    w.write_all(bytes)
        .map_err(|e| ImageError::io("hash", out, e))?;
    let (_, digest, size) = w.finish();
    let path = blob_path(out, &digest)?;
    fs::write(&path, bytes).map_err(|e| ImageError::io("write blob", &path, e))?;
    DescriptorBuilder::default()
        .media_type(media)
        .digest(Digest::from_str(&digest).map_err(|e| spec_err("descriptor", e))?)
        .size(size)
        .build()
        .map_err(|e| spec_err("descriptor", e))
}

/// Gzips one uncompressed layer tar into the layout; returns (descriptor, diff_id).
fn put_layer(out: &Path, tar: &Path) -> Result<(Descriptor, String), ImageError> {
    let src = File::open(tar).map_err(|e| ImageError::io("open layer tar", tar, e))?;
    let mut reader = HashReader::new(BufReader::with_capacity(1 << 20, src));
    let tmp = out
        .join("blobs")
        .join("sha256")
        .join(format!(".tmp-layer-{}", std::process::id()));
    let file = File::create(&tmp).map_err(|e| ImageError::io("create", &tmp, e))?;
    // GzBuilder defaults: mtime 0, no file name: the same tar always gives the same blob.
    let mut enc = flate2::GzBuilder::new().write(
        HashWriter::new(io::BufWriter::with_capacity(1 << 20, file)),
        flate2::Compression::default(),
    );
    io::copy(&mut reader, &mut enc).map_err(|e| ImageError::io("compress layer", tar, e))?;
    let hw = enc
        .finish()
        .map_err(|e| ImageError::io("compress layer", tar, e))?;
    let (buf, digest, size) = hw.finish();
    let file = buf
        .into_inner()
        .map_err(|e| ImageError::io("write", &tmp, e.into_error()))?;
    file.sync_all()
        .map_err(|e| ImageError::io("sync", &tmp, e))?;
    let (diff_id, _) = reader.finish();
    let path = blob_path(out, &digest)?;
    fs::rename(&tmp, &path).map_err(|e| ImageError::io("rename layer blob into", &path, e))?;
    let desc = DescriptorBuilder::default()
        .media_type(MediaType::ImageLayerGzip)
        .digest(Digest::from_str(&digest).map_err(|e| spec_err("descriptor", e))?)
        .size(size)
        .build()
        .map_err(|e| spec_err("descriptor", e))?;
    Ok((desc, diff_id))
}

/// Write an OCI image layout directory from layer tarballs (gzip them) and a runtime
/// config; used by image-build and by tests.
///
/// `layers` are uncompressed `.tar` files, lowest first. `ref_name` (`name:tag`) goes into
/// the index as `org.opencontainers.image.ref.name`. The output is reproducible: the same
/// inputs give the same manifest digest, which is returned (`sha256:<hex>`).
pub fn write_oci_layout(
    out: &Path,
    layers: &[PathBuf],
    config: &RuntimeConfig,
    ref_name: &str,
) -> Result<String, ImageError> {
    let blobs = out.join("blobs").join("sha256");
    fs::create_dir_all(&blobs).map_err(|e| ImageError::io("create", &blobs, e))?;
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for tar in layers {
        let (d, id) = put_layer(out, tar)?;
        descs.push(d);
        diff_ids.push(id);
    }
    let mut cb = ConfigBuilder::default();
    if !config.env.is_empty() {
        cb = cb.env(config.env.clone());
    }
    if !config.entrypoint.is_empty() {
        cb = cb.entrypoint(config.entrypoint.clone());
    }
    if !config.cmd.is_empty() {
        cb = cb.cmd(config.cmd.clone());
    }
    if let Some(w) = &config.working_dir {
        cb = cb.working_dir(w.clone());
    }
    if let Some(u) = &config.user {
        cb = cb.user(u.clone());
    }
    let image_config = ImageConfigurationBuilder::default()
        .architecture(host_arch())
        .os(Os::Linux)
        .config(cb.build().map_err(|e| spec_err("config", e))?)
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(diff_ids)
                .build()
                .map_err(|e| spec_err("rootfs", e))?,
        )
        .build()
        .map_err(|e| spec_err("image config", e))?;
    let config_json = serde_json::to_vec(&image_config).map_err(|e| spec_err("image config", e))?;
    let config_desc = put_json_blob(out, &config_json, MediaType::ImageConfig)?;
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config_desc)
        .layers(descs)
        .build()
        .map_err(|e| spec_err("manifest", e))?;
    let manifest_json = serde_json::to_vec(&manifest).map_err(|e| spec_err("manifest", e))?;
    let mut manifest_desc = put_json_blob(out, &manifest_json, MediaType::ImageManifest)?;
    let digest = manifest_desc.digest().to_string();
    manifest_desc.set_annotations(Some(HashMap::from([(
        ANNOTATION_REF_NAME.to_string(),
        ref_name.to_string(),
    )])));
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![manifest_desc])
        .build()
        .map_err(|e| spec_err("index", e))?;
    let index_json = serde_json::to_vec_pretty(&index).map_err(|e| spec_err("index", e))?;
    let index_path = out.join("index.json");
    fs::write(&index_path, index_json).map_err(|e| ImageError::io("write", &index_path, e))?;
    let layout = out.join("oci-layout");
    fs::write(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)
        .map_err(|e| ImageError::io("write", &layout, e))?;
    Ok(digest)
}
