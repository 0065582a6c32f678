//! The privacy commands: settings, message requests, usernames, timers and read state.

use clap::Subcommand;
use miyu_client::{Client, Settings};

use crate::{Usage, format_time, message_line, print_json, printable};

#[derive(Subcommand, Debug)]
pub(crate) enum SettingsAction {
    /// Change a setting: presence (nobody|contacts), typing, read_receipts, message_requests,
    /// discoverable, link_previews (on|off), group_invites (nobody|contacts|everyone), proxy
    /// (socks5h://IP:PORT or none).
    Set { key: String, value: String },
}

#[derive(Subcommand, Debug)]
pub(crate) enum RequestsAction {
    /// Make them a contact; they learn your name and that you accepted.
    Accept {
        name: String,
        /// What to call them instead of the name they gave.
        #[arg(long = "as")]
        rename: Option<String>,
    },
    /// Delete the request and what it said; they are not told.
    Decline { name: String },
    /// Decline, and drop everything this account sends from now on.
    Block { name: String },
    /// List the blocked accounts.
    Blocked,
    /// Let a blocked account (by its id, from `requests blocked`) reach you again, as a
    /// message request.
    Unblock { account_id: String },
}

#[derive(Subcommand, Debug)]
pub(crate) enum UsernameAction {
    /// Choose a username: 5 to 32 letters, digits or underscores.
    Set { name: String },
    /// Remove the username; nobody can find you by it any more.
    Clear,
}

#[derive(Subcommand, Debug)]
pub(crate) enum AccountAction {
    /// Delete the account from the server and this profile from disk, now.
    Delete {
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// After how many months without any use (1, 3, 6 or 12) the server deletes the account.
    Lifetime { months: u32 },
}

pub(crate) async fn account(
    profile: &std::path::Path,
    proxy: Option<Option<miyu_client::Proxy>>,
    action: AccountAction,
) -> anyhow::Result<()> {
    let mut client = crate::open(profile, proxy).await?;
    match action {
        AccountAction::Lifetime { months } => {
            client.set_account_lifetime(months).await?;
            client.disconnect().await;
            println!("the server deletes this account after {months} months without use");
        }
        AccountAction::Delete { yes } => {
            if !yes {
                use std::io::IsTerminal;
                if !std::io::stdin().is_terminal() {
                    return Err(Usage(
                        "deleting the account cannot be undone: pass --yes to confirm".into(),
                    )
                    .into());
                }
                println!(
                    "This deletes the account and every message in this profile. Type DELETE to confirm:"
                );
                let mut answer = String::new();
                std::io::stdin().read_line(&mut answer)?;
                if answer.trim() != "DELETE" {
                    return Err(Usage("not deleted".into()).into());
                }
            }
            client.delete_account(profile).await?;
            println!("account deleted");
        }
    }
    Ok(())
}

fn print_settings(settings: &Settings, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(settings);
    }
    for key in miyu_client::settings::KEYS {
        let note = match *key {
            "group_invites" => "\t(applies once groups exist)",
            _ => "",
        };
        println!("{key}\t{}{note}", settings.text(key));
    }
    Ok(())
}

pub(crate) async fn settings(
    mut client: Client,
    action: Option<SettingsAction>,
    json: bool,
) -> anyhow::Result<()> {
    let settings = match action {
        None => client.settings()?,
        Some(SettingsAction::Set { key, value }) => {
            let settings = client.set_setting(&key, &value).await?;
            client.disconnect().await;
            settings
        }
    };
    print_settings(&settings, json)
}

