//! Groups: conversations of any number of accounts, end-to-end encrypted like every other
//! (one MLS group; the server keeps the log and which devices belong, nothing else).
//!
//! What members share beyond the MLS tree travels inside it: the group's name, description,
//! roles (owner, admin, member) and permissions are a `GroupInfo` message that an owner or
//! admin sends whole whenever they change and after adding members (PROTOCOL.md §10.8).
//! Every member's device checks each change against the roles it holds and refuses what the
//! sender was not allowed to do, with a notice in the conversation. A commit cannot be refused
//! that way (every member must follow the log's commits, or the group forks); one that adds
//! members without the right to is followed, but those members stay "unapproved" and this
//! device sends nothing to the group until an admin removes them.
//!
//! A one-to-one conversation has a 16-byte group id; a group, a 32-byte one. The id is part of
//! the MLS group context, so nobody can turn one into the other.

use std::collections::{BTreeMap, HashMap, HashSet};

use miyu_crypto::mls::{self, CommitSummary, KeyPackage, Provider};
use miyu_proto::cert::VerifiedCertificate;
use miyu_proto::wire::{self, client_frame::Body as Request, server_frame::Body as Reply};
use miyu_proto::{AccountId, DeviceId};
use prost::Message as _;
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

use crate::privacy::{self, Received};
use crate::settings::{GroupInvites, Settings};
use crate::{
    COMMIT_ATTEMPTS, Client, Error, Event, MessageKind, MessageState, MessageView, Verdict, db,
    features, files, now_ms, random, settle_own_commit,
};

/// Bytes of a group's id (a one-to-one conversation's has 16).
pub const GROUP_ID_LEN: usize = 32;
/// How the scope of a group's conversation starts (see [`Client::conversation_of`]).
pub(crate) const SCOPE_PREFIX: &str = "group:";

/// The most devices one commit adds. Each brings its key package (about 420 bytes) into the
/// commit and a sealed secret (about 100 bytes) into the Welcome, which travel together in one
/// request under the 1 MiB frame limit.
pub const ADD_BATCH_DEVICES: usize = 1000;

/// The most devices a group holds. A commit that removes a member or updates keys carries
/// about 80 bytes for each member of a freshly built group (one ciphertext per blank subtree),
/// and must fit in one 1 MiB request: past about 12,800 members nobody could be removed.
pub const MAX_GROUP_DEVICES: usize = 12_000;

/// The error of an addition of which only the first batches went in.
fn partly_added(group: &str, error: Error) -> Error {
    let text = format!(
        "only some of the members were added to {group} ({error}); add the others with `miyu group add`"
    );
    if error.is_transient() {
        Error::Network(text)
    } else {
        Error::Usage(text)
    }
}

/// Refuses an addition that would take a group of `present` devices past
/// [`MAX_GROUP_DEVICES`].
fn check_group_size(present: usize, adding: usize) -> Result<(), Error> {
    if present + adding > MAX_GROUP_DEVICES {
        return Err(Error::Usage(format!(
            "a group holds at most {MAX_GROUP_DEVICES} devices for now (a removal must fit in one \
             request); this one has {present} and {adding} would join"
        )));
    }
    Ok(())
}

/// The most key package bytes one commit adds, whatever their number: room is left for the
/// Welcome's secrets and the commit's own fields.
const ADD_BATCH_BYTES: usize = 640 * 1024;

/// Splits contacts to add into batches of at most [`ADD_BATCH_DEVICES`] devices and
/// [`ADD_BATCH_BYTES`] of key packages, keeping each contact's devices together (a contact
/// over either bound goes alone).
fn add_batches(add: &[Claimed]) -> Vec<&[Claimed]> {
    let mut batches = Vec::new();
    let (mut start, mut devices, mut bytes) = (0, 0, 0);
    for (index, claimed) in add.iter().enumerate() {
        let claimed_bytes: usize = claimed.key_packages.iter().map(mls::key_package_len).sum();
        if index > start
            && (devices + claimed.devices.len() > ADD_BATCH_DEVICES
                || bytes + claimed_bytes > ADD_BATCH_BYTES)
        {
            batches.push(&add[start..index]);
            (start, devices, bytes) = (index, 0, 0);
        }
        devices += claimed.devices.len();
        bytes += claimed_bytes;
    }
    if start < add.len() {
        batches.push(&add[start..]);
    }
    batches
}

/// Who a commit removes: whole accounts (all their devices), or single devices.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Gone<'a> {
    Accounts(&'a [String]),
    Devices(&'a [DeviceId]),
}

impl Gone<'_> {
    pub(crate) const NOBODY: Gone<'static> = Gone::Accounts(&[]);

    fn covers(&self, certificate: &VerifiedCertificate) -> bool {
        match self {
            Gone::Accounts(accounts) => accounts.contains(&certificate.account_id().to_string()),
            Gone::Devices(devices) => devices.contains(&certificate.device_id()),
        }
    }
}

/// How long a group we were added to waits for its adder's GroupInfo before we decline it.
pub(crate) const PENDING_DAYS: u64 = 7;

/// Groups still waiting for their adder's GroupInfo since before `now_ms` minus
/// [`PENDING_DAYS`].
fn silent_groups(db: &Connection, now_ms: u64) -> Result<Vec<Vec<u8>>, Error> {
    let cutoff = now_ms.saturating_sub(PENDING_DAYS * 24 * 3600 * 1000);
    let mut statement = db.prepare(
        "SELECT group_id FROM groups WHERE state = 'pending' AND leaving = 0 AND created_at_ms < ?1",
    )?;
    let groups = statement
        .query_map(params![cutoff], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    Ok(groups)
}

/// Longest group name, in characters.
pub const MAX_TITLE_CHARS: usize = 64;
/// Longest group description, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 512;
/// Largest group picture, in bytes, once its metadata is gone.
pub const MAX_AVATAR_BYTES: usize = 64 * 1024;

pub(crate) fn is_group_id(group_id: &[u8]) -> bool {
    group_id.len() == GROUP_ID_LEN
}

pub(crate) fn scope(group_id: &[u8]) -> String {
    let hex: String = group_id.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("{SCOPE_PREFIX}{hex}")
}

/// A member's role. Owners and admins may add and remove members and change the group's info;
/// only owners change roles; admins remove only members, owners also admins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Member,
    Admin,
    Owner,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Member => "member",
            Role::Admin => "admin",
            Role::Owner => "owner",
        }
    }

    fn from_stored(text: &str) -> Role {
        match text {
            "owner" => Role::Owner,
            "admin" => Role::Admin,
            _ => Role::Member,
        }
    }

    pub fn parse(text: &str) -> Result<Role, Error> {
        match text {
            "owner" => Ok(Role::Owner),
            "admin" => Ok(Role::Admin),
            "member" => Ok(Role::Member),
            _ => Err(Error::Usage(
                "a role is owner (handing the group over), admin or member".into(),
            )),
        }
    }
}

/// Who may do something in a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    Admins,
    Everyone,
}

impl Policy {
    fn as_str(self) -> &'static str {
        match self {
            Policy::Admins => "admins",
            Policy::Everyone => "everyone",
        }
    }

    fn from_stored(text: &str) -> Policy {
        if text == "everyone" {
            Policy::Everyone
        } else {
            Policy::Admins
        }
    }

    pub fn parse(text: &str) -> Result<Policy, Error> {
        match text {
            "admins" => Ok(Policy::Admins),
            "everyone" | "all" => Ok(Policy::Everyone),
            _ => Err(Error::Usage("a permission is admins or everyone".into())),
        }
    }

    fn allows(self, role: Role) -> bool {
        self == Policy::Everyone || role >= Role::Admin
    }

    fn to_wire(self) -> i32 {
        match self {
            Policy::Admins => wire::GroupPolicy::Admins as i32,
            Policy::Everyone => wire::GroupPolicy::Everyone as i32,
        }
    }

    fn from_wire(value: i32) -> Option<Policy> {
        match wire::GroupPolicy::try_from(value).ok()? {
            wire::GroupPolicy::Admins => Some(Policy::Admins),
            wire::GroupPolicy::Everyone => Some(Policy::Everyone),
        }
    }
}

/// A group as front ends show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupView {
    /// This device's name for the group (what commands take).
    pub name: String,
    /// The name its members share.
    pub title: String,
    pub description: String,
    /// Who may add members.
    pub adding: Policy,
    /// Who may post (admins: an announcement-only group).
    pub posting: Policy,
    /// Who may change the name, description and picture.
    pub editing: Policy,
    /// The group's picture: its size and type (`group avatar` saves it).
    pub avatar_bytes: usize,
    pub avatar_mime: Option<String>,
    /// "active", "left" or "removed".
    pub state: String,
    pub my_role: Role,
    pub members: Vec<MemberView>,
    /// Messages that no device of the account has shown yet.
    pub unread: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MemberView {
    /// A contact's name; otherwise the name the member gave, marked with `~`.
    pub name: String,
    pub account_id: String,
    pub role: Role,
    pub me: bool,
    /// Added by someone without the right to; nothing is sent while such a member is in.
    pub unapproved: bool,
}

/// A change of a group's info; `None` keeps what is.
#[derive(Debug, Clone, Default)]
pub struct GroupChange {
    pub title: Option<String>,
    pub description: Option<String>,
    /// A new picture (the bytes of a JPEG, PNG or WebP file), or `Some(empty)` for none.
    pub avatar: Option<Vec<u8>>,
    pub adding: Option<Policy>,
    pub posting: Option<Policy>,
    pub editing: Option<Policy>,
}

/// What members share about a group (besides the MLS tree).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Info {
    title: String,
    description: String,
    adding: Policy,
    posting: Policy,
    editing: Policy,
    /// Owners and admins by account id; everyone else is a member.
    roles: BTreeMap<String, Role>,
    avatar: Vec<u8>,
    avatar_mime: String,
}

impl Info {
    fn to_wire(&self) -> Result<wire::GroupInfo, Error> {
        let mut roles = Vec::with_capacity(self.roles.len());
        for (account, role) in &self.roles {
            let account: AccountId = account
                .parse()
                .map_err(|_| Error::Protocol("a stored account id does not parse".into()))?;
            roles.push(wire::GroupRole {
                account_id: account.as_bytes().to_vec(),
                role: match role {
                    Role::Owner => wire::Role::Owner as i32,
                    Role::Admin => wire::Role::Admin as i32,
                    Role::Member => wire::Role::Member as i32,
                },
            });
        }
        Ok(wire::GroupInfo {
            name: self.title.clone(),
            description: self.description.clone(),
            roles,
            adding: self.adding.to_wire(),
            posting: self.posting.to_wire(),
            editing: self.editing.to_wire(),
            names: Vec::new(),
            avatar: self.avatar.clone(),
            avatar_mime: self.avatar_mime.clone(),
        })
    }

    /// A received GroupInfo, if well formed: a name, limits kept, known roles and policies.
    fn from_wire(info: &wire::GroupInfo) -> Option<Info> {
        let title = clean_title(&info.name).ok()?;
        if info.description.chars().count() > MAX_DESCRIPTION_CHARS {
            return None;
        }
        let description = clean_description(&info.description);
        let mut roles = BTreeMap::new();
        for role in info.roles.iter().take(10_000) {
            let account = AccountId::from_bytes(&role.account_id).ok()?.to_string();
            let role = match wire::Role::try_from(role.role).ok()? {
                wire::Role::Owner => Role::Owner,
                wire::Role::Admin => Role::Admin,
                wire::Role::Member => continue,
            };
            roles.insert(account, role);
        }
        // A picture must be a small image of the type it claims.
        if !info.avatar.is_empty()
            && (info.avatar.len() > MAX_AVATAR_BYTES
                || crate::strip::sniff(&info.avatar).map(|kind| kind.mime())
                    != Some(info.avatar_mime.as_str()))
        {
            return None;
        }
        Some(Info {
            title,
            description,
            roles,
            avatar: info.avatar.clone(),
            avatar_mime: if info.avatar.is_empty() {
                String::new()
            } else {
                info.avatar_mime.clone()
            },
            adding: Policy::from_wire(info.adding)?,
            posting: Policy::from_wire(info.posting)?,
            editing: Policy::from_wire(info.editing)?,
        })
    }

