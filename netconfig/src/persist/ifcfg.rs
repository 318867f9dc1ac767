//! RHEL `ifcfg-*` files: `IPADDR=`, `PREFIX=`, `GATEWAY=`.

use super::*;

fn unquote(value: &str) -> &str {
    value.trim_matches(|c| c == '"' || c == '\'')
}

fn get<'a>(lines: &'a [String], names: &[&str]) -> Option<(usize, &'a str)> {
    lines.iter().enumerate().find_map(|(i, line)| {
        if is_comment(line) {
            return None;
        }
        let (key, value) = key_value(line)?;
        names.contains(&key).then(|| (i, unquote(value)))
    })
}

pub(super) fn matches(text: &str, interface: &str) -> bool {
    let (lines, _) = lines(text);
    get(&lines, &["DEVICE"]).is_some_and(|(_, d)| d == interface)
}

/// Keeps the quoting style of the line.
fn set(line: &str, value: &str) -> String {
    let quote = key_value(line)
        .and_then(|(_, v)| v.chars().next())
        .filter(|c| *c == '"' || *c == '\'');
    match quote {
        Some(q) => set_value(line, &format!("{q}{value}{q}")),
        None => set_value(line, value),
    }
}

pub(super) fn read(text: &str) -> Result<StaticConfig, Problem> {
    let (lines, _) = lines(text);
    if let Some((_, proto)) = get(&lines, &["BOOTPROTO"])
        && matches!(proto.to_ascii_lowercase().as_str(), "dhcp" | "bootp")
    {
        return Err(Problem::Dhcp);
    }
    let (_, ip) = get(&lines, &["IPADDR", "IPADDR0"]).ok_or_else(|| other("no IPADDR"))?;
    let ip: Ipv4Addr = ip
        .parse()
        .map_err(|_| other(format!("IPADDR {ip:?} is not an IPv4 address")))?;
    let prefix = if let Some((_, p)) = get(&lines, &["PREFIX", "PREFIX0"]) {
        p.parse::<u8>()
            .map_err(|_| other(format!("PREFIX {p:?}")))?
    } else if let Some((_, m)) = get(&lines, &["NETMASK", "NETMASK0"]) {
        let mask: Ipv4Addr = m.parse().map_err(|_| other(format!("NETMASK {m:?}")))?;
        u32::from(mask).leading_ones() as u8
    } else {
        return Err(other("neither PREFIX nor NETMASK"));
    };
    let address = Ipv4Cidr::new(ip, prefix).ok_or_else(|| other("prefix over 32"))?;
    let gateway = get(&lines, &["GATEWAY", "GATEWAY0"]).and_then(|(_, g)| g.parse().ok());
    Ok(StaticConfig { address, gateway })
}

pub(super) fn rewrite(text: &str, new: &StaticConfig) -> Result<String, String> {
    let (mut lines, newline) = lines(text);
    let (at, _) = get(&lines, &["IPADDR", "IPADDR0"]).ok_or("no IPADDR")?;
    lines[at] = set(&lines[at], &new.address.addr.to_string());
    if let Some((p, _)) = get(&lines, &["PREFIX", "PREFIX0"]) {
        lines[p] = set(&lines[p], &new.address.prefix.to_string());
    }
    if let Some((m, _)) = get(&lines, &["NETMASK", "NETMASK0"]) {
        lines[m] = set(&lines[m], &new.address.netmask().to_string());
    }
    match (
        get(&lines, &["GATEWAY", "GATEWAY0"]).map(|(g, _)| g),
        new.gateway,
    ) {
        (Some(g), Some(ip)) => lines[g] = set(&lines[g], &ip.to_string()),
        (Some(g), None) => {
            lines.remove(g);
        }
        (None, Some(ip)) => lines.insert(at + 1, format!("GATEWAY={ip}")),
        (None, None) => {}
    }
    // ARPCHECK (default yes) probes the address before ifup takes it.
    if let Some((a, value)) = get(&lines, &["ARPCHECK"])
        && value.eq_ignore_ascii_case("no")
    {
        lines[a] = set(&lines[a], "yes");
    }
    Ok(join(&lines, newline))
}
