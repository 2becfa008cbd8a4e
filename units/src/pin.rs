//! Pinning a unit's registry image to a digest: `fleetctl start/submit` rewrites
//! `[container] image = "host/repo:tag"` to `"host/repo:tag@sha256:<hex>"` before it submits
//! the body, so every machine runs the same bytes even after the tag moves. The rewrite keeps
//! the rest of the body (comments, layout, key order) as it was.

use toml_edit::{DocumentMut, Item, Value};

/// Why [`pin_image`] could not rewrite a body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    /// The body is not TOML.
    #[error("the unit body does not parse as TOML: {0}")]
    Toml(String),
    /// The body has no `[container] image` string.
    #[error("the unit body has no [container] image string to pin")]
    NoImage,
    /// The image names a digest already.
    #[error("the image {0:?} is pinned already (it names a digest)")]
    AlreadyPinned(String),
    /// The digest is not `sha256:` and 64 lower-case hex digits.
    #[error("{0:?} is not a digest to pin to: expected sha256: and 64 lower-case hex digits")]
    BadDigest(String),
}

/// Splits `sha256:<hex>` into its hex part, checking it is 64 lower-case hex digits: the
/// only digest form images are pinned by (a prefix or upper case is not a digest).
pub fn sha256_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then_some(hex)
}

/// The digest an image reference is pinned to: the `sha256:<hex>` after its `@`, if any.
pub fn pinned_digest(image: &str) -> Option<&str> {
    image.split_once('@').map(|(_, d)| d)
}

/// Whether [`pin_image`] should pin `image`: a registry reference
/// ([`ContainerSection::registry_image`](crate::ContainerSection::registry_image)) that names
/// no digest yet and has no `%` specifier (a template's image is known per instance only).
pub fn wants_pin(image: &str) -> bool {
    pinned_digest(image).is_none() && !image.contains('%')
}

/// Returns `body` with its `[container] image` rewritten to `<image>@<digest>` (the tag
/// stays: it tells people what was meant); everything else, comments and layout included,
/// is kept. Pure: resolving the digest is the caller's business.
pub fn pin_image(body: &str, digest: &str) -> Result<String, PinError> {
    let hex = sha256_hex(digest).ok_or_else(|| PinError::BadDigest(digest.to_string()))?;
    let mut doc: DocumentMut = body
        .parse()
        .map_err(|e: toml_edit::TomlError| PinError::Toml(e.message().to_string()))?;
    let value = doc
        .get_mut("container")
        .and_then(Item::as_table_like_mut)
        .and_then(|t| t.get_mut("image"))
        .and_then(Item::as_value_mut)
        .ok_or(PinError::NoImage)?;
    let Some(image) = value.as_str() else {
        return Err(PinError::NoImage);
    };
    if pinned_digest(image).is_some() {
        return Err(PinError::AlreadyPinned(image.to_string()));
    }
    let pinned = format!("{image}@sha256:{hex}");
    let decor = value.decor().clone();
    *value = Value::from(pinned);
    *value.decor_mut() = decor;
    Ok(doc.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn digest() -> String {
        format!("sha256:{}", "0a".repeat(32))
    }

    #[test]
    fn the_image_gets_the_digest_and_nothing_else_changes() {
        let body = "# the web tier\n[unit]\ndescription = \"web\"  # shown in status\n\n\
                    [container]\nimage   =   \"127.0.0.1:5000/team/app:1\"   # v1 for now\n\
                    command = [\"/bin/sh\"]\n";
        let pinned = pin_image(body, &digest()).unwrap();
        assert_eq!(
            pinned,
            body.replace(
                "\"127.0.0.1:5000/team/app:1\"",
                &format!("\"127.0.0.1:5000/team/app:1@{}\"", digest())
            )
        );
        // It is still the same unit, with the pinned image.
        let unit = crate::parse_unit("web", None, &pinned).unwrap();
        let image = unit.container.registry_image().unwrap();
        assert_eq!(pinned_digest(image), Some(digest().as_str()));
        assert!(!wants_pin(image));
    }

    #[test]
    fn inline_and_dotted_containers_are_pinned_too() {
        for body in [
            "container = { image = \"reg.example/app\", command = [\"/x\"] }\n",
            "container.image = \"reg.example/app\"\ncontainer.command = [\"/x\"]\n",
        ] {
            let pinned = pin_image(body, &digest()).unwrap();
            assert_eq!(
                pinned,
                body.replace("reg.example/app", &format!("reg.example/app@{}", digest())),
                "{body}"
            );
        }
    }

    #[test]
    fn what_cannot_be_pinned_says_why() {
        let d = digest();
        assert_eq!(
            pin_image("[service]\ntype = \"simple\"\n", &d),
            Err(PinError::NoImage)
        );
        assert_eq!(
            pin_image("[container]\nimage = 3\n", &d),
            Err(PinError::NoImage)
        );
        let pinned = format!("[container]\nimage = \"reg.example/app:1@{d}\"\n");
        assert!(matches!(
            pin_image(&pinned, &d),
            Err(PinError::AlreadyPinned(_))
        ));
        for bad in ["sha256:0a0a", "sha512:00", &d.to_uppercase()] {
            assert!(matches!(
                pin_image("[container]\nimage = \"reg.example/app\"\n", bad),
                Err(PinError::BadDigest(_))
            ));
        }
        assert!(matches!(
            pin_image("[container\n", &d),
            Err(PinError::Toml(_))
        ));
        assert!(wants_pin("reg.example/app:1"));
        assert!(!wants_pin("reg.example/app:%i"));
        assert!(!wants_pin(&format!("reg.example/app@{d}")));
    }
}
