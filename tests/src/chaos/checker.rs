//! The chaos checker: judgements made from what was recorded outside lbs — the sniffer's ARP
//! lines, the phone's answers, the files on both boxes — and from the data center's and the
//! agents' own words only where the question is about them (generations, who believed it
//! was primary). Pure functions of those records, tested here without a lab.

use std::collections::BTreeMap;

/// A box claimed the shared address at `at_ms`: answered an ARP request for it, or announced
/// it (gratuitous ARP).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub at_ms: u64,
    pub mac: String,
}

/// The claims of `ip` in tcpdump's lines (`-n -e -tt`): `<epoch.frac> <src MAC> > <dst>,
/// ethertype ARP …: Reply <ip> is-at <MAC>, …` or `…: Request who-has <x> tell <ip>, …`.
pub fn arp_claims<'a>(lines: impl IntoIterator<Item = &'a str>, ip: &str) -> Vec<Claim> {
    let reply = format!("Reply {ip} is-at ");
    let announce = format!("tell {ip},");
    lines
        .into_iter()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let at: f64 = words.next()?.parse().ok()?;
            let source = words.next()?;
            let mac = if let Some(rest) = line.split(&reply).nth(1) {
                rest.split([',', ' ']).next()?.to_owned()
            } else if line.contains(&announce) {
                source.to_owned()
            } else {
                return None;
            };
            Some(Claim {
                at_ms: (at * 1000.0) as u64,
                mac: mac.to_lowercase(),
            })
        })
        .collect()
}

/// Split-brain moments: intervals in which two boxes held the address at once, seen as
/// claims by one MAC, then another, then the first again, all within `window_ms` (a clean
/// change of holder — a failover, a hand-over — never goes back). Overlapping ones are one
/// moment: (start, end) in ms.
pub fn split_brain_moments(claims: &[Claim], window_ms: u64) -> Vec<(u64, u64)> {
    let mut sorted = claims.to_vec();
    sorted.sort_by_key(|c| c.at_ms);
    let mut moments: Vec<(u64, u64)> = Vec::new();
    for (i, first) in sorted.iter().enumerate() {
        let within = sorted[i + 1..]
            .iter()
            .take_while(|c| c.at_ms <= first.at_ms + window_ms);
        let mut other_seen = false;
        for later in within {
            if later.mac != first.mac {
                other_seen = true;
            } else if other_seen {
                match moments.last_mut() {
                    Some(last) if last.1 >= first.at_ms => last.1 = last.1.max(later.at_ms),
                    _ => moments.push((first.at_ms, later.at_ms)),
                }
                break;
            }
        }
    }
    moments
}

/// The data center's generation, sampled: the samples where it went backwards.
pub fn regressions(generations: &[(u64, u64)]) -> Vec<(u64, u64, u64)> {
    generations
        .windows(2)
        .filter(|w| w[1].1 < w[0].1)
        .map(|w| (w[1].0, w[0].1, w[1].1))
        .collect()
}

/// One look at both agents: who believed it was primary, at which generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Beliefs {
    pub at_ms: u64,
    /// (host, role state, generation) of each agent that answered.
    pub agents: Vec<(String, String, u64)>,
    /// The agents that did not answer (frozen, dead, busy), and why.
    pub silent: Vec<(String, String)>,
}

/// Looks in which two agents believed they were primary of the same generation.
pub fn same_generation_primaries(looks: &[Beliefs]) -> Vec<(u64, u64)> {
    looks
        .iter()
        .filter_map(|look| {
            let mut primaries: BTreeMap<u64, usize> = BTreeMap::new();
            for (_, state, generation) in &look.agents {
                if state == "primary" {
                    *primaries.entry(*generation).or_default() += 1;
                }
            }
            primaries
                .into_iter()
                .find(|(_, n)| *n > 1)
                .map(|(generation, _)| (look.at_ms, generation))
        })
        .collect()
}

/// An automatic promotion at `at_ms` is false when the primary it replaced was alive — no
/// fault had it dead, frozen or off the LAN within `gone_ms` before — and the phone was
/// answered in that time.
pub fn false_promotion(
    at_ms: u64,
    gone_ms: u64,
    primary_disabled: impl Fn(u64, u64) -> bool,
    answers: &[u64],
) -> bool {
    let since = at_ms.saturating_sub(gone_ms);
    let answered = answers.iter().any(|t| *t >= since && *t < at_ms);
    answered && !primary_disabled(since, at_ms)
}

/// A workload file's content: a header naming it, its version and the BLAKE3 of its body,
/// then the body. A copy whose header does not match its body is torn.
pub fn file_content(name: &str, version: u64, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "lbs-chaos {name} v{version} {} {}\n",
        body.len(),
        blake3_hex(body)
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// The version a workload file's content says it is, if the content is whole.
pub fn file_version(name: &str, content: &[u8]) -> Result<u64, String> {
    let end = content
        .iter()
        .position(|b| *b == b'\n')
        .ok_or("no header line")?;
    let header = std::str::from_utf8(&content[..end]).map_err(|_| "a header not UTF-8")?;
    let body = &content[end + 1..];
    let words: Vec<&str> = header.split(' ').collect();
    match words.as_slice() {
        ["lbs-chaos", n, v, len, hash] if *n == name => {
            let version = v
                .strip_prefix('v')
                .and_then(|v| v.parse().ok())
                .ok_or("a bad version")?;
            if len.parse::<usize>().ok() != Some(body.len()) {
                return Err(format!("{} bytes of {len}", body.len()));
            }
            if *hash != blake3_hex(body) {
                return Err("its body does not match its hash".into());
            }
            Ok(version)
        }
        _ => Err(format!("the header {header:?}")),
    }
}

fn blake3_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// The recording's byte at `offset`: a stream a copy must be a prefix of.
pub fn recording_byte(seed: u64, offset: u64) -> u8 {
    let x = (offset / 8)
        .wrapping_add(seed)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x >> ((offset % 8) * 8)) as u8
}