pub(crate) async fn requests(
    mut client: Client,
    action: Option<RequestsAction>,
    json: bool,
) -> anyhow::Result<()> {
    match action {
        None => {
            // Fetch first, so that requests that arrived meanwhile are listed.
            if let Err(error) = client.sync(std::time::Duration::ZERO).await {
                eprintln!("showing what is stored; could not fetch new requests: {error}");
            }
            client.disconnect().await;
            let requests = client.requests()?;
            if json {
                return print_json(&requests);
            }
            if requests.is_empty() {
                println!("no message requests");
            }
            for request in requests {
                println!(
                    "{} ({}), not a contact, first wrote {}:",
                    printable(&request.name),
                    request.account_id,
                    format_time(request.received_at_ms)
                );
                for message in &request.messages {
                    println!("    {}", message_line(message));
                }
            }
            Ok(())
        }
        Some(RequestsAction::Accept { name, rename }) => {
            let contact = client.accept_request(&name, rename.as_deref()).await?;
            client.disconnect().await;
            if json {
                print_json(&contact)
            } else {
                println!("{} is now a contact", printable(&contact.name));
                Ok(())
            }
        }
        Some(RequestsAction::Decline { name }) => {
            client.decline_request(&name)?;
            tell_other_devices(&mut client).await?;
            println!("declined; everything {} sent is deleted", printable(&name));
            Ok(())
        }
        Some(RequestsAction::Block { name }) => {
            client.block_request(&name)?;
            tell_other_devices(&mut client).await?;
            println!(
                "blocked {}; nothing they send will reach you",
                printable(&name)
            );
            Ok(())
        }
        Some(RequestsAction::Blocked) => {
            let blocked = client.blocked()?;
            if json {
                return print_json(&blocked);
            }
            if blocked.is_empty() {
                println!("nobody is blocked");
            }
            for account in blocked {
                println!(
                    "{}  blocked {}",
                    account.account_id,
                    format_time(account.blocked_at_ms)
                );
            }
            Ok(())
        }
        Some(RequestsAction::Unblock { account_id }) => {
            client.unblock(&account_id)?;
            tell_other_devices(&mut client).await?;
            println!("unblocked {}", printable(&account_id));
            Ok(())
        }
    }
}

pub(crate) async fn username(
    mut client: Client,
    action: Option<UsernameAction>,
    json: bool,
) -> anyhow::Result<()> {
    let username = match action {
        None => client.username()?,
        Some(UsernameAction::Set { name }) => client.set_username(Some(&name)).await?,
        Some(UsernameAction::Clear) => client.set_username(None).await?,
    };
    client.disconnect().await;
    let discoverable = client.settings()?.discoverable;
    if json {
        return print_json(&serde_json::json!({
            "username": username.as_ref().map(|name| name.to_string()),
            "discoverable": discoverable,
        }));
    }
    match (username, discoverable) {
        (None, _) => println!("no username"),
        (Some(name), true) => println!("{name} (others can find you by it)"),
        (Some(name), false) => {
            println!("{name} (nobody can find you by it until `miyu settings set discoverable on`)")
        }
    }
    Ok(())
}

pub(crate) async fn timer(
    mut client: Client,
    contact: &str,
    duration: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let seconds = match duration {
        None => client.timer(contact)?,
        Some(text) => {
            let seconds = miyu_client::parse_timer(&text).map_err(|e| Usage(e.to_string()))?;
            client.set_timer(contact, seconds).await?;
            client.disconnect().await;
            seconds
        }
    };
    if json {
        print_json(&serde_json::json!({ "contact": contact, "timer_seconds": seconds }))
    } else {
        println!(
            "disappearing messages with {}: {}",
            printable(contact),
            miyu_client::timer_text(seconds)
        );
        Ok(())
    }
}

/// Posts what a local change queued for the account's other devices, if anything (best
/// effort: what cannot go out now waits in the outbox for the next connection).
pub(crate) async fn tell_other_devices(client: &mut Client) -> anyhow::Result<()> {
    if client.outbox_waiting()? {
        match client.flush().await {
            Err(error) if !error.is_transient() => return Err(error.into()),
            _ => {}
        }
        client.disconnect().await;
    }
    Ok(())
}

/// Marks the contact's messages read; with read receipts on, tells them (best effort: a
/// receipt that cannot go out now waits in the outbox).
pub(crate) async fn read(client: &mut Client, contact: &str) -> anyhow::Result<()> {
    if client.mark_read(contact)? {
        match client.flush().await {
            Err(error) if !error.is_transient() => return Err(error.into()),
            _ => {}
        }
    }
    Ok(())
}
