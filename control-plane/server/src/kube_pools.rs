//! Pools from Kubernetes: the control plane watches the `InferenceEndpointConfig` and
//! `CatalogModel` resources and the EndpointSlices of the Services the controller made for
//! them, and serves one pool per resource (the controller's [`pools::pools`]): its strategy
//! from the resource, its members the ready endpoints, all on the shared gateway listener
//! under `/<namespace>/<name>`.
//!
//! The EndpointSlice controller copies a Service's labels onto its slices, so the watch selects
//! slices by the label the controller puts on every object it makes
//! ([`ENDPOINT_LABEL`](kvmesh_control_plane_controller::render::ENDPOINT_LABEL)) rather than
//! listing every slice of the cluster. A catalog ConfigMap is read when pools are computed (it is
//! not watched: the control plane may only `get` ConfigMaps), so a catalog edit shows within
//! [`RESYNC`]. While the API server is unreachable the watches retry with backoff and the pools
//! stay as they were: routing degrades to stale membership, the service goes on.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use kvmesh_control_plane_controller::crd::catalog::DEFAULT_CATALOG;
use kvmesh_control_plane_controller::crd::{CatalogModel, InferenceEndpointConfig};
use kvmesh_control_plane_controller::pools::{self, Pool, PoolSource};
use kvmesh_control_plane_controller::render::ENDPOINT_LABEL;
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use crate::App;
use crate::config::{GatewayRoute, KubernetesSource, PoolSpec, StrategySpec};

/// Pools are recomputed at least this often (catalog ConfigMaps are read, not watched).
pub const RESYNC: Duration = Duration::from_secs(60);

/// The control plane's pool for one pool the resources describe.
pub fn pool_spec(pool: Pool, k: &KubernetesSource) -> PoolSpec {
    let c = pool.config;
    let module = k.strategies.get(&c.strategy);
    if module.is_none() {
        tracing::warn!(pool = %c.name, strategy = %c.strategy,
            "no module configured for this strategy (kubernetes.strategies): served without a routing filter");
    }
    let mut params: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&c.strategy_config).unwrap_or_else(|e| {
            tracing::warn!(pool = %c.name, error = %e, "strategyConfig is not a JSON object; using defaults");
            serde_json::Map::new()
        });
    params
        .entry("max_fallbacks")
        .or_insert(serde_json::json!(c.max_fallbacks));
    PoolSpec {
        strategy: module.map(|m| StrategySpec {
            name: c.strategy.clone(),
            module: m.clone(),
            sha256: None,
            params: serde_json::Value::Object(params),
        }),
        gateway: Some(GatewayRoute {
            path_prefix: format!("/{}/{}", pool.namespace, pool.name),
            discovered: pool
                .endpoints
                .iter()
                .filter_map(|e| e.parse().ok())
                .collect(),
        }),
        name: c.name,
        model: c.model,
        listener: k.listener,
        chunk_bytes: c.chunk_bytes,
        max_body_bytes: k.max_body_bytes,
        timeout_ms: k.timeout_ms,
        probe_module: None,
    }
}

/// The pools the watched objects describe. `catalogs` holds the data of each catalog
/// ConfigMap by (namespace, name); a `CatalogModel` whose catalog is missing forms no pool.
pub fn pool_specs(
    endpoints: &[Arc<InferenceEndpointConfig>],
    catalog_models: &[Arc<CatalogModel>],
    catalogs: &BTreeMap<(String, String), BTreeMap<String, String>>,
    slices: &[Arc<EndpointSlice>],
    k: &KubernetesSource,
) -> Vec<PoolSpec> {
    let mut sources: Vec<PoolSource> = endpoints
        .iter()
        .filter_map(|r| PoolSource::from_endpoint(r))
        .collect();
    for m in catalog_models {
        let Some(ns) = m.metadata.namespace.clone() else {
            continue;
        };
        let key = (ns, catalog_name(m).to_owned());
        if let Some(src) = catalogs
            .get(&key)
            .and_then(|data| PoolSource::from_catalog(m, data))
        {
            sources.push(src);
        }
    }
    let slices: Vec<EndpointSlice> = slices.iter().map(|s| (**s).clone()).collect();
    pools::pools(&sources, &slices)
        .into_iter()
        .map(|p| pool_spec(p, k))
        .collect()
}

fn catalog_name(m: &CatalogModel) -> &str {
    m.spec.catalog.as_deref().unwrap_or(DEFAULT_CATALOG)
}

