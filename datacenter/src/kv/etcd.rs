//! [`Kv`] on etcd (v3 API, through the `etcd-client` crate).
//!
//! The client lives on a thread of its own with its own runtime, so the store's synchronous
//! callers (on async workers or blocking threads alike) wait on a channel with a deadline and
//! never start a runtime inside another. Every request must be answered by the cluster's
//! leader (`require_leader`) and reads are linearizable: a member cut off from the majority
//! answers nothing rather than something stale, and the caller hears
//! [`KvError::Unreachable`] within [`EtcdSettings::timeout`].

use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};

use nix::sys::signal::{SigSet, Signal};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, PutOptions,
    SortOrder, SortTarget, TlsOptions, Txn, TxnOp, TxnOpResponse,
};

use super::{
    Expect, Kv, KvError, LeaseId, Op, Read, Revision, Versioned, check_commit, lease_seconds,
};

/// Where the cluster is, how to prove who we are to it, and how long anything may take.
#[derive(Clone, Debug)]
pub struct EtcdSettings {
    /// Client URLs of the members (`https://10.0.0.1:2379`; `http://` only on loopback in
    /// tests), every site's.
    pub endpoints: Vec<String>,
    /// The longest one request (connecting included) may take.
    pub timeout: Duration,
    /// Mutual TLS with the members (`https://` endpoints).
    pub tls: Option<EtcdTls>,
}

/// The PEM files of mutual TLS with etcd: the CA its members' certificates chain to, and
/// this site's client certificate and key.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl EtcdSettings {
    fn named(&self) -> String {
        self.endpoints.join(", ")
    }

    /// The client's TLS options, read from the files now (so a missing file is said when the
    /// store opens, not at the first request).
    fn tls_options(&self) -> Result<Option<TlsOptions>, KvError> {
        let Some(tls) = &self.tls else {
            return Ok(None);
        };
        let read = |what: &'static str, path: &PathBuf| {
            std::fs::read(path).map_err(|err| KvError::Refused {
                what: "the settings",
                detail: format!("cannot read the etcd {what} {}: {err}", path.display()),
            })
        };
        let ca = read("CA certificate", &tls.ca)?;
        let (cert, key) = (
            read("client certificate", &tls.cert)?,
            read("client key", &tls.key)?,
        );
        Ok(Some(
            TlsOptions::new()
                .ca_certificate(Certificate::from_pem(ca))
                .identity(Identity::from_pem(cert, key)),
        ))
    }
}

/// A request to the client's thread, with where its answer goes.
enum Request {
    Get(Vec<String>, Reply<Read<Vec<Option<Versioned>>>>),
    Range {
        prefix: String,
        after: Option<String>,
        /// Only keys changed at this revision or later, oldest change first.
        since: Option<Revision>,
        limit: usize,
        reply: Reply<Read<Vec<(String, Versioned)>>>,
    },
    Commit(Vec<Expect>, Vec<Op>, Reply<Option<Revision>>),
    Grant(Duration, Reply<LeaseId>),
    Renew(LeaseId, Reply<bool>),
    Revoke(LeaseId, Reply<()>),
}

type Reply<T> = std_mpsc::SyncSender<Result<T, KvError>>;

/// An etcd cluster as a [`Kv`]. Dropping it ends its client thread.
#[derive(Debug)]
pub struct EtcdKv {
    settings: EtcdSettings,
    requests: tokio::sync::mpsc::UnboundedSender<Request>,
}

