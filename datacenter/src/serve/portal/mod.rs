//! The provider's portal (`[portal]`, off by default): HTTPS on its own port, server-rendered
//! pages that need no JavaScript — the fleet with its problems first, each pair with its
//! boxes, DNS, audit log and the promote action (an operator's remote P), the audit log —,
//! `/metrics` for Prometheus and `/healthz` for load balancers.
//!
//! Accounts are the store's ([`crate::accounts`]); a login gives a session (a random token in
//! a `Secure`, `HttpOnly`, `SameSite=Strict` cookie, 30 minutes idle, 12 hours at most) kept
//! by this site; every form carries the session's CSRF token; logins are rate-limited per
//! address. A session ends when its account is removed, its role changes or its password is
//! set again.

use std::collections::HashMap;

use axum::Router;
use axum::extract::{Form, Path as UrlPath, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use lbs_protocol::tls::WebIdentity;

use super::*;
use crate::accounts::{Account, AccountRole, verify_password};
use crate::config::PortalSettings;

mod charts;
mod metrics;
mod pages;
mod resources;

/// A session is dropped after this long without a request.
const IDLE: Duration = Duration::from_secs(30 * 60);
/// And after this long whatever.
const LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Portal connections at once, and from one address (browsers open several).
const CONNECTIONS: usize = 256;
const PER_SOURCE: usize = 32;
/// A request's headers must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Form bodies larger than this are refused (a login or a promotion is tiny).
const MAX_FORM: usize = 16 * 1024;
/// How long a promotion asked in the portal waits for the backup.
const PROMOTION_WAIT: Duration = Duration::from_secs(60);
/// Logins per address: a burst, then one every few seconds.
const LOGIN_LIMIT: RateLimit = RateLimit {
    burst: 5,
    per_minute: 12,
};

/// The portal's own state beside the service's.
pub(super) struct Portal {
    settings: PortalSettings,
    sessions: Mutex<HashMap<String, Session>>,
    logins: Mutex<RateLimiter>,
}

#[derive(Clone, Debug)]
struct Session {
    name: String,
    role: AccountRole,
    csrf: String,
    /// The account's `changed_at` at login: a new password ends the session.
    changed_at: i64,
    started: Instant,
    seen: Instant,
}

/// A logged-in person, as a handler sees them.
#[derive(Clone, Debug)]
pub(super) struct Who {
    pub(super) name: String,
    pub(super) role: AccountRole,
    pub(super) csrf: String,
}

impl Portal {
    pub(super) fn new(settings: PortalSettings) -> Portal {
        Portal {
            settings,
            sessions: Mutex::new(HashMap::new()),
            logins: Mutex::new(RateLimiter::new(LOGIN_LIMIT)),
        }
    }
}

/// 32 random bytes as hex: session tokens and CSRF tokens.
fn token() -> String {
    let mut bytes = [0u8; 32];
    #[allow(clippy::expect_used)]
    getrandom::fill(&mut bytes).expect("the operating system's random source failed");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Constant-time comparison of two tokens.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

const COOKIE: &str = "lbs_session";

fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
}

/// The person behind a request's session cookie, if it is still good.
async fn who(inner: &Arc<Inner>, headers: &HeaderMap) -> Option<Who> {
    let portal = inner.portal.as_ref()?;
    let token = cookie_token(headers)?;
    let session = {
        let mut sessions = portal.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        sessions.retain(|_, s| {
            now.duration_since(s.seen) < IDLE && now.duration_since(s.started) < LIFETIME
        });
        let session = sessions.get_mut(&token)?;
        session.seen = now;
        session.clone()
    };
    // The account as it is now: removed, demoted or given a new password ends the session.
    let name = session.name.clone();
    let account = with_store(inner, move |s| {
        Ok(s.accounts()?.into_iter().find(|a| a.name == name))
    })
    .await
    .ok()
    .flatten();
    match account {
        Some(a) if a.role == session.role && a.changed_at == session.changed_at => Some(Who {
            name: session.name,
            role: session.role,
            csrf: session.csrf,
        }),
        _ => {
            portal
                .sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&token);
            None
        }
    }
}

