//! Privacy settings, hardened by default: nothing about the user is shared until they choose
//! to share it. Each setting is stored in the profile database as text.

use rusqlite::{Connection, OptionalExtension, params};

use crate::Error;

/// Who may see when the user is online or was last seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Presence {
    Nobody,
    Contacts,
}

/// Who may add the user to groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupInvites {
    Nobody,
    Contacts,
    Everyone,
}

/// Every setting, with its current value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Settings {
    /// Online status and last seen: shown to nobody (default) or to contacts. Reciprocal:
    /// with `nobody`, contacts' presence is not shown either.
    pub presence: Presence,
    /// Typing indicators, off by default. Reciprocal.
    pub typing: bool,
    /// Read receipts, off by default. Reciprocal.
    pub read_receipts: bool,
    /// First messages from people who are not contacts go to `requests` (on, the default);
    /// off drops them unseen.
    pub message_requests: bool,
    /// Who may add the user to groups (default: contacts).
    pub group_invites: GroupInvites,
    /// Whether the username, if any, can be looked up (off by default).
    pub discoverable: bool,
    /// Link previews; always off: the client never fetches URLs found in messages.
    pub link_previews: bool,
    /// The SOCKS5 proxy every connection goes through, if any.
    pub proxy: Option<String>,
}

/// The keys `settings set` accepts.
pub const KEYS: &[&str] = &[
    "presence",
    "typing",
    "read_receipts",
    "message_requests",
    "group_invites",
    "discoverable",
    "link_previews",
    "proxy",
];

impl Default for Settings {
    fn default() -> Self {
        Self {
            presence: Presence::Nobody,
            typing: false,
            read_receipts: false,
            message_requests: true,
            group_invites: GroupInvites::Contacts,
            discoverable: false,
            link_previews: false,
            proxy: None,
        }
    }
}

fn on_off(key: &str, value: &str) -> Result<bool, Error> {
    match value {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(Error::Usage(format!("{key} is on or off, not {value:?}"))),
    }
}

fn on_off_text(value: bool) -> &'static str {
    if value { "on" } else { "off" }
}

impl Settings {
    /// The stored settings, defaults for those never set.
    pub(crate) fn load(db: &Connection) -> Result<Self, Error> {
        let mut settings = Settings::default();
        let mut statement = db.prepare("SELECT key, value FROM settings")?;
        let rows = statement
            .query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        for (key, value) in rows {
            // A value this version cannot read keeps the default rather than locking the user
            // out of their profile.
            if let Err(error) = settings.apply(&key, &value) {
                tracing::warn!("ignored a stored setting: {error}");
            }
        }
        settings.proxy = db
            .query_row("SELECT proxy FROM account WHERE id = 1", [], |row| {
                row.get(0)
            })
            .optional()?
            .flatten();
        Ok(settings)
    }

    /// Checks and applies one `key value` pair (the proxy excepted, which lives with the
    /// account and is checked by the caller).
    pub(crate) fn apply(&mut self, key: &str, value: &str) -> Result<(), Error> {
        let value = value.trim();
        match key {
            "presence" => {
                self.presence = match value {
                    "nobody" => Presence::Nobody,
                    "contacts" => Presence::Contacts,
                    _ => {
                        return Err(Error::Usage(format!(
                            "presence is nobody or contacts, not {value:?}"
                        )));
                    }
                }
            }
            "typing" => self.typing = on_off(key, value)?,
            "read_receipts" => self.read_receipts = on_off(key, value)?,
            "message_requests" => self.message_requests = on_off(key, value)?,
            "group_invites" => {
                self.group_invites = match value {
                    "nobody" => GroupInvites::Nobody,
                    "contacts" => GroupInvites::Contacts,
                    "everyone" => GroupInvites::Everyone,
                    _ => {
                        return Err(Error::Usage(format!(
                            "group_invites is nobody, contacts or everyone, not {value:?}"
                        )));
                    }
                }
            }
            "discoverable" => self.discoverable = on_off(key, value)?,
            "link_previews" => {
                if on_off(key, value)? {
                    return Err(Error::Usage(
                        "link previews cannot be turned on: fetching a link tells its server \
                         who you are and what you read, so miyu never fetches URLs from messages"
                            .into(),
                    ));
                }
                self.link_previews = false;
            }
            "proxy" => {
                return Err(Error::Usage(
                    "the proxy is set with the account (internal error)".into(),
                ));
            }
            _ => {
                return Err(Error::Usage(format!(
                    "unknown setting {key:?}; the settings are: {}",
                    KEYS.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// The value of `key` as `settings set` takes it (empty for an unknown key).
    pub fn text(&self, key: &str) -> String {
        match key {
            "presence" => match self.presence {
                Presence::Nobody => "nobody".into(),
                Presence::Contacts => "contacts".into(),
            },
            "typing" => on_off_text(self.typing).into(),
            "read_receipts" => on_off_text(self.read_receipts).into(),
            "message_requests" => on_off_text(self.message_requests).into(),
            "group_invites" => match self.group_invites {
                GroupInvites::Nobody => "nobody".into(),
                GroupInvites::Contacts => "contacts".into(),
                GroupInvites::Everyone => "everyone".into(),
            },
            "discoverable" => on_off_text(self.discoverable).into(),
            "link_previews" => on_off_text(self.link_previews).into(),
            "proxy" => self.proxy.clone().unwrap_or_else(|| "none".into()),
            _ => String::new(),
        }
    }

    /// Stores one setting already checked by [`apply`](Self::apply).
    pub(crate) fn store(&self, db: &Connection, key: &str) -> Result<(), Error> {
        db.execute(
            "INSERT INTO settings (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![key, self.text(key)],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_share_nothing() {
        let settings = Settings::default();
        assert_eq!(settings.presence, Presence::Nobody);
        assert!(!settings.typing);
        assert!(!settings.read_receipts);
        assert!(settings.message_requests);
        assert_eq!(settings.group_invites, GroupInvites::Contacts);
        assert!(!settings.discoverable);
        assert!(!settings.link_previews);
        assert_eq!(settings.proxy, None);
    }

    #[test]
    fn every_key_round_trips_through_its_text() {
        let mut settings = Settings::default();
        for (key, value) in [
            ("presence", "contacts"),
            ("typing", "on"),
            ("read_receipts", "on"),
            ("message_requests", "off"),
            ("group_invites", "everyone"),
            ("discoverable", "on"),
            ("link_previews", "off"),
        ] {
            settings.apply(key, value).expect("a valid value");
            assert_eq!(settings.text(key), value, "{key}");
        }
    }

    #[test]
    fn bad_values_and_unknown_keys_are_refused_and_change_nothing() {
        let mut settings = Settings::default();
        assert!(settings.apply("presence", "everyone").is_err());
        assert!(settings.apply("typing", "maybe").is_err());
        assert!(settings.apply("colour", "blue").is_err());
        assert!(settings.apply("link_previews", "on").is_err());
        assert_eq!(settings, Settings::default());
    }
}