impl EtcdKv {
    /// Starts the client thread. Nothing is asked of the cluster yet: a site starts while
    /// its store is unreachable, and says so on each request until it answers.
    pub fn open(settings: EtcdSettings) -> Result<EtcdKv, KvError> {
        if settings.endpoints.is_empty() {
            return Err(KvError::Refused {
                what: "the settings",
                detail: "no etcd endpoint given".into(),
            });
        }
        // Unbounded, but each caller waits for its answer: as many requests as callers.
        let (requests, incoming) = tokio::sync::mpsc::unbounded_channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|err| KvError::Unreachable {
                endpoints: settings.named(),
                detail: format!("cannot start the client's runtime: {err}"),
            })?;
        let worker = Arc::new(Worker {
            settings: settings.clone(),
            tls: settings.tls_options()?,
            connection: Mutex::new((None, 0)),
        });
        std::thread::Builder::new()
            .name("lbs-etcd".into())
            .spawn(move || {
                // The commands that print reports take SIGPIPE's default (ending quietly
                // under `head`); a member closing its connection while this thread writes
                // must be an error here, not the end of the process. Blocked for this
                // thread only: its writes fail with EPIPE instead.
                let pipe = SigSet::from(Signal::SIGPIPE);
                if let Err(err) = pipe.thread_block() {
                    tracing::warn!("blocking SIGPIPE on the etcd client's thread: {err}");
                }
                runtime.block_on(worker.run(incoming))
            })
            .map_err(|err| KvError::Unreachable {
                endpoints: settings.named(),
                detail: format!("cannot start the client's thread: {err}"),
            })?;
        Ok(EtcdKv { settings, requests })
    }

    /// Sends a request and waits for its answer, at most the timeout and a little more (the
    /// client's thread enforces the timeout itself; the margin covers its queue).
    fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, KvError> {
        let (reply, answer) = std_mpsc::sync_channel(1);
        let gone = || KvError::Unreachable {
            endpoints: self.settings.named(),
            detail: "the etcd client's thread has stopped".into(),
        };
        self.requests.send(make(reply)).map_err(|_| gone())?;
        match answer.recv_timeout(self.settings.timeout * 2) {
            Ok(result) => result,
            Err(std_mpsc::RecvTimeoutError::Timeout) => Err(KvError::Unreachable {
                endpoints: self.settings.named(),
                detail: format!("no answer within {:?}", self.settings.timeout * 2),
            }),
            Err(std_mpsc::RecvTimeoutError::Disconnected) => Err(gone()),
        }
    }
}

impl Kv for EtcdKv {
    fn get(&self, keys: &[String]) -> Result<Read<Vec<Option<Versioned>>>, KvError> {
        super::check_get(keys)?;
        self.ask(|reply| Request::Get(keys.to_vec(), reply))
    }

    fn range(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Read<Vec<(String, Versioned)>>, KvError> {
        self.ask(|reply| Request::Range {
            prefix: prefix.to_owned(),
            after: after.map(str::to_owned),
            since: None,
            limit,
            reply,
        })
    }

    fn range_since(
        &self,
        prefix: &str,
        since: Revision,
        limit: usize,
    ) -> Result<Read<Vec<(String, Versioned)>>, KvError> {
        self.ask(|reply| Request::Range {
            prefix: prefix.to_owned(),
            after: None,
            since: Some(since),
            limit,
            reply,
        })
    }

    fn commit(&self, expect: &[Expect], ops: &[Op]) -> Result<Option<Revision>, KvError> {
        check_commit(expect, ops)?;
        self.ask(|reply| Request::Commit(expect.to_vec(), ops.to_vec(), reply))
    }

    fn grant(&self, ttl: Duration) -> Result<LeaseId, KvError> {
        self.ask(|reply| Request::Grant(ttl, reply))
    }

    fn renew(&self, lease: LeaseId) -> Result<bool, KvError> {
        self.ask(|reply| Request::Renew(lease, reply))
    }

    fn revoke(&self, lease: LeaseId) -> Result<(), KvError> {
        self.ask(|reply| Request::Revoke(lease, reply))
    }
}

/// The client's thread: connects when first needed (and again after a failure) and answers
/// requests, each as a task of its own so that callers do not queue behind each other's
/// round trips, until every [`EtcdKv`] handle is gone.
///
/// It talks to one member at a time, the first listed (this site's own, by convention) until
/// it fails; then the next. A client balanced over every member would keep sending some
/// requests to a member gone dark, and fail them at random while the others form a majority.
struct Worker {
    settings: EtcdSettings,
    tls: Option<TlsOptions>,
    /// The connection to the member talked to, and that member (an index into the
    /// endpoints). Held only to read or replace them.
    connection: Mutex<(Option<Client>, usize)>,
}

impl Worker {
    async fn run(self: Arc<Self>, mut incoming: tokio::sync::mpsc::UnboundedReceiver<Request>) {
        // Waiting for requests asynchronously keeps the client's connections driven while
        // idle (HTTP/2 pings answered, a closed connection noticed before the next request).
        // Each caller waits for its answer, so the tasks are as many as the callers.
        while let Some(request) = incoming.recv().await {
            tokio::spawn(self.clone().answer(request));
        }
    }