/// Whether `content` is a prefix of the recording's stream; the first offset that is not.
pub fn recording_prefix(seed: u64, content: &[u8]) -> Result<(), u64> {
    match content
        .iter()
        .enumerate()
        .find(|(i, b)| **b != recording_byte(seed, *i as u64))
    {
        Some((i, _)) => Err(i as u64),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(at_ms: u64, mac: &str) -> Claim {
        Claim {
            at_ms,
            mac: mac.into(),
        }
    }

    #[test]
    fn tcpdump_lines_give_replies_and_announcements_of_the_address_only() {
        let lines = [
            "1764990000.100000 5a:ec:b4:27:71:cf > 02:00:00:00:00:32, ethertype ARP (0x0806), length 42: Reply 192.168.1.2 is-at 5a:ec:b4:27:71:cf, length 28",
            "1764990000.200000 02:00:00:00:00:32 > ff:ff:ff:ff:ff:ff, ethertype ARP (0x0806), length 42: Request who-has 192.168.1.2 tell 192.168.1.50, length 28",
            "1764990000.300000 3E:5A:68:E6:2A:F2 > ff:ff:ff:ff:ff:ff, ethertype ARP (0x0806), length 42: Request who-has 192.168.1.2 tell 192.168.1.2, length 28",
            "1764990000.400000 3e:5a:68:e6:2a:f2 > ff:ff:ff:ff:ff:ff, ethertype ARP (0x0806), length 42: Reply 192.168.1.3 is-at 3e:5a:68:e6:2a:f2, length 28",
            "tcpdump: listening on eth0",
        ];
        assert_eq!(
            arp_claims(lines, "192.168.1.2"),
            [
                claim(1_764_990_000_100, "5a:ec:b4:27:71:cf"),
                claim(1_764_990_000_300, "3e:5a:68:e6:2a:f2")
            ]
        );
    }

    #[test]
    fn a_failover_is_no_split_brain_and_two_holders_answering_in_turn_are() {
        // A answers, dies; B announces and answers from then on.
        let failover = [
            claim(0, "a"),
            claim(100, "a"),
            claim(2600, "b"),
            claim(2700, "b"),
        ];
        assert!(split_brain_moments(&failover, 1000).is_empty());
        // A hand-over: A's last answer just before B's first, and never again.
        let hand_over = [claim(0, "a"), claim(20, "b"), claim(120, "b")];
        assert!(split_brain_moments(&hand_over, 1000).is_empty());
        // Both hold it for a second: A, B, A, B, … — one moment, from the first to the last.
        let both: Vec<Claim> = (0..10)
            .map(|i| claim(i * 100, if i % 2 == 0 { "a" } else { "b" }))
            .chain([claim(5000, "b")])
            .collect();
        assert_eq!(split_brain_moments(&both, 1000), [(0, 900)]);
        // The old primary back on the LAN an hour later, answering once: a moment.
        let late = [claim(0, "b"), claim(100, "a"), claim(150, "b")];
        assert_eq!(split_brain_moments(&late, 1000), [(0, 150)]);
    }

    #[test]
    fn generations_going_back_and_two_primaries_of_one_generation_are_found() {
        assert!(regressions(&[(0, 1), (10, 1), (20, 2), (30, 3)]).is_empty());
        assert_eq!(regressions(&[(0, 2), (10, 3), (20, 2)]), [(20, 3, 2)]);
        let look = |agents: Vec<(&str, &str, u64)>| Beliefs {
            at_ms: 7,
            silent: Vec::new(),
            agents: agents
                .into_iter()
                .map(|(h, s, g)| (h.to_owned(), s.to_owned(), g))
                .collect(),
        };
        assert!(
            same_generation_primaries(&[look(vec![
                ("primary", "primary", 3),
                ("backup", "primary", 4)
            ])])
            .is_empty(),
            "a stale primary of an older generation is fenced, not split"
        );
        assert_eq!(
            same_generation_primaries(&[look(vec![
                ("primary", "primary", 3),
                ("backup", "primary", 3)
            ])]),
            [(7, 3)]
        );
    }

    #[test]
    fn an_automatic_promotion_is_false_only_while_the_primary_lived_and_answered() {
        let answers = [9_000, 9_500];
        // Alive and answering: false.
        assert!(false_promotion(10_000, 2_000, |_, _| false, &answers));
        // Dead (a fault had it) in that time: a real failover.
        assert!(!false_promotion(10_000, 2_000, |_, _| true, &answers));
        // Nobody answered the phone for the last 2 s: not a false one either.
        assert!(!false_promotion(20_000, 2_000, |_, _| false, &answers));
    }

    #[test]
    fn a_whole_file_tells_its_version_and_a_torn_one_is_found() {
        let content = file_content("msg7", 3, b"hello voicemail");
        assert_eq!(file_version("msg7", &content), Ok(3));
        assert!(file_version("msg8", &content).is_err());
        assert!(file_version("msg7", &content[..content.len() - 1]).is_err());
        let mut changed = content.clone();
        let last = changed.len() - 1;
        changed[last] ^= 1;
        assert!(file_version("msg7", &changed).is_err());
        let stream: Vec<u8> = (0..1000).map(|i| recording_byte(5, i)).collect();
        assert_eq!(recording_prefix(5, &stream[..700]), Ok(()));
        let mut torn = stream.clone();
        torn[300] ^= 0xff;
        assert_eq!(recording_prefix(5, &torn), Err(300));
    }
}
