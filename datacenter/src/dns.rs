//! DNS takeover: the pair's names move to the new primary by RFC 2136 dynamic update, signed
//! with TSIG (HMAC-SHA256), sent to the provider's authoritative server (BIND, PowerDNS,
//! Knot …).
//!
//! Every change names the value it replaces: the update carries a prerequisite that the
//! record still holds the old address (or does not exist yet), so a stale decision can never
//! overwrite a newer one — the server refuses it and [`DnsError::Changed`] says so.

use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use futures_util::StreamExt;
use hickory_net::client::Client;
use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::udp::UdpClientStream;
use hickory_net::xfer::DnsHandle;
use hickory_proto::op::{DnsRequest, ResponseCode, update_message};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::rdata::tsig::TsigAlgorithm;
use hickory_proto::rr::{Name, RData, Record, RecordSet, RecordType, TSigner};

/// Where and how updates are sent.
#[derive(Clone)]
pub struct DnsServer {
    /// The authoritative server.
    pub server: SocketAddr,
    /// The zone the pairs' names are in (`example.com.`).
    pub zone: String,
    /// The TSIG key's name, as the server knows it.
    pub key_name: String,
    /// The TSIG secret (HMAC-SHA256).
    pub secret: Vec<u8>,
    /// How long one update may take.
    pub timeout: Duration,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret: configurations end up in logs and bug reports.
        f.debug_struct("DnsServer")
            .field("server", &self.server)
            .field("zone", &self.zone)
            .field("key_name", &self.key_name)
            .field("secret", &format_args!("<{} bytes>", self.secret.len()))
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Why an update did not happen.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// A name is not a DNS name, or not inside the zone.
    #[error("DNS name {name:?}: {why}")]
    Name {
        name: String,
        /// What is wrong.
        why: String,
    },
    /// The server rejected the TSIG key (wrong secret or key name).
    #[error(
        "DNS update refused by {server}: TSIG key {key:?} rejected; check the key name and secret against the server's configuration"
    )]
    KeyRejected {
        server: SocketAddr,
        /// The key's name.
        key: String,
    },
    /// The record no longer holds the value the update replaces (someone changed it).
    #[error(
        "DNS record {name} no longer holds {expected}: not overwritten (a newer change may have happened; check the zone)"
    )]
    Changed {
        name: String,
        /// What the update expected there.
        expected: String,
    },
    /// The server refused for another reason.
    #[error("DNS update of {name} refused by {server}: {code}")]
    Refused {
        name: String,
        server: SocketAddr,
        code: ResponseCode,
    },
    /// No answer (the server is down or unreachable): worth retrying.
    #[error("DNS server {server} did not answer: {reason}")]
    Unreachable {
        server: SocketAddr,
        /// What failed.
        reason: String,
    },
}

impl DnsError {
    /// Whether trying again later can help: the server was unreachable, or failed itself
    /// (SERVFAIL). A rejected key, a name outside the zone or a refusal stay until someone
    /// changes a configuration.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            DnsError::Unreachable { .. }
                | DnsError::Refused {
                    code: ResponseCode::ServFail,
                    ..
                }
        )
    }
}

fn name(text: &str) -> Result<Name, DnsError> {
    let mut parsed = Name::from_str(text).map_err(|e| DnsError::Name {
        name: text.to_owned(),
        why: e.to_string(),
    })?;
    parsed.set_fqdn(true);
    Ok(parsed)
}

impl DnsServer {
    /// Points `fqdn`'s A record at `new`, only if it now holds `old` (`None`: only if it has
    /// no A record yet). Setting the value it already has is a success.
    pub async fn replace_a(
        &self,
        fqdn: &str,
        old: Option<Ipv4Addr>,
        new: Ipv4Addr,
        ttl: u32,
    ) -> Result<(), DnsError> {
        let zone = name(&self.zone)?;
        let owner = name(fqdn)?;
        if !zone.zone_of(&owner) {
            return Err(DnsError::Name {
                name: fqdn.to_owned(),
                why: format!("not inside the zone {zone}"),
            });
        }
        if old == Some(new) {
            return Ok(());
        }
        let rrset = |address: Ipv4Addr, ttl: u32| {
            RecordSet::from(Record::from_rdata(owner.clone(), ttl, RData::A(A(address))))
        };
        let message = match old {
            Some(old) => {
                update_message::compare_and_swap(rrset(old, ttl), rrset(new, ttl), zone, false)
            }
            None => update_message::create(rrset(new, ttl), zone, false),
        };
        let code = self.send(DnsRequest::from(message)).await?;
        match code {
            ResponseCode::NoError => Ok(()),
            ResponseCode::NXRRSet | ResponseCode::YXRRSet => Err(DnsError::Changed {
                name: fqdn.to_owned(),
                expected: old.map_or("no A record".to_owned(), |o| o.to_string()),
            }),
            ResponseCode::NotAuth | ResponseCode::BADSIG | ResponseCode::BADKEY => {
                Err(DnsError::KeyRejected {
                    server: self.server,
                    key: self.key_name.clone(),
                })
            }
            other => Err(DnsError::Refused {
                name: fqdn.to_owned(),
                server: self.server,
                code: other,
            }),
        }
    }