    async fn answer(self: Arc<Self>, request: Request) {
        {
            match request {
                Request::Get(keys, reply) => {
                    let answer = self.timed(|c| get(c, keys.clone())).await;
                    let _ = reply.send(answer.map_err(Failure::read));
                }
                Request::Range {
                    prefix,
                    after,
                    since,
                    limit,
                    reply,
                } => {
                    let answer = self
                        .timed(|c| range(c, prefix.clone(), after.clone(), since, limit))
                        .await;
                    let _ = reply.send(answer.map_err(Failure::read));
                }
                Request::Commit(expect, ops, reply) => {
                    let answer = self.timed(|c| commit(c, expect.clone(), ops.clone())).await;
                    let _ = reply.send(answer.map_err(Failure::commit));
                }
                // An unanswered grant leaves at most a lease nobody renews: it expires.
                Request::Grant(ttl, reply) => {
                    let answer = self.timed(|c| grant(c, ttl)).await;
                    let _ = reply.send(answer.map_err(Failure::read));
                }
                // Unanswered, a lease is as good as lost: its holder must stop relying on it.
                Request::Renew(lease, reply) => {
                    let answer = self.timed(|c| renew(c, lease)).await;
                    let _ = reply.send(answer.map_err(Failure::read));
                }
                Request::Revoke(lease, reply) => {
                    let answer = self.timed(|c| revoke(c, lease)).await;
                    let _ = reply.send(answer.map_err(Failure::commit));
                }
            }
        }
    }

    /// Runs one request within the timeout, connecting first if needed. A request that could
    /// not reach a member with a leader (no connection, or the member is cut off from the
    /// majority: nothing was applied) goes to the next member while time remains; any failure
    /// drops the connection and moves on to the next member for the next request.
    async fn timed<T, F>(&self, request: impl Fn(Client) -> F) -> Result<T, Failure>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        let timeout = self.settings.timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let members = self.settings.endpoints.len().max(1);
        let mut tried = Vec::new();
        loop {
            let (client, current) = self.connection().clone();
            let endpoint = self.settings.endpoints[current % members].clone();
            let failure = match self
                .attempt(client, current, &endpoint, deadline, members, &request)
                .await
            {
                Ok(answer) => return Ok(answer),
                Err(failure) => failure,
            };
            {
                // Moved on once for this member, however many requests failed on it at once.
                let mut connection = self.connection();
                if connection.1 == current {
                    *connection = (None, (current + 1) % members);
                }
            }
            tried.push(format!("{endpoint}: {}", failure.detail));
            let more = matches!(failure.kind, Failed::NotSent)
                && tried.len() < members
                && tokio::time::Instant::now() < deadline;
            if !more {
                return Err(Failure {
                    kind: failure.kind,
                    endpoints: self.settings.named(),
                    detail: tried.join("; "),
                });
            }
        }
    }

    fn connection(&self) -> std::sync::MutexGuard<'_, (Option<Client>, usize)> {
        self.connection.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One try of a request at `endpoint` (member `current`, over `client` if connected),
    /// within `deadline`.
    async fn attempt<T, F>(
        &self,
        client: Option<Client>,
        current: usize,
        endpoint: &str,
        deadline: tokio::time::Instant,
        members: usize,
        request: &impl Fn(Client) -> F,
    ) -> Result<T, Failure>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        let timeout = self.settings.timeout;
        let failed = |kind: Failed, detail: String| Failure {
            kind,
            endpoints: endpoint.to_owned(),
            detail,
        };
        let client = match client {
            Some(client) => client,
            None => {
                // A share of the time per member, so a dark one leaves time for the next.
                let mut options = ConnectOptions::new()
                    .with_connect_timeout(timeout / u32::try_from(members).unwrap_or(1))
                    .with_timeout(timeout)
                    // Not more often than etcd allows (--grpc-keepalive-min-time, 5 s).
                    .with_keep_alive(Duration::from_secs(10), timeout)
                    .with_require_leader(true);
                if let Some(tls) = &self.tls {
                    options = options.with_tls(tls.clone());
                }
                let connect = Client::connect([endpoint], Some(options));
                match tokio::time::timeout_at(deadline, connect).await {
                    Ok(Ok(client)) => client,
                    Ok(Err(err)) => return Err(failed(Failed::NotSent, err.to_string())),
                    Err(_) => {
                        let detail = format!("no connection within {timeout:?}");
                        return Err(failed(Failed::NotSent, detail));
                    }
                }
            }
        };
        match tokio::time::timeout_at(deadline, request(client.clone())).await {
            Ok(Ok(answer)) => {
                let mut connection = self.connection();
                if connection.1 == current && connection.0.is_none() {
                    connection.0 = Some(client);
                }
                Ok(answer)
            }
            Ok(Err(err)) => Err(match refusal(&err) {
                Some((code, detail)) => failed(Failed::Refused(code), detail),
                None if not_sent(&err) => failed(Failed::NotSent, err.to_string()),
                None => failed(Failed::Unanswered, err.to_string()),
            }),
            Err(_) => Err(failed(
                Failed::Unanswered,
                format!("no answer within {timeout:?}"),
            )),
        }
    }
}