    fn role_of(&self, account: &str) -> Role {
        self.roles.get(account).copied().unwrap_or(Role::Member)
    }
}

/// The GroupInfo to send: `info` and the names members gave themselves.
fn info_message(
    db: &Connection,
    group_id: &[u8],
    info: &Info,
) -> Result<wire::app_message::Body, Error> {
    let mut message = info.to_wire()?;
    let mut statement = db.prepare_cached(
        "SELECT account_id, name FROM group_members WHERE group_id = ?1 AND name IS NOT NULL",
    )?;
    for row in statement.query_map(params![group_id], |row| {
        Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
    })? {
        let (account, name) = row?;
        if let Ok(account) = account.parse::<AccountId>() {
            message.names.push(wire::MemberName {
                account_id: account.as_bytes().to_vec(),
                name,
            });
        }
    }
    Ok(wire::app_message::Body::GroupInfo(message))
}

/// Takes the names a GroupInfo relays for members whose own introduction we lack.
fn learn_names(db: &Connection, group_id: &[u8], info: &wire::GroupInfo) -> Result<(), Error> {
    for given in info.names.iter().take(10_000) {
        let Ok(account) = AccountId::from_bytes(&given.account_id) else {
            continue;
        };
        let name = crate::profile_name(&wire::Profile {
            name: given.name.clone(),
            invite_proof: Vec::new(),
        });
        if name.is_empty() {
            continue;
        }
        db.execute(
            "UPDATE group_members SET name = ?3 WHERE group_id = ?1 AND account_id = ?2 AND name IS NULL",
            params![group_id, account.to_string(), name],
        )?;
    }
    Ok(())
}

/// A group name as it may be shown: printable, trimmed, 1 to 64 characters.
fn clean_title(text: &str) -> Result<String, Error> {
    let title: String = text.chars().filter(|c| !c.is_control()).collect();
    let title = title.trim();
    if title.is_empty() {
        return Err(Error::Usage("a group needs a name".into()));
    }
    if title.chars().count() > MAX_TITLE_CHARS {
        return Err(Error::Usage(format!(
            "a group name has at most {MAX_TITLE_CHARS} characters"
        )));
    }
    Ok(title.to_string())
}

/// A description without control characters other than line breaks.
fn clean_description(text: &str) -> String {
    text.chars()
        .filter(|c| *c == '\n' || !c.is_control())
        .take(MAX_DESCRIPTION_CHARS)
        .collect::<String>()
        .trim()
        .to_string()
}

/// Who may add, post and edit: the part of the group's info that every incoming message and
/// every send consults (without the roles and the picture that `load_info` reads).
struct Policies {
    adding: Policy,
    posting: Policy,
    editing: Policy,
}

fn load_policies(db: &Connection, group_id: &[u8]) -> Result<Policies, Error> {
    let (adding, posting, editing): (String, String, String) = db
        .prepare_cached("SELECT adding, posting, editing FROM groups WHERE group_id = ?1")?
        .query_row(params![group_id], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })?;
    Ok(Policies {
        adding: Policy::from_stored(&adding),
        posting: Policy::from_stored(&posting),
        editing: Policy::from_stored(&editing),
    })
}

fn load_info(db: &Connection, group_id: &[u8]) -> Result<Info, Error> {
    type Row = (
        String,
        String,
        String,
        String,
        String,
        Option<Vec<u8>>,
        Option<String>,
    );
    let (title, description, adding, posting, editing, avatar, avatar_mime): Row = db.query_row(
        "SELECT title, description, adding, posting, editing, avatar, avatar_mime FROM groups
         WHERE group_id = ?1",
        params![group_id],
        |row| {
            Ok((
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
                row.get(4)?,
                row.get(5)?,
                row.get(6)?,
            ))
        },
    )?;
    let mut roles = BTreeMap::new();
    let mut statement = db.prepare_cached(
        "SELECT account_id, role FROM group_members WHERE group_id = ?1 AND role != 'member'",
    )?;
    for row in statement.query_map(params![group_id], |row| {
        Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
    })? {
        let (account, role) = row?;
        roles.insert(account, Role::from_stored(&role));
    }
    Ok(Info {
        title,
        description,
        adding: Policy::from_stored(&adding),
        posting: Policy::from_stored(&posting),
        editing: Policy::from_stored(&editing),
        roles,
        avatar: avatar.unwrap_or_default(),
        avatar_mime: avatar_mime.unwrap_or_default(),
    })
}

/// Stores `info`: the group's fields, and each current member's role (roles of accounts that
/// are not members are dropped).
fn save_info(db: &Connection, group_id: &[u8], info: &Info) -> Result<(), Error> {
    db.execute(
        "UPDATE groups SET title = ?2, description = ?3, adding = ?4, posting = ?5, editing = ?6,
         avatar = ?7, avatar_mime = ?8 WHERE group_id = ?1",
        params![
            group_id,
            info.title,
            info.description,
            info.adding.as_str(),
            info.posting.as_str(),
            info.editing.as_str(),
            (!info.avatar.is_empty()).then_some(&info.avatar),
            (!info.avatar.is_empty()).then_some(&info.avatar_mime)
        ],
    )?;
    db.execute(
        "UPDATE group_members SET role = 'member' WHERE group_id = ?1",
        params![group_id],
    )?;
    for (account, role) in &info.roles {
        db.execute(
            "UPDATE group_members SET role = ?3 WHERE group_id = ?1 AND account_id = ?2",
            params![group_id, account, role.as_str()],
        )?;
    }
    Ok(())
}

fn role_of(db: &Connection, group_id: &[u8], account: &str) -> Result<Option<Role>, Error> {
    Ok(db
        .prepare_cached("SELECT role FROM group_members WHERE group_id = ?1 AND account_id = ?2")?
        .query_row(params![group_id, account], |row| row.get::<_, String>(0))
        .optional()?
        .map(|role| Role::from_stored(&role)))
}

fn group_state(db: &Connection, group_id: &[u8]) -> Result<Option<(String, String)>, Error> {
    Ok(db
        .prepare_cached("SELECT name, state FROM groups WHERE group_id = ?1")?
        .query_row(params![group_id], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?)
}

/// How this device shows an account: a contact's name, else the name it gave in a group
/// (marked `~`, since nobody checked it), else the start of its id.
fn display_name(db: &Connection, account: &str) -> Result<String, Error> {
    let contact: Option<String> = db
        .prepare_cached("SELECT name FROM contacts WHERE account_id = ?1 AND state = 'accepted'")?
        .query_row(params![account], |row| row.get(0))
        .optional()?;
    if let Some(name) = contact {
        return Ok(name);
    }
    let given: Option<String> = db
        .prepare_cached(
            "SELECT name FROM group_members WHERE account_id = ?1 AND name IS NOT NULL LIMIT 1",
        )?
        .query_row(params![account], |row| row.get(0))
        .optional()?;
    Ok(match given {
        Some(name) => format!("~{name}"),
        None => account.get(..8).unwrap_or(account).to_string(),
    })
}

/// Display names, looked up once per account.
pub(crate) struct Names<'a> {
    db: &'a Connection,
    cache: HashMap<String, String>,
}

impl<'a> Names<'a> {
    pub(crate) fn new(db: &'a Connection) -> Self {
        Self {
            db,
            cache: HashMap::new(),
        }
    }

    pub(crate) fn of(&mut self, account: &str) -> Result<String, Error> {
        if let Some(name) = self.cache.get(account) {
            return Ok(name.clone());
        }
        let name = display_name(self.db, account)?;
        self.cache.insert(account.to_string(), name.clone());
        Ok(name)
    }
}

/// Stores a notice in the group's conversation and returns it as an event.
fn notice(
    db: &Connection,
    group_id: &[u8],
    seq: Option<u64>,
    sender: Option<&str>,
    text: &str,
) -> Result<Event, Error> {
    let (name, _) = group_state(db, group_id)?.unwrap_or_default();
    let now = now_ms();
    let outgoing = sender.is_none();
    db.execute(
        "INSERT INTO messages (group_id, message_id, outgoing, body, sent_at_ms, received_at_ms, state, seq, kind, sender)
         VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, ?7, 'notice', ?8)",
        params![
            group_id,
            random::<16>().to_vec(),
            outgoing,
            text,
            now,
            if outgoing { "sent" } else { "received" },
            seq,
            sender
        ],
    )?;
    Ok(Event::Message(MessageView {
        id: db.last_insert_rowid(),
        contact: name,
        from: if outgoing { "me".into() } else { String::new() },
        outgoing,
        body: text.to_string(),
        sent_at_ms: now,
        state: if outgoing {
            MessageState::Sent
        } else {
            MessageState::Received
        },
        kind: MessageKind::Notice,
        ..Default::default()
    }))
}

/// Brings the member list in line with the MLS tree: accounts that joined are added as
/// members, accounts with no leaf left are dropped. Returns the accounts added.
fn reconcile(db: &Connection, group_id: &[u8]) -> Result<Vec<String>, Error> {
    let provider = Provider::new(db);
    let Some(group) = mls::load_group(&provider, group_id)? else {
        return Ok(Vec::new());
    };
    let mut present: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (_, certificate) in mls::members(&group) {
        present
            .entry(certificate.account_id().to_string())
            .or_insert_with(|| certificate.to_compact());
    }
    let known: HashSet<String> = {
        let mut statement =
            db.prepare_cached("SELECT account_id FROM group_members WHERE group_id = ?1")?;
        statement
            .query_map(params![group_id], |row| row.get(0))?
            .collect::<Result<_, _>>()?
    };
    for account in known
        .iter()
        .filter(|account| !present.contains_key(*account))
    {
        db.execute(
            "DELETE FROM group_members WHERE group_id = ?1 AND account_id = ?2",
            params![group_id, account],
        )?;
    }
    let mut added = Vec::new();
    for (account, certificate) in &present {
        if !known.contains(account) {
            db.execute(
                "INSERT INTO group_members (group_id, account_id, certificate) VALUES (?1, ?2, ?3)",
                params![group_id, account, certificate],
            )?;
            added.push(account.clone());
        }
    }
    Ok(added)
}

/// After our own commit was accepted: the member list follows the tree.
pub(crate) fn after_own_commit(db: &Connection, group_id: &[u8]) -> Result<(), Error> {
    if is_group_id(group_id) {
        reconcile(db, group_id)?;
    }
    Ok(())
}

/// Joins a group from a Welcome: kept hidden ("pending") until its info arrives and says who
/// added us, which decides whether we stay (see [`Client::on_group_message`]).
pub(crate) fn join(db: &Connection, joined: &mls::JoinedGroup, me: AccountId) -> Result<(), Error> {
    let group_id = joined.group.group_id().as_slice().to_vec();
    if !joined
        .members
        .iter()
        .any(|member| member.account_id() == me)
    {
        return Err(Error::Security("a Welcome to a group we are not in".into()));
    }
    match group_state(db, &group_id)? {
        // Removed, left or declined before, and added again: the history stays, the group
        // waits for its info as a new one does.
        Some((_, state)) if matches!(state.as_str(), "removed" | "left" | "declined") => {
            db.execute(
                "UPDATE groups SET state = 'pending', leaving = 0, adder = ?2, created_at_ms = ?3
                 WHERE group_id = ?1",
                params![group_id, joined.sender.account_id().to_string(), now_ms()],
            )?;
            db.execute(
                "UPDATE conversations SET broken = NULL, pending_commit_hash = NULL, announce = NULL
                 WHERE group_id = ?1",
                params![group_id],
            )?;
            db.execute(
                "DELETE FROM group_members WHERE group_id = ?1",
                params![group_id],
            )?;
        }
        // Handed over with the account's history by the device of ours that adds us now: it
        // is known already, as that device knows it.
        Some(_) if joined.sender.account_id() == me => {
            db.execute(
                "UPDATE conversations SET cursor = 0, broken = NULL, last_update_ms = ?2
                 WHERE group_id = ?1",
                params![group_id, now_ms()],
            )?;
        }
        // Known from the history only (this device had no state of it, or MLS would have
        // refused the Welcome), and someone else adds us: an invitation like any other, judged
        // when its adder's info arrives.
        Some(_) => {
            db.execute(
                "UPDATE groups SET state = 'pending', leaving = 0, adder = ?2, created_at_ms = ?3
                 WHERE group_id = ?1",
                params![group_id, joined.sender.account_id().to_string(), now_ms()],
            )?;
            db.execute(
                "UPDATE conversations SET cursor = 0, broken = NULL, pending_commit_hash = NULL,
                 announce = NULL WHERE group_id = ?1",
                params![group_id],
            )?;
        }
        None => {
            let placeholder = db::free_group_name(
                db,
                &format!("pending-{}", &scope(&group_id)[6..14]),
                &group_id,
            )?;
            db.execute(
                "INSERT INTO conversations (group_id, contact, scope, cursor, last_update_ms) VALUES (?1, NULL, ?2, 0, ?3)",
                params![group_id, scope(&group_id), now_ms()],
            )?;
            db.execute(
                "INSERT INTO groups (group_id, name, state, created_at_ms, adder) VALUES (?1, ?2, 'pending', ?3, ?4)",
                params![group_id, placeholder, now_ms(), joined.sender.account_id().to_string()],
            )?;
        }
    }
    reconcile(db, &group_id)?;
    Ok(())
}

