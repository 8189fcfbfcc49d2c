//! The simulator on tiny traces whose right answer is worked out by hand,
//! with the real plugins from target/plugins (scripts/build-plugins.sh).

#![allow(clippy::unwrap_used)]

use kvmesh_host_sim::{PluginSpec, SimConfig, simulate};
use kvmesh_host_trace::TraceRequest;
use kvmesh_plugins_sdk::prompt::render_message;
use serde_json::json;

const MODEL: &str = "tiny-model";

fn plugin(name: &str) -> PluginSpec {
    let wasm =
        kvmesh_host_runtime::locate_plugin(name).unwrap_or_else(|e| panic!("plugin {name}: {e}"));
    PluginSpec {
        name: name.to_owned(),
        wasm,
        config: kvmesh_host_sim::default_plugin_config("sim", 256).into_bytes(),
    }
}

/// One tenant: a system prompt of exactly two 256-byte chunks in canonical
/// form, then a unique 300-byte question. Requests 10 s apart, one output
/// token: no queueing, so no load-based spilling.
fn one_tenant(n: usize) -> (Vec<TraceRequest>, usize, f64) {
    let system = "s".repeat(512 - "system".len() - 2);
    let mut canon = Vec::new();
    render_message("system", &system, &mut canon);
    assert_eq!(canon.len(), 512);
    let trace: Vec<TraceRequest> = (0..n)
        .map(|i| {
            let question = format!("{i:04} {}", "q".repeat(295));
            TraceRequest {
                at_ms: i as f64 * 10_000.0,
                path: "/v1/chat/completions".to_owned(),
                body: json!({"model": MODEL, "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": question},
                ]}),
                output_tokens: 1,
                tag: None,
            }
        })
        .collect();
    // Canonical prompt: 512 + ("user" + 2 + 300) = 818 bytes, 205 tokens at
    // 4 bytes per token; 2 shared chunks = 128 tokens per hit.
    (trace, 2, 205.0)
}

fn config(replicas: usize) -> SimConfig {
    SimConfig {
        model: MODEL.to_owned(),
        replicas,
        ..SimConfig::default()
    }
}

#[test]
fn one_tenant_two_replicas_prefix_aware_hits_after_the_first_round_robin_after_two() {
    let n = 10;
    let (trace, shared_chunks, prompt_tokens) = one_tenant(n);
    let hit = shared_chunks as f64 * 64.0;
    let total = n as f64 * prompt_tokens;
    let report = simulate(
        &trace,
        &[plugin("round-robin"), plugin("prefix-aware")],
        &config(2),
    )
    .unwrap();
    let oracle = (n - 1) as f64 * hit / total;
    assert!(
        (report.oracle_ratio - oracle).abs() < 1e-9,
        "{}",
        report.table()
    );

    let rr = &report.plugins[0];
    // Each replica's first request misses, every later one hits.
    assert_eq!(rr.served, vec![5, 5], "{}", report.table());
    assert!(
        (rr.cached_tokens - (n - 2) as f64 * hit).abs() < 1e-9,
        "{}",
        report.table()
    );
    assert!((rr.cached_ratio - (n - 2) as f64 * hit / total).abs() < 1e-9);

    let pa = &report.plugins[1];
    assert!(
        (pa.cached_tokens - (n - 1) as f64 * hit).abs() < 1e-9,
        "{}",
        report.table()
    );
    assert!((pa.fraction_of_oracle - 1.0).abs() < 1e-9);
    assert_eq!(pa.fallbacks, 0);
    assert_eq!(rr.fallbacks, 0);
}

#[test]
fn ttft_follows_the_cost_model_without_queueing() {
    let (trace, _, prompt_tokens) = one_tenant(3);
    let cfg = config(1);
    let report = simulate(&trace, &[plugin("round-robin")], &cfg).unwrap();
    let p = &report.plugins[0];
    // First request: all 205 tokens prefilled; later ones: 205 - 128.
    let miss_ms = (prompt_tokens * cfg.prefill_us_per_token + cfg.decode_us_per_token) / 1000.0;
    let hit_ms =
        ((prompt_tokens - 128.0) * cfg.prefill_us_per_token + cfg.decode_us_per_token) / 1000.0;
    assert!((p.ttft_p50_ms - hit_ms).abs() < 1e-6, "{p:?}");
    assert!((p.ttft_p99_ms - miss_ms).abs() < 1e-6, "{p:?}");
}
