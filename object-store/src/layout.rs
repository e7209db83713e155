//! Where things live in the bucket, under the configured prefix:
//!
//! - `cas/<function>/<hex>`: a verified blob, named by its content. Nothing else is ever
//!   written under `cas/`, and only after its hash and size were checked.
//! - `staging/<uuid>`: a large write's bytes while it is checked; copied to `cas/` after.
//! - `uploads/<id>/<function>-<start>`: what a resumable upload kept, one object per
//!   writer that went away, named by its offset (16 hex digits) so a listing sorts them.
//! - `multipart/<uuid>`: the key and id of a multipart upload in progress, so a sweep can
//!   abort one whose process died (`tracked_upload`).
//! - `touched/<function>/<hex>`: an empty marker whose modification time is the blob's
//!   last use, shared by every replica (see `access_times`).

use kiln_store::{ContentHash, DigestFunction};
use object_store::path::Path;

#[derive(Clone, Debug)]
pub(crate) struct Layout {
    prefix: Path,
}

/// One kept piece of a resumable upload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SegmentKey {
    pub upload_id: String,
    pub function: DigestFunction,
    pub start: u64,
}

impl Layout {
    pub fn new(prefix: &str) -> Self {
        Layout {
            prefix: Path::from(prefix.trim_matches('/')),
        }
    }

    fn under(&self, parts: &[&str]) -> Path {
        let mut path = self.prefix.clone();
        for part in parts {
            path = path.child(*part);
        }
        path
    }

    pub fn content_root(&self) -> Path {
        self.under(&["cas"])
    }

    pub fn content(&self, hash: &ContentHash) -> Path {
        self.under(&["cas", hash.function.name(), &hash.hex()])
    }

    /// The blob a `cas/` key names; `None` for anything else found there.
    pub fn parse_content(&self, path: &Path) -> Option<ContentHash> {
        hash_under(&self.content_root(), path)
    }

    pub fn staging_root(&self) -> Path {
        self.under(&["staging"])
    }

    pub fn staging(&self) -> Path {
        self.under(&["staging", &uuid::Uuid::new_v4().simple().to_string()])
    }

    pub fn uploads_root(&self) -> Path {
        self.under(&["uploads"])
    }

    pub fn upload(&self, upload_id: &str) -> Path {
        self.under(&["uploads", upload_id])
    }

    pub fn segment(&self, key: &SegmentKey) -> Path {
        self.under(&[
            "uploads",
            &key.upload_id,
            &format!("{}-{:016x}", key.function.name(), key.start),
        ])
    }

    pub fn parse_segment(&self, path: &Path) -> Option<SegmentKey> {
        let parts: Vec<_> = path.prefix_match(&self.uploads_root())?.collect();
        let [upload_id, name] = parts.as_slice() else {
            return None;
        };
        let (function, start) = name.as_ref().rsplit_once('-')?;
        Some(SegmentKey {
            upload_id: upload_id.as_ref().to_string(),
            function: DigestFunction::from_name(function)?,
            start: u64::from_str_radix(start, 16).ok()?,
        })
    }

    pub fn multipart_root(&self) -> Path {
        self.under(&["multipart"])
    }

    /// A new marker of an in-progress multipart upload (see `tracked_upload`).
    pub fn multipart_marker(&self) -> Path {
        self.under(&["multipart", &uuid::Uuid::new_v4().simple().to_string()])
    }

    pub fn touched_root(&self) -> Path {
        self.under(&["touched"])
    }

    pub fn touched(&self, hash: &ContentHash) -> Path {
        self.under(&["touched", hash.function.name(), &hash.hex()])
    }

    pub fn parse_touched(&self, path: &Path) -> Option<ContentHash> {
        hash_under(&self.touched_root(), path)
    }
}

/// The hash a `<root>/<function>/<hex>` key names.
fn hash_under(root: &Path, path: &Path) -> Option<ContentHash> {
    let parts: Vec<_> = path.prefix_match(root)?.collect();
    match parts.as_slice() {
        [function, hex] => {
            let function = DigestFunction::from_name(function.as_ref())?;
            ContentHash::parse_hex(function, hex.as_ref()).ok()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_store::Digest;

    #[test]
    fn keys_round_trip_under_a_prefix() {
        let layout = Layout::new("/team/kiln/");
        let hash = Digest::of_bytes(DigestFunction::Sha256, b"x").content_hash();
        let content = layout.content(&hash);
        assert!(content.as_ref().starts_with("team/kiln/cas/sha256/"));
        assert_eq!(layout.parse_content(&content), Some(hash));
        assert_eq!(layout.parse_touched(&layout.touched(&hash)), Some(hash));
        assert_eq!(layout.parse_content(&layout.touched(&hash)), None);

        let segment = SegmentKey {
            upload_id: "abc-1_2".into(),
            function: DigestFunction::Blake3,
            start: 70_000,
        };
        let path = layout.segment(&segment);
        assert_eq!(
            path.as_ref(),
            "team/kiln/uploads/abc-1_2/blake3-0000000000011170"
        );
        assert_eq!(layout.parse_segment(&path), Some(segment));
        assert_eq!(layout.parse_segment(&layout.staging()), None);
    }

    #[test]
    fn an_empty_prefix_is_the_bucket_root() {
        let layout = Layout::new("");
        assert_eq!(layout.content_root().as_ref(), "cas");
    }
}
