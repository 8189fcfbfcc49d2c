//! The reconciler: applies what [`crate::render`] produces with server-side apply, advances the
//! `Ordered` placement, and reports conditions. Invalid resources get a status condition and
//! wait for a change; only API failures are errors (retried with a delay, never a hot loop).

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolume, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use thiserror::Error;

use crate::checked::{Endpoint, SpecError, find_catalog_entry};
use crate::crd::status::{EndpointStatus, condition};
use crate::placement;
use crate::render::{FIELD_MANAGER, OWNER_UID_LABEL, Owner, RenderConfig, render};
use crate::resource::EndpointResource;

/// Finalizer guarding the cluster-scoped volume of S3 and FSx sources.
pub const FINALIZER: &str = "kvmesh.io/cleanup";
/// How often a settled endpoint is looked at again anyway.
pub const RESYNC: Duration = Duration::from_secs(300);
/// Retry delay after an API failure.
pub const RETRY: Duration = Duration::from_secs(15);
/// Retry delay while a catalog ConfigMap or entry is missing.
pub const CATALOG_RETRY: Duration = Duration::from_secs(60);

/// Reconcile failures (API errors only; bad specs become conditions).
#[derive(Debug, Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The object has no namespace or name.
    #[error("object without namespace or name")]
    Unnamed,
    /// The finalizer machinery failed.
    #[error("finalizer: {0}")]
    Finalizer(Box<kube::runtime::finalizer::Error<Error>>),
}

/// Monotonic wall clock: wall time at start plus tokio's elapsed time, so paused-time tests
/// drive it and a stepped system clock cannot fire a fallback early.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    wall: Timestamp,
    mono: tokio::time::Instant,
}

impl Clock {
    /// Starts at the current wall time.
    pub fn new() -> Self {
        Self::starting_at(Timestamp::now())
    }

    /// Starts at a given wall time (tests).
    pub fn starting_at(wall: Timestamp) -> Self {
        Self {
            wall,
            mono: tokio::time::Instant::now(),
        }
    }

    /// Current time.
    pub fn now(&self) -> Timestamp {
        let elapsed = jiff::SignedDuration::try_from(self.mono.elapsed())
            .unwrap_or(jiff::SignedDuration::MAX);
        self.wall.checked_add(elapsed).unwrap_or(self.wall)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Shared reconciler state.
#[derive(Clone)]
pub struct Context {
    /// API client.
    pub client: Client,
    /// Rendering settings.
    pub render: RenderConfig,
    /// Event recorder.
    pub recorder: Recorder,
    /// Time source.
    pub clock: Clock,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("render", &self.render)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context with the controller's event reporter.
    pub fn new(client: Client, render: RenderConfig, clock: Clock) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            render,
            clock,
        }
    }
}

/// What one apply pass decided (exposed for tests; [`reconcile`] turns it into an [`Action`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Pass {
    /// The status written.
    pub status: EndpointStatus,
    /// When to look again.
    pub requeue_after: Option<Duration>,
}