    /// Sends one signed request and returns the server's response code.
    async fn send(&self, request: DnsRequest) -> Result<ResponseCode, DnsError> {
        let unreachable = |reason: String| DnsError::Unreachable {
            server: self.server,
            reason,
        };
        match self.exchange(request, Some(self.signer()?)).await? {
            Ok(response) => Ok(response.metadata.response_code),
            Err(err) => {
                let text = err.to_string();
                // A wrong secret makes the server answer unsigned (or signed with an error),
                // which the client reports as a verification failure ("truncated HMAC").
                if text.contains("HMAC") || text.contains("TSIG") || text.contains("tsig") {
                    Err(DnsError::KeyRejected {
                        server: self.server,
                        key: self.key_name.clone(),
                    })
                } else if let Some(code) = response_code_of(&text) {
                    Ok(code)
                } else {
                    Err(unreachable(text))
                }
            }
        }
    }

    /// The A records of `fqdn` as the server answers them now: a query signed with the key,
    /// whose answer must carry the server's signature (an answer forged by anyone on the path
    /// is refused, not believed).
    pub async fn lookup_a(&self, fqdn: &str) -> Result<Vec<Ipv4Addr>, DnsError> {
        let owner = name(fqdn)?;
        let query = hickory_proto::op::Query::query(owner, RecordType::A);
        let request =
            DnsRequest::from_query(query, hickory_proto::op::DnsRequestOptions::default());
        match self.exchange(request, Some(self.signer()?)).await? {
            Err(err) => Err(DnsError::Unreachable {
                server: self.server,
                reason: err.to_string(),
            }),
            Ok(response) => Ok(response
                .answers
                .iter()
                .filter_map(|r| match &r.data {
                    RData::A(a) => Some(a.0),
                    _ => None,
                })
                .collect()),
        }
    }
}

impl DnsServer {
    /// The TSIG signer of every request (updates and the confirming lookups).
    fn signer(&self) -> Result<TSigner, DnsError> {
        TSigner::new(
            self.secret.clone(),
            TsigAlgorithm::HmacSha256,
            name(&self.key_name)?,
            300,
        )
        .map_err(|e| DnsError::Name {
            name: self.key_name.clone(),
            why: format!("unusable TSIG key: {e}"),
        })
    }

    /// One request over a fresh UDP exchange, signed if `signer` is given. The outer error
    /// is a missing answer; the inner result is what the client made of the answer.
    async fn exchange(
        &self,
        request: DnsRequest,
        signer: Option<TSigner>,
    ) -> Result<Result<hickory_proto::op::DnsResponse, hickory_net::NetError>, DnsError> {
        let unreachable = |reason: String| DnsError::Unreachable {
            server: self.server,
            reason,
        };
        let stream = UdpClientStream::builder(self.server, TokioRuntimeProvider::default())
            .with_timeout(Some(self.timeout))
            .with_signer(signer)
            .build();
        let (client, background) = Client::<TokioRuntimeProvider>::from_sender(stream);
        // The exchange's driver lives exactly as long as this request.
        let background = tokio::spawn(background);
        let answer = tokio::time::timeout(self.timeout, client.send(request).next()).await;
        background.abort();
        match answer {
            Err(_) => Err(unreachable(format!("no answer within {:?}", self.timeout))),
            Ok(None) => Err(unreachable("the exchange ended without an answer".into())),
            Ok(Some(result)) => Ok(result),
        }
    }
}

/// Some clients report an error response code as an error; find it in the text.
fn response_code_of(text: &str) -> Option<ResponseCode> {
    [
        ResponseCode::NXRRSet,
        ResponseCode::YXRRSet,
        ResponseCode::NotAuth,
        ResponseCode::Refused,
        ResponseCode::NotZone,
        ResponseCode::ServFail,
    ]
    .into_iter()
    .find(|code| text.contains(&code.to_string()))
}
