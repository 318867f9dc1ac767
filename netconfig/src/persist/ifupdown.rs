//! ifupdown: the interface's `iface … inet static` stanza in `/etc/network/interfaces`-style files.

use super::*;

const STANZAS: &[&str] = &[
    "iface",
    "auto",
    "mapping",
    "source",
    "source-directory",
    "allow-auto",
    "allow-hotplug",
];

fn starts_stanza(line: &str) -> bool {
    let word = line.split_whitespace().next().unwrap_or("");
    STANZAS.contains(&word) || word.starts_with("allow-")
}

/// The `iface <interface> inet …` line and the lines of its options: (first, end, method).
pub(super) fn stanza(text: &str, interface: &str) -> Option<(usize, usize, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().position(|l| {
        let words: Vec<&str> = l.split_whitespace().collect();
        words.len() >= 4 && words[0] == "iface" && words[1] == interface && words[2] == "inet"
    })?;
    let method = lines[start].split_whitespace().nth(3)?.to_owned();
    let end = lines[start + 1..]
        .iter()
        .position(|l| starts_stanza(l.trim_start()))
        .map_or(lines.len(), |n| start + 1 + n);
    Some((start, end, method))
}

/// (line, value) of the first option `name` within the stanza.
fn option(lines: &[String], start: usize, end: usize, name: &str) -> Option<(usize, String)> {
    (start + 1..end).find_map(|i| {
        let mut words = lines[i].split_whitespace();
        (words.next() == Some(name)).then(|| (i, words.next().unwrap_or("").to_owned()))
    })
}

fn address_of(lines: &[String], start: usize, end: usize) -> Result<Ipv4Cidr, Problem> {
    let (_, address) =
        option(lines, start, end, "address").ok_or_else(|| other("no address line"))?;
    if let Ok(cidr) = address.parse::<Ipv4Cidr>() {
        return Ok(cidr);
    }
    let ip: Ipv4Addr = address
        .parse()
        .map_err(|_| other(format!("address {address:?} is not an IPv4 address")))?;
    let (_, mask) = option(lines, start, end, "netmask")
        .ok_or_else(|| other("address without a prefix length or netmask"))?;
    let prefix = match mask.parse::<u8>() {
        Ok(prefix) => prefix,
        Err(_) => {
            let mask: Ipv4Addr = mask
                .parse()
                .map_err(|_| other(format!("netmask {mask:?} is not valid")))?;
            let bits = u32::from(mask);
            if bits.leading_ones() + bits.trailing_zeros() != 32 {
                return Err(other(format!("netmask {mask} is not contiguous")));
            }
            bits.leading_ones() as u8
        }
    };
    Ipv4Cidr::new(ip, prefix).ok_or_else(|| other("prefix length over 32"))
}

pub(super) fn read(text: &str, interface: &str) -> Result<StaticConfig, Problem> {
    let (start, end, method) =
        stanza(text, interface).ok_or_else(|| other("no iface stanza for it"))?;
    match method.as_str() {
        "dhcp" => return Err(Problem::Dhcp),
        "static" => {}
        other_method => {
            return Err(other(format!(
                "method {other_method:?}: lbs handles static addresses only"
            )));
        }
    }
    let (lines, _) = lines(text);
    let address = address_of(&lines, start, end)?;
    let gateway = option(&lines, start, end, "gateway").and_then(|(_, g)| g.parse().ok());
    Ok(StaticConfig { address, gateway })
}

/// Replaces the value (second word) of an option line, keeping its indentation.
fn set_word(line: &str, value: &str) -> String {
    let indent = &line[..line.len() - line.trim_start().len()];
    let mut words = line.split_whitespace();
    let name = words.next().unwrap_or("");
    let _old = words.next();
    let rest: Vec<&str> = words.collect();
    let mut out = format!("{indent}{name} {value}");
    for word in rest {
        out.push(' ');
        out.push_str(word);
    }
    out
}

pub(super) fn rewrite(text: &str, interface: &str, new: &StaticConfig) -> Result<String, String> {
    let (start, end, _) = stanza(text, interface).ok_or("no iface stanza")?;
    let (mut lines, newline) = lines(text);
    let (at, old) = option(&lines, start, end, "address").ok_or("no address line")?;
    let indent = lines[at][..lines[at].len() - lines[at].trim_start().len()].to_owned();
    if old.contains('/') {
        lines[at] = set_word(&lines[at], &new.address.to_string());
    } else {
        lines[at] = set_word(&lines[at], &new.address.addr.to_string());
        if let Some((m, _)) = option(&lines, start, end, "netmask") {
            lines[m] = set_word(&lines[m], &new.address.netmask().to_string());
        }
    }
    if let Some((b, _)) = option(&lines, start, end, "broadcast") {
        let broadcast = u32::from(new.address.network()) | !u32::from(new.address.netmask());
        lines[b] = set_word(&lines[b], &Ipv4Addr::from(broadcast).to_string());
    }
    if let Some((n, _)) = option(&lines, start, end, "network") {
        lines[n] = set_word(&lines[n], &new.address.network().to_string());
    }
    match (option(&lines, start, end, "gateway"), new.gateway) {
        (Some((g, _)), Some(ip)) => lines[g] = set_word(&lines[g], &ip.to_string()),
        (Some((g, _)), None) => {
            lines.remove(g);
        }
        (None, Some(ip)) => lines.insert(at + 1, format!("{indent}gateway {ip}")),
        (None, None) => {}
    }
    Ok(join(&lines, newline))
}
