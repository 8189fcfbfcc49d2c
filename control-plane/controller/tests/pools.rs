//! Pool descriptions for the control plane: strategy mapping, defaults, and ready members
//! taken from the right EndpointSlices only.
#![allow(clippy::unwrap_used)] // test helpers, like #[test] bodies, may unwrap

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kvmesh_control_plane_controller::crd::InferenceEndpointConfigSpec;
use kvmesh_control_plane_controller::pools::{PoolSource, pools};
use serde_json::json;

fn source(ns: &str, name: &str, routing: serde_json::Value) -> PoolSource {
    let mut spec = json!({
        "modelName": format!("model-{name}"),
        "instanceType": "ml.g5.8xlarge",
        "modelSourceConfig": {"modelSourceType": "pvc", "pvc": {"claimName": "w"}},
        "worker": {"image": "img", "modelInvocationPort": {"containerPort": 8000, "name": "http"}}
    });
    if !routing.is_null() {
        spec["intelligentRoutingSpec"] = routing;
    }
    let spec: InferenceEndpointConfigSpec = serde_json::from_value(spec).unwrap();
    PoolSource {
        namespace: ns.into(),
        name: name.into(),
        spec,
    }
}

fn slice(ns: &str, service: &str, port_name: &str, endpoints: serde_json::Value) -> EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {"name": format!("{service}-abc"), "namespace": ns, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": port_name, "port": 8000, "protocol": "TCP"}],
        "endpoints": endpoints
    }))
    .unwrap()
}

#[test]
fn strategies_map_to_sdk_names_with_defaults() {
    let sources = [
        source(
            "a",
            "kv",
            json!({"routingStrategy": "kvaware", "chunkBytes": 128, "maxFallbacks": 3, "strategyConfig": "{\"w\":1}"}),
        ),
        source("a", "prefix", json!({"routingStrategy": "prefixaware"})),
        source("a", "rr", json!({"routingStrategy": "roundrobin"})),
        source(
            "a",
            "off",
            json!({"enabled": false, "routingStrategy": "kvaware"}),
        ),
        source("a", "default", serde_json::Value::Null),
    ];
    let got = pools(&sources, &[]);
    let by = |n: &str| {
        got.iter()
            .find(|p| p.config.name == format!("a.{n}"))
            .unwrap()
            .config
            .clone()
    };
    assert_eq!(by("kv").strategy, "kv-aware");
    assert_eq!(
        (
            by("kv").chunk_bytes,
            by("kv").max_fallbacks,
            by("kv").strategy_config.as_str()
        ),
        (128, 3, "{\"w\":1}")
    );
    assert_eq!(by("prefix").strategy, "prefix-aware");
    assert_eq!(by("rr").strategy, "round-robin");
    assert_eq!(
        by("off").strategy,
        "round-robin",
        "routing disabled falls back to round-robin"
    );
    let d = by("default");
    assert_eq!(
        (
            d.strategy.as_str(),
            d.chunk_bytes,
            d.max_fallbacks,
            d.model.as_str()
        ),
        ("prefix-aware", 256, 2, "model-default")
    );
    let names: Vec<&str> = got.iter().map(|p| p.config.name.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "pools come sorted by name");
}

#[test]
fn members_are_the_ready_addresses_of_the_endpoints_own_slices() {
    let sources = [
        source("a", "m", serde_json::Value::Null),
        source("b", "m", serde_json::Value::Null),
    ];
    let slices = [
        slice(
            "a",
            "m",
            "http",
            json!([
                {"addresses": ["10.0.0.2"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.1"]},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": false}}
            ]),
        ),
        slice(
            "a",
            "m",
            "http",
            json!([{"addresses": ["10.0.1.9"], "conditions": {"ready": true}}]),
        ),
        // Same service name, other namespace: belongs to b/m.
        slice(
            "b",
            "m",
            "http",
            json!([{"addresses": ["10.9.0.1"], "conditions": {"ready": true}}]),
        ),
        // Another service in a: not ours.
        slice("a", "other", "http", json!([{"addresses": ["10.7.0.1"]}])),
        // Our service, but the port is not the serving port.
        slice("a", "m", "metrics", json!([{"addresses": ["10.8.0.1"]}])),
    ];
    let got = pools(&sources, &slices);
    assert_eq!(got[0].config.name, "a.m");
    assert_eq!(
        got[0].endpoints,
        ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.1.9:8000"]
    );
    assert_eq!(got[1].endpoints, ["10.9.0.1:8000"]);
}

#[test]
fn an_invalid_spec_forms_no_pool() {
    let mut bad = source("a", "bad", serde_json::Value::Null);
    bad.spec.instance_types = Some(vec!["x".into()]); // now both instanceType and instanceTypes
    assert!(pools(&[bad], &[]).is_empty());
}

#[test]
fn sources_come_from_either_kind() {
    use kvmesh_control_plane_controller::crd::{CatalogModel, InferenceEndpointConfig};
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/examples");
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    let iec: InferenceEndpointConfig =
        serde_yaml_ng::from_str(&read("llama-ordered.yaml")).unwrap();
    let a = PoolSource::from_endpoint(&iec).unwrap();
    let cm: CatalogModel = serde_yaml_ng::from_str(&read("catalog-model.yaml")).unwrap();
    let catalog: k8s_openapi::api::core::v1::ConfigMap =
        serde_yaml_ng::from_str(&read("catalog.yaml")).unwrap();
    let data = catalog.data.unwrap();
    let b = PoolSource::from_catalog(&cm, &data).unwrap();
    let got = pools(&[a, b], &[]);
    let summary: Vec<(&str, &str, &str)> = got
        .iter()
        .map(|p| {
            (
                p.config.name.as_str(),
                p.config.model.as_str(),
                p.config.strategy.as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("demo.smollm2-catalog", "SmolLM2-135M-Instruct", "kv-aware"),
            ("inference.llama-8b", "Llama-3.1-8B-Instruct", "kv-aware"),
        ]
    );
    assert!(
        PoolSource::from_catalog(&cm, &Default::default()).is_none(),
        "no pool until the catalog resolves"
    );
}
