//! The device commands: `miyu link` on a new device, `miyu devices [add CODE | revoke ID]` on
//! the account's first device.

use std::path::Path;
use std::time::Duration;

use clap::Subcommand;
use miyu_client::devices::{DeviceView, LINK_WAIT};
use miyu_client::{Client, Proxy};
use miyu_proto::{DeviceId, LinkCode, ServerAddress};

use crate::{Usage, print_json};

#[derive(Subcommand, Debug)]
pub(crate) enum DevicesAction {
    /// Approve a new device that shows a `miyu-link://` code (from `miyu link` on it).
    Add {
        code: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// How many seconds to wait for the new device.
        #[arg(long, default_value_t = LINK_WAIT.as_secs())]
        wait: u64,
    },
    /// Remove a device from the account and from every conversation, for good.
    Revoke { id: String },
}

/// A device id as people compare it: groups of four.
fn grouped(id: &str) -> String {
    id.as_bytes()
        .chunks(4)
        .map(|chunk| String::from_utf8_lossy(chunk).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn day(day: u64) -> String {
    // Days since 1970-01-01 to a calendar date (proleptic Gregorian).
    let z = day as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// `miyu link`: makes this profile a new device of an account and waits for its approval.
pub(crate) async fn link(
    profile: &Path,
    server: ServerAddress,
    name: &str,
    protection: &miyu_client::Protection,
    proxy: Option<Proxy>,
    wait: u64,
    json: bool,
) -> anyhow::Result<()> {
    let (mut client, linked) = Client::link(
        profile,
        server,
        name,
        protection,
        proxy,
        Duration::from_secs(wait),
        |code| {
            let text = code.to_string();
            // The code on its own line, for copying; the QR code and the fingerprint to the
            // error stream, for people.
            println!("{text}");
            if let Ok(qr) = qrcode::QrCode::new(text.as_bytes()) {
                let picture = qr
                    .render::<qrcode::render::unicode::Dense1x2>()
                    .quiet_zone(true)
                    .build();
                eprintln!("{picture}");
            }
            let id = DeviceId::from_device_key(&code.device_key).to_string();
            eprintln!(
                "On a device of your account run `miyu devices add CODE` with the code above, and check it shows this device as {name:?} with the fingerprint {}",
                grouped(&id)
            );
            eprintln!("waiting for the approval...");
        },
    )
    .await?;
    client.disconnect().await;
    if json {
        print_json(&linked)
    } else {
        println!(
            "linked as {} ({} conversations, {} messages of history)",
            linked.name, linked.conversations, linked.messages
        );
        Ok(())
    }
}

pub(crate) async fn devices(
    profile: &Path,
    proxy: Option<Option<Proxy>>,
    action: Option<DevicesAction>,
    json: bool,
) -> anyhow::Result<()> {
    let mut client = crate::open(profile, proxy).await?;
    match action {
        None => {
            let devices = client.devices().await?;
            client.disconnect().await;
            if json {
                return print_json(&devices);
            }
            for DeviceView {
                id,
                name,
                created_day,
                last_active_day,
                this_device,
            } in devices
            {
                println!(
                    "{id}  {:<20} linked {}  last active {}{}",
                    name.unwrap_or_else(|| "(unnamed)".into()),
                    day(created_day),
                    day(last_active_day),
                    if this_device { "  (this device)" } else { "" }
                );
            }
            Ok(())
        }
        Some(DevicesAction::Add { code, yes, wait }) => {
            let code: LinkCode = code
                .parse()
                .map_err(|error| Usage(format!("not a link code: {error}")))?;
            let id = DeviceId::from_device_key(&code.device_key).to_string();
            if !yes {
                use std::io::IsTerminal;
                if !std::io::stdin().is_terminal() {
                    return Err(Usage(format!(
                        "linking {:?} (fingerprint {}) gives it your messages: pass --yes to confirm",
                        code.name,
                        grouped(&id)
                    ))
                    .into());
                }
                println!(
                    "Link the device {:?} with the fingerprint {}? It will read every conversation. [y/N]",
                    code.name,
                    grouped(&id)
                );
                let mut answer = String::new();
                std::io::stdin().read_line(&mut answer)?;
                if !matches!(answer.trim(), "y" | "Y" | "yes") {
                    return Err(Usage("not linked".into()).into());
                }
            }
            let linked = client
                .approve_device(&code, Duration::from_secs(wait))
                .await?;
            client.disconnect().await;
            if json {
                print_json(&linked)
            } else {
                println!(
                    "linked {} ({}): added to {} conversations, {} messages of history sent",
                    linked.name, linked.device, linked.conversations, linked.messages
                );
                Ok(())
            }
        }
        Some(DevicesAction::Revoke { id }) => {
            let revoked = client.revoke_device(&id).await?;
            client.disconnect().await;
            if json {
                print_json(&serde_json::json!({ "revoked": revoked }))
            } else {
                println!("revoked {revoked}");
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_read_as_dates() {
        assert_eq!(day(0), "1970-01-01");
        assert_eq!(day(19_723), "2024-01-01");
        assert_eq!(day(20_786), "2026-11-29");
    }
}
