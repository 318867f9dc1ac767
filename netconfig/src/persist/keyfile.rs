//! NetworkManager keyfiles: `[ipv4]` `address1=` of the connection bound to the interface.

use super::*;

pub(super) fn matches(text: &str, interface: &str) -> bool {
    let (lines, _) = lines(text);
    let sections = sections(&lines);
    lines.iter().zip(&sections).any(|(line, section)| {
        (section == "connection" || section == "match")
            && !is_comment(line)
            && key_value(line).is_some_and(|(k, v)| {
                k == "interface-name" && v.split(';').any(|n| n.trim() == interface)
            })
    })
}

/// The first `key=value` line of `[ipv4]` for which `pick` says yes, with its index.
fn find_ipv4<T>(
    lines: &[String],
    sections: &[String],
    pick: impl Fn(&str, &str) -> Option<T>,
) -> Option<(usize, T)> {
    lines
        .iter()
        .zip(sections)
        .enumerate()
        .find_map(|(i, (line, section))| {
            if section != "ipv4" || is_comment(line) {
                return None;
            }
            let (key, value) = key_value(line)?;
            Some((i, pick(key, value)?))
        })
}

/// (line, address, inline gateway) of the first `address1=`/`addresses=` entry.
fn find_address(
    lines: &[String],
    sections: &[String],
) -> Option<(usize, Ipv4Cidr, Option<Ipv4Addr>)> {
    let (i, (address, gateway)) = find_ipv4(lines, sections, |key, value| {
        if !key.starts_with("address") || key == "address-data" {
            return None;
        }
        let first = value.split(';').next()?.trim();
        let mut parts = first.split(',');
        let address: Ipv4Cidr = parts.next()?.trim().parse().ok()?;
        let gateway = parts.next().and_then(|g| g.trim().parse().ok());
        Some((address, gateway))
    })?;
    Some((i, address, gateway))
}

fn find_key(lines: &[String], sections: &[String], name: &str) -> Option<(usize, String)> {
    find_ipv4(lines, sections, |key, value| {
        (key == name).then(|| value.to_owned())
    })
}

pub(super) fn read(text: &str) -> Result<StaticConfig, Problem> {
    let (lines, _) = lines(text);
    let sections = sections(&lines);
    match find_key(&lines, &sections, "method").map(|(_, m)| m) {
        Some(m) if m == "auto" => return Err(Problem::Dhcp),
        Some(m) if m == "manual" => {}
        Some(m) => return Err(other(format!("ipv4 method {m:?}: lbs needs manual"))),
        None => return Err(other("no [ipv4] method")),
    }
    let (_, address, inline) =
        find_address(&lines, &sections).ok_or_else(|| other("no [ipv4] address1="))?;
    let gateway =
        inline.or_else(|| find_key(&lines, &sections, "gateway").and_then(|(_, g)| g.parse().ok()));
    Ok(StaticConfig { address, gateway })
}

pub(super) fn rewrite(text: &str, new: &StaticConfig) -> Result<String, String> {
    let (mut lines, newline) = lines(text);
    let sections = sections(&lines);
    let (at, _, inline) = find_address(&lines, &sections).ok_or("no [ipv4] address1=")?;
    let gateway_line = find_key(&lines, &sections, "gateway");
    let value = key_value(&lines[at])
        .map(|(_, v)| v.to_owned())
        .unwrap_or_default();
    let mut entries: Vec<String> = value.split(';').map(str::to_owned).collect();
    entries[0] = match (inline, new.gateway) {
        (Some(_), Some(ip)) => format!("{},{ip}", new.address),
        _ => new.address.to_string(),
    };
    lines[at] = set_value(&lines[at], &entries.join(";"));
    match (inline, gateway_line, new.gateway) {
        (Some(_), _, _) | (None, None, None) => {}
        (None, Some((g, _)), Some(ip)) => lines[g] = set_value(&lines[g], &ip.to_string()),
        (None, Some((g, _)), None) => {
            lines.remove(g);
        }
        (None, None, Some(ip)) => lines.insert(at + 1, format!("gateway={ip}")),
    }
    // NetworkManager's ipv4.dad-timeout: -1 (default) and 0 mean no probe at boot.
    let sections = super::sections(&lines);
    match find_key(&lines, &sections, "dad-timeout") {
        Some((d, value)) if value.parse::<i64>().is_ok_and(|v| v <= 0) => {
            lines[d] = set_value(&lines[d], "3000");
        }
        Some(_) => {}
        None => {
            let (at, _, _) = find_address(&lines, &sections).ok_or("address vanished")?;
            lines.insert(at + 1, "dad-timeout=3000".into());
        }
    }
    Ok(join(&lines, newline))
}
