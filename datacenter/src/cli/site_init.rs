//! `lbs-datacenter site-init --site NAME --out DIR`: another full site's data directory, made
//! where the root key is: the site's own CA signed by the root (and the root certificate
//! boxes pin, without its key), this site's configuration with the new site's name, and the
//! DNS secret it names. What is the new site's own (its etcd member first, its etcd client
//! certificate, its tunnel endpoint, its control address told to boxes) is listed for the
//! operator to set. `site-revoke` revokes a site's CA through the shared store.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};

use crate::ca_files;
use crate::config::{ServeConfig, StoreSettings};

pub(super) fn site_init(
    dir: &Path,
    config: &Path,
    site: &str,
    out: &Path,
    root_key: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    if site.is_empty()
        || !site
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!(
            "--site {site:?}: letters, digits, - and _ only (it names the site to boxes and in the DNS role)"
        );
    }
    let settings = ServeConfig::load(config, false).with_context(|| {
        format!(
            "site-init copies this site's configuration, {}",
            config.display()
        )
    })?;
    if !matches!(settings.store, StoreSettings::Etcd { .. }) {
        bail!(
            "{} keeps its records in SQLite, which only this site can use: set [store] backend = \"etcd\" and run `lbs-datacenter migrate --to etcd` first (README: Three sites)",
            config.display()
        );
    }
    if settings.site == site {
        bail!("this site is called {site:?} already; give the new site its own name");
    }
    if out.exists() && std::fs::read_dir(out)?.next().is_some() {
        bail!(
            "{} is not empty: site-init writes a fresh directory",
            out.display()
        );
    }
    let root = ca_files::root(dir, root_key)?;
    // Issued (and recorded) before anything is written: refused, it leaves nothing behind.
    let own = if root.signs_sites()? {
        let mut store = super::open(dir)?;
        Some(ca_files::issue_site(
            &mut *store,
            &root,
            site,
            crate::time::now_ms(),
        )?)
    } else {
        None
    };
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {}", out.display()))?;
    root.trust_root().save(&out.join(ca_files::CA_CERT))?;
    let own_ca = match own {
        Some(ca) => {
            ca.save(
                &out.join(ca_files::SITE_CA_CERT),
                &out.join(ca_files::SITE_CA_KEY),
            )?;
            "its own CA under the root"
        }
        None => {
            // A root made before sites had their own CA signs boxes itself: the site needs it.
            let key = root_key.map_or_else(|| dir.join(ca_files::CA_KEY), Path::to_owned);
            let bytes =
                std::fs::read(&key).with_context(|| format!("reading {}", key.display()))?;
            lbs_host::write_file_atomic(&out.join(ca_files::CA_KEY), &bytes, 0o600)?;
            "the root's key (this root predates sites' own CAs: the sites share it and none can be revoked alone)"
        }
    };
    let text = std::fs::read_to_string(config)?;
    let renamed = with_site(&text, site);
    lbs_host::write_file_atomic(
        &out.join(crate::config::CONFIG_FILE),
        renamed.as_bytes(),
        0o600,
    )?;
    // A DNS secret in a file next to the configuration goes along (the new site may hold the
    // DNS role).
    let base = config.parent().unwrap_or(Path::new("."));
    for secret in secret_files(&text) {
        if Path::new(&secret).is_relative() {
            let bytes = std::fs::read(base.join(&secret)).with_context(|| {
                format!("reading the DNS secret {}", base.join(&secret).display())
            })?;
            lbs_host::write_file_atomic(&out.join(&secret), &bytes, 0o600)?;
        }
    }
    lbs_host::say!(
        "site {site} prepared in {}: {own_ca}, and this site's configuration with site = \"{site}\".\n\
         Before `lbs-datacenter --dir DIR serve` there, in its datacenter.toml:\n  \
         1. activation, control: its own addresses; [store] endpoints: its own etcd member first;\n  \
         2. [store] cert_file, key_file: its own etcd client certificate (if TLS);\n  \
         3. [[endpoint]]: its own tunnel endpoint (private_key_file there), the others' with public_key;\n  \
         4. advertise_control: its control address added, here and at every other site, so boxes learn it at their next activation;\n  \
         and keep the directory 0700: it holds the site's CA key.",
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `lbs-datacenter site-revoke --site NAME`: the root revokes `site`'s CA and the shared
/// store carries the new list to every site.
pub(super) fn site_revoke(
    dir: &Path,
    site: &str,
    root_key: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let root = ca_files::root(dir, root_key)?;
    if !root.signs_sites()? {
        bail!(
            "this root predates sites' own CAs: the sites share its key and none can be revoked alone"
        );
    }
    let mut store = super::open(dir)?;
    ca_files::revoke(&mut *store, &root, site, crate::time::now_ms())?;
    let here = ServeConfig::load(&dir.join(crate::config::CONFIG_FILE), false)
        .map(|c| c.site)
        .unwrap_or_default();
    if here == site {
        lbs_host::say!("{site} is this site: its serve stops at its next look at the list");
    }
    lbs_host::say!(
        "site {site}'s CA is revoked: every site refuses the boxes and sites it signed within {} s. \
         Boxes it activated: rekey them (lbs-datacenter rekey SID) and run `lbs activate` on them against another site.",
        crate::serve::TRUST_RELOAD.as_secs()
    );
    Ok(ExitCode::SUCCESS)
}

/// `text` with its top-level `site = …` set to `site` (added at the top when absent).
fn with_site(text: &str, site: &str) -> String {
    let line = format!("site = \"{site}\"");
    let mut out = Vec::new();
    let mut top = true;
    let mut done = false;
    for l in text.lines() {
        let trimmed = l.trim_start();
        if trimmed.starts_with('[') {
            top = false;
        }
        if top && !done && trimmed.starts_with("site") && trimmed[4..].trim_start().starts_with('=')
        {
            out.push(line.clone());
            done = true;
        } else {
            out.push(l.to_owned());
        }
    }
    if !done {
        out.insert(0, line);
    }
    out.join("\n") + "\n"
}

/// The `secret_file = "…"` values in `text`.
fn secret_files(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            let (key, value) = l.split_once('=')?;
            (key.trim() == "secret_file").then(|| value.trim().trim_matches('"').to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_site_line_is_set_at_the_top_level_only() {
        let text = "activation = [\"0.0.0.0:7440\"]\nsite = \"dc1\"\n[[endpoint]]\nname = \"dc1\"\nsite = \"dc1\"\n";
        let renamed = with_site(text, "dc2");
        assert_eq!(renamed.matches("site = \"dc2\"").count(), 1, "{renamed}");
        assert!(
            renamed.contains("[[endpoint]]\nname = \"dc1\"\nsite = \"dc1\""),
            "{renamed}"
        );
        let added = with_site("[store]\nbackend = \"etcd\"\n", "dc2");
        assert!(added.starts_with("site = \"dc2\"\n[store]"), "{added}");
        assert_eq!(
            secret_files("[dns]\nsecret_file = \"tsig.key\"\n"),
            ["tsig.key"]
        );
    }
}
