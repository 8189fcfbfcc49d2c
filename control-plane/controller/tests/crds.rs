//! The committed CRD YAML matches the types, and its CEL rules accept and reject what they
//! should, evaluated offline with kube's CEL interpreter (kube-cel).
#![allow(clippy::unwrap_used)] // test helpers, like #[test] bodies, may unwrap

use std::path::PathBuf;

use kube::CustomResourceExt;
use kube::core::cel::Validator;
use kvmesh_control_plane_controller::crd::{self, CatalogModel, InferenceEndpointConfig};
use serde_json::{Value, json};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn committed_crds_match_the_types() {
    let path = repo().join("deploy/crds/kvmesh.io.yaml");
    let fresh = crd::crds_yaml().expect("crds serialise");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &fresh).expect("write crds");
    }
    let committed = std::fs::read_to_string(&path).expect("deploy/crds/kvmesh.io.yaml exists");
    assert!(
        committed == fresh,
        "deploy/crds/kvmesh.io.yaml drifted from the Rust types: run \
         `cargo run -p kvmesh-control-plane-controller -- crdgen > deploy/crds/kvmesh.io.yaml`"
    );
    // The Helm chart ships the same file.
    let chart = std::fs::read_to_string(repo().join("deploy/helm/kvmesh/crds/kvmesh.io.yaml"))
        .expect("chart crds exist");
    assert!(
        chart == fresh,
        "deploy/helm/kvmesh/crds/kvmesh.io.yaml drifted: copy deploy/crds/kvmesh.io.yaml"
    );
}

fn schema<K: CustomResourceExt>() -> Value {
    let crd = K::crd();
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap()
}

#[test]
fn crds_carry_subresources_printer_columns_and_cel_rules() {
    for crd in crd::crds() {
        let v = &crd.spec.versions[0];
        let sub = v.subresources.as_ref().expect("subresources");
        assert!(
            sub.status.is_some(),
            "{}: status subresource",
            crd.spec.names.kind
        );
        let scale = sub.scale.as_ref().expect("scale subresource");
        assert_eq!(scale.spec_replicas_path, ".spec.replicas");
        assert_eq!(scale.status_replicas_path, ".status.replicas");
        assert_eq!(
            scale.label_selector_path.as_deref(),
            Some(".status.selector")
        );
        let cols: Vec<_> = v
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        for want in ["Replicas", "Ready", "Placement", "Status", "Age"] {
            assert!(
                cols.contains(&want),
                "{}: printer column {want}",
                crd.spec.names.kind
            );
        }
        let text = serde_json::to_string(&crd).unwrap();
        assert!(
            text.contains("x-kubernetes-validations"),
            "CEL rules live in the schema"
        );
    }
    let s = schema::<InferenceEndpointConfig>();
    let spec_rules = s["properties"]["spec"]["x-kubernetes-validations"]
        .as_array()
        .expect("spec-level rules");
    assert!(spec_rules.iter().any(|r| {
        r["message"]
            .as_str()
            .unwrap()
            .contains("exactly one of instanceType")
    }));
    assert_eq!(
        s["properties"]["spec"]["properties"]["instanceTypes"]["maxItems"],
        20
    );
}

fn endpoint() -> Value {
    json!({
        "apiVersion": "kvmesh.io/v1alpha1",
        "kind": "InferenceEndpointConfig",
        "metadata": {"name": "m", "namespace": "ns"},
        "spec": {
            "modelName": "m",
            "replicas": 1,
            "instanceTypes": ["ml.g5.8xlarge", "ml.g5.12xlarge"],
            "schedulingPolicy": {"mode": "Ordered", "fallbackDelay": "5m"},
            "modelSourceConfig": {
                "modelSourceType": "s3",
                "s3Storage": {"bucketName": "bucket", "region": "us-west-2"},
                "modelLocation": "models/m"
            },
            "worker": {
                "image": "img",
                "modelInvocationPort": {"containerPort": 8000, "name": "http"},
                "modelVolumeMount": {"name": "model-weights", "mountPath": "/opt/ml/model"}
            },
            "autoScalingSpec": {"minReplicaCount": 0, "maxReplicaCount": 4,
                                "prometheusTrigger": {"targetValue": 4.0}},
            "kvCacheSpec": {"device": {"enabled": true, "size": "8Gi"},
                            "disk": {"enabled": true, "size": "100Gi", "path": "/var/cache/kvmesh"}}
        }
    })
}

