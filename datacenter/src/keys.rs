//! One-time activation keys and fresh server IDs.
//!
//! A key is 120 random bits, shown as 24 characters of Crockford base32 in groups of four
//! (`7K3M-…`), typed at a box's console; case, dashes and spaces do not matter and the
//! easily confused letters read as the digits they look like. The data center stores only a
//! BLAKE3 hash (keys are random, not passwords, so a fast hash is enough) and compares hashes
//! in constant time.

use lbs_protocol::ServerId;

const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const KEY_BYTES: usize = 15;
const CONTEXT: &str = "lbs activation key v1";

/// Random bytes from the operating system. Failing to get them is not recoverable: a data
/// center without randomness must not issue keys.
fn random<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    #[allow(clippy::expect_used)]
    getrandom::fill(&mut out).expect("the operating system's random source failed");
    out
}

/// A random number (for spreading choices, not for secrets' sake).
pub(crate) fn random_u64() -> u64 {
    u64::from_be_bytes(random())
}

/// A fresh random server ID.
pub fn random_sid() -> ServerId {
    ServerId::from_bytes(random())
}

/// An activation key, as given to the operator.
#[derive(Clone, PartialEq, Eq)]
pub struct ActivationKey(String);

impl std::fmt::Debug for ActivationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ActivationKey(…)")
    }
}

impl std::fmt::Display for ActivationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl ActivationKey {
    /// A new random key.
    pub fn generate() -> ActivationKey {
        let bytes: [u8; KEY_BYTES] = random();
        let mut chars = Vec::with_capacity(KEY_BYTES * 8 / 5);
        let (mut acc, mut bits) = (0u32, 0u32);
        for byte in bytes {
            acc = (acc << 8) | u32::from(byte);
            bits += 8;
            while bits >= 5 {
                bits -= 5;
                chars.push(ALPHABET[((acc >> bits) & 31) as usize]);
            }
        }
        let text = chars
            .chunks(4)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join("-");
        ActivationKey(text)
    }

    /// Its hash, as stored.
    pub fn hash(&self) -> KeyHash {
        KeyHash::of(&self.0)
    }
}

/// What a key looks like once typed: upper case, no separators, confusable letters mapped.
fn normalise(typed: &str) -> String {
    typed
        .chars()
        .filter(|c| !matches!(c, '-' | ' ' | '\t'))
        .map(|c| match c.to_ascii_uppercase() {
            'O' => '0',
            'I' | 'L' => '1',
            other => other,
        })
        .collect()
}

/// The stored form of a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyHash(blake3::Hash);

impl KeyHash {
    /// The hash of a key as typed.
    pub fn of(typed: &str) -> KeyHash {
        KeyHash(blake3::derive_key(CONTEXT, normalise(typed).as_bytes()).into())
    }

    /// Reads a stored hash; `None` if it has the wrong length.
    pub fn from_slice(bytes: &[u8]) -> Option<KeyHash> {
        let bytes: [u8; 32] = bytes.try_into().ok()?;
        Some(KeyHash(blake3::Hash::from_bytes(bytes)))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }

    /// The hash as 64 hexadecimal digits (the shared store's JSON).
    pub fn to_hex(&self) -> String {
        self.0.to_hex().to_string()
    }

    /// Reads [`KeyHash::to_hex`]'s form; `None` if it is not one.
    pub fn from_hex(text: &str) -> Option<KeyHash> {
        blake3::Hash::from_hex(text).ok().map(KeyHash)
    }

    /// Whether `typed` is this key (constant time: `blake3::Hash` compares so).
    pub fn matches(&self, typed: &str) -> bool {
        KeyHash::of(typed).0 == self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_typed_forgivingly_and_differ() {
        let key = ActivationKey::generate();
        let text = key.to_string();
        assert_eq!(text.len(), 24 + 5, "{text}");
        assert!(key.hash().matches(&text));
        assert!(key.hash().matches(&text.to_lowercase().replace('-', " ")));
        let confusable = text.replace('0', "o").replace('1', "l");
        assert!(key.hash().matches(&confusable));
        assert!(!key.hash().matches(&ActivationKey::generate().to_string()));
        assert!(!key.hash().matches(""));
        assert_ne!(key, ActivationKey::generate());
        let stored = KeyHash::from_slice(key.hash().as_bytes()).map(|h| h.matches(&text));
        assert_eq!(stored, Some(true));
        assert_eq!(KeyHash::from_slice(&[1, 2, 3]), None);
        assert!(
            !format!("{key:?}").contains(&text),
            "Debug must not print the key"
        );
    }
}
