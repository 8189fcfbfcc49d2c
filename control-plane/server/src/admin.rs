//! HTTP admin API: reads are open, changes need `Authorization: Bearer <token>`.
//!
//! - `GET  /healthz`, `GET /readyz` (ready once the warm-up ended), `GET /metrics`
//! - `GET  /v1/pools`, `GET /v1/replicas`: live state
//! - `PUT  /v1/pools/{pool}/strategy` (body: a strategy spec): push by ECDS, answer ACK/NACK
//! - `POST /v1/pools/{pool}/rollback`

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;

use crate::app::{App, ChangeError, PushReport, PushResult};
use crate::config::StrategySpec;
use crate::envoy;
use crate::strategy::StrategyError;

#[derive(Debug, Clone)]
struct AdminState {
    app: Arc<App>,
    token: Option<String>,
}

/// The error every admin endpoint answers with (OpenAI-style JSON body).
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "message": self.message, "type": self.kind, "code": self.status.as_u16() } });
        (self.status, Json(body)).into_response()
    }
}

impl From<ChangeError> for ApiError {
    fn from(e: ChangeError) -> Self {
        let status = match &e {
            ChangeError::UnknownPool(_) | ChangeError::Strategy(StrategyError::UnknownPool(_)) => {
                StatusCode::NOT_FOUND
            }
            ChangeError::Strategy(StrategyError::NoHistory(_)) => StatusCode::CONFLICT,
            ChangeError::Strategy(StrategyError::Store(_)) => StatusCode::INTERNAL_SERVER_ERROR,
            ChangeError::Strategy(StrategyError::Fetch(..)) => StatusCode::BAD_GATEWAY,
            ChangeError::Strategy(_) => StatusCode::BAD_REQUEST,
        };
        Self::new(status, "invalid_request_error", e.to_string())
    }
}

/// The token for changes: the config's, else `KVMESH_ADMIN_TOKEN`.
pub fn token(app: &App) -> Option<String> {
    app.config
        .admin_token
        .clone()
        .or_else(|| std::env::var("KVMESH_ADMIN_TOKEN").ok())
        .filter(|t| !t.is_empty())
}

fn authorize(state: &AdminState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &state.token else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "changes are disabled: no admin token configured",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compare without an early exit on the first differing byte.
    let same = given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "missing or wrong bearer token",
        ))
    }
}

pub fn router(app: Arc<App>) -> Router {
    let token = token(&app);
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/pools", get(pools))
        .route("/v1/replicas", get(replicas))
        .route("/v1/pools/{pool}/strategy", put(set_strategy))
        .route("/v1/pools/{pool}/rollback", post(rollback))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "no such endpoint",
            )
        })
        .with_state(AdminState { app, token })
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    if s.app.is_warm() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "warming up")
    }
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.app.metrics.encode(),
    )
}

#[derive(Debug, Serialize)]
struct PoolView {
    name: String,
    model: String,
    listener: String,
    /// Pools from Kubernetes: the path prefix on the shared gateway listener.
    #[serde(skip_serializing_if = "Option::is_none")]
    path_prefix: Option<String>,
    /// Pools from Kubernetes: ready endpoints listed by their EndpointSlices.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    discovered: Vec<String>,
    chunk_bytes: u32,
    strategy: Option<StrategyView>,
    rollback_depth: usize,
    replicas: usize,
    /// ECDS state of the routing filter per Envoy node.
    filter_status: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Serialize)]
struct StrategyView {
    name: String,
    module: String,
    sha256: String,
    params: serde_json::Value,
}

async fn pools(State(s): State<AdminState>) -> Json<Vec<PoolView>> {
    let strategies = s.app.strategies.lock().await;
    let registry = s.app.registry.lock().await;
    let pools = registry.pools();
    let views = pools
        .iter()
        .map(|p| {
            let filter_status = s
                .app
                .status
                .by_resource(kvmesh_control_plane_xds::type_url::EXTENSION_CONFIG, &envoy::filter_name(&p.name))
                .into_iter()
                .map(|(node, st)| {
                    let answer = match &st.answer {
                        None => json!("pending"),
                        Some(kvmesh_control_plane_xds::Answer::Acked) => json!("acked"),
                        Some(kvmesh_control_plane_xds::Answer::Nacked(m)) => json!({ "nacked": m }),
                    };
                    (node, json!({ "sent": st.sent_version, "answer": answer, "serving": st.acked_version }))
                })
                .collect();
            PoolView {
                name: p.name.clone(),
                model: p.model.clone(),
                listener: p.listener.to_string(),
                path_prefix: p.gateway.as_ref().map(|g| g.path_prefix.clone()),
                discovered: p
                    .gateway
                    .as_ref()
                    .map(|g| g.discovered.iter().map(|a| a.to_string()).collect())
                    .unwrap_or_default(),
                chunk_bytes: p.chunk_bytes,
                strategy: strategies.current(&p.name).map(|a| StrategyView {
                    name: a.spec.name.clone(),
                    module: a.spec.module.clone(),
                    sha256: a.sha256.clone(),
                    params: a.spec.params.clone(),
                }),
                rollback_depth: strategies.history_len(&p.name),
                replicas: registry.members(&p.name).len(),
                filter_status,
            }
        })
        .collect();
    Json(views)
}

async fn replicas(State(s): State<AdminState>) -> Json<Vec<serde_json::Value>> {
    let registry = s.app.registry.lock().await;
    let list = registry
        .replicas()
        .map(|r| {
            let load = &r.load;
            json!({
                "id": r.id,
                "pool": r.pool,
                "address": r.register.address,
                "model": r.register.model,
                "connected": r.connected(),
                "silent_ms": r.last_seen.elapsed().as_millis() as u64,
                "waiting": load.waiting,
                "running": load.running,
                "queued_prefill_tokens": load.queued_prefill_tokens,
                "kv": load.kv.iter().map(|u| json!({"tier": u.tier, "used": u.used_blocks, "capacity": u.capacity_blocks})).collect::<Vec<_>>(),
                "resident_chunks": r.residency_by_tier(),
                "rejected_reports": r.rejected,
            })
        })
        .collect();
    Json(list)
}

fn push_response(report: PushReport) -> Response {
    let status = match report.result {
        PushResult::Acked => StatusCode::OK,
        PushResult::Nacked => StatusCode::CONFLICT,
        PushResult::Pending => StatusCode::ACCEPTED,
    };
    (status, Json(report)).into_response()
}

async fn set_strategy(
    State(s): State<AdminState>,
    Path(pool): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    let spec: StrategySpec = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("invalid strategy JSON: {e}"),
        )
    })?;
    Ok(push_response(s.app.set_strategy(&pool, spec).await?))
}

async fn rollback(
    State(s): State<AdminState>,
    Path(pool): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    Ok(push_response(s.app.rollback(&pool).await?))
}
