//! The Helm chart under deploy/helm/kvmesh, rendered and checked offline.
//!
//! `helm` is not installable from Debian or PyPI here, so the templates are rendered with
//! gtmpl (a Rust implementation of Go's text/template, the engine under Helm) plus the one
//! Helm function the chart uses (`toJson`); `.Files.Get "x"` is rewritten to a `filesGet`
//! call because gtmpl has no methods with arguments. The chart keeps to that subset on
//! purpose. The output is then checked: least-privilege RBAC, one ServiceAccount per
//! component, schema validation of every object, and the gateway bootstrap with Envoy.
#![allow(clippy::unwrap_used)] // test helpers, like #[test] bodies, may unwrap

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use gtmpl::{Context, FuncError, Template};
use gtmpl_value::{Number, Value as G};
use serde_json::Value;

fn chart() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/helm/kvmesh")
}

fn to_g(v: &Value) -> G {
    match v {
        Value::Null => G::Nil,
        Value::Bool(b) => G::Bool(*b),
        Value::Number(n) => n.as_i64().map_or_else(
            || G::Number(Number::from(n.as_f64().unwrap_or(0.0))),
            |i| G::Number(Number::from(i)),
        ),
        Value::String(s) => G::String(s.clone()),
        Value::Array(a) => G::Array(a.iter().map(to_g).collect()),
        Value::Object(o) => G::Map(
            o.iter()
                .map(|(k, v)| (k.clone(), to_g(v)))
                .collect::<HashMap<_, _>>(),
        ),
    }
}

fn from_g(v: &G) -> Value {
    match v {
        G::NoValue | G::Nil | G::Function(_) => Value::Null,
        G::Bool(b) => Value::Bool(*b),
        G::Number(n) => n
            .as_i64()
            .map_or_else(|| serde_json::json!(n.as_f64()), |i| serde_json::json!(i)),
        G::String(s) => Value::String(s.clone()),
        G::Array(a) => Value::Array(a.iter().map(from_g).collect()),
        G::Object(o) | G::Map(o) => {
            Value::Object(o.iter().map(|(k, v)| (k.clone(), from_g(v))).collect())
        }
    }
}

fn to_json(args: &[G]) -> Result<G, FuncError> {
    let [arg] = args else {
        return Err(FuncError::ExactlyXArgs("toJson".into(), 1));
    };
    Ok(G::String(
        serde_json::to_string(&from_g(arg)).map_err(|e| FuncError::Generic(e.to_string()))?,
    ))
}

fn files_get(args: &[G]) -> Result<G, FuncError> {
    let [G::String(path)] = args else {
        return Err(FuncError::ExactlyXArgs("filesGet".into(), 1));
    };
    std::fs::read_to_string(chart().join(path))
        .map(G::String)
        .map_err(|e| FuncError::Generic(e.to_string()))
}

