//! The group commands: `miyu group create|add|remove|leave|info|set|role` and `miyu groups`.
//! Sending and reading use the same commands as one-to-one chats (`send`, `messages`, ...),
//! with the group's name in place of a contact's.

use clap::Subcommand;
use miyu_client::Client;
use miyu_client::groups::{GroupChange, GroupView, Policy, Role};

use crate::{print_json, printable};

#[derive(Subcommand, Debug)]
pub(crate) enum GroupAction {
    /// Create a group with some of your contacts; you are its owner. Its name, like
    /// everything in it, is end-to-end encrypted.
    Create { name: String, contacts: Vec<String> },
    /// Add contacts (all their devices). Admins may, or everyone if the group allows it.
    Add {
        group: String,
        #[arg(required = true)]
        contacts: Vec<String>,
    },
    /// Remove members: admins remove members, the owner also admins.
    Remove {
        group: String,
        #[arg(required = true)]
        members: Vec<String>,
    },
    /// Leave the group; its history stays on this device.
    Leave { group: String },
    /// Show the group's name, description, permissions and members with their roles.
    Info { group: String },
    /// Change the name, description or permissions (admins, or everyone where allowed).
    Set {
        group: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        description: Option<String>,
        /// A picture for the group: a JPEG, PNG or WebP of at most 64 KiB once its metadata
        /// (GPS position, camera, time) is removed, which happens first.
        #[arg(long, value_name = "PATH", conflicts_with = "no_avatar")]
        avatar: Option<std::path::PathBuf>,
        /// Remove the group's picture.
        #[arg(long)]
        no_avatar: bool,
        /// Who may add members: admins or everyone.
        #[arg(long, value_parser = parse_policy)]
        adding: Option<Policy>,
        /// Who may post: admins (an announcement-only group) or everyone.
        #[arg(long, value_parser = parse_policy)]
        posting: Option<Policy>,
        /// Who may change the name and description: admins or everyone.
        #[arg(long, value_parser = parse_policy)]
        editing: Option<Policy>,
    },
    /// Save the group's picture (default: GROUP and its type's extension, in the current
    /// folder; an existing file is never replaced).
    Avatar {
        group: String,
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Print an invite link for the group (admins, or everyone if the group allows adding).
    /// Whoever uses it (`miyu accept LINK`) becomes your contact and is added at your next
    /// sync, or waits for `group approve` with --approval.
    Invite {
        group: String,
        /// How many people the link serves (1 to 1,000); it expires after 30 days.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Add people only once you approve them.
        #[arg(long)]
        approval: bool,
    },
    /// List the group's invite links you made that can still be used.
    Links { group: String },
    /// Revoke one of your links (its number from `group links`): whoever uses it from now on
    /// is a stranger to you, not someone asking to join.
    RevokeLink { group: String, id: i64 },
    /// List who asked to join through your links and waits for your answer.
    Requests { group: String },
    /// Add someone who asked to join.
    Approve { group: String, name: String },
    /// Refuse someone who asked to join (they are not told).
    Deny { group: String, name: String },
    /// Make a member an admin, an admin a member again, or hand the group over to a member
    /// (`owner`; you stay as an admin). The owner only.
    Role {
        group: String,
        member: String,
        #[arg(value_parser = parse_role)]
        role: Role,
    },
}

fn parse_policy(text: &str) -> Result<Policy, String> {
    Policy::parse(text).map_err(|error| error.to_string())
}

fn parse_role(text: &str) -> Result<Role, String> {
    Role::parse(text).map_err(|error| error.to_string())
}

pub(crate) async fn run(
    client: &mut Client,
    action: GroupAction,
    json: bool,
) -> anyhow::Result<()> {
    let shown = match action {
        GroupAction::Create { name, contacts } => {
            Some(client.create_group(&name, &contacts).await?)
        }
        GroupAction::Add { group, contacts } => Some(client.add_to_group(&group, &contacts).await?),
        GroupAction::Remove { group, members } => {
            Some(client.remove_from_group(&group, &members).await?)
        }
        GroupAction::Leave { group } => {
            client.leave_group(&group).await?;
            None
        }
        GroupAction::Info { group } => Some(client.group_info(&group)?),
        GroupAction::Set {
            group,
            name,
            description,
            avatar,
            no_avatar,
            adding,
            posting,
            editing,
        } => {
            let avatar = match (avatar, no_avatar) {
                (Some(path), _) => Some(
                    std::fs::read(&path)
                        .map_err(|error| anyhow::anyhow!("reading {}: {error}", path.display()))?,
                ),
                (None, true) => Some(Vec::new()),
                (None, false) => None,
            };
            let change = GroupChange {
                title: name,
                description,
                avatar,
                adding,
                posting,
                editing,
            };
            Some(client.change_group(&group, change).await?)
        }
        GroupAction::Role {
            group,
            member,
            role,
        } => Some(client.set_group_role(&group, &member, role).await?),
        GroupAction::Invite {
            group,
            uses,
            approval,
        } => {
            let link = client.group_invite(&group, uses, approval).await?;
            client.disconnect().await;
            if json {
                return print_json(&serde_json::json!({ "link": link.to_string() }));
            }
            println!("{link}");
            return Ok(());
        }
        GroupAction::Avatar { group, out } => {
            let Some((bytes, mime)) = client.group_avatar(&group)? else {
                return Err(crate::Usage(format!("{group} has no picture")).into());
            };
            let extension = mime.rsplit('/').next().unwrap_or("img");
            let out = out.unwrap_or_else(|| {
                let base: String = group
                    .chars()
                    .map(|c| if c.is_alphanumeric() { c } else { '-' })
                    .collect();
                std::path::PathBuf::from(format!("{base}.{extension}"))
            });
            use std::io::Write as _;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&out)
                .map_err(|error| anyhow::anyhow!("writing {}: {error}", out.display()))?;
            file.write_all(&bytes)?;
            if json {
                return print_json(&serde_json::json!({ "saved": out, "mime": mime }));
            }
            println!("{}", out.display());
            return Ok(());
        }
        GroupAction::Requests { group } => {
            let requests = client.join_requests(&group)?;
            if json {
                return print_json(&requests);
            }
            for request in &requests {
                println!(
                    "{}  {}  asked {}",
                    printable(&request.name),
                    request.account_id,
                    crate::format_time(request.requested_at_ms)
                );
            }
            return Ok(());
        }
        GroupAction::Approve { group, name } => Some(client.approve_request(&group, &name).await?),
        GroupAction::Deny { group, name } => {
            client.deny_request(&group, &name)?;
            None
        }
        GroupAction::Links { group } => {
            let links = client.group_links(&group)?;
            if json {
                return print_json(&links);
            }
            for link in &links {
                println!(
                    "#{}  made {}  {} use{} left{}",
                    link.id,
                    crate::format_time(link.created_at_ms),
                    link.uses_left,
                    if link.uses_left == 1 { "" } else { "s" },
                    if link.approval {
                        ", needs your approval"
                    } else {
                        ""
                    }
                );
            }
            return Ok(());
        }
        GroupAction::RevokeLink { group, id } => {
            client.revoke_group_link(&group, id)?;
            None
        }
    };
    client.disconnect().await;
    match shown {
        Some(group) if json => print_json(&group),
        Some(group) => {
            print_group(&group);
            Ok(())
        }
        None => Ok(()),
    }
}

