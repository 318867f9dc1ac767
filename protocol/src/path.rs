//! [`RelPath`]: a path inside a sync root, as it travels on the wire.
//!
//! A path from a peer is hostile until proven otherwise. A `RelPath` can only hold a
//! normalised relative path: no leading `/`, no `.` or `..` component, no empty component
//! (`a//b`), no NUL byte, and within the kernel's name limits. The check runs in every
//! constructor *and* in deserialisation, so no code ever holds an unchecked one. (Symlinks
//! that point out of the root are the file-system layer's business: it never follows them.)

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The longest path the kernel accepts (`PATH_MAX` less the terminating NUL).
pub const MAX_PATH_LEN: usize = 4095;
/// The longest single file name the kernel accepts (`NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;

/// A normalised path relative to a sync root, as raw bytes (Linux file names need not be
/// UTF-8). Ordered bytewise, so manifests sort the same on both sides.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(
    try_from = "serde_bytes_compat::Bytes",
    into = "serde_bytes_compat::Bytes"
)]
pub struct RelPath(Vec<u8>);

/// Why bytes are not a valid [`RelPath`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path is empty.
    #[error("empty path")]
    Empty,
    /// The path starts with `/`.
    #[error("absolute path {0:?}: only paths relative to the sync root are allowed")]
    Absolute(String),
    /// A component is `..`, `.` or empty.
    #[error("path {0:?} is not normalised: no '..', '.' or empty components allowed")]
    NotNormal(String),
    /// The path contains a NUL byte.
    #[error("path {0:?} contains a NUL byte")]
    Nul(String),
    /// The path or one of its names is longer than the kernel allows.
    #[error("path {0:?} is too long (at most {MAX_PATH_LEN} bytes, {MAX_NAME_LEN} per name)")]
    TooLong(String),
}

impl RelPath {
    /// Checks and wraps raw bytes.
    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> Result<Self, PathError> {
        let bytes = bytes.into();
        let shown = || String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
        if bytes.is_empty() {
            return Err(PathError::Empty);
        }
        if bytes.len() > MAX_PATH_LEN {
            return Err(PathError::TooLong(shown()));
        }
        if bytes.contains(&0) {
            return Err(PathError::Nul(shown()));
        }
        if bytes[0] == b'/' {
            return Err(PathError::Absolute(shown()));
        }
        for name in bytes.split(|b| *b == b'/') {
            if name.is_empty() || name == b"." || name == b".." {
                return Err(PathError::NotNormal(shown()));
            }
            if name.len() > MAX_NAME_LEN {
                return Err(PathError::TooLong(shown()));
            }
        }
        Ok(Self(bytes))
    }

    /// Checks and wraps a relative file-system path.
    pub fn from_path(path: &Path) -> Result<Self, PathError> {
        Self::from_bytes(path.as_os_str().as_bytes())
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The path for file-system calls, relative to the root.
    pub fn as_path(&self) -> &Path {
        Path::new(OsStr::from_bytes(&self.0))
    }

    /// `root` joined with this path.
    pub fn under(&self, root: &Path) -> PathBuf {
        root.join(self.as_path())
    }

    /// The names from the root down.
    pub fn names(&self) -> impl Iterator<Item = &OsStr> {
        self.0.split(|b| *b == b'/').map(OsStr::from_bytes)
    }

    /// The last name.
    pub fn file_name(&self) -> &OsStr {
        self.names().last().unwrap_or_default()
    }

    /// The directory holding this path, or `None` at the top of the root.
    pub fn parent(&self) -> Option<RelPath> {
        self.parent_bytes().map(|bytes| Self(bytes.to_vec()))
    }

    /// The bytes of [`RelPath::parent`], without a copy (sets of paths can be asked about
    /// them directly: a `RelPath` borrows as its bytes).
    pub fn parent_bytes(&self) -> Option<&[u8]> {
        let cut = self.0.iter().rposition(|b| *b == b'/')?;
        Some(&self.0[..cut])
    }

    /// This path, then each directory above it up to the top of the root, as bytes.
    pub fn ancestors_bytes(&self) -> impl Iterator<Item = &[u8]> {
        std::iter::successors(Some(self.as_bytes()), |at| {
            at.iter().rposition(|b| *b == b'/').map(|cut| &at[..cut])
        })
    }

    /// This path extended by one name, which must itself be a single valid name.
    pub fn join(&self, name: &OsStr) -> Result<RelPath, PathError> {
        let mut bytes = Vec::with_capacity(self.0.len() + 1 + name.len());
        bytes.extend_from_slice(&self.0);
        bytes.push(b'/');
        bytes.extend_from_slice(name.as_bytes());
        if name.as_bytes().contains(&b'/') {
            return Err(PathError::NotNormal(
                String::from_utf8_lossy(&bytes).into_owned(),
            ));
        }
        Self::from_bytes(bytes)
    }

    /// Whether `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        self.0.starts_with(&other.0)
            && (self.0.len() == other.0.len() || self.0[other.0.len()] == b'/')
    }
}

