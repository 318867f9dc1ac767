use super::*;

#[test]
fn sets_stay_off_what_is_this_boxs_alone_and_do_not_overlap() {
    let refused = |sets: &str| {
        let err = AgentConfig::parse(sets).unwrap_err();
        format!("{err:#}")
    };
    let set = |name: &str, path: &str| format!("[[set]]\nname = \"{name}\"\npath = \"{path}\"\n");
    assert!(refused(&set("state", "/var/lib/lbs")).contains("belongs to this box alone"));
    assert!(refused(&set("all", "/var/lib")).contains("overlaps /var/lib/lbs"));
    assert!(refused(&set("keys", "/etc/lbs/keys")).contains("belongs to this box alone"));
    assert!(refused(&set("usr", "/usr")).contains("whole system directory"));
    assert!(refused(&set("etc", "/etc")).contains("overlaps /etc/lbs"));
    assert!(
        refused(&set("up", "/var/spool/asterisk/../../lib/lbs")).contains("must not contain ..")
    );
    let overlapping =
        set("spool", "/var/spool/asterisk") + &set("voicemail", "/var/spool/asterisk/voicemail");
    assert!(refused(&overlapping).contains("overlap: one directory, one set"));
    // The defaults and a PBX's own directories pass.
    AgentConfig::parse("").unwrap();
    AgentConfig::parse(
        &(set("config", "/etc/asterisk") + &set("voicemail", "/var/spool/asterisk/voicemail")),
    )
    .unwrap();
}

#[test]
fn hooks_default_to_asterisk_where_its_unit_is_and_unset_ones_are_warned_about() {
    let with = BoxFacts {
        asterisk_unit: true,
    };
    let config = AgentConfig::parse_for("", with).unwrap();
    assert_eq!(
        config.pbx_start.as_deref(),
        Some("systemctl start asterisk")
    );
    assert_eq!(config.pbx_stop.as_deref(), Some("systemctl stop asterisk"));
    assert!(!config.notes.iter().any(|n| matches!(n, Note::Warning(_))));
    // "" is none, said so.
    let config = AgentConfig::parse_for("pbx_start = \"\"\n", with).unwrap();
    assert_eq!(config.pbx_start, None);
    assert!(config.notes.contains(&Note::Warning(
        "no pbx_start command: P takes the address but starts no PBX".into()
    )));
    // Without the unit: none, and warned.
    let config = AgentConfig::parse("").unwrap();
    assert_eq!((config.pbx_start, config.pbx_stop), (None, None));
    assert_eq!(
        config
            .notes
            .iter()
            .filter(|n| matches!(n, Note::Warning(_)))
            .count(),
        2
    );
    let config = AgentConfig::parse("pbx_start = \" /bin/true \"\n").unwrap();
    assert_eq!(config.pbx_start.as_deref(), Some("/bin/true"));
}

#[test]
fn a_reload_takes_what_can_change_at_once_and_names_the_rest() {
    let old = AgentConfig::parse("pbx_start = \"a\"\n").unwrap();
    let new = AgentConfig::parse(
        "pbx_start = \"b\"\nprimary_gone_after_s = 30\nauto_failover = true\nsync_port = 9000\n[[set]]\nname = \"x\"\npath = \"/x\"\n",
    )
    .unwrap();
    let (merged, later) = old.reloaded(new);
    assert_eq!(merged.pbx_start.as_deref(), Some("b"));
    assert_eq!(merged.primary_gone_after, Duration::from_secs(30));
    assert!(merged.auto_failover);
    assert_eq!(
        (merged.sync_port, merged.sets.clone()),
        (old.sync_port, old.sets.clone())
    );
    assert_eq!(later, vec!["sync_port", "sets"]);
}

#[test]
fn a_missing_file_is_all_defaults_and_said_so() {
    let config = AgentConfig::load(Path::new("/nonexistent/lbs/agent.toml"), false).unwrap();
    assert!(
        matches!(&config.notes[0], Note::Warning(w) if w.contains("does not exist: every setting is its default")),
        "{:?}",
        config.notes
    );
    assert!(AgentConfig::load(Path::new("/nonexistent/lbs/agent.toml"), true).is_err());
}

#[test]
fn the_packaged_config_is_the_defaults_with_the_console_group() {
    let shipped = AgentConfig::parse(include_str!("../../../dist/lbs/agent.toml"))
        .expect("dist/lbs/agent.toml parses");
    assert_eq!(shipped.console_group.as_deref(), Some("lbs-console"));
    let defaults = AgentConfig::parse("").expect("defaults");
    assert_eq!(shipped.sets, defaults.sets);
    assert_eq!(shipped.network, None);
    // Every option of the file is documented in it: uncommenting every `#key = value`
    // line of the top-level block gives a file that parses and keeps the defaults.
    let top: String = include_str!("../../../dist/lbs/agent.toml")
        .lines()
        .take_while(|l| !l.starts_with("#[network]"))
        .map(|l| {
            l.strip_prefix('#')
                .filter(|r| r.contains(" = "))
                .unwrap_or(l)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let spelled = AgentConfig::parse(&top).expect("every documented option parses");
    assert_eq!(spelled.sync_port, defaults.sync_port);
    assert_eq!(spelled.sets, defaults.sets);
    for key in [
        "sync_port",
        "sync_over",
        "report_interval_s",
        "reconcile_interval_s",
        "debounce_ms",
        "resource_interval_s",
        "trash_retention_days",
        "tunnels",
        "astdb",
        "pbx_stop",
        "pbx_start",
        "primary_gone_after_s",
        "promote_note",
        "demote_note",
        "auto_failover",
        "metrics_listen",
    ] {
        assert!(
            top.contains(&format!("\n{key} = ")),
            "{key} is not documented"
        );
    }
}

#[test]
fn no_file_replicates_an_asterisk_box() {
    let config = AgentConfig::parse("").expect("defaults");
    let names: Vec<&str> = config.sets.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["config", "voicemail", "prompts", "moh", "recordings"]
    );
    assert_eq!(config.sync_port, 7450);
    assert_eq!(
        config.astdb.as_deref(),
        Some(Path::new("/var/lib/asterisk/astdb.sqlite3"))
    );
}

#[test]
fn mistakes_are_named() {
    let err = |text: &str| format!("{:#}", AgentConfig::parse(text).expect_err(text));
    assert!(err("[[set]]\nname = \"a\"\npath = \"rel\"").contains("absolute"));
    assert!(err("[[set]]\nname = \"a b\"\npath = \"/x\"").contains("letters"));
    assert!(
        err("[[set]]\nname = \"a\"\npath = \"/x\"\n[[set]]\nname = \"a\"\npath = \"/y\"")
            .contains("twice")
    );
    assert!(err("sync_prot = 1").contains("unknown field"));
}

#[test]
fn metrics_are_off_by_default_and_served_on_loopback_only() {
    assert_eq!(AgentConfig::parse("").unwrap().metrics_listen, None);
    let on = AgentConfig::parse("metrics_listen = \"127.0.0.1:9464\"").unwrap();
    assert_eq!(on.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
    assert!(AgentConfig::parse("metrics_listen = \"[::1]:9464\"").is_ok());
    let open = AgentConfig::parse("metrics_listen = \"0.0.0.0:9464\"").unwrap_err();
    assert!(
        format!("{open:#}").contains("loopback address only"),
        "{open:#}"
    );
    let garbled = AgentConfig::parse("metrics_listen = \"localhost\"").unwrap_err();
    assert!(format!("{garbled:#}").contains("expected like 127.0.0.1:9464"));
}
