//! The `kvmesh-controller` binary's offline subcommands, run as a user would.
#![allow(clippy::unwrap_used)] // test helpers, like #[test] bodies, may unwrap

use std::path::PathBuf;
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvmesh-controller"))
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn crdgen_prints_the_committed_crds() {
    let o = run(&["crdgen"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        std::fs::read_to_string(repo().join("deploy/crds/kvmesh.io.yaml")).unwrap()
    );
}

#[test]
fn render_prints_the_golden_objects() {
    let o = run(&[
        "render",
        "deploy/examples/catalog-model.yaml",
        "--catalog",
        "deploy/examples/catalog.yaml",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let golden = std::fs::read_to_string(
        repo().join("control-plane/controller/tests/golden/catalog-model.yaml"),
    )
    .unwrap();
    assert_eq!(stdout(&o), golden);
}

#[test]
fn render_rejects_an_invalid_resource_with_the_reason() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let bad = dir.join("bad-endpoint.yaml");
    let text = std::fs::read_to_string(repo().join("deploy/examples/smollm-preferred.yaml"))
        .unwrap()
        .replace(
            "  replicas: 3\n",
            "  replicas: 3\n  instanceType: m7i.2xlarge\n",
        );
    std::fs::write(&bad, text).unwrap();
    let o = run(&["render", bad.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("InferenceEndpointConfig smollm2")
            && err.contains("exactly one of instanceType"),
        "{err}"
    );
    assert!(stdout(&o).is_empty(), "nothing half-rendered on stdout");
    assert!(!err.contains("panicked"), "{err}");

    let o = run(&["render", "deploy/examples/catalog-model.yaml"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no entry has modelId \"smollm2-135m\""),
        "{}",
        stderr(&o)
    );
}

#[test]
fn import_hyperpod_writes_the_resource_and_reports_on_stderr() {
    let sample = "control-plane/controller/tests/data/hyperpod/v1_deepseek_model15b.yaml";
    let o = run(&["import-hyperpod", sample]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out: serde_json::Value =
        serde_yaml_ng::from_str(stdout(&o).trim_start_matches("---\n")).unwrap();
    assert_eq!(out["kind"], "CatalogModel");
    let report = stderr(&o);
    assert!(
        report.contains("CatalogModel deepseek-sample: 6 field(s) not carried over as is"),
        "{report}"
    );
    assert!(
        report.contains("spec.server.maxAutoScaleReplicas: not in the HyperPod v1 schema"),
        "{report}"
    );

    let strict = run(&["import-hyperpod", "--strict", sample]);
    assert!(
        !strict.status.success(),
        "--strict fails when anything was dropped"
    );

    let other = run(&[
        "import-hyperpod",
        "control-plane/controller/tests/data/hyperpod/v1_modeldeployment.yaml",
    ]);
    assert!(!other.status.success());
    assert!(
        stderr(&other).contains("unsupported apiVersion/kind"),
        "{}",
        stderr(&other)
    );
}

#[test]
fn run_without_a_cluster_fails_with_a_clear_error() {
    let o = Command::new(env!("CARGO_BIN_EXE_kvmesh-controller"))
        .arg("run")
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env("HOME", env!("CARGO_TARGET_TMPDIR"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("connecting to the cluster"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
