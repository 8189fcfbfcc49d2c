//! Rendering the example resources: golden snapshots of every object, the affinity shape,
//! and offline validation of every built-in object against the Kubernetes schemas.
#![allow(clippy::unwrap_used)] // test helpers, like #[test] bodies, may unwrap

use std::path::{Path, PathBuf};
use std::process::Command;

use kvmesh_control_plane_controller::offline::render_objects;
use kvmesh_control_plane_controller::render::RenderConfig;
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// (example file, catalog file) pairs under deploy/examples.
const EXAMPLES: &[(&str, Option<&str>)] = &[
    ("llama-ordered.yaml", None),
    ("smollm-preferred.yaml", None),
    ("fsx-node-affinity.yaml", None),
    ("catalog-model.yaml", Some("catalog.yaml")),
];

fn render_example(file: &str, catalog: Option<&str>) -> Vec<Value> {
    let dir = repo().join("deploy/examples");
    let input = std::fs::read_to_string(dir.join(file)).expect("example exists");
    let catalog = catalog.map(|c| std::fs::read_to_string(dir.join(c)).expect("catalog exists"));
    render_objects(&input, catalog.as_deref(), &RenderConfig::default()).expect("example renders")
}

fn to_yaml(objects: &[Value]) -> String {
    objects
        .iter()
        .map(|o| format!("---\n{}", serde_yaml_ng::to_string(o).unwrap()))
        .collect()
}

#[test]
fn rendered_objects_match_golden_snapshots() {
    let golden_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut drifted = Vec::new();
    for (file, catalog) in EXAMPLES {
        let got = to_yaml(&render_example(file, *catalog));
        let path = golden_dir.join(file);
        if update {
            std::fs::write(&path, &got).unwrap();
        }
        let want = std::fs::read_to_string(&path).unwrap_or_default();
        if want != got {
            drifted.push(file.to_string());
        }
    }
    assert!(
        drifted.is_empty(),
        "rendered objects changed for {drifted:?}; review and rerun with UPDATE_GOLDEN=1"
    );
}

fn kinds(objects: &[Value]) -> Vec<&str> {
    objects
        .iter()
        .map(|o| o["kind"].as_str().unwrap())
        .collect()
}