pub(crate) fn list(client: &Client, json: bool) -> anyhow::Result<()> {
    let groups = client.groups()?;
    if json {
        return print_json(&groups);
    }
    for group in &groups {
        let state = match group.state.as_str() {
            "active" => String::new(),
            other => format!(" ({other})"),
        };
        let unread = match group.unread {
            0 => String::new(),
            count => format!(", {count} unread"),
        };
        println!(
            "{}  {} members{}{}",
            printable(&group.name),
            group.members.len(),
            unread,
            state
        );
    }
    Ok(())
}

fn policy(policy: Policy) -> &'static str {
    match policy {
        Policy::Admins => "admins",
        Policy::Everyone => "everyone",
    }
}

fn role(role: Role) -> &'static str {
    match role {
        Role::Owner => "owner",
        Role::Admin => "admin",
        Role::Member => "member",
    }
}

fn print_group(group: &GroupView) {
    println!("{}", printable(&group.title));
    if group.name != group.title {
        println!("  called here: {}", printable(&group.name));
    }
    if !group.description.is_empty() {
        println!("  {}", printable(&group.description));
    }
    if let Some(mime) = &group.avatar_mime {
        println!(
            "  picture: {} KiB {mime} (`miyu group avatar` saves it)",
            group.avatar_bytes.div_ceil(1024)
        );
    }
    if group.state != "active" {
        println!(
            "  you {} this group",
            if group.state == "left" {
                "left"
            } else {
                "were removed from"
            }
        );
    }
    println!(
        "  adding: {}, posting: {}, editing: {}",
        policy(group.adding),
        policy(group.posting),
        policy(group.editing)
    );
    println!("  {} members:", group.members.len());
    for member in &group.members {
        let unapproved = if member.unapproved {
            "  (added without permission)"
        } else {
            ""
        };
        println!(
            "    {}  {}{}",
            printable(&member.name),
            role(member.role),
            unapproved
        );
    }
}
