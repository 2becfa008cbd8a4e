//! The name a unit's registry image gets in an image store, for code that must not depend on
//! the store itself (fleetd's scheduler compares it with the images a machine publishes).

use crate::model::ContainerSection;

impl ContainerSection {
    /// The `name:tag` the unit's registry image has in an image store once pulled:
    /// `host[:port]/repo:tag` as written (`:latest` when no tag is given), and for a digest
    /// reference (`host/repo[:tag]@sha256:<64 hex>`) `host/repo:sha256-<64 hex>` (the digest
    /// decides, the tag is left out). `None` for a local image name, no image, or a digest
    /// that is not `sha256:`.
    ///
    /// This restates the store's rule (`flotilla_container::image` and
    /// `flotilla_registry::ImageRef::store_name`) without depending on either; the tests
    /// below pin it.
    pub fn store_name(&self) -> Option<String> {
        let image = self.registry_image()?;
        let (host, path) = image.split_once('/')?;
        let (path, digest) = match path.split_once('@') {
            Some((p, d)) => (p, Some(d)),
            None => (path, None),
        };
        let repo = path.rsplit_once(':').map_or(path, |(r, _)| r);
        if repo.is_empty() {
            return None;
        }
        match digest {
            Some(d) => {
                let hex = d.strip_prefix("sha256:")?;
                Some(format!("{host}/{repo}:sha256-{hex}"))
            }
            None if repo.len() < path.len() => Some(format!("{host}/{path}")),
            None => Some(format!("{host}/{path}:latest")),
        }
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
