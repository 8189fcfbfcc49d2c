//! `import-hyperpod` on the HyperPod CLI repository's sample resources: each imports into a
//! kvmesh resource that passes the CRD's CEL rules and renders, and every field not carried
//! over is reported.
#![allow(clippy::unwrap_used)] // test helpers, like #[test] bodies, may unwrap

use std::path::PathBuf;

use kube::CustomResourceExt;
use kube::core::cel::Validator;
use kvmesh_control_plane_controller::crd::{CatalogModel, InferenceEndpointConfig};
use kvmesh_control_plane_controller::hyperpod::{FindingKind, Imported, import_yaml};
use kvmesh_control_plane_controller::offline::render_objects;
use kvmesh_control_plane_controller::render::RenderConfig;

fn sample(name: &str) -> String {
    std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/hyperpod")
            .join(name),
    )
    .unwrap()
}

fn one(name: &str) -> Imported {
    let mut v = import_yaml(&sample(name)).unwrap();
    assert_eq!(v.len(), 1);
    v.remove(0)
}

fn reported(i: &Imported, path: &str) -> Option<FindingKind> {
    i.findings
        .iter()
        .find(|f| f.path == path)
        .map(|f| f.kind.clone())
}

fn assert_valid<K: CustomResourceExt>(i: &Imported) {
    let crd = K::crd();
    let schema = serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap();
    if let Err(errs) = Validator::new().validate_with_defaults(&schema, &i.resource, None) {
        panic!(
            "imported resource fails CEL: {errs:?}\n{}",
            serde_yaml_ng::to_string(&i.resource).unwrap()
        );
    }
}

#[test]
fn jumpstart_sample_becomes_a_catalog_model_and_reports_the_field_hyperpod_lacks() {
    let i = one("v1_deepseek_model15b.yaml");
    assert_eq!(i.resource["kind"], "CatalogModel");
    assert_eq!(i.resource["metadata"]["namespace"], "ns-team-a");
    assert_eq!(
        i.resource["spec"]["modelId"],
        "deepseek-llm-r1-distill-qwen-1-5b"
    );
    assert_eq!(i.resource["spec"]["instanceType"], "ml.g5.8xlarge");
    assert_eq!(
        i.resource["spec"]["environmentVariables"][0]["name"],
        "SAMPLE_ENV_VAR"
    );
    // Not in the HyperPod v1 JumpStartModel schema: HyperPod itself would have pruned these.
    assert_eq!(
        reported(&i, "spec.server.maxAutoScaleReplicas"),
        Some(FindingKind::NotInSchema)
    );
    assert_eq!(
        reported(&i, "spec.server.minAutoScaleReplicas"),
        Some(FindingKind::NotInSchema)
    );
    for p in [
        "spec.sageMakerEndpoint",
        "spec.model.modelHubName",
        "spec.model.modelVersion",
        "spec.maxDeployTimeInSeconds",
    ] {
        assert_eq!(
            reported(&i, p),
            Some(FindingKind::NoEquivalent),
            "{p}: {:?}",
            i.findings
        );
    }
    assert_eq!(i.findings.len(), 6, "{:#?}", i.findings);
    assert_valid::<CatalogModel>(&i);
}

#[test]
fn intelligent_routing_sample_keeps_routing_and_reports_the_alb_fields() {
    let i = one("v1_llama31_8b_intelligent_routing.yaml");
    let s = &i.resource["spec"];
    assert_eq!(i.resource["kind"], "InferenceEndpointConfig");
    assert_eq!(s["modelName"], "Llama-3.1-8B-Instruct");
    assert_eq!(s["instanceType"], "ml.g5.8xlarge");
    assert_eq!(
        s["intelligentRoutingSpec"]["routingStrategy"],
        "prefixaware"
    );
    assert_eq!(s["modelSourceConfig"]["s3Storage"]["region"], "us-west-2");
    assert_eq!(s["modelSourceConfig"]["modelLocation"], "llama31_8b");
    assert_eq!(s["worker"]["args"][2], "4096");
    assert_eq!(s["kvCacheSpec"]["host"]["enabled"], true);
    assert_eq!(
        s["worker"]["probes"]["readinessProbe"]["httpGet"]["path"],
        "/health"
    );
    for p in [
        "spec.endpointName",
        "spec.invocationEndpoint",
        "spec.tlsConfig",
        "spec.modelSourceConfig.prefetchEnabled",
    ] {
        assert_eq!(
            reported(&i, p),
            Some(FindingKind::NoEquivalent),
            "{p}: {:?}",
            i.findings
        );
    }
    assert_eq!(
        reported(&i, "spec.kvCacheSpec.enableL1Cache"),
        Some(FindingKind::Changed)
    );
    assert_eq!(
        reported(&i, "spec.loadBalancer.healthCheckPath"),
        Some(FindingKind::Changed)
    );
    assert_valid::<InferenceEndpointConfig>(&i);
}

#[test]
fn redis_l2_cache_is_reported_as_unsupported() {
    let i = one("v1_llama31_8b_kv_cache_l1_l2.yaml");
    assert_eq!(
        reported(&i, "spec.kvCacheSpec.enableL2Cache"),
        Some(FindingKind::NoEquivalent)
    );
    assert_eq!(
        reported(&i, "spec.kvCacheSpec.l2CacheSpec.l2CacheLocalUrl"),
        Some(FindingKind::NoEquivalent)
    );
    assert!(i.resource["spec"]["kvCacheSpec"].get("disk").is_none());
    assert_valid::<InferenceEndpointConfig>(&i);
}

#[test]
fn s3_samples_import_render_and_keep_the_environment() {
    for name in ["v1_s3_deepseek15b.yaml", "v1_s3_modeldeployment.yaml"] {
        let i = one(name);
        assert_valid::<InferenceEndpointConfig>(&i);
        let env = i.resource["spec"]["worker"]["environmentVariables"]
            .as_array()
            .unwrap();
        assert!(env.iter().any(|e| e["name"] == "SAGEMAKER_ENV"), "{name}");
        // Resource quantities written as bare integers (`nvidia.com/gpu: 8`) become strings.
        let gpu = &i.resource["spec"]["worker"]["resources"]["limits"]["nvidia.com/gpu"];
        assert!(gpu.is_string(), "{name}: {gpu}");
        assert_eq!(
            reported(&i, "spec.endpointName"),
            Some(FindingKind::NoEquivalent)
        );
        let yaml = serde_yaml_ng::to_string(&i.resource).unwrap();
        let objects = render_objects(&yaml, None, &RenderConfig::default())
            .expect("imported resource renders");
        assert!(objects.iter().any(|o| o["kind"] == "Deployment"), "{name}");
    }
}

#[test]
fn unsupported_kinds_are_refused_with_a_clear_error() {
    let err = import_yaml(&sample("v1_modeldeployment.yaml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("ModelDeployment"), "{err}");
    assert!(
        err.contains("InferenceEndpointConfig or JumpStartModel"),
        "{err}"
    );
}
