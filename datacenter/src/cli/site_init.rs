//! `lbs-datacenter site-init --site NAME --out DIR`: another full site's data directory, made
//! at a site that has one: the CA (certificate and key: every site signs with it in this
//! version), this site's configuration with the new site's name, and the DNS secret it names.
//! What is the new site's own (its etcd member first, its etcd client certificate, its tunnel
//! endpoint, its control address told to boxes) is listed for the operator to set.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};

use crate::config::{ServeConfig, StoreSettings};

pub(super) fn site_init(
    dir: &Path,
    config: &Path,
    site: &str,
    out: &Path,
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
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {}", out.display()))?;
    for (file, mode) in [(super::CA_CERT, 0o644), (super::CA_KEY, 0o600)] {
        let bytes = std::fs::read(dir.join(file)).with_context(|| {
            format!(
                "reading {} (site-init runs where the CA is)",
                dir.join(file).display()
            )
        })?;
        lbs_host::write_file_atomic(&out.join(file), &bytes, mode)
            .with_context(|| format!("writing {}", out.join(file).display()))?;
    }
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
        "site {site} prepared in {}: the CA, and this site's configuration with site = \"{site}\".\n\
         Before `lbs-datacenter --dir DIR serve` there, in its datacenter.toml:\n  \
         1. activation, control: its own addresses; [store] endpoints: its own etcd member first;\n  \
         2. [store] cert_file, key_file: its own etcd client certificate (if TLS);\n  \
         3. [[endpoint]]: its own tunnel endpoint (private_key_file there), the others' with public_key;\n  \
         4. advertise_control: its control address added, here and at every other site, so boxes learn it at their next activation;\n  \
         and keep the directory 0700: it holds the CA key.",
        out.display()
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