/// A commit of another member, merged: records who came and went, and says whether the
/// committer had the right to.
pub(crate) fn on_commit(
    db: &Connection,
    entry: &wire::GroupEntry,
    group: &mls::MlsGroup,
    summary: &CommitSummary,
    me: AccountId,
) -> Result<Option<Event>, Error> {
    let group_id = entry.group_id.as_slice();
    let Some((_, state)) = group_state(db, group_id)? else {
        return Ok(None);
    };
    let committer = summary.committer.account_id().to_string();
    let committer_name = display_name(db, &committer)?;
    if !mls::is_active(group) {
        // A group never shown stays unshown; one we left stays left.
        db.execute(
            "UPDATE groups SET state = CASE state WHEN 'active' THEN 'removed'
             WHEN 'pending' THEN 'declined' ELSE state END, leaving = 0 WHERE group_id = ?1",
            params![group_id],
        )?;
        // Nothing queued for it may go out later, to whoever is in it then.
        db.execute("DELETE FROM outbox WHERE group_id = ?1", params![group_id])?;
        mls::delete_group(&Provider::new(db), group_id)?;
        if state != "active" {
            return Ok(None);
        }
        let text = format!("{committer_name} removed you from the group");
        return notice(db, group_id, Some(entry.seq), Some(&committer), &text).map(Some);
    }
    let committer_role = role_of(db, group_id, &committer)?.unwrap_or(Role::Member);
    let adding = load_policies(db, group_id)?.adding;
    let mut texts = Vec::new();
    let me = me.to_string();
    // Removed accounts, before the member list forgets them.
    let mut removed_accounts: Vec<String> = summary
        .removed
        .iter()
        .map(|certificate| certificate.account_id().to_string())
        .collect();
    removed_accounts.sort();
    removed_accounts.dedup();
    let mut departures = Vec::new();
    for account in &removed_accounts {
        let (role, leaving): (String, bool) = match db
            .query_row(
                "SELECT role, leaving FROM group_members WHERE group_id = ?1 AND account_id = ?2",
                params![group_id, account],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?
        {
            Some(found) => found,
            None => continue,
        };
        let name = display_name(db, account)?;
        departures.push((account.clone(), name, Role::from_stored(&role), leaving));
    }
    let added = reconcile(db, group_id)?;
    let still_in: HashSet<String> = {
        let mut statement =
            db.prepare_cached("SELECT account_id FROM group_members WHERE group_id = ?1")?;
        statement
            .query_map(params![group_id], |row| row.get(0))?
            .collect::<Result<_, _>>()?
    };
    for (account, name, role, leaving) in departures {
        if still_in.contains(&account) || leaving {
            // One device of several went, or the member had said it leaves.
            continue;
        }
        let allowed = committer_role >= Role::Admin && committer_role > role;
        texts.push(if allowed {
            format!("{committer_name} removed {name}")
        } else {
            format!("{committer_name} removed {name} without permission")
        });
    }
    if state == "active" {
        for account in added.iter().filter(|account| **account != me) {
            let name = display_name(db, account)?;
            if adding.allows(committer_role) {
                texts.push(format!("{committer_name} added {name}"));
            } else {
                db.execute(
                    "UPDATE group_members SET unapproved = 1 WHERE group_id = ?1 AND account_id = ?2",
                    params![group_id, account],
                )?;
                texts.push(format!(
                    "{committer_name} added {name} without permission: nothing is sent to this group until an admin removes them"
                ));
            }
        }
    }
    if texts.is_empty() || state != "active" {
        return Ok(None);
    }
    notice(
        db,
        group_id,
        Some(entry.seq),
        Some(&committer),
        &texts.join("; "),
    )
    .map(Some)
}

/// Refuses to queue anything but a Leave for a group this device may not send to: not (or no
/// longer) a member, members added without permission, or a post where only admins post.
pub(crate) fn check_can_send(
    db: &Connection,
    group_id: &[u8],
    me: &str,
    body: &wire::app_message::Body,
) -> Result<(), Error> {
    if matches!(body, wire::app_message::Body::Leave(_)) {
        return Ok(());
    }
    let Some((name, state)) = group_state(db, group_id)? else {
        return Err(Error::Usage("no such group".into()));
    };
    match state.as_str() {
        "active" => {}
        "removed" => return Err(Error::Usage(format!("you were removed from {name}"))),
        "left" => return Err(Error::Usage(format!("you left {name}"))),
        _ => return Err(Error::Usage(format!("you are not in {name}"))),
    }
    let leaving: bool = db.query_row(
        "SELECT leaving FROM groups WHERE group_id = ?1",
        params![group_id],
        |row| row.get(0),
    )?;
    if leaving {
        return Err(Error::Usage(format!("you are leaving {name}")));
    }
    let unapproved: Vec<String> = {
        let mut statement = db.prepare_cached(
            "SELECT account_id FROM group_members WHERE group_id = ?1 AND unapproved = 1",
        )?;
        statement
            .query_map(params![group_id], |row| row.get(0))?
            .collect::<Result<_, _>>()?
    };
    if !unapproved.is_empty() {
        let names = unapproved
            .iter()
            .map(|account| display_name(db, account))
            .collect::<Result<Vec<_>, _>>()?;
        return Err(Error::Security(format!(
            "{} joined {name} without an admin's approval; nothing is sent to the group until an admin removes them (`miyu group remove {name} ...`)",
            names.join(", ")
        )));
    }
    if matches!(
        body,
        wire::app_message::Body::Text(_) | wire::app_message::Body::File(_)
    ) {
        let role = role_of(db, group_id, me)?.unwrap_or(Role::Member);
        if !load_policies(db, group_id)?.posting.allows(role) {
            return Err(Error::Usage(format!("only admins may post in {name}")));
        }
    }
    Ok(())
}

/// The members a group text mentions: each `@name` that is a member's name as this device
/// shows it (a contact's name, or the name the member gave, with or without its `~`).
pub(crate) fn mentions_in(
    db: &Connection,
    group_id: &[u8],
    text: &str,
    me: AccountId,
) -> Result<Vec<Vec<u8>>, Error> {
    // `@bob,` names bob; `@bob_` may be a member called bob_: try the word as it is too.
    let wanted: Vec<&str> = text
        .split_whitespace()
        .filter_map(|word| word.strip_prefix('@'))
        .flat_map(|name| {
            [
                name,
                name.trim_end_matches(|c: char| c.is_ascii_punctuation()),
            ]
        })
        .filter(|name| !name.is_empty())
        .collect();
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let accounts: Vec<String> = {
        let mut statement =
            db.prepare_cached("SELECT account_id FROM group_members WHERE group_id = ?1")?;
        statement
            .query_map(params![group_id], |row| row.get(0))?
            .collect::<Result<_, _>>()?
    };
    let me = me.to_string();
    let mut mentioned = Vec::new();
    for account in accounts.iter().filter(|account| **account != me) {
        let shown = display_name(db, account)?;
        let bare = shown.strip_prefix('~').unwrap_or(&shown);
        if wanted.iter().any(|name| *name == shown || *name == bare)
            && let Ok(id) = account.parse::<AccountId>()
        {
            mentioned.push(id.as_bytes().to_vec());
        }
    }
    Ok(mentioned)
}

/// Someone connected through one of our invite links (and became a contact); if it was a
/// group's link, they ask to join it: added at the next sync, or once approved.
pub(crate) fn on_join_request(
    db: &Connection,
    token: &[u8],
    account: &str,
    name: &str,
) -> Result<Option<Event>, Error> {
    let link: Option<(Option<Vec<u8>>, bool)> = db
        .query_row(
            "SELECT group_id, approval FROM invites WHERE token = ?1",
            params![token],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()?;
    let Some((Some(group_id), approval)) = link else {
        return Ok(None);
    };
    let Some((_, state)) = group_state(db, &group_id)? else {
        return Ok(None);
    };
    if state != "active" {
        return Ok(None);
    }
    db.execute(
        "INSERT OR IGNORE INTO group_requests (group_id, account_id, state, requested_at_ms) VALUES (?1, ?2, ?3, ?4)",
        params![group_id, account, if approval { "waiting" } else { "approved" }, now_ms()],
    )?;
    if !approval {
        return Ok(None);
    }
    let (group_name, _) = group_state(db, &group_id)?.unwrap_or_default();
    notice(
        db,
        &group_id,
        None,
        Some(account),
        &format!(
            "{name} asks to join through the group's link: `miyu group approve {group_name} {name}` or `group deny`"
        ),
    )
    .map(Some)
}

/// One of this device's invite links for a group that can still be used.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupLink {
    /// This device's number for the link, for `group revoke-link`.
    pub id: i64,
    pub created_at_ms: u64,
    pub uses_left: u32,
    pub approval: bool,
}

/// A request to join a group through its link, as `group requests` lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct JoinRequest {
    pub name: String,
    pub account_id: String,
    pub requested_at_ms: u64,
}

/// Key packages of one contact's devices, checked against the contact's identity.
pub(crate) struct Claimed {
    pub(crate) account: String,
    pub(crate) devices: Vec<DeviceId>,
    pub(crate) key_packages: Vec<KeyPackage>,
}

impl Client {
    fn group_named(&self, name: &str) -> Result<Vec<u8>, Error> {
        self.db
            .query_row(
                "SELECT group_id FROM groups WHERE name = ?1 AND state IN ('active', 'left', 'removed')",
                params![name],
                |row| row.get(0),
            )
            .optional()?
            .ok_or_else(|| Error::Usage(format!("no group called {name:?}; `miyu groups` lists them")))
    }

    fn my_role(&self, group_id: &[u8]) -> Result<Role, Error> {
        Ok(role_of(&self.db, group_id, &self.account_id().to_string())?.unwrap_or(Role::Member))
    }

    /// Fetches key packages of every device of `contact` for adding them to a group.
    async fn claim_contact(&mut self, contact: &str) -> Result<Claimed, Error> {
        let compact: Vec<u8> = self
            .db
            .query_row(
                "SELECT certificate FROM contacts WHERE name = ?1 AND state = 'accepted'",
                params![contact],
                |row| row.get(0),
            )
            .optional()?
            .ok_or_else(|| {
                Error::Usage(format!(
                    "no contact called {contact:?}; `miyu contacts` lists them"
                ))
            })?;
        let known = VerifiedCertificate::from_compact(&compact)
            .map_err(|error| Error::Security(format!("stored certificate: {error}")))?;
        let reply = self
            .call(Request::ClaimKeyPackages(wire::ClaimKeyPackages {
                account_id: known.account_id().as_bytes().to_vec(),
            }))
            .await?;
        let Reply::InviteClaimed(claimed) = reply else {
            return Err(Error::Protocol(format!("unexpected answer: {reply:?}")));
        };
        let provider = Provider::new(&self.db);
        let mut devices = Vec::new();
        let mut key_packages = Vec::new();
        for device in &claimed.devices {
            let certificate = device
                .certificate
                .as_ref()
                .ok_or_else(|| Error::Security("a device came without certificate".into()))
                .and_then(|c| {
                    VerifiedCertificate::verify(c)
                        .map_err(|e| Error::Security(format!("device certificate: {e}")))
                })?;
            // The server must not slip in a device of someone else.
            if certificate.account_id() != known.account_id()
                || certificate.identity_fingerprint() != known.identity_fingerprint()
            {
                return Err(Error::Security(format!(
                    "the server returned keys that are not {contact}'s; not adding"
                )));
            }
            key_packages.push(mls::check_key_package(
                &provider,
                &device.key_package,
                &certificate,
            )?);
            devices.push(certificate.device_id());
        }
        if devices.is_empty() {
            return Err(Error::Protocol(format!(
                "the server has no keys for {contact}'s devices; ask them to open miyu"
            )));
        }
        Ok(Claimed {
            account: known.account_id().to_string(),
            devices,
            key_packages,
        })
    }

