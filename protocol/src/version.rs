//! Versions: the wire protocol's ([`ProtocolVersion`], negotiated in the `Hello` exchange) and
//! the software's ([`SoftwareVersion`], reported for the operator's overview).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The protocol this build speaks.
///
/// Bump `minor` when adding message variants or trailing fields that an older peer can live
/// without (the newer side must not send them to an older peer); bump `major` for anything
/// an older peer would misread. Peers with different majors refuse each other.
pub const PROTOCOL_VERSION: ProtocolVersion = ProtocolVersion {
    major: 1,
    minor: 14,
};

/// A wire protocol version, `major.minor`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct ProtocolVersion {
    /// Incompatible changes.
    pub major: u16,
    /// Compatible additions.
    pub minor: u16,
}

impl ProtocolVersion {
    /// The version two peers use together: the lower minor of a shared major, or `None` when
    /// the majors differ and the peers cannot talk.
    pub fn negotiate(self, peer: ProtocolVersion) -> Option<ProtocolVersion> {
        (self.major == peer.major).then(|| ProtocolVersion {
            major: self.major,
            minor: self.minor.min(peer.minor),
        })
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The lbs release a process runs (`major.minor.patch`), shown in status and the data center's
/// overview so a provider sees which boxes need an update.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct SoftwareVersion {
    /// Major release.
    pub major: u32,
    /// Minor release.
    pub minor: u32,
    /// Patch release.
    pub patch: u32,
}

impl SoftwareVersion {
    /// The version of this build, from the workspace's `Cargo.toml`.
    pub fn current() -> Self {
        // The workspace version is a plain `x.y.z`; a test below keeps it that way.
        env!("CARGO_PKG_VERSION")
            .parse()
            .unwrap_or(SoftwareVersion {
                major: 0,
                minor: 0,
                patch: 0,
            })
    }
}

impl fmt::Display for SoftwareVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Why text is not a `major.minor.patch` version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid software version {0:?}: expected major.minor.patch such as 1.4.2")]
pub struct VersionError(String);

impl FromStr for SoftwareVersion {
    type Err = VersionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || VersionError(s.to_owned());
        let mut parts = s.split('.').map(|part| {
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                Err(invalid())
            } else {
                part.parse::<u32>().map_err(|_| invalid())
            }
        });
        let mut next = || parts.next().unwrap_or_else(|| Err(invalid()));
        let version = SoftwareVersion {
            major: next()?,
            minor: next()?,
            patch: next()?,
        };
        if parts.next().is_some() {
            return Err(invalid());
        }
        Ok(version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_major_negotiates_the_lower_minor() {
        let v1_0 = ProtocolVersion { major: 1, minor: 0 };
        let v1_3 = ProtocolVersion { major: 1, minor: 3 };
        assert_eq!(v1_0.negotiate(v1_3), Some(v1_0));
        assert_eq!(v1_3.negotiate(v1_0), Some(v1_0));
        assert_eq!(v1_3.negotiate(v1_3), Some(v1_3));
    }

    #[test]
    fn different_majors_do_not_negotiate() {
        let v1 = ProtocolVersion { major: 1, minor: 9 };
        let v2 = ProtocolVersion { major: 2, minor: 0 };
        assert_eq!(v1.negotiate(v2), None);
        assert_eq!(v2.negotiate(v1), None);
    }

    #[test]
    fn this_build_has_a_real_software_version() {
        assert_eq!(
            SoftwareVersion::current().to_string(),
            env!("CARGO_PKG_VERSION")
        );
    }

    #[test]
    fn software_versions_parse_strictly() {
        assert_eq!(
            "1.4.2".parse(),
            Ok(SoftwareVersion {
                major: 1,
                minor: 4,
                patch: 2
            })
        );
        for bad in [
            "", "1", "1.4", "1.4.2.7", "1.-4.2", "1.4.x", "1..2", "+1.4.2",
        ] {
            assert!(bad.parse::<SoftwareVersion>().is_err(), "{bad:?}");
        }
    }
}
