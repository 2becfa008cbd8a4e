//! Registry references: `host[:port]/repo[:tag]`, `host[:port]/repo@sha256:<hex>`.

use std::fmt;

use flotilla_container::image;

use crate::{PullError, Registries};

/// A parsed registry reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `host` or `host:port`.
    pub registry: String,
    /// Repository path (`team/app`).
    pub repository: String,
    /// Tag (`latest` when neither tag nor digest is given).
    pub tag: Option<String>,
    /// `sha256:<64 hex>` when pulled by digest.
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parses `reference`; a first component that is no host (no `.`, no `:`, not
    /// `localhost`) is a short name, resolved against `settings.default_registry` or refused.
    pub fn parse(
        reference: &str,
        settings: &Registries,
        settings_path: &str,
    ) -> Result<ImageRef, PullError> {
        let bad = |reason: &str| PullError::BadReference {
            reference: reference.to_string(),
            reason: reason.to_string(),
        };
        let (rest, digest) = match reference.split_once('@') {
            Some((r, d)) => {
                if !d.starts_with("sha256:") {
                    return Err(bad("only sha256 digests are supported"));
                }
                if image::sha256_hex(d).is_none() {
                    return Err(bad("a digest is sha256: and 64 lowercase hex digits"));
                }
                (r, Some(d.to_string()))
            }
            None => (reference, None),
        };
        let (registry, path) = match rest.split_once('/') {
            Some((host, path))
                if host.contains('.') || host.contains(':') || host == "localhost" =>
            {
                (host.to_string(), path)
            }
            _ => match &settings.default_registry {
                Some(d) => (d.clone(), rest),
                None => {
                    return Err(PullError::NoDefaultRegistry {
                        reference: reference.to_string(),
                        settings: settings_path.to_string(),
                    })
                }
            },
        };
        let (repository, tag) = match path.rsplit_once(':') {
            Some((r, t)) => (r, Some(t.to_string())),
            None => (path, None),
        };
        let tag = match (&digest, tag) {
            (None, None) => Some("latest".to_string()),
            (_, t) => t,
        };
        if repository.is_empty()
            || !repository.split('/').all(|c| {
                !c.is_empty()
                    && c.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
            })
        {
            return Err(bad(
                "a repository is lowercase letters, digits, '.', '_', '-' in '/'-separated parts",
            ));
        }
        if let Some(t) = &tag {
            if t.is_empty()
                || t.len() > 128
                || !t
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err(bad("a tag is up to 128 letters, digits, '.', '_', '-'"));
            }
        }
        Ok(ImageRef {
            registry,
            repository: repository.to_string(),
            tag,
            digest,
        })
    }

    /// The `name:tag` the image gets in the store: `registry/repo:tag`, or for any reference
    /// with a digest (a tag beside it or not) `registry/repo:sha256-<64 hex>`, the store's
    /// one rule for pinned images ([`flotilla_container::image::digest_tag`]), under which a
    /// unit naming `registry/repo[:tag]@sha256:<hex>` finds it.
    pub fn store_name(&self) -> String {
        let tag = match (&self.digest, &self.tag) {
            // parse() accepts only whole sha256 digests; the fallback keeps them apart anyway.
            (Some(d), _) => image::digest_tag(d).unwrap_or_else(|| d.replace(':', "-")),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        };
        format!("{}/{}:{tag}", self.registry, self.repository)
    }

    /// The reference for `oci-client` against `host` (the registry or one of its mirrors).
    pub(crate) fn client_ref(&self, host: &str) -> oci_client::Reference {
        match (&self.tag, &self.digest) {
            (Some(t), Some(d)) => oci_client::Reference::with_tag_and_digest(
                host.to_string(),
                self.repository.clone(),
                t.clone(),
                d.clone(),
            ),
            (_, Some(d)) => oci_client::Reference::with_digest(
                host.to_string(),
                self.repository.clone(),
                d.clone(),
            ),
            (t, None) => oci_client::Reference::with_tag(
                host.to_string(),
                self.repository.clone(),
                t.clone().unwrap_or_else(|| "latest".to_string()),
            ),
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn parse(r: &str, default: Option<&str>) -> Result<ImageRef, PullError> {
        let s = Registries {
            default_registry: default.map(str::to_string),
            ..Default::default()
        };
        ImageRef::parse(r, &s, "/etc/flotilla/registries.toml")
    }

    #[test]
    fn references() {
        let r = parse("127.0.0.1:5000/team/app:1.4", None).unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "team/app");
        assert_eq!(r.tag.as_deref(), Some("1.4"));
        assert_eq!(r.store_name(), "127.0.0.1:5000/team/app:1.4");
        let d = format!("sha256:{}", "ab".repeat(32));
        let r = parse(&format!("reg.example/app@{d}"), None).unwrap();
        assert_eq!(r.digest.as_deref(), Some(d.as_str()));
        assert_eq!(
            r.store_name(),
            format!("reg.example/app:sha256-{}", "ab".repeat(32))
        );
        // A tag beside the digest: the digest names it in the store.
        let r = parse(&format!("reg.example/app:1.4@{d}"), None).unwrap();
        assert_eq!(r.tag.as_deref(), Some("1.4"));
        assert_eq!(
            r.store_name(),
            format!("reg.example/app:sha256-{}", "ab".repeat(32))
        );
        assert_eq!(r.to_string(), format!("reg.example/app:1.4@{d}"));
        // The store looks such a reference up under that very name.
        let (name, tag) = image::parse_reference(&r.to_string()).unwrap();
        assert_eq!(format!("{name}:{tag}"), r.store_name());
        let r = parse("localhost/app", None).unwrap();
        assert_eq!(r.tag.as_deref(), Some("latest"));
    }

    #[test]
    fn short_names_need_a_default_registry() {
        let e = parse("debian:12", None).unwrap_err().to_string();
        assert!(e.contains("default_registry"), "{e}");
        let r = parse("team/app:1", Some("mirror.local:5000")).unwrap();
        assert_eq!(r.store_name(), "mirror.local:5000/team/app:1");
        assert!(parse("r.example/App", None).is_err());
        assert!(parse("r.example/app@sha256:12", None).is_err());
    }
}
