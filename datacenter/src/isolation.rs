//! Customers apart on the overlay. The endpoints forward between their tunnels' peers (a
//! remote backup reaches its primary through them), and the kernel would forward between any
//! two boxes: a box of one customer would reach another customer's SIP, AMI, SSH and sync
//! ports. One nftables table, replaced whole whenever the boxes change, lets a packet from an
//! endpoint's interface be forwarded only to the other box of the same pair.

use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

/// The table lbs owns (and nothing else touches).
pub const TABLE: &str = "lbs_overlay";
/// How long `nft` may take.
const NFT_DEADLINE: Duration = Duration::from_secs(10);

/// Why the rules could not be put in place.
#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    /// `nft` is not installed.
    #[error(
        "cannot keep pairs apart on the overlay: nft is not installed (apt-get install nftables); until then every box can reach every other customer's boxes"
    )]
    NoNft,
    /// `nft` ran and refused, or did not finish.
    #[error(
        "cannot keep pairs apart on the overlay: nft {0}; until this is fixed every box can reach every other customer's boxes"
    )]
    Nft(String),
}

/// The nftables script for endpoints on `interfaces` and the pairs' overlay addresses: one
/// transaction that replaces the table, so no moment passes without rules.
pub fn ruleset(interfaces: &[String], pairs: &[Vec<Ipv4Addr>]) -> String {
    let mut allowed = Vec::new();
    for pair in pairs {
        for from in pair {
            for to in pair {
                if from != to {
                    allowed.push(format!("{from} . {to}"));
                }
            }
        }
    }
    let interfaces: Vec<String> = interfaces.iter().map(|i| format!("\"{i}\"")).collect();
    let elements = if allowed.is_empty() {
        String::new()
    } else {
        format!("\t\telements = {{ {} }}\n", allowed.join(", "))
    };
    let from_tunnels = format!("iifname {{ {} }}", interfaces.join(", "));
    format!(
        "table inet {TABLE}\n\
         delete table inet {TABLE}\n\
         table inet {TABLE} {{\n\
         \tset same_pair {{\n\
         \t\ttype ipv4_addr . ipv4_addr\n\
         {elements}\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\t{from_tunnels} ip saddr . ip daddr @same_pair accept\n\
         \t\t{from_tunnels} counter drop\n\
         \t}}\n\
         }}\n"
    )
}

/// Runs `nft -f -` with `script`, within [`NFT_DEADLINE`].
pub async fn apply(script: &str) -> Result<(), IsolationError> {
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|err| match err.kind() {
            std::io::ErrorKind::NotFound => IsolationError::NoNft,
            _ => IsolationError::Nft(format!("cannot be started: {err}")),
        })?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| IsolationError::Nft("has no standard input".into()))?;
    let run = async {
        stdin.write_all(script.as_bytes()).await?;
        drop(stdin);
        child.wait_with_output().await
    };
    let out = tokio::time::timeout(NFT_DEADLINE, run)
        .await
        .map_err(|_| IsolationError::Nft(format!("did not finish within {NFT_DEADLINE:?}")))?
        .map_err(|err| IsolationError::Nft(err.to_string()))?;
    if !out.status.success() {
        return Err(IsolationError::Nft(format!(
            "refused the rules ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The overlay addresses of each pair (keys and addresses, pair by pair, as the store or
/// the main site gives them).
pub fn overlays<K>(pairs: &[Vec<(K, Ipv4Addr)>]) -> Vec<Vec<Ipv4Addr>> {
    pairs
        .iter()
        .map(|pair| pair.iter().map(|(_, overlay)| *overlay).collect())
        .collect()
}

/// Removes the table (at shutdown, with the endpoints).
pub async fn remove() -> Result<(), IsolationError> {
    apply(&format!("table inet {TABLE}\ndelete table inet {TABLE}\n")).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_boxes_of_one_pair_are_let_through_to_each_other() {
        let a = [Ipv4Addr::new(10, 77, 0, 10), Ipv4Addr::new(10, 77, 0, 11)];
        let b = [Ipv4Addr::new(10, 77, 0, 12)];
        let script = ruleset(&["lbs-dc1".into()], &[a.to_vec(), b.to_vec()]);
        assert!(script.starts_with("table inet lbs_overlay\ndelete table inet lbs_overlay\n"));
        assert!(script.contains("elements = { 10.77.0.10 . 10.77.0.11, 10.77.0.11 . 10.77.0.10 }"));
        assert!(!script.contains("10.77.0.12 ."), "{script}");
        assert!(script.contains("iifname { \"lbs-dc1\" } ip saddr . ip daddr @same_pair accept"));
        assert!(script.contains("iifname { \"lbs-dc1\" } counter drop"));
        // No pair with two boxes yet: an empty set (nft refuses `elements = { }`).
        let lonely = ruleset(&["lbs-dc1".into()], &[b.to_vec()]);
        assert!(!lonely.contains("elements"), "{lonely}");
    }
}