/// Headers every page carries: no scripts, no framing, nothing cached.
fn secured(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CACHE_CONTROL, "no-store"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::STRICT_TRANSPORT_SECURITY, "max-age=31536000"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

fn html(status: StatusCode, body: String) -> Response {
    secured(
        (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            body,
        )
            .into_response(),
    )
}

fn to_login() -> Response {
    secured(Redirect::to("/login").into_response())
}

fn router(inner: Arc<Inner>) -> Router {
    Router::new()
        .route("/", get(fleet_page))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/pair/{name}", get(pair_page))
        .route("/pair/{name}/promote", post(promote))
        .route("/pair/{name}/note", post(note))
        .route("/pair/{name}/resources", get(resources::pair_resources))
        .route("/box/{sid}", get(resources::box_page))
        .route("/events", get(events_page))
        .route("/metrics", get(metrics::metrics))
        .route("/healthz", get(healthz))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_FORM))
        .with_state(inner)
}

async fn healthz(State(inner): State<Arc<Inner>>) -> Response {
    match with_store(&inner, |s| s.revocation_list()).await {
        Ok(_) => (StatusCode::OK, "ok\n").into_response(),
        Err(err) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the authority cannot be read: {err}\n"),
        )
            .into_response(),
    }
}

async fn login_page(State(inner): State<Arc<Inner>>, headers: HeaderMap) -> Response {
    if who(&inner, &headers).await.is_some() {
        return secured(Redirect::to("/").into_response());
    }
    html(StatusCode::OK, pages::login(None))
}

#[derive(serde::Deserialize)]
struct LoginForm {
    name: String,
    password: String,
}

async fn login(
    State(inner): State<Arc<Inner>>,
    axum::extract::ConnectInfo(source): axum::extract::ConnectInfo<SocketAddr>,
    Form(form): Form<LoginForm>,
) -> Response {
    let Some(portal) = inner.portal.as_ref() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let limited = portal
        .logins
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take(source.ip(), Instant::now());
    if let Err(wait) = limited {
        tracing::warn!(%source, name = form.name, "portal login rate-limited");
        let why = format!(
            "too many attempts from {}; try again in {} s",
            source.ip(),
            wait.as_secs() + 1
        );
        return html(StatusCode::TOO_MANY_REQUESTS, pages::login(Some(&why)));
    }
    let name = form.name.clone();
    let account: Option<Account> = with_store(&inner, move |s| {
        Ok(s.accounts()?.into_iter().find(|a| a.name == name))
    })
    .await
    .ok()
    .flatten();
    // The hash is checked on a blocking thread (argon2 takes tens of milliseconds), also for
    // an unknown name, so the answer's time does not tell which names exist.
    let password = form.password;
    let checked = tokio::task::spawn_blocking(move || match account {
        Some(account) if verify_password(&account.hash, &password) => Some(account),
        Some(_) => None,
        None => {
            let _ = verify_password(DUMMY_HASH, &password);
            None
        }
    })
    .await
    .ok()
    .flatten();
    let Some(account) = checked else {
        tracing::warn!(%source, name = form.name, "portal login refused");
        return html(
            StatusCode::UNAUTHORIZED,
            pages::login(Some("wrong name or password")),
        );
    };
    let token = token();
    portal
        .sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            token.clone(),
            Session {
                name: account.name.clone(),
                role: account.role,
                csrf: self::token(),
                changed_at: account.changed_at,
                started: Instant::now(),
                seen: Instant::now(),
            },
        );
    tracing::info!(%source, name = account.name, role = %account.role, "portal login");
    let mut response = Redirect::to("/").into_response();
    if let Ok(cookie) = HeaderValue::from_str(&format!(
        "{COOKIE}={token}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={}",
        LIFETIME.as_secs()
    )) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    secured(response)
}

/// An argon2id hash of nothing anyone knows: unknown names cost the same check.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$Jw2ZwEHuTi5Z7PrHnKsNFnC2Ny+6jsHHdvwR7qfTCk8";