    /// Creates a group called `name` with the given contacts; we are its owner.
    pub async fn create_group(
        &mut self,
        name: &str,
        contacts: &[String],
    ) -> Result<GroupView, Error> {
        let title = clean_title(name)?;
        if self.conversation_of(&title).is_ok() {
            return Err(Error::Usage(format!(
                "a contact or group is already called {title:?}"
            )));
        }
        self.connect().await?;
        let mut claims = Vec::with_capacity(contacts.len());
        for contact in contacts {
            let claimed = self.claim_contact(contact).await?;
            if claimed.account == self.account_id().to_string()
                || claims
                    .iter()
                    .any(|c: &Claimed| c.account == claimed.account)
            {
                continue;
            }
            claims.push(claimed);
        }
        // Our other devices take part from the start.
        if let Some(own) = self.claim_own_devices().await? {
            claims.push(own);
        }
        // The creator's device and everyone's.
        check_group_size(1, claims.iter().map(|claimed| claimed.devices.len()).sum())?;
        let group_id: [u8; GROUP_ID_LEN] = random();
        let me = self.account_id().to_string();
        // A group of one first; the members come in with commits like any later addition, in
        // batches that fit a request, and their tree is served apart from the Welcome.
        db::in_transaction(&self.db, |db| {
            let provider = Provider::new(db);
            let created =
                mls::create_group(&provider, &self.keys, &group_id, &[], mls::Tree::Served)?;
            let announce = wire::CreateGroup {
                group_id: group_id.to_vec(),
                epoch: created.epoch,
                member_devices: Vec::new(),
                welcomes: Vec::new(),
                welcome: Vec::new(),
                posting_key: mls::PostingKey::current(&provider, &created.group)?
                    .public()
                    .to_vec(),
            };
            db.execute(
                "INSERT INTO conversations (group_id, contact, scope, announce, last_update_ms) VALUES (?1, NULL, ?2, ?3, ?4)",
                params![group_id.as_slice(), scope(&group_id), announce.encode_to_vec(), now_ms()],
            )?;
            let local_name = db::free_group_name(db, &title, &group_id)?;
            db.execute(
                "INSERT INTO groups (group_id, name, title, state, created_at_ms) VALUES (?1, ?2, ?3, 'active', ?4)",
                params![group_id.as_slice(), local_name, title, now_ms()],
            )?;
            reconcile(db, &group_id)?;
            db.execute(
                "UPDATE group_members SET role = 'owner', name = ?3 WHERE group_id = ?1 AND account_id = ?2",
                params![group_id.as_slice(), me, self.name],
            )?;
            Ok(())
        })?;
        self.announce_pending_groups().await?;
        let broken: Option<String> = self.db.query_row(
            "SELECT broken FROM conversations WHERE group_id = ?1",
            params![group_id.as_slice()],
            |row| row.get(0),
        )?;
        if let Some(reason) = broken {
            // The server refused the group: it exists nowhere but here. Forget it.
            db::in_transaction(&self.db, |db| {
                mls::delete_group(&Provider::new(db), &group_id)?;
                db.execute(
                    "DELETE FROM outbox WHERE group_id = ?1",
                    params![group_id.as_slice()],
                )?;
                db.execute(
                    "DELETE FROM groups WHERE group_id = ?1",
                    params![group_id.as_slice()],
                )?;
                db.execute(
                    "DELETE FROM conversations WHERE group_id = ?1",
                    params![group_id.as_slice()],
                )?;
                Ok(())
            })?;
            return Err(Error::Protocol(format!(
                "the group could not be created: {reason}"
            )));
        }
        let added = if claims.is_empty() {
            Ok(())
        } else {
            self.commit_membership(&group_id, &claims, Gone::NOBODY)
                .await
        };
        // The members learn the group's name, roles and permissions, and our name, from these;
        // also when only some batches went in, or they would wait for them in vain.
        db::in_transaction(&self.db, |db| {
            let info = load_info(db, &group_id)?;
            self.queue_app_message_in(db, &group_id, info_message(db, &group_id, &info)?, None)?;
            self.queue_app_message_in(
                db,
                &group_id,
                wire::app_message::Body::Profile(wire::Profile {
                    name: self.name.clone(),
                    invite_proof: Vec::new(),
                }),
                None,
            )?;
            Ok(())
        })?;
        self.flush_outbox().await?;
        let name: String = self.db.query_row(
            "SELECT name FROM groups WHERE group_id = ?1",
            params![group_id.as_slice()],
            |row| row.get(0),
        )?;
        if let Err(error) = added {
            if self.member_accounts(&group_id)?.len() == 1 {
                let text = format!(
                    "{name} was created, but nobody could be added yet ({error}); use `miyu group add`"
                );
                return Err(if error.is_transient() {
                    Error::Network(text)
                } else {
                    Error::Usage(text)
                });
            }
            return Err(partly_added(&name, error));
        }
        self.group_info(&name)
    }

    /// Adds contacts to a group (all their devices), if our role allows it.
    pub async fn add_to_group(
        &mut self,
        group: &str,
        contacts: &[String],
    ) -> Result<GroupView, Error> {
        let group_id = self.group_to_change(group).await?;
        self.check_can_inform(&group_id)?;
        let role = self.my_role(&group_id)?;
        if !load_policies(&self.db, &group_id)?.adding.allows(role) {
            return Err(Error::Usage(format!(
                "only admins may add members to {group}"
            )));
        }
        let members: HashSet<String> = self.member_accounts(&group_id)?;
        let mut claims = Vec::new();
        for contact in contacts {
            let account: Option<String> = self
                .db
                .query_row(
                    "SELECT account_id FROM contacts WHERE name = ?1 AND state = 'accepted'",
                    params![contact],
                    |row| row.get(0),
                )
                .optional()?;
            if account
                .as_ref()
                .is_some_and(|account| members.contains(account))
            {
                return Err(Error::Usage(format!("{contact} is in {group} already")));
            }
            claims.push(self.claim_contact(contact).await?);
        }
        if claims.is_empty() {
            return self.group_info(group);
        }
        let before = self.member_accounts(&group_id)?;
        let added = self
            .commit_membership(&group_id, &claims, Gone::NOBODY)
            .await;
        let now_in = self.member_accounts(&group_id)?;
        let added = match added {
            Err(error) if now_in == before => return Err(error),
            other => other,
        };
        // The newcomers learn the group's name, roles and permissions from this (also those of
        // the batches that went in when a later one failed).
        let names: Vec<String> = claims
            .iter()
            .filter(|claimed| {
                now_in.contains(&claimed.account) && !before.contains(&claimed.account)
            })
            .map(|claimed| display_name(&self.db, &claimed.account))
            .collect::<Result<_, _>>()?;
        db::in_transaction(&self.db, |db| {
            let info = load_info(db, &group_id)?;
            self.queue_app_message_in(db, &group_id, info_message(db, &group_id, &info)?, None)?;
            notice(
                db,
                &group_id,
                None,
                None,
                &format!("you added {}", names.join(", ")),
            )?;
            Ok(())
        })?;
        self.flush_outbox().await?;
        if let Err(error) = added {
            return Err(partly_added(group, error));
        }
        self.group_info(group)
    }

    /// Removes members (all their devices) from a group, if our role allows it.
    pub async fn remove_from_group(
        &mut self,
        group: &str,
        members: &[String],
    ) -> Result<GroupView, Error> {
        let group_id = self.group_to_change(group).await?;
        let my_role = self.my_role(&group_id)?;
        let me = self.account_id().to_string();
        let mut accounts = Vec::new();
        for member in members {
            let (account, role) = self.member_named(&group_id, member)?;
            if account == me {
                return Err(Error::Usage(format!(
                    "to leave {group}, use `miyu group leave {group}`"
                )));
            }
            if my_role < Role::Admin || my_role <= role {
                return Err(Error::Usage(format!(
                    "you may not remove {member} from {group}: admins remove members, the owner also admins"
                )));
            }
            accounts.push(account);
        }
        self.commit_membership(&group_id, &[], Gone::Accounts(&accounts))
            .await?;
        let names = members.join(", ");
        db::in_transaction(&self.db, |db| {
            notice(db, &group_id, None, None, &format!("you removed {names}"))?;
            Ok(())
        })?;
        self.group_info(group)
    }

    /// Leaves a group: the members are told (an admin's device then removes ours), the server
    /// stops delivering it, and this device forgets the group's keys. The history stays.
    pub async fn leave_group(&mut self, group: &str) -> Result<(), Error> {
        let group_id = self.group_named(group)?;
        self.check_active(&group_id, group)?;
        // A group whose owner left would have nobody to change roles: hand it over first.
        if self.my_role(&group_id)? == Role::Owner && self.member_accounts(&group_id)?.len() > 1 {
            return Err(Error::Usage(format!(
                "you own {group}: hand it over first with `miyu group role {group} MEMBER owner`"
            )));
        }
        db::in_transaction(&self.db, |db| {
            db.execute(
                "UPDATE groups SET state = 'left', leaving = 1 WHERE group_id = ?1",
                params![group_id],
            )?;
            self.queue_app_message_in(
                db,
                &group_id,
                wire::app_message::Body::Leave(wire::Leave {}),
                None,
            )?;
            notice(db, &group_id, None, None, "you left the group")?;
            Ok(())
        })?;
        let queued = |error: Error| {
            if error.is_transient() {
                Error::Queued(error.to_string())
            } else {
                error
            }
        };
        self.connect().await.map_err(queued)?;
        self.flush_outbox().await.map_err(queued)
    }

    /// Changes the group's name, description or permissions.
    pub async fn change_group(
        &mut self,
        group: &str,
        change: GroupChange,
    ) -> Result<GroupView, Error> {
        let group_id = self.group_to_change(group).await?;
        self.check_can_inform(&group_id)?;
        let role = self.my_role(&group_id)?;
        let old = load_info(&self.db, &group_id)?;
        let mut new = old.clone();
        if let Some(title) = &change.title {
            new.title = clean_title(title)?;
        }
        if let Some(avatar) = change.avatar {
            (new.avatar, new.avatar_mime) = clean_avatar(avatar)?;
        }
        if let Some(description) = &change.description {
            if description.chars().count() > MAX_DESCRIPTION_CHARS {
                return Err(Error::Usage(format!(
                    "a description has at most {MAX_DESCRIPTION_CHARS} characters"
                )));
            }
            new.description = clean_description(description);
        }
        new.adding = change.adding.unwrap_or(old.adding);
        new.posting = change.posting.unwrap_or(old.posting);
        new.editing = change.editing.unwrap_or(old.editing);
        if let Some(refused) = refused_change(&old, &new, role) {
            return Err(Error::Usage(format!("you may not {refused} in {group}")));
        }
        self.publish_info(&group_id, &old, &new).await?;
        let name: String = self.db.query_row(
            "SELECT name FROM groups WHERE group_id = ?1",
            params![group_id],
            |row| row.get(0),
        )?;
        self.group_info(&name)
    }

    /// Makes a member an admin, or an admin a member again. Only the owner may.
    pub async fn set_group_role(
        &mut self,
        group: &str,
        member: &str,
        role: Role,
    ) -> Result<GroupView, Error> {
        let group_id = self.group_to_change(group).await?;
        self.check_can_inform(&group_id)?;
        if self.my_role(&group_id)? != Role::Owner {
            return Err(Error::Usage(format!(
                "only the owner of {group} changes roles"
            )));
        }
        let (account, current) = self.member_named(&group_id, member)?;
        if current == Role::Owner {
            return Err(Error::Usage(
                "the owner's role changes only by handing the group over to another member".into(),
            ));
        }
        let old = load_info(&self.db, &group_id)?;
        let mut new = old.clone();
        match role {
            Role::Member => {
                new.roles.remove(&account);
            }
            Role::Owner => {
                let leaving: bool = self.db.query_row(
                    "SELECT leaving FROM group_members WHERE group_id = ?1 AND account_id = ?2",
                    params![group_id, account],
                    |row| row.get(0),
                )?;
                if leaving {
                    return Err(Error::Usage(format!(
                        "{member} is leaving {group}; hand it over to someone staying"
                    )));
                }
                // Handing over: we stay as an admin.
                new.roles.insert(account, Role::Owner);
                new.roles.insert(self.account_id().to_string(), Role::Admin);
            }
            Role::Admin => {
                new.roles.insert(account, Role::Admin);
            }
        }
        self.publish_info(&group_id, &old, &new).await?;
        self.group_info(group)
    }

