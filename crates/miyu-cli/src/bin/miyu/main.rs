//! `miyu`: the Miyu command-line client. It parses arguments, calls the client core and
//! prints; all logic lives in `miyu-client`.
//!
//! Exit codes: 0 success, 1 other failure, 2 wrong usage, 3 network, 4 refused by the server,
//! 5 a security check failed.

mod demo;
mod devices;
mod files;
mod groups;
mod privacy;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::io::IsTerminal;

use miyu_client::vault::{self, AppLock};
use miyu_client::{Client, Event, MessageView, Protection, Proxy};
use miyu_proto::{InviteLink, ServerAddress};
use zeroize::Zeroizing;

#[derive(Parser, Debug)]
#[command(
    name = "miyu",
    version,
    about = "Miyu: end-to-end encrypted messaging without phone numbers"
)]
struct Cli {
    /// Folder holding this account's keys and messages.
    #[arg(
        long,
        env = "MIYU_PROFILE",
        global = true,
        default_value = "miyu-profile"
    )]
    profile: PathBuf,
    /// Print data as JSON.
    #[arg(long, global = true)]
    json: bool,
    /// Send every connection of this profile through a SOCKS5 proxy such as Tor, which also
    /// resolves names: socks5h://IP:PORT. Remembered for the profile.
    #[arg(long, global = true, env = "MIYU_PROXY", conflicts_with = "no_proxy")]
    proxy: Option<String>,
    /// Connect directly again, forgetting the profile's proxy.
    #[arg(long, global = true)]
    no_proxy: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create an account (no phone number, no e-mail) and print its id.
    Init {
        /// The server's address line, e.g. wss://127.0.0.1:7443/#<fingerprint>.
        #[arg(long)]
        server: String,
        /// The name your contacts will see (sent to them end-to-end encrypted).
        #[arg(long)]
        name: Option<String>,
        /// Keep the database key in a file in the profile instead of deriving it from a
        /// passphrase. Anyone who can read the profile folder can then read your messages.
        #[arg(long)]
        no_passphrase: bool,
    },
    /// Make this profile a new device of an existing account: prints a one-time `miyu-link://`
    /// code (and its QR code) to approve on a device of the account with `miyu devices add`,
    /// then waits for it and takes in the account's history.
    Link {
        /// The server's address line, as for `init`.
        #[arg(long)]
        server: String,
        /// What to call this device in `miyu devices` (never sent to the server).
        #[arg(long, default_value = "new device")]
        name: String,
        /// How many seconds to wait for the approval.
        #[arg(long, default_value_t = miyu_client::devices::LINK_WAIT.as_secs())]
        wait: u64,
        /// As for `init`.
        #[arg(long)]
        no_passphrase: bool,
    },
    /// List this account's devices, or link (`add CODE`) or revoke (`revoke ID`) one.
    Devices {
        #[command(subcommand)]
        action: Option<devices::DevicesAction>,
    },
    /// Show this account's recovery key again (on its first device).
    RecoveryKey,
    /// Restore an account whose devices are all lost, with its recovery key: this profile
    /// becomes a new device of it, holding its identity, and gets back the latest backup.
    /// A recovery passphrase, if the account has one, is read from MIYU_RECOVERY_PASSPHRASE.
    Recover {
        /// The server's address line, as for `init`.
        #[arg(long)]
        server: String,
        /// The recovery key `init` printed (miyu-recovery:...).
        key: String,
        /// As for `init`.
        #[arg(long)]
        no_passphrase: bool,
    },
    /// Upload an encrypted backup of the history, readable only with the recovery key: what
    /// changed since the last backup, or now and then the whole history, which replaces the
    /// backup before.
    Backup,
    /// Bring the latest backup into this profile's history.
    Restore {
        /// The recovery key (miyu-recovery:...).
        key: String,
    },
    /// Print a one-time invite link.
    Invite,
    /// Accept an invite link and start an encrypted chat.
    Accept {
        link: String,
        /// What to call this contact (default: the name they chose).
        #[arg(long)]
        name: Option<String>,
    },
    /// List contacts.
    Contacts,
    /// Rename a contact locally.
    Rename { old: String, new: String },
    /// Send a message; succeeds once the server has stored it.
    Send { contact: String, text: String },
    /// Fetch and process everything pending.
    Sync {
        /// Then wait up to this many seconds for a new message.
        #[arg(long, default_value_t = 0)]
        wait: u64,
    },
    /// Print the conversation with a contact, oldest first.
    Messages { contact: String },
    /// Answer message ID (the #number `messages` shows), quoting it.
    Reply {
        contact: String,
        id: i64,
        text: String,
    },
    /// Change the text of one of your messages, for both sides (within 48 hours).
    Edit {
        contact: String,
        id: i64,
        text: String,
    },
    /// Delete message ID from this device, or with --everyone (your own messages) for both
    /// sides, where a notice stays.
    Delete {
        contact: String,
        id: i64,
        #[arg(long)]
        everyone: bool,
    },
    /// React to message ID with an emoji; --remove takes your reaction back.
    React {
        contact: String,
        id: i64,
        #[arg(required_unless_present = "remove")]
        emoji: Option<String>,
        #[arg(long, conflicts_with = "emoji")]
        remove: bool,
    },
    /// Send a copy of text message ID of the chat with FROM to TO, marked as forwarded.
    Forward { from: String, id: i64, to: String },
    /// Send a file (up to 4 GiB), end-to-end encrypted. JPEG, PNG and WebP images lose their
    /// EXIF, XMP and IPTC metadata (GPS position, camera, time) first. Interrupted, the same
    /// command continues where it stopped.
    SendFile {
        contact: String,
        path: PathBuf,
        /// Send images with their metadata.
        #[arg(long)]
        keep_metadata: bool,
    },
    /// List the files of a conversation: id, name, size, sender.
    Files { contact: String },
    /// Download, decrypt and check a file. Interrupted, the same command continues where it
    /// stopped.
    Download {
        contact: String,
        file_id: i64,
        /// Where to save it (default: its name in the current folder).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Chat interactively: type lines to send, incoming messages appear live.
    Chat { contact: String },
    /// Print the safety number to compare with a contact.
    SafetyNumber { contact: String },
    /// Mark a contact as verified after comparing safety numbers.
    Verify { contact: String },
    /// Replace this device's keys in the conversation (done by itself weekly before sending).
    UpdateKeys { contact: String },
    /// Show the privacy settings, or change one with `settings set KEY VALUE`.
    Settings {
        #[command(subcommand)]
        action: Option<privacy::SettingsAction>,
    },
    /// List message requests from people who are not contacts, or answer one.
    Requests {
        #[command(subcommand)]
        action: Option<privacy::RequestsAction>,
    },
    /// Show your username, or choose one with `username set NAME` (found only while the
    /// `discoverable` setting is on).
    Username {
        #[command(subcommand)]
        action: Option<privacy::UsernameAction>,
    },
    /// Start a chat with someone by their exact username; they see it as a message request.
    Add {
        username: String,
        /// What to call them locally (default: the username).
        #[arg(long)]
        name: Option<String>,
    },
    /// Show or set a conversation's disappearing-message timer: 30s to 4w, or off.
    Timer {
        contact: String,
        duration: Option<String>,
    },
    /// Tell a contact you are typing (or stopped, with --stop); only when the `typing`
    /// setting is on.
    Typing {
        contact: String,
        #[arg(long)]
        stop: bool,
    },
    /// Ask for the passphrase once, then let commands on this profile run without it for a
    /// while. The key stays in the kernel's keyring, where any process of yours can read it.
    Unlock {
        /// How long: seconds, minutes or hours, e.g. 30s, 15m, 2h; at most 24h, 15m if not
        /// given.
        #[arg(long = "for", value_name = "DURATION", value_parser = parse_duration)]
        duration: Option<Duration>,
    },
    /// Forget the key `unlock` kept, at once: commands ask for the passphrase again.
    Lock,
    /// Delete the account, or choose after how long without use the server deletes it.
    Account {
        #[command(subcommand)]
        action: privacy::AccountAction,
    },
    /// Create and manage groups: `group create NAME CONTACT...`, `group add`, `remove`,
    /// `leave`, `info`, `set`, `role`. Send and read with `send GROUP TEXT`, `messages GROUP`.
    Group {
        #[command(subcommand)]
        action: groups::GroupAction,
    },
    /// List your groups.
    Groups,
    /// Run a server and two clients locally and show an encrypted conversation.
    Demo,
}