fn errors(obj: &Value) -> Vec<String> {
    match Validator::new().validate(&schema::<InferenceEndpointConfig>(), obj, None) {
        Ok(()) => vec![],
        Err(errs) => errs.iter().map(|e| e.to_string()).collect(),
    }
}

fn with(mut obj: Value, edit: impl FnOnce(&mut Value)) -> Value {
    edit(&mut obj["spec"]);
    obj
}

#[test]
fn a_valid_endpoint_passes_every_rule() {
    assert_eq!(errors(&endpoint()), Vec::<String>::new());
    let single = with(endpoint(), |s| {
        s.as_object_mut().unwrap().remove("instanceTypes");
        s.as_object_mut().unwrap().remove("schedulingPolicy");
        s["instanceType"] = json!("ml.g5.8xlarge");
    });
    assert_eq!(errors(&single), Vec::<String>::new());
}

#[test]
fn each_invalid_endpoint_fails_with_its_message() {
    let cases: Vec<(&str, Value)> = vec![
        (
            "exactly one of instanceType",
            with(endpoint(), |s| s["instanceType"] = json!("ml.g5.8xlarge")),
        ),
        (
            "exactly one of instanceType",
            with(endpoint(), |s| {
                s.as_object_mut().unwrap().remove("instanceTypes");
                s.as_object_mut().unwrap().remove("schedulingPolicy");
            }),
        ),
        (
            "must not repeat",
            with(endpoint(), |s| s["instanceTypes"] = json!(["a", "b", "a"])),
        ),
        (
            "between 1 and 20",
            with(endpoint(), |s| s["instanceTypes"] = json!([])),
        ),
        (
            "between 1 and 20",
            with(endpoint(), |s| {
                s["instanceTypes"] = json!((0..21).map(|i| format!("t{i}")).collect::<Vec<_>>())
            }),
        ),
        (
            "Ordered needs an instanceTypes list",
            with(endpoint(), |s| {
                s.as_object_mut().unwrap().remove("instanceTypes");
                s["instanceType"] = json!("ml.g5.8xlarge");
            }),
        ),
        (
            "fallbackDelay is a positive duration",
            with(endpoint(), |s| {
                s["schedulingPolicy"]["fallbackDelay"] = json!("soon")
            }),
        ),
        (
            "fallbackDelay is a positive duration",
            with(endpoint(), |s| {
                s["schedulingPolicy"]["fallbackDelay"] = json!("0s")
            }),
        ),
        (
            "minReplicaCount must not exceed",
            with(endpoint(), |s| {
                s["autoScalingSpec"]["minReplicaCount"] = json!(5)
            }),
        ),
        (
            "modelSourceType s3 needs s3Storage",
            with(endpoint(), |s| {
                s["modelSourceConfig"]
                    .as_object_mut()
                    .unwrap()
                    .remove("s3Storage");
            }),
        ),
        (
            "set only the storage member",
            with(endpoint(), |s| {
                s["modelSourceConfig"]["pvc"] = json!({"claimName": "x"});
            }),
        ),
        (
            "modelLocation is a relative path",
            with(endpoint(), |s| {
                s["modelSourceConfig"]["modelLocation"] = json!("../etc")
            }),
        ),
        (
            "replicas must not be negative",
            with(endpoint(), |s| s["replicas"] = json!(-1)),
        ),
        (
            "containerPort must be 1 to 65535",
            with(endpoint(), |s| {
                s["worker"]["modelInvocationPort"]["containerPort"] = json!(70000)
            }),
        ),
        (
            "size is a byte quantity",
            with(endpoint(), |s| {
                s["kvCacheSpec"]["device"]["size"] = json!("8 gigs")
            }),
        ),
        (
            "disk.path must be absolute",
            with(endpoint(), |s| {
                s["kvCacheSpec"]["disk"]["path"] = json!("cache")
            }),
        ),
        (
            "modelName must not be empty",
            with(endpoint(), |s| s["modelName"] = json!("")),
        ),
        (
            "targetValue must be positive",
            with(endpoint(), |s| {
                s["autoScalingSpec"]["prometheusTrigger"]["targetValue"] = json!(0.0)
            }),
        ),
    ];
    for (want, obj) in cases {
        let errs = errors(&obj);
        assert!(
            errs.iter().any(|e| e.contains(want)),
            "expected an error containing {want:?}, got {errs:?}"
        );
    }
}