/// Renders every template with the chart's default values into parsed objects.
fn render(namespace: &str) -> Vec<Value> {
    let values: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(chart().join("values.yaml")).unwrap())
            .unwrap();
    let root = serde_json::json!({
        "Values": values,
        "Release": {"Name": "kvmesh", "Namespace": namespace, "Service": "Helm"},
        "Chart": {"Name": "kvmesh", "Version": "0.1.0"},
    });
    let mut out = Vec::new();
    let mut names: Vec<PathBuf> = std::fs::read_dir(chart().join("templates"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    names.sort();
    for path in names {
        let text = std::fs::read_to_string(&path).unwrap();
        let text = rewrite_files_get(&text);
        let mut t = Template::default();
        t.add_func("toJson", to_json);
        t.add_func("filesGet", files_get);
        t.parse(text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let rendered = t
            .render(&Context::from(to_g(&root)))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for doc in serde_yaml_ng::Deserializer::from_str(&rendered) {
            let v: Value = serde::Deserialize::deserialize(doc).unwrap_or_else(|e| {
                panic!("{} renders invalid YAML: {e}\n{rendered}", path.display())
            });
            if !v.is_null() {
                out.push(v);
            }
        }
    }
    out
}

/// `.Files.Get "x"` -> `filesGet "x"` (gtmpl cannot call methods with arguments).
fn rewrite_files_get(text: &str) -> String {
    text.replace(".Files.Get ", "filesGet ")
}

fn of_kind<'a>(objs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objs.iter().filter(|o| o["kind"] == kind).collect()
}

#[test]
fn rbac_is_least_privilege_with_one_service_account_per_component() {
    let objs = render("kvmesh-system");
    let sas: Vec<&str> = of_kind(&objs, "ServiceAccount")
        .iter()
        .map(|s| s["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        sas,
        [
            "kvmesh-control-plane",
            "kvmesh-controller",
            "kvmesh-gateway"
        ]
    );
    let deployments = of_kind(&objs, "Deployment");
    assert_eq!(deployments.len(), 3);
    for d in &deployments {
        let name = d["metadata"]["name"].as_str().unwrap();
        assert_eq!(
            d["spec"]["template"]["spec"]["serviceAccountName"], name,
            "{name} runs as its own ServiceAccount"
        );
    }
    for role in of_kind(&objs, "ClusterRole")
        .into_iter()
        .chain(of_kind(&objs, "Role"))
    {
        let name = role["metadata"]["name"].as_str().unwrap();
        let rules = role["rules"].as_array().unwrap();
        assert!(!rules.is_empty(), "{name}");
        for rule in rules {
            for field in ["verbs", "resources", "apiGroups"] {
                for v in rule[field]
                    .as_array()
                    .unwrap_or_else(|| panic!("{name}: rule without {field}"))
                {
                    assert_ne!(v, "*", "{name}: wildcard in {field}");
                }
            }
            assert!(rule.get("nonResourceURLs").is_none(), "{name}");
            for verb in rule["verbs"].as_array().unwrap() {
                assert!(
                    ["get", "list", "watch", "create", "patch", "delete"]
                        .contains(&verb.as_str().unwrap()),
                    "{name}: unexpected verb {verb} (no update, escalate, bind, impersonate, deletecollection)"
                );
            }
            for res in rule["resources"].as_array().unwrap() {
                assert!(
                    ![
                        "secrets",
                        "clusterroles",
                        "clusterrolebindings",
                        "roles",
                        "rolebindings",
                        "serviceaccounts/token"
                    ]
                    .contains(&res.as_str().unwrap()),
                    "{name}: must not touch {res}"
                );
            }
        }
    }
    // The gateway needs no API access at all: no binding, no token.
    let bindings: Vec<&Value> = of_kind(&objs, "ClusterRoleBinding")
        .into_iter()
        .chain(of_kind(&objs, "RoleBinding"))
        .collect();
    for b in &bindings {
        let role = b["roleRef"]["name"].as_str().unwrap();
        assert!(
            !["cluster-admin", "admin", "edit"].contains(&role),
            "bound to {role}"
        );
        let subjects = b["subjects"].as_array().unwrap();
        assert_eq!(subjects.len(), 1);
        assert_eq!(
            subjects[0]["name"], b["metadata"]["name"],
            "each component's role goes to its own account only"
        );
        assert_eq!(subjects[0]["namespace"], "kvmesh-system");
    }
    assert!(
        !bindings
            .iter()
            .any(|b| b["subjects"][0]["name"] == "kvmesh-gateway")
    );
    let gw_sa = of_kind(&objs, "ServiceAccount")
        .into_iter()
        .find(|s| s["metadata"]["name"] == "kvmesh-gateway")
        .unwrap();
    assert_eq!(gw_sa["automountServiceAccountToken"], false);
}

#[test]
fn controller_role_covers_what_the_controller_applies() {
    let objs = render("kvmesh-system");
    let role = of_kind(&objs, "ClusterRole")
        .into_iter()
        .find(|r| r["metadata"]["name"] == "kvmesh-controller")
        .unwrap();
    let allows = |group: &str, resource: &str, verb: &str| {
        role["rules"].as_array().unwrap().iter().any(|r| {
            r["apiGroups"]
                .as_array()
                .unwrap()
                .iter()
                .any(|g| g == group)
                && r["resources"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|x| x == resource)
                && r["verbs"].as_array().unwrap().iter().any(|v| v == verb)
        })
    };
    // Server-side apply of every kind the renderer produces (create + patch).
    for (g, r) in [
        ("apps", "deployments"),
        ("", "services"),
        ("", "persistentvolumeclaims"),
        ("", "persistentvolumes"),
        ("keda.sh", "scaledobjects"),
    ] {
        assert!(allows(g, r, "create") && allows(g, r, "patch"), "{g}/{r}");
    }
    for r in ["inferenceendpointconfigs", "catalogmodels"] {
        for v in ["get", "list", "watch", "patch"] {
            assert!(allows("kvmesh.io", r, v), "{r} {v}");
        }
        assert!(allows("kvmesh.io", &format!("{r}/status"), "patch"));
    }
    assert!(allows("", "pods", "list") && allows("", "pods", "watch"));
    assert!(
        allows("", "persistentvolumes", "delete"),
        "finalizer cleanup"
    );
    assert!(
        allows("keda.sh", "scaledobjects", "delete"),
        "stale autoscaler removal"
    );
    assert!(allows("events.k8s.io", "events", "create"));
    assert!(
        !allows("", "configmaps", "list"),
        "catalog lookups are single gets"
    );
}

#[test]
fn dashboard_has_the_panels_operators_need() {
    let objs = render("kvmesh-system");
    let cm = of_kind(&objs, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == "kvmesh-dashboard")
        .unwrap();
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let dash: Value = serde_json::from_str(cm["data"]["kvmesh.json"].as_str().unwrap()).unwrap();
    let titles: Vec<&str> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for want in [
        "Time to first token",
        "End-to-end latency",
        "Cached prompt-token ratio by tier",
        "Routing decisions by strategy",
        "Replicas",
    ] {
        assert!(
            titles.iter().any(|t| t.starts_with(want)),
            "missing panel {want}: {titles:?}"
        );
    }
    for p in dash["panels"].as_array().unwrap() {
        assert!(
            !p["targets"].as_array().unwrap().is_empty(),
            "{} has queries",
            p["title"]
        );
    }
}

#[test]
fn rendered_chart_objects_pass_kubernetes_schemas() {
    let repo = chart().join("../../..");
    if !repo.join(".venv").exists() {
        assert!(
            std::env::var_os("KVMESH_NO_SKIP").is_none(),
            "a prerequisite is missing under scripts/test.sh (KVMESH_NO_SKIP)"
        );
        eprintln!(
            "SKIP rendered_chart_objects_pass_kubernetes_schemas: no .venv (run scripts/setup.sh)"
        );
        return;
    }
    let tool = repo.join(".venv/bin/kubernetes-validate");
    assert!(
        tool.exists(),
        "scripts/setup.sh installs kubernetes-validate"
    );
    let objs = render("kvmesh-system");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("chart");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("chart.yaml");
    let text: String = objs
        .iter()
        .map(|o| format!("---\n{}", serde_yaml_ng::to_string(o).unwrap()))
        .collect();
    std::fs::write(&file, text).unwrap();
    let out = Command::new(&tool)
        .args(["--strict", "-k", "1.34.0"])
        .arg(&file)
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !report.contains("ERROR"),
        "{report}"
    );
    assert_eq!(
        report.matches("passed").count(),
        objs.len(),
        "every object validated:\n{report}"
    );
}

/// The gateway bootstrap passes `envoy --mode validate`. The state-pump module is built by the
/// plugins' build; when it is not there, the bootstrap extension is dropped and the rest checked.
#[test]
fn gateway_bootstrap_passes_envoy_validation() {
    let Some(envoy) = std::env::var_os("KVMESH_ENVOY") else {
        assert!(
            std::env::var_os("KVMESH_NO_SKIP").is_none(),
            "a prerequisite is missing under scripts/test.sh (KVMESH_NO_SKIP)"
        );
        eprintln!(
            "SKIP gateway_bootstrap_passes_envoy_validation: KVMESH_ENVOY unset (scripts/test.sh sets it)"
        );
        return;
    };
    let objs = render("kvmesh-system");
    let cm = of_kind(&objs, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == "kvmesh-gateway")
        .unwrap();
    let mut boot: Value =
        serde_yaml_ng::from_str(cm["data"]["envoy.yaml"].as_str().unwrap()).unwrap();
    let pump = chart().join("../../../target/plugins/state-pump.wasm");
    if pump.exists() {
        boot["bootstrap_extensions"][0]["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] =
            pump.canonicalize()
                .unwrap()
                .to_string_lossy()
                .into_owned()
                .into();
    } else {
        eprintln!(
            "note: target/plugins/state-pump.wasm not built; validating the bootstrap without it"
        );
        boot.as_object_mut().unwrap().remove("bootstrap_extensions");
    }
    // The cluster address only resolves inside Kubernetes; validation does not resolve it.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("chart");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("envoy.yaml");
    std::fs::write(&file, serde_yaml_ng::to_string(&boot).unwrap()).unwrap();
    // Run with the gateway container's own arguments (node id from --service-node).
    let gw = of_kind(&objs, "Deployment")
        .into_iter()
        .find(|d| d["metadata"]["name"] == "kvmesh-gateway")
        .unwrap();
    let file_arg = file.to_string_lossy().into_owned();
    let args: Vec<String> = gw["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| match a.as_str().unwrap() {
            "/etc/envoy/envoy.yaml" => file_arg.clone(),
            "$(POD_NAME)" => "kvmesh-gateway-0".to_owned(),
            other => other.to_owned(),
        })
        .collect();
    assert!(
        args.contains(&file_arg),
        "the gateway reads the rendered bootstrap"
    );
    let out = Command::new(envoy)
        .args(["--mode", "validate"])
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The control plane's config is what its parser takes: known keys only, pools from the
/// cluster on the gateway's port, and a module for every strategy a resource may name.
#[test]
fn control_plane_config_serves_kubernetes_pools_on_the_gateway_port() {
    let objs = render("kvmesh-system");
    let cm = of_kind(&objs, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == "kvmesh-control-plane")
        .unwrap();
    let cfg: Value =
        serde_yaml_ng::from_str(cm["data"]["control-plane.yaml"].as_str().unwrap()).unwrap();
    for k in cfg.as_object().unwrap().keys() {
        assert!(
            [
                "grpc",
                "admin",
                "replica_silence_ms",
                "module_store",
                "pools",
                "kubernetes"
            ]
            .contains(&k.as_str()),
            "unknown key {k}"
        );
    }
    assert!(cfg["pools"].as_array().unwrap().is_empty());
    let gw = of_kind(&objs, "Service")
        .into_iter()
        .find(|s| s["metadata"]["name"] == "kvmesh-gateway")
        .unwrap();
    let port = gw["spec"]["ports"][0]["port"].as_i64().unwrap();
    let k = &cfg["kubernetes"];
    assert_eq!(k["listener"], format!("0.0.0.0:{port}"));
    assert!(k["max_body_bytes"].as_u64().unwrap() > 0);
    // The strategy names the CRD's routingStrategy values map to, each with a module the
    // control plane's init container copies from the plugins image.
    for strategy in ["prefix-aware", "kv-aware", "round-robin"] {
        assert_eq!(
            k["strategies"][strategy],
            format!("/var/lib/kvmesh/plugins/{strategy}.wasm")
        );
    }
    let deployment = of_kind(&objs, "Deployment")
        .into_iter()
        .find(|d| d["metadata"]["name"] == "kvmesh-control-plane")
        .unwrap();
    let init = &deployment["spec"]["template"]["spec"]["initContainers"][0];
    assert_eq!(
        init["volumeMounts"][0]["mountPath"],
        "/var/lib/kvmesh/plugins"
    );
    assert_eq!(cfg["grpc"], "0.0.0.0:18000");
}
