//! Runs the two controllers (one per endpoint kind) against the cluster.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, ResourceExt};

use crate::crd::{CatalogModel, InferenceEndpointConfig};
use crate::reconcile::{Context, error_policy, reconcile};
use crate::render::{ENDPOINT_LABEL, FIELD_MANAGER, KIND_LABEL};
use crate::resource::EndpointResource;

/// Runs both controllers until a termination signal.
pub async fn run(client: Client, ctx: Context) {
    let ctx = Arc::new(ctx);
    tokio::join!(
        controller::<InferenceEndpointConfig>(client.clone(), ctx.clone()),
        controller::<CatalogModel>(client, ctx),
    );
}

async fn controller<K: EndpointResource>(client: Client, ctx: Arc<Context>) {
    let managed = format!(
        "app.kubernetes.io/managed-by={FIELD_MANAGER},{KIND_LABEL}={}",
        K::KIND_NAME
    );
    Controller::new(Api::<K>::all(client.clone()), watcher::Config::default())
        .owns(
            Api::<Deployment>::all(client.clone()),
            watcher::Config::default().labels(&managed),
        )
        // Pods belong to ReplicaSets, not to us: map them back by label so a pod turning
        // Unschedulable (or Ready) reconciles its endpoint at once.
        .watches(
            Api::<Pod>::all(client),
            watcher::Config::default().labels(&managed),
            |pod: Pod| {
                let name = pod.labels().get(ENDPOINT_LABEL)?.clone();
                Some(ObjectRef::<K>::new(&name).within(&pod.namespace()?))
            },
        )
        .shutdown_on_signal()
        .run(reconcile::<K>, error_policy::<K>, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => {
                    tracing::debug!(kind = K::KIND_NAME, name = %obj.name, "reconciled")
                }
                Err(e) => tracing::warn!(kind = K::KIND_NAME, error = %e, "reconcile error"),
            }
        })
        .await;
}
