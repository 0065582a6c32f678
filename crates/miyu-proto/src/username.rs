//! Usernames: optional, found by exact match only. The server never sees one in the clear:
//! clients send `SHA-256("miyu username v1" || canonical name)`.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

const HASH_CONTEXT: &[u8] = b"miyu username v1";
const MIN_CHARS: usize = 5;
const MAX_CHARS: usize = 32;

/// A username in canonical form: 5 to 32 characters of `a-z`, `0-9` and `_`, starting with a
/// letter. Parsing lowercases it and drops one leading `@`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Username(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a username is {MIN_CHARS} to {MAX_CHARS} letters, digits or underscores, starting with a letter"
)]
pub struct UsernameError;

impl FromStr for Username {
    type Err = UsernameError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let name = text.strip_prefix('@').unwrap_or(text).to_ascii_lowercase();
        let valid_length = (MIN_CHARS..=MAX_CHARS).contains(&name.len());
        let starts_with_letter = name.starts_with(|c: char| c.is_ascii_lowercase());
        let valid_characters = name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if valid_length && starts_with_letter && valid_characters {
            Ok(Self(name))
        } else {
            Err(UsernameError)
        }
    }
}

impl fmt::Display for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Username {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// What the server stores and looks up.
    pub fn hash(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(HASH_CONTEXT);
        hasher.update(self.0.as_bytes());
        hasher.finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_canonical_lowercase_without_the_at_sign() {
        let name: Username = " @Alice_1984 ".parse().unwrap();
        assert_eq!(name.as_str(), "alice_1984");
        assert_eq!(name, "alice_1984".parse().unwrap());
        assert_eq!(
            name.hash(),
            "ALICE_1984".parse::<Username>().unwrap().hash()
        );
    }

    #[test]
    fn malformed_names_are_refused() {
        for bad in [
            "",
            "@",
            "abcd",
            "1alice",
            "_alice",
            "alice smith",
            "alice-smith",
            "ålice",
            "@@alice",
            &"a".repeat(33),
        ] {
            assert_eq!(bad.parse::<Username>(), Err(UsernameError), "{bad:?}");
        }
        assert!("a".repeat(32).parse::<Username>().is_ok());
    }
}