/// Whether a request failed before any member could apply it: no connection to the member,
/// or the member has no leader (with `require_leader` it refuses before proposing anything).
fn not_sent(err: &etcd_client::Error) -> bool {
    match err {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(status) => {
            i32::from(status.code()) == GRPC_UNAVAILABLE
                && ["tcp connect error", "no leader"]
                    .iter()
                    .any(|m| status.message().contains(m))
        }
        _ => false,
    }
}

/// How a request failed.
enum Failed {
    /// Before it was sent: no connection.
    NotSent,
    /// Sent, and not answered in time (or the connection broke).
    Unanswered,
    /// Refused by etcd as such, with this gRPC code.
    Refused(i32),
}

/// A failed request, as the client's thread tells it.
struct Failure {
    kind: Failed,
    endpoints: String,
    detail: String,
}

impl Failure {
    /// A read changes nothing: unanswered is unreachable.
    fn read(self) -> KvError {
        match self.kind {
            Failed::Refused(_) => KvError::Refused {
                what: "a read",
                detail: self.detail,
            },
            Failed::NotSent | Failed::Unanswered => KvError::Unreachable {
                endpoints: self.endpoints,
                detail: self.detail,
            },
        }
    }

    /// A transaction sent and not answered may yet be applied.
    fn commit(self) -> KvError {
        match self.kind {
            Failed::Refused(GRPC_NOT_FOUND) => KvError::LeaseEnded {
                detail: self.detail,
            },
            Failed::Refused(_) => KvError::Refused {
                what: "a transaction",
                detail: self.detail,
            },
            Failed::Unanswered => KvError::Unconfirmed {
                endpoints: self.endpoints,
                detail: self.detail,
            },
            Failed::NotSent => KvError::Unreachable {
                endpoints: self.endpoints,
                detail: self.detail,
            },
        }
    }
}

/// etcd's own refusal of a request as such (too large, an invalid transaction, a lease that
/// is gone): its gRPC code and what it said. Anything else is a failure to reach the
/// majority.
fn refusal(err: &etcd_client::Error) -> Option<(i32, String)> {
    match err {
        etcd_client::Error::GRpcStatus(status) => {
            let code = i32::from(status.code());
            matches!(
                code,
                GRPC_INVALID_ARGUMENT | GRPC_RESOURCE_EXHAUSTED | GRPC_NOT_FOUND
            )
            .then(|| (code, status.message().to_owned()))
        }
        _ => None,
    }
}

/// The gRPC status codes (standard numbers) that [`refusal`] counts as refusals.
const GRPC_INVALID_ARGUMENT: i32 = 3;
const GRPC_RESOURCE_EXHAUSTED: i32 = 8;
/// What etcd answers for a lease that is gone.
const GRPC_NOT_FOUND: i32 = 5;
/// No connection, or a member without a leader.
const GRPC_UNAVAILABLE: i32 = 14;

fn versioned(kv: &etcd_client::KeyValue) -> Versioned {
    Versioned {
        value: kv.value().to_vec(),
        mod_revision: kv.mod_revision(),
    }
}

fn revision_of(header: Option<&etcd_client::ResponseHeader>) -> Revision {
    header.map_or(0, etcd_client::ResponseHeader::revision)
}