/// `30s`, `15m`, `2h`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let wrong = || format!("{text:?} is not a duration such as 30s, 15m or 2h");
    let unit = match text.chars().last() {
        Some('s') => 1,
        Some('m') => 60,
        Some('h') => 3600,
        _ => return Err(wrong()),
    };
    let number: u64 = text[..text.len() - 1].parse().map_err(|_| wrong())?;
    number
        .checked_mul(unit)
        .map(Duration::from_secs)
        .ok_or_else(wrong)
}

/// `15m` for 900 seconds: the largest unit that divides the duration.
fn format_duration(duration: Duration) -> String {
    match duration.as_secs() {
        seconds if seconds > 0 && seconds % 3600 == 0 => format!("{}h", seconds / 3600),
        seconds if seconds > 0 && seconds % 60 == 0 => format!("{}m", seconds / 60),
        seconds => format!("{seconds}s"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MIYU_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("miyu: cannot start: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("miyu: {error:#}");
            ExitCode::from(exit_code(&error))
        }
    }
}

fn exit_code(error: &anyhow::Error) -> u8 {
    match error.downcast_ref::<miyu_client::Error>() {
        Some(miyu_client::Error::Usage(_) | miyu_client::Error::Locked(_)) => 2,
        Some(miyu_client::Error::Network(_) | miyu_client::Error::Queued(_)) => 3,
        Some(miyu_client::Error::Server(_)) => 4,
        Some(miyu_client::Error::Security(_)) => 5,
        _ if error.downcast_ref::<Usage>().is_some() => 2,
        _ => 1,
    }
}

/// A mistake in how the command was called.
#[derive(Debug)]
struct Usage(String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// The passphrase from `MIYU_PASSPHRASE`, else typed on the terminal (twice when `confirm`),
/// else none.
fn passphrase(prompt: &str, confirm: bool) -> anyhow::Result<Option<Zeroizing<String>>> {
    if let Ok(passphrase) = std::env::var("MIYU_PASSPHRASE") {
        return Ok(Some(Zeroizing::new(passphrase)));
    }
    if !std::io::stdin().is_terminal() {
        return Ok(None);
    }
    let first =
        Zeroizing::new(rpassword::prompt_password(prompt).context("reading the passphrase")?);
    if confirm {
        let second = Zeroizing::new(
            rpassword::prompt_password("Again: ").context("reading the passphrase")?,
        );
        if first != second {
            return Err(Usage("the two passphrases differ".into()).into());
        }
    }
    Ok(Some(first))
}

/// Opens a profile, asking for its passphrase if it has one and is not unlocked, and applies a
/// proxy choice made on the command line (`Some(None)`: connect directly).
/// The recovery passphrase, when the user set one in the environment.
fn recovery_passphrase() -> Option<Zeroizing<String>> {
    std::env::var("MIYU_RECOVERY_PASSPHRASE")
        .ok()
        .filter(|passphrase| !passphrase.is_empty())
        .map(Zeroizing::new)
}

fn print_restored(restored: &miyu_client::recovery::Restored, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(restored);
    }
    if restored.backup {
        println!(
            "account {}: {} conversations and {} messages back from the backup ({} segments)",
            restored.account_id, restored.conversations, restored.messages, restored.segments
        );
    } else {
        println!("account {}: no backup to bring back", restored.account_id);
    }
    Ok(())
}

fn server_address(text: &str) -> anyhow::Result<ServerAddress> {
    Ok(text.parse().map_err(|error| {
        Usage(format!(
            "{error}; pass the `address:` line miyu-server printed, e.g. wss://127.0.0.1:7443/#<fingerprint>"
        ))
    })?)
}

/// How a new profile is protected: a passphrase (asked for), or with `--no-passphrase` a key
/// file in the profile.
fn new_protection(profile: &std::path::Path, no_passphrase: bool) -> anyhow::Result<Protection> {
    if no_passphrase {
        eprintln!(
            "warning: --no-passphrase keeps the database key in {}; anyone who can read \
             that folder (a thief of this device, a backup) can read your messages",
            profile.join("key").display()
        );
        return Ok(Protection::DangerKeyFile);
    }
    match passphrase("Choose a passphrase for this profile: ", true)? {
        Some(passphrase) => Ok(Protection::Passphrase(passphrase)),
        None => Err(Usage(
            "choose a passphrase to encrypt this profile: run this on a terminal, \
             set MIYU_PASSPHRASE, or pass --no-passphrase"
                .into(),
        )
        .into()),
    }
}

async fn open(profile: &std::path::Path, proxy: Option<Option<Proxy>>) -> anyhow::Result<Client> {
    let mut client = match Client::open(profile, None) {
        Err(miyu_client::Error::Locked(reason)) if vault::needs_passphrase(profile) => {
            match passphrase("Passphrase: ", false)? {
                Some(passphrase) => Client::open(profile, Some(&passphrase))?,
                None => return Err(miyu_client::Error::Locked(reason).into()),
            }
        }
        opened => opened?,
    };
    if let Some(proxy) = proxy {
        client.set_proxy(proxy).await?;
    }
    Ok(client)
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer(&mut stdout, value)?;
    writeln!(stdout)?;
    Ok(())
}

/// `2026-11-29 14:03:07` in UTC, from Unix milliseconds.
fn format_time(unix_ms: u64) -> String {
    let seconds = unix_ms / 1000;
    let days = (seconds / 86_400) as i64;
    let rest = seconds % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Text from other people, made safe for a terminal: control characters (escape sequences,
/// carriage returns, newlines) are shown escaped, so a message cannot rewrite the screen or
/// pass itself off as several lines.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// One line of a conversation: `#ID TIME  FROM: [reply to #N] BODY (notes) [reactions]`. The
/// number is omitted where it is not known (live events).
fn message_line(message: &MessageView) -> String {
    let mut state = match message.state {
        miyu_client::MessageState::Pending => " (not sent yet)",
        miyu_client::MessageState::Read => " (read)",
        _ => "",
    }
    .to_string();
    if message.edited_at_ms.is_some() && !message.deleted {
        state.push_str(" (edited)");
    }
    if message.mentions_me {
        state.push_str(" (mentions you)");
    }
    if let Some(expires_at_ms) = message.expires_at_ms {
        state.push_str(&format!(" (disappears {})", format_time(expires_at_ms)));
    }
    if !message.reactions.is_empty() {
        let reactions: Vec<String> = message
            .reactions
            .iter()
            .map(|r| format!("{} {}", printable(&r.emoji), printable(&r.from)))
            .collect();
        state.push_str(&format!(" [{}]", reactions.join(", ")));
    }
    let number = if message.id > 0 {
        format!("#{} ", message.id)
    } else {
        String::new()
    };
    if matches!(
        message.kind,
        miyu_client::MessageKind::Timer | miyu_client::MessageKind::Notice
    ) {
        return format!(
            "{number}{}  -- {} --",
            format_time(message.sent_at_ms),
            printable(&message.body)
        );
    }
    let mut body = String::new();
    if let Some(quoted) = message.reply_to {
        body.push_str(&format!("(reply to #{quoted}) "));
    }
    if message.forwarded {
        body.push_str("(forwarded) ");
    }
    if message.deleted {
        body.push_str("(message deleted)");
    } else {
        body.push_str(&printable(&message.body));
    }
    format!(
        "{number}{}  {}: {}{}",
        format_time(message.sent_at_ms),
        printable(&message.from),
        body,
        state
    )
}

fn print_sent(message: &MessageView, json: bool) -> anyhow::Result<()> {
    if json { print_json(message) } else { Ok(()) }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let profile = cli.profile;
    let proxy: Option<Option<Proxy>> = match (&cli.proxy, cli.no_proxy) {
        (Some(text), _) => Some(Some(text.parse()?)),
        (None, true) => Some(None),
        (None, false) => None,
    };
    match cli.command {
        Command::Demo => demo::run().await,
        Command::Group { action } => {
            let mut client = open(&profile, proxy).await?;
            groups::run(&mut client, action, cli.json).await
        }
        Command::Groups => groups::list(&open(&profile, proxy).await?, cli.json),
        Command::Link {
            server,
            name,
            wait,
            no_passphrase,
        } => {
            let server = server_address(&server)?;
            let protection = new_protection(&profile, no_passphrase)?;
            devices::link(
                &profile,
                server,
                &name,
                &protection,
                proxy.flatten(),
                wait,
                cli.json,
            )
            .await
        }
        Command::Devices { action } => devices::devices(&profile, proxy, action, cli.json).await,
        Command::RecoveryKey => {
            let client = open(&profile, proxy).await?;
            println!("{}", client.recovery_key()?.as_str());
            Ok(())
        }
        Command::Recover {
            server,
            key,
            no_passphrase,
        } => {
            let server = server_address(&server)?;
            let protection = new_protection(&profile, no_passphrase)?;
            let recovery_passphrase = recovery_passphrase();
            let (mut client, restored) = Client::recover(
                &profile,
                server,
                &key,
                recovery_passphrase.as_deref().map(String::as_str),
                &protection,
                proxy.flatten(),
            )
            .await?;
            // The account's other devices are now in its account group with this one: those
            // lost must be revoked, or they keep taking part.
            let others = client
                .devices()
                .await?
                .into_iter()
                .filter(|device| !device.this_device)
                .count();
            client.disconnect().await;
            if others > 0 && !cli.json {
                eprintln!(
                    "the account has {others} other device(s): revoke those you lost with \
                     `miyu devices revoke ID` (`miyu devices` lists them); the others bring this \
                     one into their conversations"
                );
            }
            print_restored(&restored, cli.json)
        }
        Command::Backup => {
            let mut client = open(&profile, proxy).await?;
            let backed = client.backup().await?;
            client.disconnect().await;
            if cli.json {
                return print_json(&backed);
            }
            use miyu_client::recovery::BackupKind;
            let messages = backed.messages;
            match backed.kind {
                BackupKind::Full => println!(
                    "full backup ({messages} messages): {} bytes, {} uploaded",
                    backed.size, backed.uploaded
                ),
                BackupKind::Incremental => println!(
                    "incremental backup ({messages} messages): {} bytes of changes, {} uploaded; \
                     the backup has {} segments",
                    backed.size, backed.uploaded, backed.segments
                ),
                BackupKind::Unchanged => {
                    println!("nothing changed since the last backup; nothing uploaded")
                }
            }
            Ok(())
        }
        Command::Restore { key } => {
            let mut client = open(&profile, proxy).await?;
            let recovery_passphrase = recovery_passphrase();
            let restored = client
                .restore(&key, recovery_passphrase.as_deref().map(String::as_str))
                .await?;
            client.disconnect().await;
            print_restored(&restored, cli.json)
        }
        Command::Init {
            server,
            name,
            no_passphrase,
        } => {
            let server = server_address(&server)?;
            let name = name.unwrap_or_else(|| "me".to_string());
            let protection = new_protection(&profile, no_passphrase)?;
            let mut client =
                Client::init(&profile, server, &name, &protection, proxy.flatten()).await?;
            let recovery_passphrase = recovery_passphrase();
            let recovery = client
                .set_up_recovery(recovery_passphrase.as_deref().map(String::as_str))
                .await?;
            client.disconnect().await;
            eprintln!(
                "Your recovery key restores this account if all its devices are lost (`miyu recover`). \
                 Write it down and keep it apart from your devices; `miyu recovery-key` shows it again:\n{}",
                recovery.as_str()
            );
            if cli.json {
                print_json(&serde_json::json!({ "account_id": client.account_id().to_string() }))
            } else {
                println!("{}", client.account_id());
                Ok(())
            }
        }
        Command::Invite => {
            let mut client = open(&profile, proxy).await?;
            let link = client.invite().await?;
            client.disconnect().await;
            if cli.json {
                print_json(&serde_json::json!({ "link": link.to_string() }))
            } else {
                println!("{link}");
                Ok(())
            }
        }
        Command::Accept { link, name } => {
            let link: InviteLink = link
                .parse()
                .map_err(|error| Usage(format!("not an invite link: {error}")))?;
            let mut client = open(&profile, proxy).await?;
            let contact = client.accept(&link, name.as_deref()).await?;
            client.disconnect().await;
            if cli.json {
                print_json(&contact)
            } else {
                println!(
                    "added {} ({}); chat is end-to-end encrypted",
                    contact.name, contact.account_id
                );
                if link.group {
                    println!("asked to join their group; you are in once they add you");
                }
                Ok(())
            }
        }
        Command::Contacts => {
            let client = open(&profile, proxy).await?;
            let contacts = client.contacts()?;
            if cli.json {
                return print_json(&contacts);
            }
            for contact in contacts {
                let verified = if contact.verified {
                    "verified"
                } else {
                    "not verified"
                };
                let presence = match (contact.online, contact.last_seen_ms) {
                    (true, _) => "\tonline".to_string(),
                    (false, Some(at)) => format!("\tlast seen {}", format_time(at)),
                    (false, None) => String::new(),
                };
                let unread = match contact.unread {
                    0 => String::new(),
                    count => format!("\t{count} unread"),
                };
                println!(
                    "{}\t{}\t{}{}{}",
                    printable(&contact.name),
                    contact.account_id,
                    verified,
                    unread,
                    presence
                );
            }
            Ok(())
        }
        Command::Rename { old, new } => {
            let mut client = open(&profile, proxy).await?;
            client.rename(&old, &new)?;
            privacy::tell_other_devices(&mut client).await
        }
        Command::Verify { contact } => {
            let mut client = open(&profile, proxy).await?;
            client.verify(&contact)?;
            privacy::tell_other_devices(&mut client).await
        }
        Command::Send { contact, text } => {
            let mut client = open(&profile, proxy).await?;
            client.send(&contact, &text).await?;
            client.disconnect().await;
            Ok(())
        }
        Command::Sync { wait } => {
            let mut client = open(&profile, proxy).await?;
            let events = client.sync(Duration::from_secs(wait)).await?;
            client.disconnect().await;
            print_events(&events, cli.json)
        }
        Command::Messages { contact } => {
            let mut client = open(&profile, proxy).await?;
            let messages = client.messages(&contact)?;
            if cli.json {
                print_json(&messages)?;
            } else {
                for message in &messages {
                    println!("{}", message_line(message));
                }
            }
            privacy::read(&mut client, &contact).await
        }
        Command::Reply { contact, id, text } => {
            let mut client = open(&profile, proxy).await?;
            let sent = client.reply(&contact, id, &text).await;
            client.disconnect().await;
            print_sent(&sent?, cli.json)
        }
        Command::Edit { contact, id, text } => {
            let mut client = open(&profile, proxy).await?;
            let done = client.edit(&contact, id, &text).await;
            client.disconnect().await;
            done.map_err(Into::into)
        }
        Command::Delete {
            contact,
            id,
            everyone,
        } => {
            let mut client = open(&profile, proxy).await?;
            let done = client.delete_message(&contact, id, everyone).await;
            client.disconnect().await;
            done.map_err(Into::into)
        }
        Command::React {
            contact,
            id,
            emoji,
            remove,
        } => {
            let mut client = open(&profile, proxy).await?;
            let emoji = if remove { None } else { emoji };
            let done = client.react(&contact, id, emoji.as_deref()).await;
            client.disconnect().await;
            done.map_err(Into::into)
        }
        Command::Forward { from, id, to } => {
            let mut client = open(&profile, proxy).await?;
            let sent = client.forward(&from, id, &to).await;
            client.disconnect().await;
            print_sent(&sent?, cli.json)
        }
        Command::SendFile {
            contact,
            path,
            keep_metadata,
        } => {
            let client = open(&profile, proxy).await?;
            files::send_file(client, &contact, &path, keep_metadata, cli.json).await
        }
        Command::Files { contact } => {
            files::list(&open(&profile, proxy).await?, &contact, cli.json)
        }
        Command::Download {
            contact,
            file_id,
            out,
        } => {
            let client = open(&profile, proxy).await?;
            files::download(client, &contact, file_id, out, cli.json).await
        }
        Command::Account { action } => privacy::account(&profile, proxy, action).await,
        Command::Settings { action } => {
            privacy::settings(open(&profile, proxy).await?, action, cli.json).await
        }
        Command::Requests { action } => {
            privacy::requests(open(&profile, proxy).await?, action, cli.json).await
        }
        Command::Username { action } => {
            privacy::username(open(&profile, proxy).await?, action, cli.json).await
        }
        Command::Add { username, name } => {
            let mut client = open(&profile, proxy).await?;
            let contact = client.add_by_username(&username, name.as_deref()).await?;
            client.disconnect().await;
            if cli.json {
                print_json(&contact)
            } else {
                println!(
                    "started an encrypted chat with {} ({}); they see it as a message request",
                    printable(&contact.name),
                    contact.account_id
                );
                Ok(())
            }
        }
        Command::Timer { contact, duration } => {
            privacy::timer(open(&profile, proxy).await?, &contact, duration, cli.json).await
        }
        Command::Typing { contact, stop } => {
            let mut client = open(&profile, proxy).await?;
            let sent = client.typing(&contact, !stop).await?;
            client.disconnect().await;
            if !sent {
                eprintln!("typing indicators are off: `miyu settings set typing on`");
            }
            Ok(())
        }
        Command::SafetyNumber { contact } => {
            let client = open(&profile, proxy).await?;
            let number = client.safety_number(&contact)?;
            if cli.json {
                print_json(&serde_json::json!({ "contact": contact, "safety_number": number }))
            } else {
                println!("{number}");
                Ok(())
            }
        }
        Command::Chat { contact } => chat(&profile, &contact, proxy).await,
        Command::Unlock { duration } => {
            let passphrase = if vault::needs_passphrase(&profile) {
                passphrase("Passphrase: ", false)?
            } else {
                None
            };
            let outcome = vault::unlock(
                &profile,
                passphrase.as_ref().map(|p| p.as_str()),
                duration.unwrap_or(vault::DEFAULT_UNLOCK),
            )?;
            print_app_lock(outcome, cli.json)
        }
        Command::Lock => print_app_lock(vault::lock(&profile)?, cli.json),
        Command::UpdateKeys { contact } => {
            let mut client = open(&profile, proxy).await?;
            client.update_keys(&contact).await?;
            client.disconnect().await;
            Ok(())
        }
    }
}

fn print_app_lock(outcome: AppLock, json: bool) -> anyhow::Result<()> {
    let (state, line) = match outcome {
        AppLock::Unlocked(duration) => (
            "unlocked",
            format!(
                "unlocked for {}; `miyu lock` locks it sooner",
                format_duration(duration)
            ),
        ),
        AppLock::Locked => ("locked", "locked".to_string()),
        AppLock::AlreadyLocked => ("locked", "locked (it was not unlocked)".to_string()),
        AppLock::NoPassphrase => (
            "no-passphrase",
            "this profile has no passphrase (its key is in a file): nothing to lock or unlock"
                .to_string(),
        ),
        _ => ("unknown", "done".to_string()),
    };
    if json {
        let mut value = serde_json::json!({ "state": state });
        match outcome {
            AppLock::Unlocked(duration) => value["seconds"] = duration.as_secs().into(),
            AppLock::Locked => value["was_unlocked"] = true.into(),
            AppLock::AlreadyLocked => value["was_unlocked"] = false.into(),
            _ => {}
        }
        print_json(&value)
    } else {
        println!("{line}");
        Ok(())
    }
}

fn print_events(events: &[Event], json: bool) -> anyhow::Result<()> {
    for event in events {
        match event {
            Event::Message(message) if !message.outgoing => {
                if json {
                    print_json(message)?;
                } else {
                    println!("{}", message_line(message));
                }
            }
            Event::ContactAdded(contact) if !json => {
                println!(
                    "new contact: {} ({})",
                    printable(&contact.name),
                    contact.account_id
                );
            }
            Event::ContactNamed { old, new } if !json => {
                println!(
                    "contact {} is now called {}",
                    printable(old),
                    printable(new)
                );
            }
            Event::Request { name } if !json => {
                println!(
                    "message request from {} (not a contact): see `miyu requests`",
                    printable(name)
                );
            }
            Event::Read { contact } if !json => {
                println!("{} read your messages", printable(contact));
            }
            other if json => {
                if let Some(value) = change_json(other) {
                    print_json(&value)?;
                }
            }
            other => {
                if let Some(line) = change_line(other) {
                    println!("{line}");
                }
            }
        }
    }
    Ok(())
}

/// Whose edit, deletion or reaction an event reports.
fn change_contact(event: &Event) -> Option<&str> {
    match event {
        Event::Edited { contact, .. }
        | Event::Deleted { contact, .. }
        | Event::Reacted { contact, .. } => Some(contact),
        _ => None,
    }
}

/// An edit, deletion or reaction by a contact, for `--json`.
fn change_json(event: &Event) -> Option<serde_json::Value> {
    Some(match event {
        Event::Edited { contact, id, body } => {
            serde_json::json!({ "event": "edited", "contact": contact, "id": id, "body": body })
        }
        Event::Deleted { contact, id } => {
            serde_json::json!({ "event": "deleted", "contact": contact, "id": id })
        }
        Event::Reacted { contact, id, emoji } => {
            serde_json::json!({ "event": "reacted", "contact": contact, "id": id, "emoji": emoji })
        }
        _ => return None,
    })
}

/// How an edit, deletion or reaction by a contact is announced.
fn change_line(event: &Event) -> Option<String> {
    Some(match event {
        Event::Edited { contact, id, body } => format!(
            "-- {} edited #{id}: {} --",
            printable(contact),
            printable(body)
        ),
        Event::Deleted { contact, id } => {
            format!("-- {} deleted #{id} for everyone --", printable(contact))
        }
        Event::Reacted {
            contact,
            id,
            emoji: Some(emoji),
        } => format!(
            "-- {} reacted {} to #{id} --",
            printable(contact),
            printable(emoji)
        ),
        Event::Reacted {
            contact,
            id,
            emoji: None,
        } => format!(
            "-- {} took back the reaction to #{id} --",
            printable(contact)
        ),
        _ => return None,
    })
}

/// Interactive chat: stdin lines are sent, incoming messages are printed as they arrive.
/// Reconnects with growing pauses when the connection drops.
async fn chat(
    profile: &std::path::Path,
    contact: &str,
    proxy: Option<Option<Proxy>>,
) -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let mut client = open(profile, proxy).await?;
    for message in client.messages(contact)? {
        println!("{}", message_line(&message));
    }
    privacy::read(&mut client, contact).await?;
    if let Err(error) = client.set_online(true).await {
        eprintln!("could not tell contacts you are online: {error}");
    }
    println!(
        "-- chatting with {contact}; type a line and press Enter to send, /help for commands, Ctrl-D to quit --"
    );
    std::io::stdout().flush()?;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut backoff = Duration::from_millis(250);
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line.context("reading input")? else {
                    break;
                };
                if line.trim().is_empty() {
                    continue;
                }
                let text = match chat_command(&mut client, contact, &line).await {
                    ChatInput::Done => continue,
                    ChatInput::Text(text) => text,
                };
                match client.send(contact, &text).await {
                    Ok(_) => {}
                    Err(error @ miyu_client::Error::Queued(_)) => {
                        eprintln!("{error}; it goes out when the server can be reached");
                    }
                    Err(error) if error.is_transient() => eprintln!("not sent: {error}"),
                    Err(error) => return Err(error.into()),
                }
            }
            event = client.next_event() => match event {
                Ok(Event::Message(message)) if message.contact == contact && !message.outgoing => {
                    backoff = Duration::from_millis(250);
                    println!("{}", message_line(&message));
                    std::io::stdout().flush()?;
                    privacy::read(&mut client, contact).await?;
                }
                Ok(Event::Typing { contact: who, active }) if who == contact => {
                    if active {
                        println!("-- {} is typing --", printable(&who));
                        std::io::stdout().flush()?;
                    }
                }
                Ok(Event::Read { contact: who }) if who == contact => {
                    println!("-- {} read your messages --", printable(&who));
                }
                Ok(Event::Request { name }) => {
                    println!("-- message request from {} (not a contact): see `miyu requests` --", printable(&name));
                }
                Ok(Event::ContactNamed { old, new }) => {
                    println!("-- {} is now called {} --", printable(&old), printable(&new));
                }
                Ok(change @ (Event::Edited { .. } | Event::Deleted { .. } | Event::Reacted { .. }))
                    if change_contact(&change) == Some(contact) =>
                {
                    if let Some(line) = change_line(&change) {
                        println!("{line}");
                        std::io::stdout().flush()?;
                    }
                }
                Ok(_) => {}
                Err(error) if error.is_transient() => {
                    eprintln!("connection lost ({error}); retrying in {} ms", backoff.as_millis());
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
                Err(error) => return Err(error.into()),
            }
        }
    }
    if let Err(error) = client.set_online(false).await {
        eprintln!("could not tell contacts you left: {error}");
    }
    client.disconnect().await;
    Ok(())
}

/// What a line typed into `chat` asks for.
enum ChatInput {
    /// Send this text.
    Text(String),
    /// A command, carried out (or refused, with a message).
    Done,
}

const CHAT_HELP: &str = "commands: /file PATH, /reply ID TEXT, /edit ID TEXT, /delete ID \
(from this device), /unsend ID (yours, for everyone), /react ID EMOJI, /unreact ID; //text \
sends a line starting with /";

/// Carries out a `/command` typed into `chat`; other lines are text to send.
async fn chat_command(client: &mut Client, contact: &str, line: &str) -> ChatInput {
    // A command may follow spaces; a line that only looks like one is never sent by mistake.
    let Some(command) = line.trim_start().strip_prefix('/') else {
        return ChatInput::Text(line.to_string());
    };
    if command.starts_with('/') {
        return ChatInput::Text(command.to_string());
    }
    let (name, rest) = command.split_once(' ').unwrap_or((command, ""));
    let rest = rest.trim();
    let (id, text) = rest.split_once(' ').unwrap_or((rest, ""));
    let id = id.trim_start_matches('#').parse::<i64>();
    let outcome = match (name, id) {
        ("help", _) => {
            println!("-- {CHAT_HELP} --");
            return ChatInput::Done;
        }
        ("file", _) if !rest.is_empty() => {
            let progress = std::sync::Arc::new(miyu_client::files::Progress::default());
            client
                .send_file(contact, std::path::Path::new(rest), false, progress)
                .await
                .map(|sent| {
                    println!(
                        "-- sent #{}: file {} {} ({}) --",
                        sent.message,
                        sent.id,
                        printable(&sent.name),
                        miyu_client::files::human_size(sent.size)
                    );
                })
        }
        ("reply", Ok(id)) if !text.is_empty() => client.reply(contact, id, text).await.map(|_| ()),
        ("edit", Ok(id)) if !text.is_empty() => client.edit(contact, id, text).await,
        ("delete", Ok(id)) => client.delete_message(contact, id, false).await,
        ("unsend", Ok(id)) => client.delete_message(contact, id, true).await,
        ("react", Ok(id)) if !text.is_empty() => client.react(contact, id, Some(text)).await,
        ("unreact", Ok(id)) => client.react(contact, id, None).await,
        _ => {
            println!("-- not understood; {CHAT_HELP} --");
            return ChatInput::Done;
        }
    };
    if let Err(error) = outcome {
        eprintln!("-- {error} --");
    }
    ChatInput::Done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_escapes_and_newlines_from_peers_are_shown_escaped() {
        assert_eq!(printable("hi\u{1b}[2J\nthere"), "hi\\u{1b}[2J\\nthere");
        assert_eq!(printable("密语 ok"), "密语 ok");
    }

    #[test]
    fn durations_parse_in_seconds_minutes_and_hours() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        for wrong in [
            "",
            "15",
            "m",
            "1.5h",
            "-1m",
            "15 m",
            "1d",
            "99999999999999999999h",
        ] {
            assert!(parse_duration(wrong).is_err(), "{wrong:?}");
        }
        assert_eq!(format_duration(Duration::from_secs(900)), "15m");
        assert_eq!(format_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
    }

    #[test]
    fn times_are_printed_in_utc() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00");
        assert_eq!(format_time(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(format_time(1_796_000_000_000), "2026-11-30 00:53:20");
    }
}