/// A form that changes something: its CSRF token (missing is refused like a wrong one).
#[derive(serde::Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    let Some(who) = who(&inner, &headers).await else {
        return to_login();
    };
    if !same(&form.csrf, &who.csrf) {
        return html(
            StatusCode::FORBIDDEN,
            pages::refused("the form is stale; reload the page"),
        );
    }
    if let (Some(portal), Some(token)) = (inner.portal.as_ref(), cookie_token(&headers)) {
        portal
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&token);
    }
    let mut response = Redirect::to("/login").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "lbs_session=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    secured(response)
}

#[derive(serde::Deserialize, Default)]
pub(super) struct FleetQuery {
    /// Pairs whose name, FQDN or a SID contains this.
    #[serde(default)]
    pub(super) q: String,
    /// Only pairs with problems.
    #[serde(default)]
    pub(super) problems: Option<String>,
    /// Which page of the pairs (from 1).
    #[serde(default)]
    pub(super) page: Option<usize>,
}

async fn fleet_page(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    Query(query): Query<FleetQuery>,
) -> Response {
    let Some(who) = who(&inner, &headers).await else {
        return to_login();
    };
    match with_store(&inner, |s| s.pairs()).await {
        Ok(pairs) => html(
            StatusCode::OK,
            pages::fleet(&who, &pairs, &query, now_ms(), &inner.config.site),
        ),
        Err(err) => html(
            StatusCode::SERVICE_UNAVAILABLE,
            pages::refused(&err.to_string()),
        ),
    }
}

#[derive(serde::Deserialize, Default)]
struct PairQuery {
    request: Option<i64>,
}

async fn pair_page(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
    Query(query): Query<PairQuery>,
) -> Response {
    let Some(who) = who(&inner, &headers).await else {
        return to_login();
    };
    let wanted = name.clone();
    let found = with_store(&inner, move |s| {
        let pair = s.pair_named(&wanted)?;
        let events: Vec<store::Event> = match &pair {
            Some(_) => s
                .events(0)?
                .into_iter()
                .filter(|e| e.pair.as_deref() == Some(wanted.as_str()))
                .collect(),
            None => Vec::new(),
        };
        let request = match query.request {
            Some(id) => Some(s.promotion_request(id, now_ms())?),
            None => None,
        };
        Ok((pair, events, request))
    })
    .await;
    match found {
        Ok((Some(pair), events, request)) => html(
            StatusCode::OK,
            pages::pair(&who, &pair, &events, request.as_ref(), now_ms()),
        ),
        Ok((None, ..)) => html(
            StatusCode::NOT_FOUND,
            pages::refused(&format!("no pair named {name}")),
        ),
        Err(err) => html(
            StatusCode::SERVICE_UNAVAILABLE,
            pages::refused(&err.to_string()),
        ),
    }
}

/// The operator behind a form that changes something (`what`, for the refusal): logged in,
/// the session's CSRF token, the operator role; else the answer to give.
async fn operator(
    inner: &Arc<Inner>,
    headers: &HeaderMap,
    csrf: &str,
    what: &str,
) -> Result<Who, Response> {
    let Some(who) = who(inner, headers).await else {
        return Err(to_login());
    };
    if !same(csrf, &who.csrf) {
        return Err(html(
            StatusCode::FORBIDDEN,
            pages::refused("the form is stale; reload the page"),
        ));
    }
    if who.role != AccountRole::Operator {
        return Err(html(
            StatusCode::FORBIDDEN,
            pages::refused(&format!(
                "{} is a viewer: only operators may {what}",
                who.name
            )),
        ));
    }
    Ok(who)
}