fn api<K>(client: &Client, k: &KubernetesSource) -> Api<K>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match &k.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// A reflected watch: keeps `writer`'s store current, yields `()` per change. Errors (the API
/// server gone, a watch expired) are logged and retried with backoff.
fn reflect<K>(
    writer: reflector::store::Writer<K>,
    api: Api<K>,
    config: watcher::Config,
) -> impl Stream<Item = ()> + Send
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    reflector::reflector(writer, watcher(api, config))
        .default_backoff()
        .filter_map(|event| async move {
            match event {
                Ok(_) => Some(()),
                Err(e) => {
                    tracing::warn!(kind = %K::kind(&Default::default()), error = %e, "kubernetes watch failed; retrying");
                    None
                }
            }
        })
}

/// Reads the catalog ConfigMaps the catalog models name (a missing one is left out).
async fn read_catalogs(
    client: &Client,
    models: &[Arc<CatalogModel>],
) -> BTreeMap<(String, String), BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for m in models {
        let Some(ns) = m.metadata.namespace.clone() else {
            continue;
        };
        let key = (ns.clone(), catalog_name(m).to_owned());
        if out.contains_key(&key) {
            continue;
        }
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
        match cms.get_opt(&key.1).await {
            Ok(Some(cm)) => {
                out.insert(key, cm.data.unwrap_or_default());
            }
            Ok(None) => {
                tracing::warn!(namespace = %ns, catalog = %key.1, "catalog ConfigMap not found")
            }
            Err(e) => {
                tracing::warn!(namespace = %ns, catalog = %key.1, error = %e, "reading catalog")
            }
        }
    }
    out
}

/// Watches the cluster and keeps `app`'s pools from Kubernetes current, until the process
/// ends. Nothing is applied before every watch has listed once (a half-listed cluster would
/// briefly drop pools).
pub async fn run(app: Arc<App>, client: Client, k: KubernetesSource) {
    let (endpoints, w1) = reflector::store::<InferenceEndpointConfig>();
    let (models, w2) = reflector::store::<CatalogModel>();
    let (slices, w3) = reflector::store::<EndpointSlice>();
    let changed = Arc::new(Notify::new());
    let events = futures::stream::select_all([
        reflect(w1, api(&client, &k), watcher::Config::default()).boxed(),
        reflect(w2, api(&client, &k), watcher::Config::default()).boxed(),
        reflect(
            w3,
            api(&client, &k),
            watcher::Config::default().labels(ENDPOINT_LABEL),
        )
        .boxed(),
    ]);
    let notify = changed.clone();
    tokio::spawn(events.for_each(move |()| {
        notify.notify_one();
        std::future::ready(())
    }));
    if wait_ready(&endpoints, &models, &slices).await.is_err() {
        return;
    }
    tracing::info!("kubernetes pools: initial lists done");
    let debounce = Duration::from_millis(k.debounce_ms);
    loop {
        let catalogs = read_catalogs(&client, &models.state()).await;
        let specs = pool_specs(
            &endpoints.state(),
            &models.state(),
            &catalogs,
            &slices.state(),
            &k,
        );
        let names: Vec<String> = specs.iter().map(|p| p.name.clone()).collect();
        let left_out = app.set_dynamic_pools(specs).await;
        tracing::debug!(pools = ?names, ?left_out, "kubernetes pools applied");
        tokio::select! {
            () = changed.notified() => {}
            () = tokio::time::sleep(RESYNC) => {}
        }
        tokio::time::sleep(debounce).await;
    }
}

async fn wait_ready(
    a: &Store<InferenceEndpointConfig>,
    b: &Store<CatalogModel>,
    c: &Store<EndpointSlice>,
) -> Result<(), reflector::store::WriterDropped> {
    a.wait_until_ready().await?;
    b.wait_until_ready().await?;
    c.wait_until_ready().await
}

#[cfg(test)]
mod tests {
    //! The watcher against a mocked API server (tower-test): pools appear from the lists
    //! (an endpoint resource, and a catalog model through its ConfigMap), with members from
    //! their EndpointSlices; a DELETED watch event removes one pool and leaves the other.
    #![allow(clippy::unwrap_used)]

    use super::*;
    use http::{Request, Response};
    use kube::client::Body;
    use std::path::PathBuf;

