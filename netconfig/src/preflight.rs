//! The pre-flight checks the seed asks for before a pair is trusted to fail over: the office
//! interface is up, its address is static in the boot configuration, the partner is in the
//! same subnet and answers on the LAN. (The hardware comparison is
//! [`crate::inventory::Inventory::compare`].)

use std::fmt;
use std::net::Ipv4Addr;
use std::path::Path;

use crate::backend::{Arp, NetBackend, ProbeResult};

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Fine.
    Ok,
    /// Works, but not as the design expects; say so in status.
    Warning,
    /// A takeover would fail or be unsafe.
    Problem,
}

/// One check's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub check: &'static str,
    /// How it came out.
    pub severity: Severity,
    /// What was found, in words.
    pub text: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = match self.severity {
            Severity::Ok => "ok     ",
            Severity::Warning => "WARNING",
            Severity::Problem => "PROBLEM",
        };
        write!(f, "{mark} {:<16} {}", self.check, self.text)
    }
}

fn finding(check: &'static str, severity: Severity, text: impl Into<String>) -> Finding {
    Finding {
        check,
        severity,
        text: text.into(),
    }
}

/// Runs every check for `interface` against the partner at `partner`. `config_root` is where
/// the boot configuration lives (`/` on a box; `None` skips that check).
pub async fn preflight<N: NetBackend, A: Arp>(
    net: &N,
    arp: &A,
    interface: &str,
    partner: Ipv4Addr,
    config_root: Option<&Path>,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let link = match net.link(interface).await {
        Ok(link) => link,
        Err(err) => {
            out.push(finding("interface", Severity::Problem, err.to_string()));
            return out;
        }
    };
    if !link.up || !link.carrier {
        let why = if link.up { "has no carrier" } else { "is down" };
        out.push(finding(
            "interface",
            Severity::Problem,
            format!("{} {why}", link.name),
        ));
        return out;
    }
    out.push(finding(
        "interface",
        Severity::Ok,
        format!("{} ({}) up with carrier", link.name, link.mac),
    ));

    let addresses = match net.addresses(&link).await {
        Ok(addresses) => addresses,
        Err(err) => {
            out.push(finding("address", Severity::Problem, err.to_string()));
            return out;
        }
    };
    let Some(own) = addresses.first().copied() else {
        out.push(finding(
            "address",
            Severity::Problem,
            format!("{} has no IPv4 address", link.name),
        ));
        return out;
    };

    if let Some(root) = config_root {
        out.push(match crate::persist::check_static(root, interface) {
            Ok((owner, config)) => finding(
                "static address",
                Severity::Ok,
                format!(
                    "{} in {} ({})",
                    config.address,
                    owner.file.display(),
                    owner.manager
                ),
            ),
            Err(err) => finding("static address", Severity::Problem, err.to_string()),
        });
    }

    let same = own.contains(partner);
    out.push(if same {
        finding(
            "same subnet",
            Severity::Ok,
            format!("partner {partner} is in {}/{}", own.network(), own.prefix),
        )
    } else {
        finding(
            "same subnet",
            Severity::Warning,
            format!(
                "partner {partner} is not in this box's subnet {}/{}: the shared address can \
                 only move between boxes on one LAN (a remote backup needs the tunnel overlay)",
                own.network(),
                own.prefix
            ),
        )
    });

    if same {
        out.push(match arp.probe(&link, partner).await {
            Ok(ProbeResult::InUse(mac)) => finding(
                "partner",
                Severity::Ok,
                format!("{partner} answers from {mac}"),
            ),
            Ok(ProbeResult::Free) => finding(
                "partner",
                Severity::Problem,
                format!(
                    "{partner} does not answer ARP on {}: is it on and plugged in?",
                    link.name
                ),
            ),
            Err(err) => finding("partner", Severity::Problem, err.to_string()),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FakeNet;
    use crate::types::MacAddr;

    fn run<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
            .block_on(future)
    }

    #[test]
    fn a_healthy_pair_passes_and_each_problem_is_named() {
        let net = FakeNet::new();
        let cidr = "192.168.1.3/24".parse().expect("valid");
        net.add_link("eth0", MacAddr([2, 0, 0, 0, 0, 3]), &[cidr]);
        let partner = Ipv4Addr::new(192, 168, 1, 2);
        let primary = MacAddr([0x5a, 0xec, 0xb4, 0x27, 0x71, 0xcf]);
        net.set_neighbour(partner, Some(primary));

        let all = run(preflight(&net, &net, "eth0", partner, None));
        assert!(all.iter().all(|f| f.severity == Severity::Ok), "{all:#?}");
        assert!(
            all.iter()
                .any(|f| f.text.contains("answers from 5a:ec:b4:27:71:cf"))
        );

        net.set_neighbour(partner, None);
        let all = run(preflight(&net, &net, "eth0", partner, None));
        let worst = all.iter().map(|f| f.severity).max();
        assert_eq!(worst, Some(Severity::Problem), "{all:#?}");
        assert!(all.iter().any(|f| f.text.contains("does not answer ARP")));

        let far = run(preflight(
            &net,
            &net,
            "eth0",
            Ipv4Addr::new(10, 0, 0, 2),
            None,
        ));
        assert!(
            far.iter()
                .any(|f| f.severity == Severity::Warning && f.check == "same subnet"),
            "{far:#?}"
        );

        net.set_carrier("eth0", false);
        let cut = run(preflight(&net, &net, "eth0", partner, None));
        assert_eq!(cut.len(), 1);
        assert!(cut[0].text.contains("has no carrier"), "{cut:#?}");

        let root = tempfile::tempdir().expect("tempdir");
        let none = run(preflight(&net, &net, "eth0", partner, Some(root.path())));
        assert!(
            none.iter().any(|f| f.severity == Severity::Problem),
            "{none:#?}"
        );
    }
}