    /// Stores and sends a new GroupInfo, with a notice of what changed.
    async fn publish_info(&mut self, group_id: &[u8], old: &Info, new: &Info) -> Result<(), Error> {
        if old == new {
            return Ok(());
        }
        db::in_transaction(&self.db, |db| {
            save_info(db, group_id, new)?;
            if new.title != old.title {
                rename_locally(db, group_id, &new.title)?;
            }
            self.queue_app_message_in(db, group_id, info_message(db, group_id, new)?, None)?;
            let mut names = Names::new(db);
            let text = describe_change(old, new, "you", &mut names)?;
            notice(db, group_id, None, None, &text)?;
            Ok(())
        })?;
        self.flush_outbox().await
    }

    /// The group called `group`, once caught up with it, for a change: refused unless this
    /// device is still in it.
    async fn group_to_change(&mut self, group: &str) -> Result<Vec<u8>, Error> {
        let group_id = self.group_named(group)?;
        self.connect().await?;
        self.catch_up().await?;
        self.check_active(&group_id, group)?;
        Ok(group_id)
    }

    /// Refuses a change that would have to send the group's info while members added without
    /// permission are in (it would reach them), before anything is committed.
    fn check_can_inform(&self, group_id: &[u8]) -> Result<(), Error> {
        let info = wire::app_message::Body::GroupInfo(wire::GroupInfo::default());
        check_can_send(&self.db, group_id, &self.account_id().to_string(), &info)
    }

    fn check_active(&self, group_id: &[u8], group: &str) -> Result<(), Error> {
        let (_, state) = group_state(&self.db, group_id)?.unwrap_or_default();
        if state != "active" {
            return Err(Error::Usage(format!("you are no longer in {group}")));
        }
        Ok(())
    }