// Sound: ordering, equality and hashing of a `RelPath` are those of its bytes.
impl std::borrow::Borrow<[u8]> for RelPath {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

impl TryFrom<&str> for RelPath {
    type Error = PathError;

    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Self::from_bytes(value.as_bytes())
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RelPath({:?})", String::from_utf8_lossy(&self.0))
    }
}

/// Serde glue: a `RelPath` travels as a byte string and is checked on arrival.
mod serde_bytes_compat {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{PathError, RelPath};

    #[derive(Debug)]
    pub struct Bytes(Vec<u8>);

    impl Serialize for Bytes {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.serialize_bytes(&self.0)
        }
    }

    impl<'de> Deserialize<'de> for Bytes {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct Visitor;
            impl serde::de::Visitor<'_> for Visitor {
                type Value = Bytes;

                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a path as bytes")
                }

                fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
                    Ok(Bytes(v.to_vec()))
                }

                fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
                    Ok(Bytes(v))
                }
            }
            deserializer.deserialize_bytes(Visitor)
        }
    }

    impl TryFrom<Bytes> for RelPath {
        type Error = PathError;

        fn try_from(value: Bytes) -> Result<Self, Self::Error> {
            RelPath::from_bytes(value.0)
        }
    }

    impl From<RelPath> for Bytes {
        fn from(path: RelPath) -> Self {
            Bytes(path.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn normal_relative_paths_are_accepted() {
        for ok in [
            "a",
            "voicemail/default/1234/INBOX/msg0001.wav",
            ".hidden",
            "..dots",
            "a/.../b",
        ] {
            let path = RelPath::try_from(ok).unwrap();
            assert_eq!(path.to_string(), ok);
        }
    }

    #[test]
    fn hostile_paths_are_refused() {
        for bad in [
            "",
            "/etc/passwd",
            "../etc/passwd",
            "a/../../b",
            "a/..",
            "./a",
            "a/./b",
            "a//b",
            "a/",
            "a\0b",
        ] {
            assert!(RelPath::try_from(bad).is_err(), "{bad:?} accepted");
        }
        assert!(matches!(
            RelPath::from_bytes(vec![b'a'; MAX_NAME_LEN + 1]),
            Err(PathError::TooLong(_))
        ));
    }

    #[test]
    fn hostile_paths_are_refused_when_deserialised() {
        let wire = postcard::to_stdvec(&serde_bytes_compat::Bytes::from(RelPath(
            b"../../etc/shadow".to_vec(),
        )))
        .unwrap();
        assert!(postcard::from_bytes::<RelPath>(&wire).is_err());
        let good = RelPath::try_from("moh/song.wav").unwrap();
        let wire = postcard::to_stdvec(&good).unwrap();
        assert_eq!(postcard::from_bytes::<RelPath>(&wire).unwrap(), good);
    }

    #[test]
    fn parents_names_and_prefixes() {
        let path = RelPath::try_from("a/b/c.wav").unwrap();
        assert_eq!(path.parent().unwrap().to_string(), "a/b");
        assert_eq!(path.file_name(), "c.wav");
        assert!(path.starts_with(&RelPath::try_from("a/b").unwrap()));
        assert!(!path.starts_with(&RelPath::try_from("a/bc").unwrap()));
        assert!(path.parent().unwrap().join(OsStr::new("x/y")).is_err());
        assert!(path.join(OsStr::new("..")).is_err());
        let ancestors: Vec<&[u8]> = path.ancestors_bytes().collect();
        assert_eq!(ancestors, [&b"a/b/c.wav"[..], b"a/b", b"a"]);
        assert_eq!(path.parent_bytes(), Some(&b"a/b"[..]));
        assert_eq!(RelPath::try_from("top").unwrap().parent_bytes(), None);
        let set: std::collections::BTreeSet<RelPath> = [path.parent().unwrap()].into();
        assert!(set.contains(&b"a/b"[..]));
    }

    proptest! {
        #[test]
        fn whatever_is_accepted_stays_inside_the_root(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(path) = RelPath::from_bytes(bytes) {
                let root = Path::new("/srv/root");
                let joined = path.under(root);
                prop_assert!(joined.starts_with(root));
                prop_assert!(joined.components().all(|c| matches!(c, std::path::Component::Normal(_) | std::path::Component::RootDir)));
            }
        }
    }
}
