//! systemd-networkd: `.network` files whose `[Match]` names the interface.

use super::*;

/// Whether a `[Match]` section names the interface (`Name=` takes a space-separated
/// list of names and globs).
pub(super) fn matches(text: &str, interface: &str) -> bool {
    let (lines, _) = lines(text);
    let sections = sections(&lines);
    lines.iter().zip(&sections).any(|(line, section)| {
        section == "Match"
            && !is_comment(line)
            && key_value(line).is_some_and(|(k, v)| {
                k == "Name" && v.split_whitespace().any(|p| glob(p, interface))
            })
    })
}

/// `*` and `?` globs, as networkd's `Name=` allows.
fn glob(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

/// A value and the line it is on.
type At<T> = Option<(usize, T)>;

/// The IPv4 `Address=` and `Gateway=` lines.
fn find(lines: &[String]) -> (At<Ipv4Cidr>, At<Ipv4Addr>) {
    let sections = sections(lines);
    let mut address = None;
    let mut gateway = None;
    for (i, (line, section)) in lines.iter().zip(&sections).enumerate() {
        if is_comment(line) {
            continue;
        }
        let Some((key, value)) = key_value(line) else {
            continue;
        };
        match (section.as_str(), key) {
            ("Network" | "Address", "Address") if address.is_none() => {
                if let Ok(cidr) = value.parse::<Ipv4Cidr>() {
                    address = Some((i, cidr));
                }
            }
            ("Network" | "Route", "Gateway") if gateway.is_none() => {
                if let Ok(ip) = value.parse::<Ipv4Addr>() {
                    gateway = Some((i, ip));
                }
            }
            _ => {}
        }
    }
    (address, gateway)
}

pub(super) fn read(text: &str) -> Result<StaticConfig, Problem> {
    let (lines, _) = lines(text);
    let sections = sections(&lines);
    let dhcp = lines.iter().zip(&sections).any(|(line, section)| {
        section == "Network"
            && !is_comment(line)
            && key_value(line).is_some_and(|(k, v)| {
                k == "DHCP" && matches!(v, "yes" | "true" | "ipv4" | "1" | "on")
            })
    });
    let (address, gateway) = find(&lines);
    match address {
        Some((_, address)) => Ok(StaticConfig {
            address,
            gateway: gateway.map(|(_, g)| g),
        }),
        None if dhcp => Err(Problem::Dhcp),
        None => Err(other("no IPv4 Address= in [Network] or [Address]")),
    }
}

pub(super) fn rewrite(text: &str, new: &StaticConfig) -> Result<String, String> {
    let (mut lines, newline) = lines(text);
    let (address, gateway) = find(&lines);
    let Some((at, _)) = address else {
        return Err("no IPv4 Address= to change".into());
    };
    lines[at] = set_value(&lines[at], &new.address.to_string());
    match (gateway, new.gateway) {
        (Some((g, _)), Some(ip)) => lines[g] = set_value(&lines[g], &ip.to_string()),
        (Some((g, _)), None) => {
            lines.remove(g);
        }
        (None, Some(ip)) => {
            let sections = sections(&lines);
            let end = last_line_of(&lines, &sections, "Network")
                .ok_or("no [Network] section to add Gateway= to")?;
            lines.insert(end + 1, format!("Gateway={ip}"));
        }
        (None, None) => {}
    }
    // Duplicate detection lives in [Address] sections only.
    let sections = sections(&lines);
    let (address, _) = find(&lines);
    if let Some((at, _)) = address
        && sections[at] == "Address"
    {
        let dad = lines.iter().zip(&sections).position(|(line, section)| {
            section == "Address"
                && key_value(line).is_some_and(|(k, _)| k == "DuplicateAddressDetection")
        });
        match dad {
            Some(d) => {
                let value = key_value(&lines[d]).map(|(_, v)| v.to_owned());
                if matches!(value.as_deref(), Some("none" | "ipv6")) {
                    let both = if value.as_deref() == Some("ipv6") {
                        "both"
                    } else {
                        "ipv4"
                    };
                    lines[d] = set_value(&lines[d], both);
                }
            }
            None => lines.insert(at + 1, "DuplicateAddressDetection=ipv4".into()),
        }
    }
    Ok(join(&lines, newline))
}

/// The last non-blank line of the first section called `name`.
pub(super) fn last_line_of(lines: &[String], sections: &[String], name: &str) -> Option<usize> {
    let first = sections.iter().position(|s| s == name)?;
    let mut last = first;
    for (i, section) in sections.iter().enumerate().skip(first) {
        if section != name {
            break;
        }
        if !lines[i].trim().is_empty() {
            last = i;
        }
    }
    Some(last)
}