async fn promote(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
    Form(form): Form<CsrfForm>,
) -> Response {
    let who = match operator(&inner, &headers, &form.csrf, "promote").await {
        Ok(who) => who,
        Err(answer) => return answer,
    };
    let actor = format!("{} (portal)", who.name);
    let pair = name.clone();
    let asked = with_store(&inner, move |s| {
        s.request_promotion(&pair, &actor, PROMOTION_WAIT, now_ms())
    })
    .await;
    match asked {
        Ok(request) => {
            tracing::info!(
                name = who.name,
                pair = name,
                id = request.id,
                "promotion asked in the portal"
            );
            secured(
                Redirect::to(&format!(
                    "/pair/{}?request={}",
                    pages::url_part(&name),
                    request.id
                ))
                .into_response(),
            )
        }
        Err(err) => html(StatusCode::CONFLICT, pages::refused(&err.to_string())),
    }
}

#[derive(serde::Deserialize)]
struct NoteForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    text: String,
}

/// An operator's note on a pair: into its audit log, with the account's name.
async fn note(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
    Form(form): Form<NoteForm>,
) -> Response {
    let who = match operator(&inner, &headers, &form.csrf, "write notes").await {
        Ok(who) => who,
        Err(answer) => return answer,
    };
    let actor = format!("{} (portal)", who.name);
    let (pair, text) = (name.clone(), form.text.replace("\r\n", "\n"));
    match with_store(&inner, move |s| {
        s.note(&pair, &actor, text.trim(), now_ms())
    })
    .await
    {
        Ok(()) => {
            secured(Redirect::to(&format!("/pair/{}", pages::url_part(&name))).into_response())
        }
        Err(err) => html(StatusCode::BAD_REQUEST, pages::refused(&err.to_string())),
    }
}

#[derive(serde::Deserialize, Default)]
pub(super) struct EventsQuery {
    #[serde(default)]
    pub(super) pair: String,
    #[serde(default)]
    pub(super) kind: String,
    /// Only events after this many hours ago (0: all kept).
    #[serde(default)]
    pub(super) hours: u64,
}

async fn events_page(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    Query(query): Query<EventsQuery>,
) -> Response {
    let Some(who) = who(&inner, &headers).await else {
        return to_login();
    };
    match with_store(&inner, |s| s.events(0)).await {
        Ok(events) => html(
            StatusCode::OK,
            pages::events(&who, &events, &query, now_ms()),
        ),
        Err(err) => html(
            StatusCode::SERVICE_UNAVAILABLE,
            pages::refused(&err.to_string()),
        ),
    }
}

/// The portal's certificate: the provider's own, or one this site's CA issues for its names.
pub(super) fn identity(
    settings: &PortalSettings,
    ca: &CertificateAuthority,
) -> anyhow::Result<WebIdentity> {
    match &settings.certificate {
        Some((cert, key)) => Ok(WebIdentity::load(cert, key)?),
        None => Ok(ca.issue_web_server(&settings.names)?),
    }
}

/// Serves the portal on `listener` until `shutdown`: TLS (within the handshake deadline),
/// then one HTTP/1.1 request with a header deadline, the whole connection within 20 s,
/// connections bounded in all and per address.
pub(super) async fn serve_portal(
    inner: Arc<Inner>,
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    shutdown: CancellationToken,
) {
    let app = router(inner);
    let serving = Serving::new("the portal", CONNECTIONS, Duration::from_secs(5))
        .with_unproven(Unproven::new(CONNECTIONS, PER_SOURCE, 2 * HEADER_TIMEOUT));
    serve_until(listener, shutdown, serving, |tcp, source, admission| {
        let (app, tls) = (app.clone(), tls.clone());
        async move {
            let _admission = admission;
            let stream = match tokio::time::timeout(IO_TIMEOUT, tls::accept_any(tls, tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(err)) => {
                    tracing::debug!(%source, "portal TLS handshake: {err}");
                    return;
                }
                Err(_) => return,
            };
            let service = hyper_util::service::TowerToHyperService::new(
                app.layer(axum::Extension(axum::extract::ConnectInfo(source)))
                    .into_service::<hyper::body::Incoming>(),
            );
            // One request per connection: each page is one request (no scripts, no images),
            // and the connection's deadline then bounds one request, never cuts a second.
            let served = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(64 * 1024)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            if let Err(err) = served {
                tracing::debug!(%source, "portal connection: {err}");
            }
        }
    })
    .await;
}