async fn get(
    mut client: Client,
    keys: Vec<String>,
) -> Result<Read<Vec<Option<Versioned>>>, etcd_client::Error> {
    // One transaction of reads: every key at the same revision.
    let reads: Vec<TxnOp> = keys.iter().map(|k| TxnOp::get(k.as_str(), None)).collect();
    let answer = client.txn(Txn::new().and_then(reads)).await?;
    let items = answer
        .op_responses()
        .iter()
        .map(|response| match response {
            TxnOpResponse::Get(got) => got.kvs().first().map(versioned),
            _ => None,
        })
        .collect();
    Ok(Read {
        revision: revision_of(answer.header()),
        items,
    })
}

async fn range(
    mut client: Client,
    prefix: String,
    after: Option<String>,
    since: Option<Revision>,
    limit: usize,
) -> Result<Read<Vec<(String, Versioned)>>, etcd_client::Error> {
    let end = prefix_end(prefix.as_bytes());
    let from = match after {
        // The first key after `after`: it with a zero byte appended.
        Some(after) if after.as_str() >= prefix.as_str() => {
            let mut key = after.into_bytes();
            key.push(0);
            key
        }
        _ => prefix.into_bytes(),
    };
    let mut options = GetOptions::new()
        .with_range(end)
        .with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
    if let Some(since) = since {
        options = options
            .with_min_mod_revision(since)
            .with_sort(SortTarget::Mod, SortOrder::Ascend);
    }
    let answer = client.get(from, Some(options)).await?;
    let mut items: Vec<(String, Versioned)> = answer
        .kvs()
        .iter()
        .filter_map(|kv| Some((kv.key_str().ok()?.to_owned(), versioned(kv))))
        .collect();
    if since.is_some() {
        items.sort_by(|a, b| (a.1.mod_revision, &a.0).cmp(&(b.1.mod_revision, &b.0)));
    }
    Ok(Read {
        revision: revision_of(answer.header()),
        items,
    })
}

async fn commit(
    mut client: Client,
    expect: Vec<Expect>,
    ops: Vec<Op>,
) -> Result<Option<Revision>, etcd_client::Error> {
    // An absent key's mod revision compares as 0.
    let compares: Vec<Compare> = expect
        .iter()
        .map(|e| {
            Compare::mod_revision(
                e.key.as_str(),
                CompareOp::Equal,
                e.mod_revision.unwrap_or(0),
            )
        })
        .collect();
    let writes: Vec<TxnOp> = ops
        .into_iter()
        .map(|op| match op {
            Op::Put { key, value } => TxnOp::put(key, value, None),
            Op::PutLeased { key, value, lease } => {
                TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease)))
            }
            Op::Delete { key } => TxnOp::delete(key, None),
        })
        .collect();
    let answer = client
        .txn(Txn::new().when(compares).and_then(writes))
        .await?;
    Ok(answer.succeeded().then(|| revision_of(answer.header())))
}

async fn grant(mut client: Client, ttl: Duration) -> Result<LeaseId, etcd_client::Error> {
    Ok(client.lease_grant(lease_seconds(ttl), None).await?.id())
}

/// One keep-alive round trip (opening the stream sends the first). The client answers a
/// lease etcd no longer has (no time left) with its keep-alive error, and only then.
async fn renew(mut client: Client, lease: LeaseId) -> Result<bool, etcd_client::Error> {
    match client.lease_keep_alive(lease).await {
        Ok(_) => Ok(true),
        Err(etcd_client::Error::LeaseKeepAliveError(_)) => Ok(false),
        Err(err) => Err(err),
    }
}

async fn revoke(mut client: Client, lease: LeaseId) -> Result<(), etcd_client::Error> {
    match client.lease_revoke(lease).await {
        Ok(_) => Ok(()),
        // Gone already (expired): what was asked for.
        Err(etcd_client::Error::GRpcStatus(status))
            if i32::from(status.code()) == GRPC_NOT_FOUND =>
        {
            Ok(())
        }
        Err(err) => Err(err),
    }
}

/// The smallest key after every key that starts with `prefix` (etcd's range end for a
/// prefix); `\0` (to the end of the key space) when there is none.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn a_prefix_ends_at_the_next_key_that_does_not_start_with_it() {
        assert_eq!(prefix_end(b"/lbs/pairs/"), b"/lbs/pairs0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