#[test]
fn each_example_renders_the_objects_its_source_and_scaling_need() {
    let s3 = render_example("llama-ordered.yaml", None);
    assert_eq!(
        kinds(&s3),
        [
            "PersistentVolume",
            "PersistentVolumeClaim",
            "Deployment",
            "Service",
            "ScaledObject"
        ]
    );
    let pv = &s3[0];
    assert_eq!(pv["spec"]["csi"]["driver"], "s3.csi.aws.com");
    assert_eq!(
        pv["spec"]["csi"]["volumeAttributes"]["bucketName"],
        "example-models"
    );
    assert_eq!(pv["spec"]["claimRef"]["name"], "llama-8b-model");
    let dep = &s3[2];
    // With an autoscaler, KEDA owns the replica count.
    assert!(dep["spec"].get("replicas").is_none());
    // Ordered placement starts pinned to the first type.
    let na = &dep["spec"]["template"]["spec"]["affinity"]["nodeAffinity"];
    let req = &na["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]["matchExpressions"]
        [0];
    assert_eq!(req["key"], "node.kubernetes.io/instance-type");
    assert_eq!(req["values"], serde_json::json!(["ml.p4d.24xlarge"]));
    let env = dep["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap();
    let get = |n: &str| {
        env.iter()
            .find(|e| e["name"] == n)
            .map(|e| e["value"].clone())
    };
    assert_eq!(
        get("KVMESH_KV_DEVICE_BYTES"),
        Some((12u64 << 30).to_string().into())
    );
    assert_eq!(
        get("KVMESH_KV_HOST_BYTES"),
        Some((64u64 << 30).to_string().into())
    );
    assert_eq!(get("KVMESH_KV_DISK_DIR"), Some("/var/cache/kvmesh".into()));
    let so = &s3[4];
    assert_eq!(so["spec"]["minReplicaCount"], 0, "scale to zero allowed");
    let trig = &so["spec"]["triggers"][0];
    assert_eq!(trig["type"], "prometheus");
    assert!(
        trig["metadata"]["query"]
            .as_str()
            .unwrap()
            .contains("kvmesh_requests_waiting")
    );
    assert_eq!(trig["metadata"]["threshold"], "8");

    let pvc = render_example("smollm-preferred.yaml", None);
    assert_eq!(kinds(&pvc), ["Deployment", "Service"]);
    assert_eq!(pvc[0]["spec"]["replicas"], 3);
    let prefs = pvc[0]["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
        ["preferredDuringSchedulingIgnoredDuringExecution"]
        .as_array()
        .unwrap();
    let weights: Vec<i64> = prefs
        .iter()
        .map(|p| p["weight"].as_i64().unwrap())
        .collect();
    assert_eq!(
        weights,
        [100, 95, 90],
        "Preferred allows all types, weighted in order"
    );

    let fsx = render_example("fsx-node-affinity.yaml", None);
    assert_eq!(fsx[0]["spec"]["csi"]["driver"], "fsx.csi.aws.com");
    let na = &fsx[2]["spec"]["template"]["spec"]["affinity"]["nodeAffinity"];
    assert_eq!(
        na["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]["matchExpressions"]
            [0]["key"],
        "karpenter.sh/capacity-type",
        "a custom nodeAffinity is used as is"
    );

    let cat = render_example("catalog-model.yaml", Some("catalog.yaml"));
    assert_eq!(kinds(&cat), ["Deployment", "Service"]);
    let c = &cat[0]["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        c["image"], "ghcr.io/kvmesh/kvmesh-gpu-server:0.1.0",
        "image from the catalog"
    );
    assert!(
        c["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "RUST_LOG" && e["value"] == "debug")
    );
    assert_eq!(cat[0]["spec"]["replicas"], 2, "replicas from the resource");
}

/// Every built-in object (and the CRDs themselves) passes `kubernetes-validate --strict`
/// against the Kubernetes 1.34 schemas, offline.
#[test]
fn rendered_built_in_objects_pass_kubernetes_schemas() {
    let tool = repo().join(".venv/bin/kubernetes-validate");
    if !repo().join(".venv").exists() {
        assert!(
            std::env::var_os("KVMESH_NO_SKIP").is_none(),
            "a prerequisite is missing under scripts/test.sh (KVMESH_NO_SKIP)"
        );
        eprintln!(
            "SKIP rendered_built_in_objects_pass_kubernetes_schemas: no .venv (run scripts/setup.sh)"
        );
        return;
    }
    assert!(
        tool.exists(),
        "{} missing: scripts/setup.sh installs kubernetes-validate",
        tool.display()
    );
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kubernetes-validate");
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = vec![repo().join("deploy/crds/kvmesh.io.yaml")];
    let mut validated = 0;
    for (file, catalog) in EXAMPLES {
        let built_in: Vec<Value> = render_example(file, *catalog)
            .into_iter()
            .filter(|o| matches!(o["apiVersion"].as_str(), Some("v1" | "apps/v1")))
            .collect();
        validated += built_in.len();
        let path = dir.join(file);
        std::fs::write(&path, to_yaml(&built_in)).unwrap();
        files.push(path);
    }
    assert!(validated >= 10, "validated too few objects: {validated}");
    let out = Command::new(&tool)
        .args(["--strict", "-k", "1.34.0"])
        .args(&files)
        .output()
        .expect("run kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kubernetes-validate failed:\n{text}");
    assert!(!text.contains("ERROR"), "{text}");
    assert!(
        text.matches("INFO").count() >= validated,
        "every object reported as validated:\n{text}"
    );
}
