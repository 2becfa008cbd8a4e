//! [`ImageStores`]: the stores an image is looked up in, in order. The first is the
//! writable store (imports and removals go there); the others are read-only to this type,
//! such as the system store baked into the host's root image ([`SYSTEM_STORE`]).
//!
//! [`SYSTEM_STORE`]: super::SYSTEM_STORE

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{ImageError, ImageInfo, ImageStore, ResolvedImage};

/// An image as [`ImageStores::list`] lists it: the image and the store that holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredImage {
    /// The image.
    #[serde(flatten)]
    pub info: ImageInfo,
    /// Root of the store holding it.
    pub store: PathBuf,
    /// Whether that store is the writable (first) one: only its images can be removed.
    pub writable: bool,
}

/// Several image stores searched in order: the first one that has an image wins.
#[derive(Debug, Clone)]
pub struct ImageStores {
    writable: ImageStore,
    others: Vec<ImageStore>,
}

impl ImageStores {
    /// Opens the stores rooted at `roots`, in order. The first is the writable store: it is
    /// created if needed. A later root that does not exist is skipped (never created); one
    /// that exists but cannot be opened is an error. No root at all is an error.
    pub fn open<P: AsRef<Path>>(roots: &[P]) -> Result<ImageStores, ImageError> {
        let (first, rest) = roots.split_first().ok_or(ImageError::NoStore)?;
        let writable = ImageStore::open(first.as_ref())?;
        let mut others = Vec::new();
        for root in rest {
            let root = root.as_ref();
            if root.is_dir() && root != writable.root() {
                others.push(ImageStore::open(root)?);
            }
        }
        Ok(ImageStores { writable, others })
    }

    /// The writable store: where imports and removals go.
    pub fn writable(&self) -> &ImageStore {
        &self.writable
    }

    /// Every store, in lookup order (the writable one first).
    pub fn stores(&self) -> impl Iterator<Item = &ImageStore> {
        std::iter::once(&self.writable).chain(&self.others)
    }

    /// Resolves `reference` (as [`ImageStore::resolve`]) in the first store that has it.
    /// [`ImageError::NotFound`] only if none has it; any other error of a store is returned.
    pub fn resolve(&self, reference: &str) -> Result<ResolvedImage, ImageError> {
        for store in self.stores() {
            match store.resolve(reference) {
                Err(ImageError::NotFound(_)) => {}
                found => return found,
            }
        }
        Err(ImageError::NotFound(reference.to_string()))
    }

    /// The images of every store, store by store in lookup order (an image of a later store
    /// may be shadowed by one of the same name in an earlier store).
    pub fn list(&self) -> Result<Vec<StoredImage>, ImageError> {
        let mut out = Vec::new();
        for (i, store) in self.stores().enumerate() {
            out.extend(store.list()?.into_iter().map(|info| StoredImage {
                info,
                store: store.root().to_path_buf(),
                writable: i == 0,
            }));
        }
        Ok(out)
    }

    /// The tagged images of every store as `(name:tag, manifest digest)` (as
    /// [`ImageStore::tags`]), sorted by name; a name a later store shares with an earlier one
    /// is the earlier store's (the one [`ImageStores::resolve`] finds).
    pub fn tags(&self) -> Result<Vec<(String, String)>, ImageError> {
        let mut out = std::collections::BTreeMap::new();
        for store in self.stores() {
            for (name, digest) in store.tags()? {
                out.entry(name).or_insert(digest);
            }
        }
        Ok(out.into_iter().collect())
    }

