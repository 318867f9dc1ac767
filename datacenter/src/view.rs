//! The states the data center keeps and shows, as types: a DNS record's, a promotion
//! request's, and a box's last report. The same words in the database, in JSON and for people.

use std::net::Ipv4Addr;

/// Where a DNS record stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum DnsState {
    /// It points where it must.
    #[serde(rename = "done")]
    Done,
    /// Not tried yet.
    #[serde(rename = "pending")]
    Pending,
    /// Failed at least once; tried again.
    #[serde(rename = "retrying")]
    Retrying,
    /// The server refuses the update (the key, the zone, its policy): trying again cannot help
    /// until its configuration or ours changes. Still tried now and then, and an event says so.
    #[serde(rename = "failed")]
    Failed,
    /// No `[dns]` in datacenter.toml: nothing updates it.
    #[serde(rename = "not configured")]
    NotConfigured,
}

/// Where a promotion (or hand-over) the provider asked for stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestState {
    /// The backup has not answered yet.
    Pending,
    /// The backup was promoted.
    Promoted,
    /// The backup's checks refused it.
    Refused,
    /// The backup did not act on it in time.
    Expired,
}

/// The words the database, JSON and people use for a state.
macro_rules! worded {
    ($type:ident { $($variant:ident => $word:literal),* $(,)? }) => {
        impl $type {
            pub fn as_str(&self) -> &'static str {
                match self { $($type::$variant => $word),* }
            }
        }
        impl std::fmt::Display for $type {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl PartialEq<&str> for $type {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
}
worded!(DnsState { Done => "done", Pending => "pending", Retrying => "retrying", Failed => "failed", NotConfigured => "not configured" });
worded!(RequestState { Pending => "pending", Promoted => "promoted", Refused => "refused", Expired => "expired" });

impl rusqlite::types::FromSql for RequestState {
    fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        let word = value.as_str()?;
        RequestState::ALL
            .into_iter()
            .find(|state| state.as_str() == word)
            .ok_or_else(|| {
                rusqlite::types::FromSqlError::Other(
                    format!("unknown promotion request state {word:?}").into(),
                )
            })
    }
}

impl DnsState {
    /// A record's state from what its last tries did.
    pub fn of(done: bool, attempts: i64, needs_operator: bool) -> DnsState {
        if done {
            DnsState::Done
        } else if attempts == 0 {
            DnsState::Pending
        } else if needs_operator {
            DnsState::Failed
        } else {
            DnsState::Retrying
        }
    }
}

impl RequestState {
    const ALL: [RequestState; 4] = [
        RequestState::Pending,
        RequestState::Promoted,
        RequestState::Refused,
        RequestState::Expired,
    ];
}

/// A box's last report as the data center keeps it (JSON in the database; a field an older
/// data center did not keep is empty).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct StoredReport {
    /// The role it believes it has.
    pub role: String,
    pub software: String,
    /// Where it serves phones.
    pub advertised: Option<Ipv4Addr>,
    /// When every set was last complete on the backup.
    pub sync_last_complete_ms: Option<u64>,
    /// Files and bytes not copied yet (`None`: not said, so not known to be in sync).
    pub sync_pending_files: Option<u64>,
    pub sync_pending_bytes: Option<u64>,
    /// Per tunnel: name, healthy, carrying the overlay.
    pub tunnels: Vec<(String, bool, bool)>,
    /// Each set, the PBX check and the latest role steps (boxes of protocol 1.9 and later).
    pub details: Option<lbs_protocol::control::ReportDetails>,
}

impl StoredReport {
    /// The backup's copy is complete as of its last report.
    pub fn in_sync(&self) -> bool {
        self.sync_pending_files == Some(0)
            && self.sync_pending_bytes == Some(0)
            && self.sync_last_complete_ms.is_some()
    }
}
