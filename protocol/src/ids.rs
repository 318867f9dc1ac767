//! Identities and the role authority's vocabulary: who a box is ([`ServerId`]), which pair it
//! belongs to ([`PairId`]), what it does ([`Role`]) and how recent its claim to that role is
//! ([`Generation`]).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A server ID (SID): the identity the data center gives a box when it is provisioned, printed
/// as six hex byte pairs (`00-1A-2B-3C-4D-5E`) because operators read it off a sheet and type
/// it at the console during activation.
///
/// Parsing accepts either case and `-`, `:` or no separators, and ignores surrounding
/// whitespace; display is always the canonical upper-case, dash-separated form.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServerId([u8; 6]);

/// On the wire (postcard) a SID is its six bytes; in JSON (status files, `--json` output) it
/// is the text operators read, `00-1A-2B-3C-4D-5E`.
impl Serialize for ServerId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            self.0.serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for ServerId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let text = String::deserialize(deserializer)?;
            text.parse().map_err(serde::de::Error::custom)
        } else {
            <[u8; 6]>::deserialize(deserializer).map(ServerId)
        }
    }
}

impl ServerId {
    /// Builds a SID from its six bytes.
    pub const fn from_bytes(bytes: [u8; 6]) -> Self {
        Self(bytes)
    }

    /// The six bytes of this SID.
    pub const fn as_bytes(&self) -> &[u8; 6] {
        &self.0
    }

    /// The DNS-style name that stands for this box in its TLS certificate
    /// (`00-1a-2b-3c-4d-5e.box.lbs.invalid`). The `.invalid` top-level domain (RFC 6761) can
    /// never resolve, which is what we want: this is an identity, not an address.
    pub fn certificate_name(&self) -> String {
        format!(
            "{}.{}",
            self.to_string().to_ascii_lowercase(),
            BOX_NAME_SUFFIX
        )
    }

    /// Reads a SID back from a certificate name made by [`ServerId::certificate_name`].
    pub fn from_certificate_name(name: &str) -> Option<Self> {
        let label = name.strip_suffix(BOX_NAME_SUFFIX)?.strip_suffix('.')?;
        let sid: ServerId = label.parse().ok()?;
        // Only the canonical spelling counts, so one box has exactly one certificate name.
        (sid.certificate_name() == name).then_some(sid)
    }
}

/// The domain under which box identities live in certificates.
pub(crate) const BOX_NAME_SUFFIX: &str = "box.lbs.invalid";

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02X}-{b:02X}-{c:02X}-{d:02X}-{e:02X}-{g:02X}")
    }
}

impl fmt::Debug for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerId({self})")
    }
}

/// Why a string is not a valid [`ServerId`] or [`PairName`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The text is not six hex byte pairs.
    #[error("invalid server ID {0:?}: expected six hex byte pairs such as 00-1A-2B-3C-4D-5E")]
    ServerId(String),
    /// The text is not a usable pair name.
    #[error(
        "invalid pair name {0:?}: use 1 to 63 lower-case letters, digits and inner hyphens, \
         such as acme-dental"
    )]
    PairName(String),
}

impl FromStr for ServerId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || IdError::ServerId(s.to_owned());
        let trimmed = s.trim();
        let digits: Vec<u8> = match trimmed.len() {
            12 => trimmed.bytes().collect(),
            17 => {
                let sep = trimmed.as_bytes()[2];
                if sep != b'-' && sep != b':' {
                    return Err(invalid());
                }
                let mut digits = Vec::with_capacity(12);
                for (idx, byte) in trimmed.bytes().enumerate() {
                    if idx % 3 == 2 {
                        if byte != sep {
                            return Err(invalid());
                        }
                    } else {
                        digits.push(byte);
                    }
                }
                digits
            }
            _ => return Err(invalid()),
        };
        let mut bytes = [0u8; 6];
        for (out, pair) in bytes.iter_mut().zip(digits.chunks_exact(2)) {
            let hi = hex_value(pair[0]).ok_or_else(invalid)?;
            let lo = hex_value(pair[1]).ok_or_else(invalid)?;
            *out = hi << 4 | lo;
        }
        Ok(Self(bytes))
    }
}

fn hex_value(digit: u8) -> Option<u8> {
    (digit as char).to_digit(16).map(|v| v as u8)
}

/// The data center's number for a pair of boxes (a primary and its backup).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct PairId(pub u64);

