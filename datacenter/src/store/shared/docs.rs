//! The records as the shared store keeps them: one JSON document per pair (its servers, DNS
//! records and promotion requests, all changed together by one compare-and-set), a box's last
//! report on a key of its own (written in batches, never compared), and the audit log's
//! entries. JSON, so `etcdctl get --prefix /lbs/` shows an operator what is there.

use super::super::*;

/// How many answered promotion requests a pair keeps (the audit log keeps them all).
pub(in crate::store) const REQUESTS_KEPT: usize = 16;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(in crate::store) struct PairDoc {
    pub id: i64,
    pub name: String,
    pub fqdn: String,
    pub generation: u64,
    pub primary: Option<String>,
    pub created_at: Millis,
    #[serde(default)]
    pub retired_at: Option<Millis>,
    /// In provisioning order.
    pub servers: Vec<ServerDoc>,
    #[serde(default)]
    pub dns: Vec<DnsDoc>,
    /// Oldest first; at most one pending, the last.
    #[serde(default)]
    pub requests: Vec<RequestDoc>,
    /// When the pair's primary last asked to hand over (the hold-off counts from it).
    #[serde(default)]
    pub last_hand_over_at: Option<Millis>,
    /// The number of the pair's last event (`event/<pair>/<number>`).
    #[serde(default)]
    pub event_seq: u64,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(in crate::store) struct ServerDoc {
    pub sid: String,
    pub role: Role,
    /// The unused activation key's hash (hex); `None` once used.
    pub key_hash: Option<String>,
    pub key_expires_at: Option<Millis>,
    /// The hash of the key its last activation used: the same box asking again is answered
    /// the same.
    #[serde(default)]
    pub used_key_hash: Option<String>,
    #[serde(default)]
    pub activated_at: Option<Millis>,
    #[serde(default)]
    pub wireguard_key: Option<String>,
    #[serde(default)]
    pub tls_key: Option<String>,
    #[serde(default)]
    pub overlay: Option<Ipv4Addr>,
    #[serde(default)]
    pub lan: Option<Ipv4Addr>,
    #[serde(default)]
    pub inventory: Option<String>,
}

/// A box's last report, and what a decision said of it meanwhile (activation and promotion
/// set its generation and address).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub(in crate::store) struct ReportDoc {
    pub at: Option<Millis>,
    pub generation: Option<u64>,
    pub software: Option<String>,
    pub advertised: Option<Ipv4Addr>,
    /// The report itself, JSON.
    pub report: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(in crate::store) struct DnsDoc {
    pub name: String,
    pub want: Ipv4Addr,
    pub have: Option<Ipv4Addr>,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub next_try_at: Millis,
    /// When the last failure was recorded (a server answering again makes those before it
    /// due at once).
    #[serde(default)]
    pub failed_at: Option<Millis>,
    pub needs_operator: bool,
    pub changed_at: Millis,
    pub done_at: Option<Millis>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(in crate::store) struct RequestDoc {
    pub id: i64,
    pub requested_by: String,
    pub requested_at: Millis,
    pub expires_at: Millis,
    pub state: RequestState,
    pub answer: Option<String>,
    pub answered_at: Option<Millis>,
    pub hand_over: Option<String>,
}

/// The store's counters: the last pair and request numbers given (rare decisions; events
/// are numbered per pair, so the busy ones do not meet here).
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub(in crate::store) struct Counters {
    #[serde(default)]
    pub pair: i64,
    #[serde(default)]
    pub request: i64,
}

impl PairDoc {
    pub fn server(&self, sid: ServerId) -> Option<&ServerDoc> {
        let text = sid.to_string();
        self.servers.iter().find(|s| s.sid == text)
    }

    pub fn server_mut(&mut self, sid: ServerId) -> Option<&mut ServerDoc> {
        let text = sid.to_string();
        self.servers.iter_mut().find(|s| s.sid == text)
    }

    /// The other server of the pair, if it has one.
    pub fn partner(&self, sid: ServerId) -> Option<ServerId> {
        let text = sid.to_string();
        self.servers
            .iter()
            .find(|s| s.sid != text)
            .and_then(|s| s.sid.parse().ok())
    }

    pub fn with_role(&self, role: Role) -> Option<&ServerDoc> {
        self.servers.iter().find(|s| s.role == role)
    }

    pub fn pending(&mut self) -> Option<&mut RequestDoc> {
        self.requests
            .last_mut()
            .filter(|r| r.state == RequestState::Pending)
    }

    /// Whether a DNS record of a served pair differs from what was decided.
    pub fn dns_owed(&self) -> bool {
        self.retired_at.is_none() && self.dns.iter().any(|r| r.have != Some(r.want))
    }

    /// Decides that `name` must point at `value` (as [`super::super::dns::want_dns`]): a new
    /// decision starts with a clean slate of attempts. Whether anything changed.
    pub fn want_dns(&mut self, name: &str, value: Ipv4Addr, now: Millis) -> bool {
        match self.dns.iter_mut().find(|r| r.name == name) {
            Some(record) if record.want == value => false,
            Some(record) => {
                record.want = value;
                record.attempts = 0;
                record.last_error = None;
                record.next_try_at = 0;
                record.failed_at = None;
                record.needs_operator = false;
                record.changed_at = now;
                true
            }
            None => {
                self.dns.push(DnsDoc {
                    name: name.to_owned(),
                    want: value,
                    have: None,
                    attempts: 0,
                    last_error: None,
                    next_try_at: 0,
                    failed_at: None,
                    needs_operator: false,
                    changed_at: now,
                    done_at: None,
                });
                self.dns.sort_by(|a, b| a.name.cmp(&b.name));
                true
            }
        }
    }

    /// Refuses a server of a retired pair.
    pub fn not_retired(&self, sid: ServerId) -> Result<(), StoreError> {
        not_retired(sid, &self.name, self.retired_at)
    }

    /// The request as the store answers with it.
    pub fn request_view(&self, request: &RequestDoc) -> PromotionRequest {
        PromotionRequest {
            id: request.id,
            pair: self.name.clone(),
            requested_by: request.requested_by.clone(),
            requested_at: request.requested_at,
            expires_at: request.expires_at,
            state: request.state,
            answer: request.answer.clone(),
            hand_over: request.hand_over.clone(),
        }
    }

    /// The pair as `status` shows it, with its servers' last reports.
    pub fn view(&self, reports: &std::collections::HashMap<String, ReportDoc>) -> PairView {
        let mut inventories = Vec::new();
        let servers = self
            .servers
            .iter()
            .map(|s| {
                inventories.push(
                    s.inventory
                        .as_deref()
                        .and_then(|t| serde_json::from_str(t).ok()),
                );
                let report = reports.get(&s.sid).cloned().unwrap_or_default();
                ServerView {
                    sid: s.sid.clone(),
                    role: s.role.to_string(),
                    overlay: s.overlay.map(|a| a.to_string()),
                    lan: s.lan.map(|a| a.to_string()),
                    software: report.software,
                    last_heartbeat_at: report.at,
                    reported_generation: report.generation,
                    advertised: report.advertised.map(|a| a.to_string()),
                    report: report
                        .report
                        .as_deref()
                        .and_then(|j| serde_json::from_str::<StoredReport>(j).ok()),
                }
            })
            .collect();
        let parsed: Vec<Option<lbs_protocol::inventory::Inventory>> = inventories;
        let hardware_differences = match parsed.as_slice() {
            [Some(a), Some(b)] => Some(a.compare(b)),
            _ => None,
        };
        PairView {
            name: self.name.clone(),
            fqdn: self.fqdn.clone(),
            generation: self.generation,
            primary: self.primary.clone(),
            servers,
            hardware_differences,
            dns: self
                .dns
                .iter()
                .map(|r| DnsView {
                    name: r.name.clone(),
                    want: r.want.to_string(),
                    have: r.have.map(|h| h.to_string()),
                    state: DnsState::of(r.have == Some(r.want), r.attempts, r.needs_operator),
                    attempts: r.attempts,
                    last_error: r.last_error.clone(),
                    changed_at: r.changed_at,
                    done_at: r.done_at,
                })
                .collect(),
            pending: self
                .requests
                .last()
                .filter(|r| r.state == RequestState::Pending)
                .map(|r| self.request_view(r)),
        }
    }
}