    fn example(name: &str) -> serde_json::Value {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/examples")
            .join(name);
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn slice(ns: &str, service: &str, ip: &str) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{service}-x"), "namespace": ns, "labels": {
                "kubernetes.io/service-name": service, ENDPOINT_LABEL: service}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}]
        })
    }

    fn list(kind: &str, items: Vec<serde_json::Value>) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items
        }))
        .unwrap()
    }

    /// Answers list, watch and get requests like an API server holding `llama-8b`
    /// (InferenceEndpointConfig), `smollm2-catalog` (CatalogModel) with its catalog, and a
    /// slice for each. The first watch of InferenceEndpointConfigs waits for `delete`, then
    /// reports `llama-8b` deleted; other watches end empty after a pause (the watcher then
    /// watches again).
    fn api_server(delete: Arc<Notify>) -> Client {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        tokio::spawn(async move {
            let mut endpoint_watches = 0;
            while let Some((req, send)) = handle.next_request().await {
                let path = req.uri().path().to_owned();
                let watch = req.uri().query().unwrap_or("").contains("watch=true");
                let first_endpoint_watch =
                    watch && path.ends_with("/inferenceendpointconfigs") && {
                        endpoint_watches += 1;
                        endpoint_watches == 1
                    };
                let delete = delete.clone();
                tokio::spawn(async move {
                    let body = if first_endpoint_watch {
                        delete.notified().await;
                        let mut gone = example("llama-ordered.yaml");
                        gone["metadata"]["resourceVersion"] = "2".into();
                        let event = serde_json::json!({"type": "DELETED", "object": gone});
                        let mut line = serde_json::to_vec(&event).unwrap();
                        line.push(b'\n');
                        line
                    } else if watch {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Vec::new()
                    } else if path.ends_with("/inferenceendpointconfigs") {
                        list(
                            "InferenceEndpointConfigList",
                            vec![example("llama-ordered.yaml")],
                        )
                    } else if path.ends_with("/catalogmodels") {
                        list("CatalogModelList", vec![example("catalog-model.yaml")])
                    } else if path.ends_with("/endpointslices") {
                        list(
                            "EndpointSliceList",
                            vec![
                                slice("inference", "llama-8b", "10.0.0.1"),
                                slice("demo", "smollm2-catalog", "10.0.0.2"),
                            ],
                        )
                    } else if path == "/api/v1/namespaces/demo/configmaps/kvmesh-model-catalog" {
                        serde_json::to_vec(&example("catalog.yaml")).unwrap()
                    } else {
                        panic!("unexpected request {path}");
                    };
                    send.send_response(Response::builder().body(Body::from(body)).unwrap());
                });
            }
        });
        Client::new(svc, "default")
    }

    fn config(store: &std::path::Path, module: &std::path::Path) -> crate::Config {
        let yaml = format!(
            "warmup_ms: 0\nmodule_store: {}\nkubernetes:\n  listener: 127.0.0.1:18080\n  debounce_ms: 10\n  strategies:\n    kv-aware: {}\n",
            store.display(),
            module.display()
        );
        let c: crate::Config = serde_yaml::from_str(&yaml).unwrap();
        c.validate().unwrap();
        c
    }

    async fn served(app: &App) -> Vec<(String, Vec<String>, Option<String>)> {
        let pools = app.registry.lock().await.pools();
        let strategies = app.strategies.lock().await;
        pools
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    p.gateway
                        .as_ref()
                        .map(|g| g.discovered.iter().map(|a| a.to_string()).collect())
                        .unwrap_or_default(),
                    strategies.current(&p.name).map(|a| a.spec.name.clone()),
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn pools_follow_the_cluster() {
        let dir = std::env::temp_dir().join(format!("kvmesh-kube-pools-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let module = dir.join("kv-aware.wasm");
        std::fs::write(&module, b"\0asm\x01\0\0\0").unwrap();
        let config = config(&dir.join("store"), &module);
        let k = config.kubernetes.clone().unwrap();
        let app = App::new(Arc::new(config)).await.unwrap();
        let delete = Arc::new(Notify::new());
        tokio::spawn(run(app.clone(), api_server(delete.clone()), k));

        let want = vec![
            (
                "demo.smollm2-catalog".to_owned(),
                vec!["10.0.0.2:8080".to_owned()],
                Some("kv-aware".to_owned()),
            ),
            (
                "inference.llama-8b".to_owned(),
                vec!["10.0.0.1:8080".to_owned()],
                Some("kv-aware".to_owned()),
            ),
        ];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while served(&app).await != want {
            assert!(
                tokio::time::Instant::now() < deadline,
                "pools never matched: {:?}",
                served(&app).await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let pools = app.registry.lock().await.pools();
        let llama = pools
            .iter()
            .find(|p| p.model == "Llama-3.1-8B-Instruct")
            .unwrap();
        assert_eq!(
            llama.gateway.as_ref().unwrap().path_prefix,
            "/inference/llama-8b"
        );
        assert_eq!(llama.listener.to_string(), "127.0.0.1:18080");

        delete.notify_one();
        while served(&app).await != want[..1] {
            assert!(
                tokio::time::Instant::now() < deadline,
                "deleted pool still served: {:?}",
                served(&app).await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            app.strategies
                .lock()
                .await
                .current("inference.llama-8b")
                .is_none(),
            "the deleted pool's strategy is forgotten"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
