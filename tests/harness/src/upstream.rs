//! In-process upstream HTTP servers that record what reached them.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// How an upstream answers.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// 200 with `{"upstream": name}`.
    Ok,
    /// This status, with an error body.
    Status(u16),
    /// Waits for a permit of the semaphore, then answers 200.
    Hold(Arc<Semaphore>),
}

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Request path.
    pub path: String,
    /// The endpoint header Envoy forwarded (the filter's).
    pub endpoint_header: Option<String>,
    /// Body length in bytes.
    pub body_len: usize,
}

#[derive(Debug)]
struct State {
    name: String,
    behaviour: Mutex<Behaviour>,
    seen: Mutex<Vec<Seen>>,
}

/// A recording upstream on 127.0.0.1, serving until dropped.
#[derive(Debug)]
pub struct Upstream {
    addr: String,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    /// Binds 127.0.0.1:0 and serves with `behaviour`.
    pub async fn start(name: &str, behaviour: Behaviour) -> anyhow::Result<Upstream> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let state = Arc::new(State {
            name: name.to_owned(),
            behaviour: Mutex::new(behaviour),
            seen: Mutex::new(Vec::new()),
        });
        let s = state.clone();
        let app = axum::Router::new()
            .fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
                let s = s.clone();
                async move { handle(s, uri, headers, body).await }
            })
            // Tests send bodies of several MiB on purpose.
            .layer(axum::extract::DefaultBodyLimit::disable());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Upstream { addr, state, task })
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The name it answers with.
    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// Requests seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state
            .seen
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Number of requests seen so far.
    pub fn count(&self) -> usize {
        self.state.seen.lock().map(|s| s.len()).unwrap_or_default()
    }

    /// Changes how it answers from now on.
    pub fn set_behaviour(&self, b: Behaviour) {
        if let Ok(mut g) = self.state.behaviour.lock() {
            *g = b;
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(s: Arc<State>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let seen = Seen {
        path: uri.path().to_owned(),
        endpoint_header: headers
            .get("x-gateway-destination-endpoint")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body_len: body.len(),
    };
    if let Ok(mut g) = s.seen.lock() {
        g.push(seen);
    }
    let behaviour = s
        .behaviour
        .lock()
        .map(|b| b.clone())
        .unwrap_or(Behaviour::Ok);
    match behaviour {
        Behaviour::Ok => {}
        Behaviour::Status(code) => {
            let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return (
                code,
                axum::Json(serde_json::json!({"error": {"message": "injected"}})),
            )
                .into_response();
        }
        Behaviour::Hold(sem) => {
            if let Ok(permit) = sem.acquire().await {
                permit.forget();
            }
        }
    }
    axum::Json(serde_json::json!({"upstream": s.name})).into_response()
}