impl fmt::Display for PairId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pair#{}", self.0)
    }
}

/// The human name a provider gives a pair (`acme-dental`): a DNS label, so it can appear in
/// host names and file names unchanged.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PairName(String);

impl PairName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for PairName {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let valid_chars = s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if (1..=63).contains(&s.len()) && valid_chars && !s.starts_with('-') && !s.ends_with('-') {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdError::PairName(s.to_owned()))
        }
    }
}

impl TryFrom<String> for PairName {
    type Error = IdError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<PairName> for String {
    fn from(name: PairName) -> Self {
        name.0
    }
}

impl fmt::Display for PairName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a box does in its pair, as the data center and the partner see it.
///
/// The agent's own state machine has more states (promoting, demoting); on the wire a box is
/// always in one of these four.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub enum Role {
    /// Provisioned but not yet activated: no keys, no tunnels, no role.
    Unactivated,
    /// Runs the PBX services and holds the office IP; the source of every sync.
    Primary,
    /// Keeps a verified copy of the primary's data and waits for **P**.
    Backup,
    /// Was primary, learned of a higher generation: PBX stopped, shared IP dropped, waiting
    /// for **B**.
    Fenced,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Unactivated => "unactivated",
            Role::Primary => "primary",
            Role::Backup => "backup",
            Role::Fenced => "fenced",
        })
    }
}

/// The pair's role generation: it rises by one with every promotion and is carried by every
/// message, so a box can tell a stale primary claim from a current one (fencing).
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize,
)]
pub struct Generation(pub u64);

impl Generation {
    /// The generation of a freshly provisioned pair, before any promotion.
    pub const FIRST: Generation = Generation(1);

    /// The generation a promotion moves to, or `None` once the counter is exhausted (which
    /// no real pair reaches: it would take a promotion every nanosecond for 584 years).
    #[must_use]
    pub fn next(self) -> Option<Generation> {
        self.0.checked_add(1).map(Generation)
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gen {}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sid_parses_the_forms_operators_type() {
        let want = ServerId::from_bytes([0x00, 0x1a, 0x2b, 0x3c, 0x4d, 0x5e]);
        for text in [
            "00-1A-2B-3C-4D-5E",
            "00-1a-2b-3c-4d-5e",
            "00:1A:2B:3C:4D:5E",
            "001A2B3C4D5E",
            "  00-1A-2B-3C-4D-5E\n",
        ] {
            assert_eq!(text.parse::<ServerId>(), Ok(want), "{text:?}");
        }
        assert_eq!(want.to_string(), "00-1A-2B-3C-4D-5E");
    }

    #[test]
    fn sid_rejects_near_misses_with_the_expected_form() {
        for text in [
            "",
            "00-1A-2B-3C-4D",
            "00-1A-2B-3C-4D-5G",
            "00-1A:2B-3C-4D-5E",
            "00-1A-2B-3C-4D-5E-6F",
            "+0-1A-2B-3C-4D-5E",
            "00_1A_2B_3C_4D_5E",
            "é0-1A-2B-3C-4D-5",
        ] {
            let err = text.parse::<ServerId>().unwrap_err();
            assert!(err.to_string().contains("00-1A-2B-3C-4D-5E"), "{err}");
        }
    }

    #[test]
    fn pair_names_are_dns_labels() {
        assert!("acme-dental".parse::<PairName>().is_ok());
        assert!("a".parse::<PairName>().is_ok());
        for bad in ["", "-acme", "acme-", "Acme", "acme dental", &"a".repeat(64)] {
            assert!(bad.parse::<PairName>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn generations_order_and_advance() {
        assert!(Generation::FIRST < Generation::FIRST.next().unwrap());
        assert_eq!(Generation(u64::MAX).next(), None);
    }

    proptest! {
        #[test]
        fn sid_display_parse_round_trip(bytes in any::<[u8; 6]>()) {
            let sid = ServerId::from_bytes(bytes);
            prop_assert_eq!(sid.to_string().parse::<ServerId>(), Ok(sid));
            prop_assert_eq!(ServerId::from_certificate_name(&sid.certificate_name()), Some(sid));
        }

        #[test]
        fn sid_parse_never_panics(text in ".{0,40}") {
            let _ = text.parse::<ServerId>();
            let _ = ServerId::from_certificate_name(&text);
        }
    }
}