/// Controller entry point for either kind.
pub async fn reconcile<K: EndpointResource>(
    obj: Arc<K>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let ns = obj.namespace().ok_or(Error::Unnamed)?;
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, obj, |event| async {
        match event {
            FinalizerEvent::Apply(o) => {
                let pass = apply(o.as_ref(), &ctx).await?;
                Ok(pass
                    .requeue_after
                    .map_or_else(Action::await_change, Action::requeue))
            }
            FinalizerEvent::Cleanup(o) => cleanup(o.as_ref(), &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// Requeue policy for failures: a fixed delay, logged.
pub fn error_policy<K: EndpointResource>(obj: Arc<K>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(kind = K::KIND_NAME, name = %obj.name_any(), error = %err, "reconcile failed");
    Action::requeue(RETRY)
}

fn owner_of<K: EndpointResource>(obj: &K) -> Result<Owner, Error> {
    Ok(Owner {
        kind: K::KIND_NAME,
        api_version: "kvmesh.io/v1alpha1",
        name: obj.meta().name.clone().ok_or(Error::Unnamed)?,
        namespace: obj.meta().namespace.clone().ok_or(Error::Unnamed)?,
        uid: obj.meta().uid.clone(),
    })
}

/// One reconcile pass for a live object: resolve, check, place, apply, report.
pub async fn apply<K: EndpointResource>(obj: &K, ctx: &Context) -> Result<Pass, Error> {
    let owner = owner_of(obj)?;
    let previous = obj.endpoint_status().cloned().unwrap_or_default();
    let generation = obj.meta().generation;
    let now = ctx.clock.now();

    let resolved = resolve(obj, ctx, &owner).await?;
    let ep = match resolved.and_then(|spec| Endpoint::check(&spec)) {
        Ok(ep) => ep,
        Err(err) => return invalid(obj, ctx, &owner, previous, err, now).await,
    };

    if let Some(other) = foreign_controller(ctx, &owner).await? {
        let err = SpecError::Conflict(format!(
            "Deployment {}/{} is controlled by {other}; rename one of the two",
            owner.namespace, owner.name
        ));
        return invalid(obj, ctx, &owner, previous, err, now).await;
    }

    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let pod_list = pods
        .list(&ListParams::default().labels(&owner.selector_string()))
        .await?;
    let unschedulable = pod_list
        .items
        .iter()
        .filter(|p| is_unschedulable(p))
        .count();
    let step = placement::advance(
        &ep.placement,
        previous.placement.as_ref(),
        unschedulable,
        now,
    );

    let rendered = render(&owner, &ep, &step.status, &ctx.render);
    let mut deployment_status = None;
    let mut autoscaler = (
        true,
        "NotRequested",
        "no autoscalingSpec: fixed replica count".to_owned(),
    );
    for object in rendered.objects() {
        let kind = object["kind"].as_str().unwrap_or_default().to_owned();
        match server_side_apply(&ctx.client, &object).await {
            Ok(applied) if kind == "Deployment" => {
                deployment_status = Some(applied["status"].clone())
            }
            Ok(_) if kind == "ScaledObject" => {
                autoscaler = (
                    true,
                    "ScaledObjectApplied",
                    "KEDA ScaledObject applied".to_owned(),
                );
            }
            Ok(_) => {}
            Err(kube::Error::Api(e)) if kind == "ScaledObject" && e.code == 404 => {
                autoscaler = (
                    false,
                    "KedaNotInstalled",
                    "the keda.sh ScaledObject API is not served".to_owned(),
                );
            }
            Err(e) => return Err(e.into()),
        }
    }
    if rendered.scaled_object.is_none() {
        delete_scaled_object(ctx, &owner).await?;
    }

    if let Some(added) = &step.widened {
        let note = step.status.steps.last().map(|s| s.reason.clone());
        publish(
            ctx,
            obj,
            EventType::Normal,
            "InstanceTypeFallback",
            format!("widened placement to {added}: {}", note.unwrap_or_default()),
        )
        .await;
    }

    let ds = deployment_status.unwrap_or(Value::Null);
    let replicas = ds["replicas"]
        .as_i64()
        .and_then(|v| i32::try_from(v).ok())
        .unwrap_or(0);
    let ready = ds["readyReplicas"]
        .as_i64()
        .and_then(|v| i32::try_from(v).ok())
        .unwrap_or(0);
    let desired = if ep.spec.auto_scaling_spec.is_some() {
        replicas
    } else {
        ep.spec.replicas
    };

    let mut conds = previous.conditions.clone();
    let scheduled = if unschedulable == 0 {
        (
            true,
            "AllPodsScheduled",
            "no pod is Unschedulable".to_owned(),
        )
    } else {
        let tail = match step.recheck_after {
            Some(d) => format!("; next instance type in {}s", d.as_secs()),
            None => String::new(),
        };
        (
            false,
            "Unschedulable",
            format!(
                "{unschedulable} pod(s) Unschedulable on {}{tail}",
                step.status.allowed_instance_types.join(",")
            ),
        )
    };
    let loaded = if ready > 0 {
        (
            true,
            "ReplicasReady",
            format!("{ready} replica(s) passed readiness"),
        )
    } else if desired == 0 {
        (false, "ScaledToZero", "no replica is running".to_owned())
    } else {
        (
            false,
            "Loading",
            "no replica has passed readiness yet".to_owned(),
        )
    };
    let ready_cond = if loaded.0 {
        (
            true,
            "Available",
            format!("{ready}/{desired} replicas ready"),
        )
    } else if !scheduled.0 {
        (false, "Unschedulable", scheduled.2.clone())
    } else {
        (false, loaded.1, loaded.2.clone())
    };
    for (t, (ok, reason, msg)) in [
        (condition::SCHEDULED, scheduled),
        (condition::MODEL_LOADED, loaded),
        (condition::AUTOSCALER_READY, autoscaler),
        (condition::READY, ready_cond),
    ] {
        set_condition(&mut conds, t, ok, reason, &msg, generation, now);
    }
    let status = EndpointStatus {
        observed_generation: generation,
        replicas,
        ready_replicas: ready,
        selector: Some(owner.selector_string()),
        conditions: conds,
        placement: Some(step.status.clone()),
        pool: Some(owner.pool()),
        resolved_model: obj.catalog_ref().map(|_| ep.spec.model_name.clone()),
    };
    patch_status::<K>(ctx, &owner, &status).await?;
    Ok(Pass {
        status,
        requeue_after: Some(step.recheck_after.unwrap_or(RESYNC)),
    })
}

async fn resolve<K: EndpointResource>(
    obj: &K,
    ctx: &Context,
    owner: &Owner,
) -> Result<Result<crate::crd::InferenceEndpointConfigSpec, SpecError>, Error> {
    let Some((catalog, model_id)) = obj.catalog_ref() else {
        return Ok(obj
            .endpoint_spec(None)
            .ok_or_else(|| SpecError::Field("no spec".into())));
    };
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let Some(cm) = cms.get_opt(&catalog).await? else {
        return Ok(Err(SpecError::Catalog(format!(
            "ConfigMap {catalog:?} not found"
        ))));
    };
    let data = cm.data.unwrap_or_default();
    Ok(find_catalog_entry(&data, &model_id)
        .map(|entry| obj.endpoint_spec(Some(&entry)))
        .and_then(|s| s.ok_or_else(|| SpecError::Catalog("entry did not resolve".into()))))
}

async fn invalid<K: EndpointResource>(
    obj: &K,
    ctx: &Context,
    owner: &Owner,
    previous: EndpointStatus,
    err: SpecError,
    now: Timestamp,
) -> Result<Pass, Error> {
    let (reason, retry) = match err {
        SpecError::Catalog(_) => ("CatalogUnresolved", true),
        SpecError::Conflict(_) => ("NameConflict", true),
        _ => ("InvalidSpec", false),
    };
    let mut status = previous;
    status.observed_generation = obj.meta().generation;
    status.selector = Some(owner.selector_string());
    let msg = err.to_string();
    let changed = status
        .conditions
        .iter()
        .find(|c| c.type_ == condition::READY)
        .is_none_or(|c| c.reason != reason || c.message != msg);
    set_condition(
        &mut status.conditions,
        condition::READY,
        false,
        reason,
        &msg,
        obj.meta().generation,
        now,
    );
    patch_status::<K>(ctx, owner, &status).await?;
    if changed {
        publish(ctx, obj, EventType::Warning, reason, msg).await;
    }
    // A bad spec waits for an edit; a missing catalog entry or a conflicting owner may go away
    // without one.
    Ok(Pass {
        status,
        requeue_after: retry.then_some(CATALOG_RETRY),
    })
}

async fn cleanup<K: EndpointResource>(obj: &K, ctx: &Context) -> Result<Action, Error> {
    let owner = owner_of(obj)?;
    // Namespaced objects go with their owner references; the PersistentVolume cannot carry one,
    // so it is deleted here, and only when its owner label says it is this resource's.
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let Some(pv) = pvs.get_opt(&owner.pv_name()).await? else {
        return Ok(Action::await_change());
    };
    if pv.labels().get(OWNER_UID_LABEL) != owner.uid.as_ref() {
        return Ok(Action::await_change());
    }
    match pvs.delete(&owner.pv_name(), &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    let note = format!("deleted PersistentVolume {}", owner.pv_name());
    publish(ctx, obj, EventType::Normal, "Cleanup", note).await;
    Ok(Action::await_change())
}

/// The controller of an existing Deployment of this name, when it is not this resource.
async fn foreign_controller(ctx: &Context, owner: &Owner) -> Result<Option<String>, Error> {
    let Some(uid) = &owner.uid else {
        return Ok(None);
    };
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let Some(d) = deployments.get_opt(&owner.name).await? else {
        return Ok(None);
    };
    Ok(d.owner_references()
        .iter()
        .find(|r| r.controller == Some(true) && &r.uid != uid)
        .map(|r| format!("{} {}", r.kind, r.name)))
}

/// Whether the scheduler has marked the pod Unschedulable.
pub fn is_unschedulable(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
            })
        })
}

/// The API resource (and scope) of a rendered object.
pub fn api_resource(api_version: &str, kind: &str) -> (ApiResource, bool) {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let (plural, namespaced) = match kind {
        "PersistentVolume" => ("persistentvolumes", false),
        "PersistentVolumeClaim" => ("persistentvolumeclaims", true),
        "Deployment" => ("deployments", true),
        "Service" => ("services", true),
        "ScaledObject" => ("scaledobjects", true),
        other => {
            return (
                ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, other)),
                true,
            );
        }
    };
    (
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural),
        namespaced,
    )
}

