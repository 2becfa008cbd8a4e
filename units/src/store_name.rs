//! The name a unit's registry image gets in an image store, for code that must not depend on
//! the store itself (fleetd's scheduler compares it with the images a machine publishes).

use crate::model::ContainerSection;
use crate::pin::sha256_hex;

/// The store tag of an image pinned by digest: `sha256:<64 hex>` → `sha256-<64 hex>`, the
/// one rule by which `NAME[:TAG]@sha256:<hex>` is stored and looked up. `None` unless
/// `digest` is `sha256:` and 64 lower-case hex digits: the whole digest, so that no crafted
/// digest prefix can pose as a pinned image.
pub fn digest_tag(digest: &str) -> Option<String> {
    sha256_hex(digest).map(|hex| format!("sha256-{hex}"))
}

/// An image reference split the way an image store names it (see [`split_reference`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferenceParts<'a> {
    /// The name: `app`, `host:port/team/app`.
    pub name: &'a str,
    /// The tag as written, `latest` when none is given.
    pub tag: &'a str,
    /// For a reference with `@sha256:<hex>`, the tag the store holds it under
    /// ([`digest_tag`]): it decides, the written tag only says what was meant.
    pub pinned: Option<String>,
}

impl ReferenceParts<'_> {
    /// The tag the store looks the image up under: the pinned one, else the written one.
    pub fn store_tag(&self) -> &str {
        self.pinned.as_deref().unwrap_or(self.tag)
    }
}

/// Splits `name`, `name:tag` or `name[:tag]@sha256:<64 hex>` the way the image store names
/// images (a `:` followed by a `/` belongs to a registry `host:port`, not a tag). Fails, with
/// the reason, only for a digest that is not whole lower-case sha256; the characters of the
/// name and tag are the store's to check.
pub fn split_reference(reference: &str) -> Result<ReferenceParts<'_>, &'static str> {
    let (rest, pinned) = match reference.split_once('@') {
        Some((rest, digest)) => {
            let tag = digest_tag(digest).ok_or(
                "a digest is 'sha256:' and 64 lower-case hex digits (NAME[:TAG]@sha256:<hex>)",
            )?;
            (rest, Some(tag))
        }
        None => (reference, None),
    };
    let (name, tag) = match rest.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n, t),
        _ => (rest, "latest"),
    };
    Ok(ReferenceParts { name, tag, pinned })
}

impl ContainerSection {
    /// The `name:tag` the unit's registry image has in an image store once pulled:
    /// `host[:port]/repo:tag` as written (`:latest` when no tag is given), and for a digest
    /// reference (`host/repo[:tag]@sha256:<64 hex>`) `host/repo:sha256-<64 hex>` (the digest
    /// decides). `None` for a local image name, no image, or a digest that is not whole
    /// sha256. The store resolves references with the same [`split_reference`].
    pub fn store_name(&self) -> Option<String> {
        let parts = split_reference(self.registry_image()?).ok()?;
        Some(format!("{}:{}", parts.name, parts.store_tag()))
    }
}

#[cfg(test)]
mod tests {
    use crate::ContainerSection;

    fn name(image: &str) -> Option<String> {
        ContainerSection {
            image: Some(image.to_string()),
            ..ContainerSection::default()
        }
        .store_name()
    }

    #[test]
    fn a_registry_tag_is_its_own_store_name() {
        assert_eq!(
            name("registry.example:5000/team/app:1.4").as_deref(),
            Some("registry.example:5000/team/app:1.4")
        );
        assert_eq!(
            name("localhost/app").as_deref(),
            Some("localhost/app:latest")
        );
    }

    #[test]
    fn a_digest_reference_is_stored_under_its_full_digest() {
        let hex = "0123456789abcdef".repeat(4);
        let want = format!("127.0.0.1:5000/team/app:sha256-{hex}");
        for image in [
            format!("127.0.0.1:5000/team/app@sha256:{hex}"),
            format!("127.0.0.1:5000/team/app:1.4@sha256:{hex}"),
        ] {
            assert_eq!(name(&image).as_deref(), Some(want.as_str()), "{image}");
        }
    }

    #[test]
    fn local_names_and_no_image_have_no_store_name_here() {
        assert_eq!(name("gcc"), None);
        assert_eq!(name("gcc:12"), None);
        assert_eq!(ContainerSection::default().store_name(), None);
    }
}