    /// Removes `reference` from the writable store (as [`ImageStore::remove`]). An image
    /// that only a read-only store has is [`ImageError::ReadOnlyStore`].
    pub fn remove(&self, reference: &str) -> Result<(), ImageError> {
        match self.writable.remove(reference) {
            Err(ImageError::NotFound(r)) => {
                for store in &self.others {
                    if !matches!(store.resolve(reference), Err(ImageError::NotFound(_))) {
                        return Err(ImageError::ReadOnlyStore {
                            reference: r,
                            store: store.root().to_path_buf(),
                            writable: self.writable.root().to_path_buf(),
                        });
                    }
                }
                Err(ImageError::NotFound(r))
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;
    use crate::image::{write_oci_layout, RuntimeConfig};

    /// Two stores `a` and `b` in a temporary directory.
    struct Two {
        t: tempfile::TempDir,
        a: PathBuf,
        b: PathBuf,
        sa: ImageStore,
        sb: ImageStore,
    }

    fn two_stores() -> Two {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        let sa = ImageStore::open(&a).unwrap();
        let sb = ImageStore::open(&b).unwrap();
        Two { t, a, b, sa, sb }
    }

    /// Imports an image of one file, `/id` holding `content`, as `reference` into `store`.
    fn import(t: &Path, store: &ImageStore, reference: &str, content: &str) {
        let name = reference.replace([':', '/'], "_");
        let tar_path = t.join(format!("{name}-{content}.tar"));
        let mut b = tar::Builder::new(std::fs::File::create(&tar_path).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_size(content.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, "id", content.as_bytes()).unwrap();
        b.finish().unwrap();
        let layout = t.join(format!("layout-{name}-{content}"));
        write_oci_layout(&layout, &[tar_path], &RuntimeConfig::default(), reference).unwrap();
        store
            .import_oci_layout(&layout, Some(reference), &mut |_| {})
            .unwrap();
    }

    fn id_of(img: &ResolvedImage) -> String {
        std::fs::read_to_string(img.layers[0].join("id")).unwrap()
    }

    #[test]
    fn a_digest_reference_resolves_to_the_image_pinned_under_it() {
        let Two { t, a, sa, .. } = two_stores();
        let hex = "ab".repeat(32);
        let pinned = format!("reg.example:5000/team/app:sha256-{hex}");
        import(t.path(), &sa, &pinned, "pinned");
        import(t.path(), &sa, "reg.example:5000/team/app:1", "moved");
        let set = ImageStores::open(&[&a]).unwrap();
        for r in [
            format!("reg.example:5000/team/app@sha256:{hex}"),
            format!("reg.example:5000/team/app:1@sha256:{hex}"),
        ] {
            let img = set.resolve(&r).unwrap();
            assert_eq!(id_of(&img), "pinned", "{r}");
            assert_eq!(img.info.tag, format!("sha256-{hex}"));
        }
        assert_eq!(
            id_of(&set.resolve("reg.example:5000/team/app:1").unwrap()),
            "moved"
        );
        // Another digest is not there, whatever its tag says.
        let other = format!("reg.example:5000/team/app:1@sha256:{}", "cd".repeat(32));
        assert!(matches!(set.resolve(&other), Err(ImageError::NotFound(_))));
    }

    #[test]
    fn first_match_wins_and_lists_say_where() {
        let Two { t, a, b, sa, sb } = two_stores();
        import(t.path(), &sa, "both:latest", "from-a");
        import(t.path(), &sb, "both:latest", "from-b");
        import(t.path(), &sb, "only-b:1", "b1");
        let set = ImageStores::open(&[&a, &b]).unwrap();
        assert_eq!(set.writable().root(), a);
        assert_eq!(set.stores().count(), 2);
        assert_eq!(id_of(&set.resolve("both").unwrap()), "from-a");
        let only_b = set.resolve("only-b:1").unwrap();
        assert_eq!(id_of(&only_b), "b1");
        assert!(only_b.layers[0].starts_with(&b));
        // By digest prefix too, in the store that has it.
        let digest = only_b.info.digest.clone();
        assert_eq!(set.resolve(&digest[..15]).unwrap().info.digest, digest);
        // The other order: b's image shadows a's.
        let rev = ImageStores::open(&[&b, &a]).unwrap();
        assert_eq!(id_of(&rev.resolve("both").unwrap()), "from-b");

        let err = set.resolve("nosuch").unwrap_err();
        assert!(
            matches!(err, ImageError::NotFound(ref r) if r == "nosuch"),
            "{err}"
        );
        assert!(matches!(
            set.resolve("Bad Name"),
            Err(ImageError::BadReference { .. })
        ));

        let listed: Vec<(String, PathBuf, bool)> = set
            .list()
            .unwrap()
            .into_iter()
            .map(|s| {
                (
                    format!("{}:{}", s.info.name, s.info.tag),
                    s.store,
                    s.writable,
                )
            })
            .collect();
        assert_eq!(
            listed,
            [
                ("both:latest".to_string(), a.clone(), true),
                ("both:latest".to_string(), b.clone(), false),
                ("only-b:1".to_string(), b.clone(), false),
            ]
        );
        let json = serde_json::to_value(set.list().unwrap()).unwrap();
        assert_eq!(json[2]["name"], "only-b");
        assert_eq!(json[2]["store"], b.to_str().unwrap());
        assert_eq!(json[2]["writable"], false);
    }

    #[test]
    fn a_store_without_layer_blobs_still_lists_and_resolves() {
        let Two { t, a, b, sb, .. } = two_stores();
        import(t.path(), &sb, "system:latest", "s");
        let before = sb.list().unwrap();
        let freed = sb.drop_layer_blobs().unwrap();
        assert_eq!(freed, before[0].size);
        assert_eq!(sb.drop_layer_blobs().unwrap(), 0);
        let set = ImageStores::open(&[&a, &b]).unwrap();
        assert_eq!(id_of(&set.resolve("system").unwrap()), "s");
        assert_eq!(set.list().unwrap()[0].info, before[0]);
        // A new import of the same image brings the blob back.
        import(t.path(), &sb, "system:latest", "s");
        assert!(sb.remove("system").is_ok());
    }

    #[test]
    fn missing_later_stores_are_skipped_not_created() {
        let t = tempfile::tempdir().unwrap();
        let (first, missing) = (t.path().join("new/first"), t.path().join("missing"));
        let set = ImageStores::open(&[&first, &missing]).unwrap();
        assert!(first.join("tmp").is_dir(), "the first store is created");
        assert!(!missing.exists(), "a later store is never created");
        assert_eq!(set.stores().count(), 1);
        assert!(set.list().unwrap().is_empty());
        assert!(matches!(
            ImageStores::open::<PathBuf>(&[]),
            Err(ImageError::NoStore)
        ));
    }

    #[test]
    fn removal_only_in_the_writable_store() {
        let Two { t, a, b, sa, sb } = two_stores();
        import(t.path(), &sa, "mine:latest", "m");
        import(t.path(), &sb, "system:latest", "s");
        import(t.path(), &sb, "mine:latest", "m-system");
        let set = ImageStores::open(&[&a, &b]).unwrap();

        let err = set.remove("system").unwrap_err();
        assert!(matches!(err, ImageError::ReadOnlyStore { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains(b.to_str().unwrap()) && text.contains("read-only"),
            "{text}"
        );
        assert!(set.resolve("system").is_ok(), "nothing was removed");

        // `mine` goes from the writable store; the system store's copy shows through.
        set.remove("mine").unwrap();
        assert!(sa.list().unwrap().is_empty());
        assert_eq!(id_of(&set.resolve("mine").unwrap()), "m-system");
        assert!(matches!(set.remove("nosuch"), Err(ImageError::NotFound(_))));
    }

    /// `tags` lists every store's names with their manifest digests from the image tables,
    /// sorted; a shadowed name is the earlier store's, as `resolve` finds it.
    #[test]
    fn tags_list_names_and_digests_the_earlier_store_wins() {
        let Two { t, a, b, sa, sb } = two_stores();
        import(t.path(), &sa, "both:latest", "from-a");
        import(t.path(), &sb, "both:latest", "from-b");
        import(t.path(), &sb, "only-b:1", "b1");
        let set = ImageStores::open(&[&a, &b]).unwrap();
        let tags = set.tags().unwrap();
        let names: Vec<&str> = tags.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["both:latest", "only-b:1"]);
        assert_eq!(tags[0].1, set.resolve("both").unwrap().info.digest);
        assert_eq!(tags[1].1, set.resolve("only-b:1").unwrap().info.digest);
        assert_ne!(tags[0].1, sb.resolve("both").unwrap().info.digest);
    }
}