async fn server_side_apply(client: &Client, object: &Value) -> Result<Value, kube::Error> {
    let (ar, namespaced) = api_resource(
        object["apiVersion"].as_str().unwrap_or_default(),
        object["kind"].as_str().unwrap_or_default(),
    );
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let api: Api<DynamicObject> = match object["metadata"]["namespace"].as_str() {
        Some(ns) if namespaced => Api::namespaced_with(client.clone(), ns, &ar),
        _ => Api::all_with(client.clone(), &ar),
    };
    let applied = api
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(object),
        )
        .await?;
    Ok(serde_json::to_value(applied).unwrap_or(Value::Null))
}

async fn delete_scaled_object(ctx: &Context, owner: &Owner) -> Result<(), Error> {
    let (ar, _) = api_resource("keda.sh/v1alpha1", "ScaledObject");
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &owner.namespace, &ar);
    match api.delete(&owner.name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        // Already gone, or KEDA not installed at all.
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn patch_status<K: EndpointResource>(
    ctx: &Context,
    owner: &Owner,
    status: &EndpointStatus,
) -> Result<(), Error> {
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let body = json!({
        "apiVersion": owner.api_version,
        "kind": owner.kind,
        "status": status,
    });
    api.patch_status(
        &owner.name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

async fn publish<K: EndpointResource>(
    ctx: &Context,
    obj: &K,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = KubeEvent {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        // Events are best effort; the status carries the same facts.
        tracing::debug!(error = %e, "event not published");
    }
}

/// Sets a condition, keeping `lastTransitionTime` when its status did not change.
pub fn set_condition(
    conds: &mut Vec<Condition>,
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) {
    let status = if ok { "True" } else { "False" }.to_owned();
    let previous = conds.iter().position(|c| c.type_ == type_);
    let last_transition_time = match previous.map(|i| &conds[i]) {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(now),
    };
    let cond = Condition {
        type_: type_.to_owned(),
        status,
        reason: reason.to_owned(),
        message: message.to_owned(),
        observed_generation: generation,
        last_transition_time,
    };
    match previous {
        Some(i) => conds[i] = cond,
        None => conds.push(cond),
    }
}