#[test]
fn catalog_model_rules() {
    let s = schema::<CatalogModel>();
    let base = json!({"spec": {"modelId": "smollm2-135m", "replicas": 1}});
    assert!(Validator::new().validate(&s, &base, None).is_ok());
    let both = json!({"spec": {"modelId": "x", "replicas": 1, "instanceType": "a", "instanceTypes": ["b"]}});
    let errs = Validator::new().validate(&s, &both, None).unwrap_err();
    assert!(
        errs.iter()
            .any(|e| e.to_string().contains("at most one of instanceType")),
        "{errs:?}"
    );
    let empty = json!({"spec": {"modelId": "", "replicas": 1}});
    assert!(Validator::new().validate(&s, &empty, None).is_err());
}

/// Every rule compiles, uses only CRD-scope variables, and stays within the API server's cost
/// budget by kube-cel's estimate (lists and strings the rules walk carry maxItems/maxLength).
#[test]
fn every_rule_compiles_in_scope_and_within_the_cost_budget() {
    use kube::core::cel::{ScopeContext, WarningKind, analyze_rule, compile_schema};

    fn macro_variables(rule: &str) -> Vec<String> {
        ["all(", "exists(", "exists_one(", "filter(", "map("]
            .iter()
            .flat_map(|m| {
                rule.match_indices(m)
                    .map(move |(i, _)| &rule[i + m.len()..])
            })
            .filter_map(|rest| rest.split_once(',').map(|(v, _)| v.trim().to_owned()))
            .filter(|v| v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
            .collect()
    }

    fn walk(node: &Value, path: &str, seen: &mut usize) {
        if let Some(rules) = node
            .get("x-kubernetes-validations")
            .and_then(Value::as_array)
        {
            let compiled = compile_schema(node);
            for v in &compiled.validations {
                assert!(v.is_ok(), "{path}: rule does not compile: {v:?}");
            }
            for r in rules {
                let rule = r["rule"].as_str().unwrap();
                // kube-cel's scope check does not know macro-bound variables (`all(t, ...)`).
                let bound = macro_variables(rule);
                let warnings: Vec<_> = analyze_rule(rule, &compiled, ScopeContext::CrdValidation)
                    .into_iter()
                    .filter(|w| {
                        !(w.kind == WarningKind::WrongScope
                            && bound.iter().any(|b| w.message.contains(&format!("'{b}'"))))
                    })
                    .collect();
                assert!(warnings.is_empty(), "{path}: {rule}: {warnings:?}");
                *seen += 1;
            }
        }
        if let Some(props) = node.get("properties").and_then(Value::as_object) {
            for (k, child) in props {
                walk(child, &format!("{path}.{k}"), seen);
            }
        }
        if let Some(items) = node.get("items") {
            walk(items, &format!("{path}[]"), seen);
        }
    }
    let mut seen = 0;
    walk(&schema::<InferenceEndpointConfig>(), "", &mut seen);
    walk(&schema::<CatalogModel>(), "", &mut seen);
    assert!(seen >= 30, "only {seen} rules found");
}

/// The shipped examples pass the CRD schema's CEL rules (with schema defaults applied).
#[test]
fn shipped_examples_pass_the_cel_rules() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/examples");
    let mut checked = 0;
    for file in [
        "llama-ordered.yaml",
        "smollm-preferred.yaml",
        "fsx-node-affinity.yaml",
        "catalog-model.yaml",
    ] {
        let obj: Value =
            serde_yaml_ng::from_str(&std::fs::read_to_string(dir.join(file)).unwrap()).unwrap();
        let schema = match obj["kind"].as_str().unwrap() {
            "CatalogModel" => schema::<CatalogModel>(),
            _ => schema::<InferenceEndpointConfig>(),
        };
        if let Err(errs) = Validator::new().validate_with_defaults(&schema, &obj, None) {
            panic!("{file}: {errs:?}");
        }
        checked += 1;
    }
    assert_eq!(checked, 4);
}
