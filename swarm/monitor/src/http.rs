//! The HTTP side: an accept loop with a connection cap, hyper's HTTP/1 with header limits, and
//! an axum router of three read-only routes.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::registry::Registry;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::{HttpConfig, Source};

const INDEX_HTML: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const VOLUNTEER_HTML: &str = include_str!("../assets/volunteer.html");

struct AppState {
    source: Source,
    token: Option<String>,
    page: String,
    registry: Registry,
    /// The last JSON served and the publication it came from (polls between publications
    /// reuse it).
    json: Mutex<Option<(u64, axum::body::Bytes)>>,
}

pub(crate) async fn serve(listener: TcpListener, cfg: HttpConfig, source: Source) {
    let page = match &source {
        Source::Trainer(_) => INDEX_HTML.replace("/*__APP_JS__*/", APP_JS),
        Source::Volunteer(_) => VOLUNTEER_HTML.to_string(),
    };
    let registry = match &source {
        Source::Trainer(rx) => crate::trainer_registry(rx.clone()),
        Source::Volunteer(rx) => crate::volunteer_registry(rx.clone()),
    };
    let state = Arc::new(AppState {
        source,
        token: cfg.token.clone(),
        page,
        registry,
        json: Mutex::new(None),
    });
    let app = Router::new()
        .route("/", get(index))
        .route("/api/v1/state", get(api_state))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state);
    let slots = Arc::new(Semaphore::new(cfg.max_connections.max(1)));
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!(error = %e, "monitor accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse_busy(stream));
            continue;
        };
        let app = app.clone();
        let cfg = cfg.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(cfg.header_timeout)
                .max_header_size(cfg.max_header_bytes)
                .max_headers(cfg.max_headers);
            let conn = b.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
            if let Ok(Err(e)) = tokio::time::timeout(cfg.max_connection_age, conn).await {
                tracing::debug!(%remote, error = %e, "monitor connection ended");
            }
        });
    }
}

/// Over the connection cap: a plain 503, then close.
async fn refuse_busy(mut stream: tokio::net::TcpStream) {
    let body = "too many connections to the monitor\n";
    let msg = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        let _ = stream.write_all(msg.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Compares in time independent of where the strings differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(state: &AppState, headers: &HeaderMap, uri: &Uri) -> bool {
    let Some(token) = &state.token else {
        return true;
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let query = uri
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")));
    [bearer, query]
        .into_iter()
        .flatten()
        .any(|t| same(t.as_bytes(), token.as_bytes()))
}

fn unauthorized() -> Response {
    let mut r = (
        StatusCode::UNAUTHORIZED,
        "a bearer token is required: Authorization: Bearer TOKEN (or ?token=TOKEN for the page)\n",
    )
        .into_response();
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

fn with_type(body: impl Into<Body>, content_type: &'static str) -> Response {
    let mut r = Response::new(body.into());
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // The page loads nothing from elsewhere; say so to the browser too.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

async fn index(State(s): State<Arc<AppState>>, headers: HeaderMap, uri: Uri) -> Response {
    if !authorized(&s, &headers, &uri) {
        return unauthorized();
    }
    with_type(s.page.clone(), "text/html; charset=utf-8")
}

fn state_json(source: &Source) -> (u64, Vec<u8>) {
    let r = match source {
        Source::Trainer(rx) => {
            let snap = rx.borrow().clone();
            (snap.seq, serde_json::to_vec(&*snap))
        }
        Source::Volunteer(rx) => {
            let snap = rx.borrow().clone();
            (snap.seq, serde_json::to_vec(&*snap))
        }
    };
    (r.0, r.1.unwrap_or_else(|_| b"{}".to_vec()))
}

fn current_seq(source: &Source) -> u64 {
    match source {
        Source::Trainer(rx) => rx.borrow().seq,
        Source::Volunteer(rx) => rx.borrow().seq,
    }
}

async fn api_state(State(s): State<Arc<AppState>>, headers: HeaderMap, uri: Uri) -> Response {
    if !authorized(&s, &headers, &uri) {
        return unauthorized();
    }
    let seq = current_seq(&s.source);
    let cached = s
        .json
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .filter(|(q, _)| *q == seq)
        .map(|(_, b)| b.clone());
    let body = match cached {
        Some(b) => b,
        None => {
            let (q, bytes) = state_json(&s.source);
            let b = axum::body::Bytes::from(bytes);
            *s.json.lock().unwrap_or_else(|e| e.into_inner()) = Some((q, b.clone()));
            b
        }
    };
    with_type(body, "application/json")
}

async fn metrics(State(s): State<Arc<AppState>>, headers: HeaderMap, uri: Uri) -> Response {
    if !authorized(&s, &headers, &uri) {
        return unauthorized();
    }
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut text, &s.registry) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("metrics encoding failed: {e}\n"),
        )
            .into_response();
    }
    with_type(text, "text/plain; version=0.0.4; charset=utf-8")
}

async fn not_found(State(s): State<Arc<AppState>>, headers: HeaderMap, uri: Uri) -> Response {
    if !authorized(&s, &headers, &uri) {
        return unauthorized();
    }
    let path: String = uri.path().chars().take(64).collect();
    (
        StatusCode::NOT_FOUND,
        format!(
            "no such page: {path:?}; this monitor serves /, /api/v1/state and /metrics (GET only)\n"
        ),
    )
        .into_response()
}
