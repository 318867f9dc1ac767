//! `provision-pair`: one pair, or many from a file in one transaction, the keys for a person or
//! as JSON.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};
use lbs_protocol::PairName;

use super::{days, open, when};

use crate::time::now_ms;

/// Provisions `pairs` (name, FQDN), two servers each unless `single`, and shows their keys.
pub(super) fn provision_pairs(
    dir: &Path,
    pairs: &[(String, String)],
    single: bool,
    key_days: u64,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut store = open(dir)?;
    let made = store.provision_pairs(pairs, if single { 1 } else { 2 }, days(key_days), now_ms());
    let made = match made {
        Err(err) if pairs.len() > 1 => {
            bail!("{err}: none of the {} pairs was provisioned", pairs.len())
        }
        made => made?,
    };
    if json {
        let keys: Vec<serde_json::Value> = pairs
            .iter()
            .zip(&made)
            .flat_map(|((name, fqdn), servers)| {
                servers.iter().map(move |server| {
                    serde_json::json!({
                        "pair": name,
                        "fqdn": fqdn,
                        "sid": server.sid.to_string(),
                        "key": server.key.to_string(),
                        "expires_at": when(server.expires_at),
                    })
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&keys)?);
        return Ok(ExitCode::SUCCESS);
    }
    for ((name, fqdn), servers) in pairs.iter().zip(&made) {
        lbs_host::say!("pair {name} ({fqdn}):");
        for server in servers {
            lbs_host::say!(
                "  SID {}  activation key {}  (valid until {})",
                server.sid,
                server.key,
                when(server.expires_at)
            );
        }
    }
    lbs_host::say!("The keys are shown only now. The first box to activate becomes primary.");
    Ok(ExitCode::SUCCESS)
}

/// A pair's name and FQDN, both checked.
pub(super) fn checked_pair(name: &str, fqdn: &str) -> anyhow::Result<(String, String)> {
    let name: PairName = name.parse().context("the pair name")?;
    check_fqdn(fqdn)?;
    Ok((name.as_str().to_owned(), fqdn.to_owned()))
}

/// `provision-pair --from`: one `NAME FQDN` per line; every line is checked before anything
/// is provisioned.
pub(super) fn pairs_from(file: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let mut pairs = Vec::new();
    let mut names = std::collections::HashSet::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let at = || format!("{} line {}", file.display(), number + 1);
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, fqdn] = fields[..] else {
            bail!("{}: expected `NAME FQDN`, found {line:?}", at());
        };
        let pair = checked_pair(name, fqdn).with_context(at)?;
        if !names.insert(pair.0.clone()) {
            bail!("{}: pair {} is listed twice", at(), pair.0);
        }
        pairs.push(pair);
    }
    if pairs.is_empty() {
        bail!("{} lists no pair", file.display());
    }
    Ok(pairs)
}

pub(super) fn check_fqdn(fqdn: &str) -> anyhow::Result<()> {
    let ok = fqdn.len() <= 253
        && fqdn.split('.').count() >= 2
        && fqdn.trim_end_matches('.').split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !ok {
        bail!("{fqdn:?} is not a DNS name like pbx.example.com");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fqdns_are_checked() {
        assert!(check_fqdn("pbx.example.com").is_ok());
        assert!(check_fqdn("pbx.example.com.").is_ok());
        for bad in ["pbx", "-a.example", "a..b", "a b.example", ""] {
            assert!(check_fqdn(bad).is_err(), "{bad}");
        }
    }
}