    fn member_accounts(&self, group_id: &[u8]) -> Result<HashSet<String>, Error> {
        let mut statement = self
            .db
            .prepare("SELECT account_id FROM group_members WHERE group_id = ?1")?;
        let accounts = statement
            .query_map(params![group_id], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(accounts)
    }

    /// A member by the name `group info` shows (with or without its `~`), or by account id.
    fn member_named(&self, group_id: &[u8], name: &str) -> Result<(String, Role), Error> {
        let mut statement = self
            .db
            .prepare("SELECT account_id, role FROM group_members WHERE group_id = ?1")?;
        let rows: Vec<(String, String)> = statement
            .query_map(params![group_id], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut found = Vec::new();
        for (account, role) in rows {
            let shown = display_name(&self.db, &account)?;
            if shown == name || shown.strip_prefix('~') == Some(name) || account == name {
                found.push((account, Role::from_stored(&role)));
            }
        }
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => Err(Error::Usage(format!(
                "no member called {name:?}; `miyu group info` lists them"
            ))),
            _ => Err(Error::Usage(format!(
                "more than one member is called {name:?}; use the account id from `miyu group info --json`"
            ))),
        }
    }

    /// Commits adding or removing members, retrying when another member's commit takes the
    /// epoch first (the server's compare-and-set). Returns once the server has stored it.
    /// Additions go in batches of at most [`ADD_BATCH_DEVICES`] devices, one commit each.
    async fn commit_membership(
        &mut self,
        group_id: &[u8],
        add: &[Claimed],
        remove: Gone<'_>,
    ) -> Result<(), Error> {
        if add.is_empty() {
            return self.commit_membership_once(group_id, &[], remove).await;
        }
        let present = match mls::load_group(&Provider::new(&self.db), group_id)? {
            Some(group) => mls::members(&group).len(),
            None => 0,
        };
        let adding: usize = add.iter().map(|claimed| claimed.devices.len()).sum();
        check_group_size(present, adding)?;
        for batch in add_batches(add) {
            self.commit_membership_once(group_id, batch, remove).await?;
        }
        Ok(())
    }

    pub(crate) async fn commit_membership_once(
        &mut self,
        group_id: &[u8],
        add: &[Claimed],
        remove: Gone<'_>,
    ) -> Result<(), Error> {
        for _ in 0..COMMIT_ATTEMPTS {
            let prepared = db::in_transaction(&self.db, |db| {
                let provider = Provider::new(db);
                let mut group = mls::load_group(&provider, group_id)?
                    .ok_or_else(|| Error::Usage("group state is missing".into()))?;
                if mls::has_pending_commit(&group) {
                    mls::discard_own_commit(&provider, &mut group)?;
                }
                let members = mls::members(&group);
                let present: HashSet<DeviceId> = members
                    .iter()
                    .map(|(_, certificate)| certificate.device_id())
                    .collect();
                // Someone may have done it meanwhile.
                let adding: Vec<(DeviceId, &KeyPackage)> = add
                    .iter()
                    .flat_map(|c| c.devices.iter().copied().zip(c.key_packages.iter()))
                    .filter(|(device, _)| !present.contains(device))
                    .collect();
                let leaving: Vec<(u32, DeviceId)> = members
                    .iter()
                    .filter(|(_, certificate)| remove.covers(certificate))
                    .map(|(leaf, certificate)| (*leaf, certificate.device_id()))
                    .collect();
                if adding.is_empty() && leaving.is_empty() {
                    return Ok(None);
                }
                let epoch = group.epoch().as_u64();
                let (commit, welcome) = if adding.is_empty() {
                    let leaves: Vec<u32> = leaving.iter().map(|(leaf, _)| *leaf).collect();
                    (
                        mls::remove_members(
                            &provider,
                            &self.keys,
                            &mut group,
                            &leaves,
                            &crate::devices::revocations(db)?,
                        )?,
                        None,
                    )
                } else {
                    let packages: Vec<KeyPackage> = adding
                        .iter()
                        .map(|(_, package)| (*package).clone())
                        .collect();
                    if is_group_id(group_id) {
                        mls::serve_tree_apart(&provider, &mut group)?;
                    }
                    let added = mls::add_members(&provider, &self.keys, &mut group, &packages)?;
                    (added.commit, Some((added.welcome, added.tree)))
                };
                let next_posting_key = mls::PostingKey::next(&provider, &group)?
                    .map(|key| key.public().to_vec())
                    .unwrap_or_default();
                let hash: [u8; 32] = Sha256::digest(&commit).into();
                db.execute(
                    "UPDATE conversations SET pending_commit_hash = ?1 WHERE group_id = ?2",
                    params![hash.as_slice(), group_id],
                )?;
                let added: Vec<DeviceId> = if welcome.is_some() {
                    adding.iter().map(|(device, _)| *device).collect()
                } else {
                    Vec::new()
                };
                let removed: Vec<DeviceId> = if welcome.is_none() {
                    leaving.iter().map(|(_, device)| *device).collect()
                } else {
                    Vec::new()
                };
                Ok(Some((
                    wire::Commit {
                        group_id: group_id.to_vec(),
                        epoch,
                        payload: commit,
                        welcomes: Vec::new(),
                        welcome: Vec::new(),
                        next_posting_key,
                        add_devices: added.iter().map(|d| d.as_bytes().to_vec()).collect(),
                        remove_devices: removed.iter().map(|d| d.as_bytes().to_vec()).collect(),
                    },
                    welcome,
                )))
            })?;
            let Some((mut commit, welcome)) = prepared else {
                return Ok(());
            };
            if let Some((welcome, _)) = welcome.as_ref().filter(|_| !is_group_id(group_id)) {
                // A conversation of two carries its small tree in the Welcome.
                commit.welcome = wire::WelcomePackage {
                    welcome: welcome.clone(),
                    ..Default::default()
                }
                .encode_to_vec();
            } else if let Some((welcome, tree)) = welcome {
                // The newcomers' tree goes up first, so that it is there when they read the
                // Welcome; only members of the group (they, once added) may download it.
                let uploaded = files::BlobClient::new(&self.keys, &self.server, self.proxy)
                    .upload_whole(Some(group_id), tree.blob)
                    .await;
                let blob_id = match uploaded {
                    Ok(blob_id) => blob_id,
                    Err(error) => {
                        db::in_transaction(&self.db, |db| {
                            settle_own_commit(db, group_id, Verdict::Lost)
                        })?;
                        return Err(error);
                    }
                };
                commit.welcome = wire::WelcomePackage {
                    welcome,
                    tree_blob: blob_id.0.to_vec(),
                    tree_size: tree.plaintext_len,
                }
                .encode_to_vec();
            }
            match self.call(Request::Commit(commit)).await {
                Ok(Reply::Posted(_)) => {
                    db::in_transaction(&self.db, |db| {
                        settle_own_commit(db, group_id, Verdict::Accepted)
                    })?;
                    return Ok(());
                }
                Ok(other) => return Err(Error::Protocol(format!("unexpected answer: {other:?}"))),
                Err(Error::Server(error)) if error.code == wire::ErrorCode::EpochMismatch => {
                    // Another member's commit took the epoch: follow it, then try again.
                    db::in_transaction(&self.db, |db| {
                        settle_own_commit(db, group_id, Verdict::Lost)
                    })?;
                    self.wait_for_epoch(group_id, error.current_epoch).await?;
                }
                // Its fate is learnt when caught up on the next connection.
                Err(error) if error.is_transient() => return Err(error),
                Err(error) => {
                    db::in_transaction(&self.db, |db| {
                        settle_own_commit(db, group_id, Verdict::Lost)
                    })?;
                    return Err(error);
                }
            }
        }
        Err(Error::Network(
            "the group kept changing while committing; try again".into(),
        ))
    }

    /// Makes an invite link for the group: whoever uses it becomes our contact and asks to
    /// join; with `approval` we decide (`approve_request`), else they are added at our next
    /// sync. The link serves `uses` people (1 to 1,000) for 30 days.
    pub async fn group_invite(
        &mut self,
        group: &str,
        uses: u32,
        approval: bool,
    ) -> Result<miyu_proto::InviteLink, Error> {
        let group_id = self.group_named(group)?;
        self.check_active(&group_id, group)?;
        if !(1..=1000).contains(&uses) {
            return Err(Error::Usage("a link serves 1 to 1,000 people".into()));
        }
        let role = self.my_role(&group_id)?;
        if !load_policies(&self.db, &group_id)?.adding.allows(role) {
            return Err(Error::Usage(format!("only admins may invite to {group}")));
        }
        self.create_invite(uses, Some(&group_id), approval).await
    }

    /// Who asked to join the group through our links and waits for our answer.
    pub fn join_requests(&self, group: &str) -> Result<Vec<JoinRequest>, Error> {
        let group_id = self.group_named(group)?;
        let rows: Vec<(String, u64)> = {
            let mut statement = self.db.prepare(
                "SELECT account_id, requested_at_ms FROM group_requests
                 WHERE group_id = ?1 AND state = 'waiting' ORDER BY requested_at_ms",
            )?;
            statement
                .query_map(params![group_id], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect::<Result<_, _>>()?
        };
        rows.into_iter()
            .map(|(account_id, requested_at_ms)| {
                Ok(JoinRequest {
                    name: display_name(&self.db, &account_id)?,
                    account_id,
                    requested_at_ms,
                })
            })
            .collect()
    }

    fn request_named(&self, group_id: &[u8], name: &str) -> Result<String, Error> {
        let waiting: Vec<String> = {
            let mut statement = self.db.prepare(
                "SELECT account_id FROM group_requests WHERE group_id = ?1 AND state = 'waiting'",
            )?;
            statement
                .query_map(params![group_id], |row| row.get(0))?
                .collect::<Result<_, _>>()?
        };
        for account in waiting {
            if display_name(&self.db, &account)? == name || account == name {
                return Ok(account);
            }
        }
        Err(Error::Usage(format!(
            "{name} has not asked to join; `miyu group requests` lists who has"
        )))
    }

    /// Adds someone who asked to join through the group's link.
    pub async fn approve_request(&mut self, group: &str, name: &str) -> Result<GroupView, Error> {
        let group_id = self.group_named(group)?;
        let account = self.request_named(&group_id, name)?;
        let contact: String = self.db.query_row(
            "SELECT name FROM contacts WHERE account_id = ?1 AND state = 'accepted'",
            params![account],
            |row| row.get(0),
        )?;
        let already_in = self.member_accounts(&group_id)?.contains(&account);
        let view = if already_in {
            self.group_info(group)?
        } else {
            self.add_to_group(group, std::slice::from_ref(&contact))
                .await?
        };
        self.db.execute(
            "DELETE FROM group_requests WHERE group_id = ?1 AND account_id = ?2",
            params![group_id, account],
        )?;
        Ok(view)
    }

    /// The group's invite links this device made that can still be used.
    pub fn group_links(&self, group: &str) -> Result<Vec<GroupLink>, Error> {
        let group_id = self.group_named(group)?;
        let mut statement = self.db.prepare(
            "SELECT rowid, created_at_ms, uses_left, approval FROM invites
             WHERE group_id = ?1 AND used = 0 AND created_at_ms > ?2 ORDER BY rowid",
        )?;
        let links = statement
            .query_map(
                params![group_id, now_ms().saturating_sub(crate::INVITE_LIFETIME_MS)],
                |row| {
                    Ok(GroupLink {
                        id: row.get(0)?,
                        created_at_ms: row.get(1)?,
                        uses_left: row.get(2)?,
                        approval: row.get(3)?,
                    })
                },
            )?
            .collect::<Result<_, _>>()?;
        Ok(links)
    }

    /// Revokes one of the group's links at once: whoever uses it afterwards is a stranger to
    /// this device (a message request), not someone asking to join. The server still lets
    /// the link be claimed until it is used up or expires, which spends key packages.
    pub fn revoke_group_link(&self, group: &str, id: i64) -> Result<(), Error> {
        let group_id = self.group_named(group)?;
        let revoked = self.db.execute(
            "UPDATE invites SET used = 1, uses_left = 0 WHERE rowid = ?1 AND group_id = ?2 AND used = 0",
            params![id, group_id],
        )?;
        if revoked == 0 {
            return Err(Error::Usage(format!(
                "no usable link #{id} for {group}; `miyu group links {group}` lists them"
            )));
        }
        Ok(())
    }

    /// Refuses someone who asked to join; they are not told (they stay a contact).
    pub fn deny_request(&self, group: &str, name: &str) -> Result<(), Error> {
        let group_id = self.group_named(group)?;
        let account = self.request_named(&group_id, name)?;
        self.db.execute(
            "DELETE FROM group_requests WHERE group_id = ?1 AND account_id = ?2",
            params![group_id, account],
        )?;
        Ok(())
    }

    /// Adds those who joined through a link that needs no approval.
    pub(crate) async fn admit_requests(&mut self) -> Result<(), Error> {
        let approved: Vec<(Vec<u8>, String, String, String)> = {
            let mut statement = self.db.prepare(
                "SELECT r.group_id, r.account_id, g.name, c.name FROM group_requests r
                 JOIN groups g ON g.group_id = r.group_id
                 JOIN contacts c ON c.account_id = r.account_id AND c.state = 'accepted'
                 WHERE r.state = 'approved' AND g.state = 'active' AND g.leaving = 0",
            )?;
            statement
                .query_map([], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                })?
                .collect::<Result<_, _>>()?
        };
        for (group_id, account, group, contact) in approved {
            match self
                .add_to_group(&group, std::slice::from_ref(&contact))
                .await
            {
                Ok(_) => {
                    self.db.execute(
                        "DELETE FROM group_requests WHERE group_id = ?1 AND account_id = ?2",
                        params![group_id, account],
                    )?;
                }
                Err(error) if error.is_transient() => return Err(error),
                Err(error) => {
                    // Left for the user to answer (`group requests`), not dropped.
                    tracing::warn!("could not add someone who used a group link: {error}");
                    self.db.execute(
                        "UPDATE group_requests SET state = 'waiting' WHERE group_id = ?1 AND account_id = ?2",
                        params![group_id, account],
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Commits the removal of members who said they leave, where we are an admin.
    pub(crate) async fn remove_leavers(&mut self) -> Result<(), Error> {
        let me = self.account_id().to_string();
        let leavers: Vec<(Vec<u8>, String)> = {
            let mut statement = self.db.prepare(
                "SELECT m.group_id, m.account_id FROM group_members m JOIN groups g ON g.group_id = m.group_id
                 WHERE m.leaving = 1 AND g.state = 'active' AND g.leaving = 0
                 AND EXISTS (SELECT 1 FROM group_members a WHERE a.group_id = m.group_id
                             AND a.account_id = ?1 AND a.role IN ('owner', 'admin'))",
            )?;
            statement
                .query_map(params![me], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect::<Result<_, _>>()?
        };
        for (group_id, account) in leavers {
            match self
                .commit_membership(
                    &group_id,
                    &[],
                    Gone::Accounts(std::slice::from_ref(&account)),
                )
                .await
            {
                Ok(()) => {}
                Err(error) if error.is_transient() => return Err(error),
                Err(error) => tracing::warn!("could not remove a member who left: {error}"),
            }
        }
        Ok(())
    }

    /// Declines the groups we were added to whose adder never said what they are: without its
    /// GroupInfo within [`PENDING_DAYS`] days the device would stay a silent member for good,
    /// receiving the group's traffic.
    pub(crate) async fn decline_silent_groups(&mut self) -> Result<(), Error> {
        let stale = silent_groups(&self.db, now_ms())?;
        if stale.is_empty() {
            return Ok(());
        }
        db::in_transaction(&self.db, |db| {
            for group_id in &stale {
                self.decline(db, group_id)?;
            }
            Ok(())
        })?;
        self.flush_outbox().await
    }

    /// Tells the server about groups we left (or declined) once the Leave is posted, and
    /// forgets their keys.
    pub(crate) async fn finish_leaving(&mut self) -> Result<(), Error> {
        let leaving: Vec<Vec<u8>> = {
            let mut statement = self.db.prepare_cached(
                "SELECT group_id FROM groups g WHERE leaving = 1
                 AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.group_id = g.group_id)",
            )?;
            statement
                .query_map([], |row| row.get(0))?
                .collect::<Result<_, _>>()?
        };
        for group_id in leaving {
            match self
                .call(Request::LeaveGroup(wire::LeaveGroup {
                    group_id: group_id.clone(),
                }))
                .await
            {
                Ok(_) => {}
                // Removed already, or never announced: nothing to end.
                Err(Error::Server(error))
                    if matches!(
                        error.code,
                        wire::ErrorCode::Forbidden | wire::ErrorCode::NotFound
                    ) => {}
                Err(error) => return Err(error),
            }
            db::in_transaction(&self.db, |db| {
                mls::delete_group(&Provider::new(db), &group_id)?;
                db.execute(
                    "UPDATE groups SET leaving = 0,
                     state = CASE state WHEN 'pending' THEN 'declined' ELSE state END
                     WHERE group_id = ?1",
                    params![group_id],
                )?;
                Ok(())
            })?;
        }
        Ok(())
    }

    /// The group's picture and its MIME type, if it has one.
    pub fn group_avatar(&self, group: &str) -> Result<Option<(Vec<u8>, String)>, Error> {
        let group_id = self.group_named(group)?;
        let info = load_info(&self.db, &group_id)?;
        Ok((!info.avatar.is_empty()).then_some((info.avatar, info.avatar_mime)))
    }

    /// The groups this device is or was in (not those it declined).
    pub fn groups(&self) -> Result<Vec<GroupView>, Error> {
        let names: Vec<String> = {
            let mut statement = self.db.prepare(
                "SELECT name FROM groups WHERE state IN ('active', 'left', 'removed') ORDER BY created_at_ms",
            )?;
            statement
                .query_map([], |row| row.get(0))?
                .collect::<Result<_, _>>()?
        };
        names.iter().map(|name| self.group_info(name)).collect()
    }

    pub fn group_info(&self, group: &str) -> Result<GroupView, Error> {
        let group_id = self.group_named(group)?;
        let info = load_info(&self.db, &group_id)?;
        let (name, state) = group_state(&self.db, &group_id)?.unwrap_or_default();
        let me = self.account_id().to_string();
        let rows: Vec<(String, String, bool)> = {
            let mut statement = self.db.prepare(
                "SELECT account_id, role, unapproved FROM group_members WHERE group_id = ?1",
            )?;
            statement
                .query_map(params![group_id], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                })?
                .collect::<Result<_, _>>()?
        };
        let mut names = Names::new(&self.db);
        let mut members = Vec::with_capacity(rows.len());
        for (account, role, unapproved) in rows {
            members.push(MemberView {
                name: if account == me {
                    "me".into()
                } else {
                    names.of(&account)?
                },
                me: account == me,
                account_id: account,
                role: Role::from_stored(&role),
                unapproved,
            });
        }
        // Roles first, then this device's account, then by name.
        members.sort_by(|a, b| {
            b.role
                .cmp(&a.role)
                .then_with(|| b.me.cmp(&a.me))
                .then_with(|| a.name.cmp(&b.name))
        });
        let my_role = members
            .iter()
            .find(|member| member.me)
            .map_or(Role::Member, |member| member.role);
        let unread: u64 = self.db.query_row(
            &format!(
                "SELECT COUNT(*) FROM messages m WHERE m.group_id = ?1 AND {}",
                crate::mirror::UNREAD
            ),
            params![group_id],
            |row| row.get(0),
        )?;
        Ok(GroupView {
            name,
            avatar_bytes: info.avatar.len(),
            avatar_mime: (!info.avatar.is_empty()).then_some(info.avatar_mime),
            title: info.title,
            description: info.description,
            adding: info.adding,
            posting: info.posting,
            editing: info.editing,
            state,
            my_role,
            members,
            unread,
        })
    }

    /// An application message in a group, from `sender` (a member, as MLS proved).
    pub(crate) fn on_group_message(
        &self,
        db: &Connection,
        entry: &wire::GroupEntry,
        sender: &VerifiedCertificate,
        plaintext: &[u8],
    ) -> Result<Option<Event>, Error> {
        let Ok(message) = wire::AppMessage::decode(plaintext) else {
            tracing::debug!("dropped a message that is not a Miyu message");
            return Ok(None);
        };
        if i64::try_from(message.sent_at_ms).is_err() {
            return Ok(None);
        }
        let group_id = entry.group_id.as_slice();
        let account = sender.account_id().to_string();
        if privacy::is_blocked(db, &account)? {
            return Ok(None);
        }
        let Some((group_name, state)) = group_state(db, group_id)? else {
            return Ok(None);
        };
        let sender_name = display_name(db, &account)?;
        let role = role_of(db, group_id, &account)?.unwrap_or(Role::Member);
        let received = Received {
            group_id,
            seq: entry.seq,
            contact_account: &account,
            contact_name: &sender_name,
            conversation_name: &group_name,
            sender: Some(&account),
            message_id: &message.message_id,
            sent_at_ms: message.sent_at_ms,
            expires_in_s: message.expires_in_s,
            own: sender.account_id() == self.account_id(),
        };
        if state == "pending" {
            return match message.body {
                Some(wire::app_message::Body::GroupInfo(info)) => {
                    self.on_first_info(db, &received, &info)
                }
                // Nothing is kept from a group before we know who added us.
                _ => Ok(None),
            };
        }
        if state != "active" {
            return Ok(None);
        }
        let refuse = |what: &str| {
            notice(
                db,
                group_id,
                Some(entry.seq),
                Some(&account),
                &format!("{sender_name} may not {what} in this group; refused"),
            )
            .map(Some)
        };
        let posting = load_policies(db, group_id)?.posting;
        match message.body {
            Some(wire::app_message::Body::GroupInfo(info)) => on_info(db, &received, role, &info),
            // Another device of ours left: the account leaves, this device too.
            Some(wire::app_message::Body::Leave(_)) if received.own => {
                db.execute(
                    "UPDATE groups SET state = 'left', leaving = 1 WHERE group_id = ?1",
                    params![group_id],
                )?;
                self.queued_while_processing.set(true);
                notice(db, group_id, Some(entry.seq), None, "you left the group").map(Some)
            }
            Some(wire::app_message::Body::Leave(_)) => {
                let changed = db.execute(
                    "UPDATE group_members SET leaving = 1 WHERE group_id = ?1 AND account_id = ?2 AND leaving = 0",
                    params![group_id, account],
                )?;
                if changed == 0 {
                    return Ok(None);
                }
                notice(
                    db,
                    group_id,
                    Some(entry.seq),
                    Some(&account),
                    &format!("{sender_name} left the group"),
                )
                .map(Some)
            }
            Some(wire::app_message::Body::Profile(profile)) => {
                let name = crate::profile_name(&profile);
                if !name.is_empty() {
                    db.execute(
                        "UPDATE group_members SET name = ?3 WHERE group_id = ?1 AND account_id = ?2",
                        params![group_id, account, name],
                    )?;
                }
                Ok(None)
            }
            Some(wire::app_message::Body::Text(_) | wire::app_message::Body::File(_))
                if !posting.allows(role) =>
            {
                refuse("post")
            }
            Some(wire::app_message::Body::Text(text)) => {
                let mut event = privacy::store_text(db, &received, &text)?;
                let me = self.account_id();
                if text.mentions.iter().any(|m| m.as_slice() == me.as_bytes())
                    && let Some(Event::Message(view)) = &mut event
                {
                    db.execute(
                        "UPDATE messages SET mentions_me = 1 WHERE id = ?1",
                        params![view.id],
                    )?;
                    view.mentions_me = true;
                }
                Ok(event)
            }
            Some(wire::app_message::Body::File(file)) => files::store_file(db, &received, &file),
            Some(wire::app_message::Body::Reaction(reaction)) => {
                features::on_reaction(db, &received, &reaction)
            }
            Some(wire::app_message::Body::Edit(edit)) => features::on_edit(db, &received, &edit),
            Some(wire::app_message::Body::Delete(delete)) => {
                features::on_delete(db, &received, &delete)
            }
            Some(wire::app_message::Body::Timer(timer)) => {
                if !load_policies(db, group_id)?.editing.allows(role) {
                    return refuse("change the disappearing-message timer");
                }
                on_group_timer(db, &received, timer.seconds)
            }
            // Receipts, typing and presence are between contacts only.
            _ => Ok(None),
        }
    }

    /// Leaves a group we were added to without ever showing it.
    fn decline(&self, db: &Connection, group_id: &[u8]) -> Result<(), Error> {
        db.execute(
            "UPDATE groups SET leaving = 1 WHERE group_id = ?1",
            params![group_id],
        )?;
        self.queue_app_message_in(
            db,
            group_id,
            wire::app_message::Body::Leave(wire::Leave {}),
            None,
        )?;
        self.queued_while_processing.set(true);
        Ok(())
    }

    /// The first GroupInfo of a group we were added to: it says who added us, which decides,
    /// by the "who can add me to groups" setting, whether we stay or decline.
    fn on_first_info(
        &self,
        db: &Connection,
        received: &Received<'_>,
        wire_info: &wire::GroupInfo,
    ) -> Result<Option<Event>, Error> {
        let adder = received.contact_account;
        // Only the member who signed our Welcome speaks for the group while we wait: another
        // member racing to post first cannot make us decline, nor dictate the roles. Once we
        // decline, nothing changes our mind.
        let (expected_adder, leaving): (Option<String>, bool) = db.query_row(
            "SELECT adder, leaving FROM groups WHERE group_id = ?1",
            params![received.group_id],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?;
        if leaving || expected_adder.as_deref() != Some(adder) {
            return Ok(None);
        }
        // The adder's info must be well formed and entitle it to add by its own account;
        // otherwise the group would never be shown: decline it.
        let info =
            Info::from_wire(wire_info).filter(|info| info.adding.allows(info.role_of(adder)));
        let Some(info) = info else {
            tracing::debug!("declined a group whose adder sent an unusable GroupInfo");
            return self.decline(db, received.group_id).map(|()| None);
        };
        let is_contact: bool = db
            .query_row(
                "SELECT 1 FROM contacts WHERE account_id = ?1 AND state = 'accepted'",
                params![adder],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        // We asked this account to add us, through its group's link.
        let expected: bool = db
            .query_row(
                "SELECT 1 FROM expected_groups WHERE account_id = ?1 AND until_ms > ?2",
                params![adder, now_ms()],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        // Another device of ours added us.
        let allowed = expected
            || adder == self.account_id().to_string()
            || match Settings::load(db)?.group_invites {
                GroupInvites::Nobody => false,
                GroupInvites::Contacts => is_contact,
                GroupInvites::Everyone => true,
            };
        let group_id = received.group_id;
        if !allowed {
            tracing::debug!("declined a group: its adder may not add us");
            return self.decline(db, group_id).map(|()| None);
        }
        if expected {
            db.execute(
                "DELETE FROM expected_groups WHERE account_id = ?1",
                params![adder],
            )?;
        }
        let name = db::free_group_name(db, &info.title, group_id)?;
        db.execute(
            "UPDATE groups SET state = 'active', name = ?2 WHERE group_id = ?1",
            params![group_id, name],
        )?;
        save_info(db, group_id, &info)?;
        learn_names(db, group_id, wire_info)?;
        self.queue_app_message_in(
            db,
            group_id,
            wire::app_message::Body::Profile(wire::Profile {
                name: self.name.clone(),
                invite_proof: Vec::new(),
            }),
            None,
        )?;
        self.queued_while_processing.set(true);
        let text = format!("{} added you to {}", received.contact_name, info.title);
        notice(db, group_id, Some(received.seq), Some(adder), &text).map(Some)
    }
}

/// A picture as it may be sent: a JPEG, PNG or WebP without its metadata, at most 64 KiB.
fn clean_avatar(bytes: Vec<u8>) -> Result<(Vec<u8>, String), Error> {
    if bytes.is_empty() {
        return Ok((Vec::new(), String::new()));
    }
    let kind = crate::strip::sniff(&bytes)
        .ok_or_else(|| Error::Usage("a group picture is a JPEG, PNG or WebP image".into()))?;
    if bytes.len() as u64 > crate::strip::MAX_STRIP_BYTES {
        return Err(Error::Usage("that picture is far too large".into()));
    }
    let clean = crate::strip::strip_metadata(kind, bytes)
        .map_err(|error| Error::Usage(format!("that picture cannot be read: {error}")))?;
    if clean.len() > MAX_AVATAR_BYTES {
        return Err(Error::Usage(format!(
            "a group picture is at most {} KiB; this one is {} KiB",
            MAX_AVATAR_BYTES / 1024,
            clean.len().div_ceil(1024)
        )));
    }
    Ok((clean, kind.mime().to_string()))
}

/// What a change of `old` into `new` would need that `role` does not have, if anything.
fn refused_change(old: &Info, new: &Info, role: Role) -> Option<&'static str> {
    if (new.title != old.title || new.description != old.description || new.avatar != old.avatar)
        && !old.editing.allows(role)
    {
        return Some("change the group's name, description or picture");
    }
    if (new.adding, new.posting, new.editing) != (old.adding, old.posting, old.editing)
        && role < Role::Admin
    {
        return Some("change who may add, post or edit");
    }
    let owners = |info: &Info| -> Vec<String> {
        info.roles
            .iter()
            .filter(|(_, role)| **role == Role::Owner)
            .map(|(account, _)| account.clone())
            .collect()
    };
    // Only the owner hands the group over, to exactly one member (roles of non-members were
    // dropped before), and stays in it as an admin or a member.
    if owners(old) != owners(new) && (role != Role::Owner || owners(new).len() != 1) {
        return Some("change the owner");
    }
    if old.roles != new.roles && role != Role::Owner {
        return Some("change roles");
    }
    None
}

/// Says what changed between two infos, as `who` did it.
fn describe_change(
    old: &Info,
    new: &Info,
    who: &str,
    names: &mut Names<'_>,
) -> Result<String, Error> {
    let mut parts = Vec::new();
    if new.title != old.title {
        parts.push(format!("renamed the group to {}", new.title));
    }
    if new.description != old.description {
        parts.push("changed the description".to_string());
    }
    if new.avatar != old.avatar {
        parts.push(if new.avatar.is_empty() {
            "removed the group's picture".to_string()
        } else {
            "changed the group's picture".to_string()
        });
    }
    let policy = |policy: Policy| match policy {
        Policy::Admins => "admins",
        Policy::Everyone => "everyone",
    };
    if new.adding != old.adding {
        parts.push(format!("let {} add members", policy(new.adding)));
    }
    if new.posting != old.posting {
        parts.push(format!("let {} post", policy(new.posting)));
    }
    if new.editing != old.editing {
        parts.push(format!(
            "let {} change the name and description",
            policy(new.editing)
        ));
    }
    let accounts: std::collections::BTreeSet<&String> =
        old.roles.keys().chain(new.roles.keys()).collect();
    for account in accounts {
        let (before, after) = (old.role_of(account), new.role_of(account));
        if before != after {
            parts.push(format!("made {} {}", names.of(account)?, after.as_str()));
        }
    }
    if parts.is_empty() {
        parts.push("sent the group's info again".into());
    }
    Ok(format!("{who} {}", parts.join(", ")))
}

fn rename_locally(db: &Connection, group_id: &[u8], title: &str) -> Result<(), Error> {
    let name = db::free_group_name(db, title, group_id)?;
    db.execute(
        "UPDATE groups SET name = ?2 WHERE group_id = ?1",
        params![group_id, name],
    )?;
    Ok(())
}

/// A GroupInfo in an active group: applied if the sender's role allows every change in it,
/// refused whole otherwise.
fn on_info(
    db: &Connection,
    received: &Received<'_>,
    role: Role,
    info: &wire::GroupInfo,
) -> Result<Option<Event>, Error> {
    let Some(mut new) = Info::from_wire(info) else {
        return Ok(None);
    };
    let group_id = received.group_id;
    learn_names(db, group_id, info)?;
    let old = load_info(db, group_id)?;
    // Roles of accounts that are not (or no longer) members mean nothing here.
    let members: HashSet<String> = {
        let mut statement =
            db.prepare_cached("SELECT account_id FROM group_members WHERE group_id = ?1")?;
        statement
            .query_map(params![group_id], |row| row.get(0))?
            .collect::<Result<_, _>>()?
    };
    new.roles.retain(|account, _| members.contains(account));
    if new == old {
        return Ok(None);
    }
    if let Some(refused) = refused_change(&old, &new, role) {
        let text = format!(
            "{} tried to {refused} without permission; the change was refused",
            received.contact_name
        );
        return notice(db, group_id, Some(received.seq), received.sender, &text).map(Some);
    }
    save_info(db, group_id, &new)?;
    if new.title != old.title {
        rename_locally(db, group_id, &new.title)?;
    }
    let mut names = Names::new(db);
    let text = describe_change(&old, &new, received.contact_name, &mut names)?;
    notice(db, group_id, Some(received.seq), received.sender, &text).map(Some)
}

/// A member set the group's disappearing-message timer.
fn on_group_timer(
    db: &Connection,
    received: &Received<'_>,
    seconds: u32,
) -> Result<Option<Event>, Error> {
    if !privacy::valid_timer(seconds) {
        return Ok(None);
    }
    db.execute(
        "UPDATE conversations SET timer_s = ?1 WHERE group_id = ?2",
        params![seconds, received.group_id],
    )?;
    let body = privacy::timer_notice(received.contact_name, seconds);
    let inserted = db.execute(
        "INSERT OR IGNORE INTO messages (group_id, message_id, outgoing, body, sent_at_ms, received_at_ms, state, seq, kind, sender)
         VALUES (?1, ?2, 0, ?3, ?4, ?5, 'received', ?6, 'timer', ?7)",
        params![
            received.group_id,
            received.message_id,
            body,
            received.sent_at_ms,
            now_ms(),
            received.seq,
            received.sender
        ],
    )?;
    Ok((inserted > 0).then(|| {
        Event::Message(MessageView {
            id: db.last_insert_rowid(),
            contact: received.conversation_name.to_string(),
            from: received.contact_name.to_string(),
            body,
            sent_at_ms: received.sent_at_ms,
            state: MessageState::Received,
            kind: MessageKind::Timer,
            ..Default::default()
        })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use miyu_crypto::identity::AccountKeys;

    fn database(folder: &tempfile::TempDir, name: &str) -> Connection {
        let mut db = Connection::open(folder.path().join(name)).unwrap();
        crate::db::configure(&mut db).unwrap();
        db
    }

    fn keys() -> AccountKeys {
        AccountKeys::generate(&mut rand::rngs::OsRng)
    }

    fn account(keys: &AccountKeys) -> String {
        keys.certificate().account_id().to_string()
    }

    /// A group in `db` as this device would hold it after joining: `owner` owns it, `admin`
    /// administers it, `member` is a member.
    fn known_group(db: &Connection, group_id: &[u8], owner: &str, admin: &str, member: &str) {
        db.execute(
            "INSERT INTO conversations (group_id, contact, scope) VALUES (?1, NULL, ?2)",
            params![group_id, scope(group_id)],
        )
        .unwrap();
        db.execute(
            "INSERT INTO groups (group_id, name, title, state, created_at_ms) VALUES (?1, 'club', 'club', 'active', 0)",
            params![group_id],
        )
        .unwrap();
        for (account, role) in [(owner, "owner"), (admin, "admin"), (member, "member")] {
            db.execute(
                "INSERT INTO group_members (group_id, account_id, role, certificate) VALUES (?1, ?2, ?3, x'00')",
                params![group_id, account, role],
            )
            .unwrap();
        }
    }

    fn received<'a>(group_id: &'a [u8], sender: &'a str) -> Received<'a> {
        Received {
            group_id,
            seq: 7,
            contact_account: sender,
            contact_name: "someone",
            conversation_name: "club",
            sender: Some(sender),
            message_id: &[1; 16],
            sent_at_ms: 1,
            expires_in_s: 0,
            own: false,
        }
    }

    #[test]
    fn each_change_of_the_group_info_is_checked_against_the_senders_role() {
        let folder = tempfile::tempdir().unwrap();
        let db = database(&folder, "miyu.db");
        let (owner, admin, member) = (account(&keys()), account(&keys()), account(&keys()));
        let group_id = [3u8; GROUP_ID_LEN];
        known_group(&db, &group_id, &owner, &admin, &member);
        let current = load_info(&db, &group_id).unwrap();
        let with = |change: &dyn Fn(&mut Info)| {
            let mut info = load_info(&db, &group_id).unwrap();
            change(&mut info);
            info.to_wire().unwrap()
        };
        let refused = |event: Option<Event>| match event {
            Some(Event::Message(message)) => message.body.contains("was refused"),
            _ => false,
        };

        // A member may not rename (editing: admins), change permissions, or make itself admin.
        let rename = with(&|info| info.title = "mine now".into());
        let event = on_info(&db, &received(&group_id, &member), Role::Member, &rename).unwrap();
        assert!(refused(event));
        let open_up = with(&|info| info.posting = Policy::Admins);
        let event = on_info(&db, &received(&group_id, &member), Role::Member, &open_up).unwrap();
        assert!(refused(event));
        let promote_self = with(&|info| {
            info.roles.insert(member.clone(), Role::Admin);
        });
        let event = on_info(
            &db,
            &received(&group_id, &member),
            Role::Member,
            &promote_self,
        )
        .unwrap();
        assert!(refused(event));
        assert_eq!(load_info(&db, &group_id).unwrap(), current);

        // An admin may rename, but not change roles or the owner.
        let event = on_info(
            &db,
            &received(&group_id, &admin),
            Role::Admin,
            &promote_self,
        )
        .unwrap();
        assert!(refused(event));
        let usurp = with(&|info| {
            info.roles.insert(admin.clone(), Role::Owner);
        });
        let event = on_info(&db, &received(&group_id, &admin), Role::Admin, &usurp).unwrap();
        assert!(refused(event));
        let event = on_info(&db, &received(&group_id, &admin), Role::Admin, &rename).unwrap();
        assert!(!refused(event));
        assert_eq!(load_info(&db, &group_id).unwrap().title, "mine now");

        // The owner changes roles.
        let event = on_info(
            &db,
            &received(&group_id, &owner),
            Role::Owner,
            &promote_self,
        )
        .unwrap();
        assert!(!refused(event));
        assert_eq!(role_of(&db, &group_id, &member).unwrap(), Some(Role::Admin));
        // Nor can the owner make a second owner.
        let event = on_info(&db, &received(&group_id, &owner), Role::Owner, &usurp).unwrap();
        assert!(refused(event));
        // Handing the group over, to exactly one member, is the owner's alone.
        let hand_over = with(&|info| {
            info.roles.insert(admin.clone(), Role::Owner);
            info.roles.insert(owner.clone(), Role::Admin);
        });
        let event = on_info(&db, &received(&group_id, &admin), Role::Admin, &hand_over).unwrap();
        assert!(refused(event));
        let to_a_stranger = with(&|info| {
            info.roles.insert(account(&keys()), Role::Owner);
            info.roles.insert(owner.clone(), Role::Admin);
        });
        let event = on_info(
            &db,
            &received(&group_id, &owner),
            Role::Owner,
            &to_a_stranger,
        )
        .unwrap();
        assert!(refused(event));
        let event = on_info(&db, &received(&group_id, &owner), Role::Owner, &hand_over).unwrap();
        assert!(!refused(event));
        assert_eq!(role_of(&db, &group_id, &admin).unwrap(), Some(Role::Owner));
        assert_eq!(role_of(&db, &group_id, &owner).unwrap(), Some(Role::Admin));
    }

    #[test]
    fn additions_go_in_batches_that_keep_each_contact_whole() {
        let folder = tempfile::tempdir().unwrap();
        let db = database(&folder, "kp.db");
        let who = keys();
        let bytes = mls::new_key_package(&Provider::new(&db), &who, false).unwrap();
        let package =
            mls::check_key_package(&Provider::new(&db), &bytes, who.certificate()).unwrap();
        let contact = |devices: usize, packages: usize| Claimed {
            account: String::new(),
            devices: vec![DeviceId::from_bytes(&[1; 16]).unwrap(); devices],
            key_packages: vec![package.clone(); packages],
        };
        let sizes = |add: &[Claimed]| -> Vec<usize> {
            add_batches(add).iter().map(|batch| batch.len()).collect()
        };
        // By devices: 600 + 600 is over the bound, 600 + 300 is not; 1,500 goes alone.
        assert_eq!(
            sizes(&[contact(600, 1), contact(600, 1), contact(300, 1)]),
            [1, 2]
        );
        assert_eq!(
            sizes(&[contact(1, 1), contact(1500, 1), contact(1, 1)]),
            [1, 1, 1]
        );
        // By bytes: key packages past 640 KiB start a new batch.
        let per_contact = ADD_BATCH_BYTES / mls::key_package_len(&package) / 2 + 1;
        assert_eq!(
            sizes(&[
                contact(1, per_contact),
                contact(1, per_contact),
                contact(1, 1)
            ]),
            [1, 2]
        );
        assert!(add_batches(&[]).is_empty());
        assert!(check_group_size(MAX_GROUP_DEVICES - 10, 10).is_ok());
        assert!(matches!(
            check_group_size(MAX_GROUP_DEVICES - 10, 11),
            Err(Error::Usage(_))
        ));
    }

    #[test]
    fn a_group_whose_adder_stays_silent_for_a_week_is_declined() {
        let folder = tempfile::tempdir().unwrap();
        let db = database(&folder, "me.db");
        let day = 24 * 3600 * 1000;
        let now = 100 * day;
        for (id, state, since) in [
            (1u8, "pending", now - 8 * day),
            (2, "pending", now - 6 * day),
            (3, "active", now - 30 * day),
        ] {
            let group_id = [id; GROUP_ID_LEN];
            db.execute(
                "INSERT INTO conversations (group_id, contact, scope) VALUES (?1, NULL, ?2)",
                params![group_id.as_slice(), scope(&group_id)],
            )
            .unwrap();
            db.execute(
                "INSERT INTO groups (group_id, name, state, created_at_ms) VALUES (?1, ?2, ?3, ?4)",
                params![group_id.as_slice(), format!("g{id}"), state, since],
            )
            .unwrap();
        }
        assert_eq!(
            silent_groups(&db, now).unwrap(),
            vec![vec![1u8; GROUP_ID_LEN]]
        );
        db.execute("UPDATE groups SET leaving = 1", []).unwrap();
        assert!(silent_groups(&db, now).unwrap().is_empty());
    }

    #[test]
    fn members_added_by_a_member_without_the_right_block_sending_until_removed() {
        let folder = tempfile::tempdir().unwrap();
        let (alice_db, mallory_db, bob_db, eve_db) = (
            database(&folder, "alice.db"),
            database(&folder, "mallory.db"),
            database(&folder, "bob.db"),
            database(&folder, "eve.db"),
        );
        let (alice, mallory, bob, eve) = (keys(), keys(), keys(), keys());
        let group_id = [4u8; GROUP_ID_LEN];
        // Alice makes the group with Mallory and Bob; Bob's device knows her as the owner.
        let package = |db: &Connection, of: &AccountKeys| {
            let bytes = mls::new_key_package(&Provider::new(db), of, false).unwrap();
            mls::check_key_package(&Provider::new(&alice_db), &bytes, of.certificate()).unwrap()
        };
        let packages = [package(&mallory_db, &mallory), package(&bob_db, &bob)];
        let created = mls::create_group(
            &Provider::new(&alice_db),
            &alice,
            &group_id,
            &packages,
            mls::Tree::Served,
        )
        .unwrap();
        let tree = created.tree.as_ref().unwrap();
        for (db, of) in [(&bob_db, &bob), (&mallory_db, &mallory)] {
            let joined =
                mls::join_group(&Provider::new(db), &created.welcome, Some(tree.sealed())).unwrap();
            join(db, &joined, of.certificate().account_id()).unwrap();
            db.execute("UPDATE groups SET state = 'active'", [])
                .unwrap();
            db.execute(
                "UPDATE group_members SET role = 'owner' WHERE account_id = ?1",
                params![account(&alice)],
            )
            .unwrap();
        }

        // Mallory, a member, adds Eve although only admins may.
        let eve_package = {
            let bytes = mls::new_key_package(&Provider::new(&eve_db), &eve, false).unwrap();
            mls::check_key_package(&Provider::new(&mallory_db), &bytes, eve.certificate()).unwrap()
        };
        let mallory_mls = Provider::new(&mallory_db);
        let mut mallory_group = mls::load_group(&mallory_mls, &group_id).unwrap().unwrap();
        let commit = mls::add_members(&mallory_mls, &mallory, &mut mallory_group, &[eve_package])
            .unwrap()
            .commit;

        // Bob's device follows the commit (or the group would fork) but flags Eve.
        let bob_mls = Provider::new(&bob_db);
        let mut bob_group = mls::load_group(&bob_mls, &group_id).unwrap().unwrap();
        let mls::Incoming::Commit(summary) =
            mls::process(&bob_mls, &mut bob_group, &commit, true).unwrap()
        else {
            panic!("expected a commit");
        };
        let entry = wire::GroupEntry {
            group_id: group_id.to_vec(),
            seq: 5,
            ..Default::default()
        };
        let event = on_commit(
            &bob_db,
            &entry,
            &bob_group,
            &summary,
            bob.certificate().account_id(),
        )
        .unwrap();
        let Some(Event::Message(message)) = event else {
            panic!("expected a notice");
        };
        assert!(
            message.body.contains("without permission"),
            "{}",
            message.body
        );
        let text = wire::app_message::Body::Text(wire::Text {
            body: "hello".into(),
            ..Default::default()
        });
        let refused = check_can_send(&bob_db, &group_id, &account(&bob), &text);
        assert!(
            matches!(&refused, Err(Error::Security(reason)) if reason.contains("without an admin's approval")),
            "{refused:?}"
        );
        // Leaving stays possible.
        let leave = wire::app_message::Body::Leave(wire::Leave {});
        assert!(check_can_send(&bob_db, &group_id, &account(&bob), &leave).is_ok());
    }
}
