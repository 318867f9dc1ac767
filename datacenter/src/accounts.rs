//! The portal's accounts: a name, a role, and an argon2id hash of the password (a PHC string;
//! the password itself is never stored). Kept in the store, so every site's portal knows the
//! same people. `lbs-datacenter user add | passwd | remove | list` manages them.

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};

/// What an account may do in the portal.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum AccountRole {
    /// Sees everything, changes nothing.
    Viewer,
    /// May also promote (the provider's remote P) and write notes.
    Operator,
}

impl std::fmt::Display for AccountRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AccountRole::Viewer => "viewer",
            AccountRole::Operator => "operator",
        })
    }
}

/// An account as the store keeps it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Account {
    pub name: String,
    pub role: AccountRole,
    /// The argon2id PHC string of its password.
    pub hash: String,
    /// When it was made or its password last set, ms since the epoch.
    pub changed_at: i64,
}

/// Passwords shorter than this are refused.
pub const MIN_PASSWORD: usize = 10;
/// Longer ones too (argon2 takes any length; a bound keeps a login request small).
pub const MAX_PASSWORD: usize = 256;

/// Why an account cannot be made as asked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AccountError {
    #[error(
        "account name {0:?}: 1 to 64 letters, digits, '.', '-', '_' or '@' (it is shown in the audit log)"
    )]
    Name(String),
    #[error("the password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters")]
    Password,
    #[error("hashing the password failed: {0}")]
    Hash(String),
}

/// Checks an account name.
pub fn check_name(name: &str) -> Result<(), AccountError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@'));
    if ok {
        Ok(())
    } else {
        Err(AccountError::Name(name.to_owned()))
    }
}

/// The stored form of `password` (argon2id, a fresh random salt).
pub fn hash_password(password: &str) -> Result<String, AccountError> {
    let length = password.chars().count();
    if !(MIN_PASSWORD..=MAX_PASSWORD).contains(&length) {
        return Err(AccountError::Password);
    }
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|hash| hash.to_string())
        .map_err(|e| AccountError::Hash(e.to_string()))
}

/// Whether `password` is the one `hash` was made from (false for a damaged hash).
pub fn verify_password(hash: &str, password: &str) -> bool {
    if password.len() > MAX_PASSWORD * 4 {
        return false;
    }
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hashed_salted_and_checked() {
        let a = hash_password("correct horse battery").unwrap();
        let b = hash_password("correct horse battery").unwrap();
        assert!(a.starts_with("$argon2id$"), "{a}");
        assert_ne!(a, b, "a fresh salt each time");
        assert!(verify_password(&a, "correct horse battery"));
        assert!(!verify_password(&a, "correct horse batterY"));
        assert!(!verify_password("not a hash", "correct horse battery"));
        assert_eq!(hash_password("short"), Err(AccountError::Password));
        assert!(check_name("ops.anna@example").is_ok());
        assert!(check_name("anna smith").is_err());
        assert!(check_name("").is_err());
    }
}
