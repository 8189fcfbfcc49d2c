//! Parses an endpoint spec once into a checked, read-only [`Endpoint`].
//!
//! The CRD's CEL rules reject most bad input at admission; these checks repeat them (an old API
//! server, a `render` run offline, or a catalog entry never passed through admission) and add the
//! ones CEL cannot express, such as quantity arithmetic. A failure becomes a status condition,
//! never a crash loop.

use std::time::Duration;

use thiserror::Error;

use crate::crd::catalog::{CatalogEntry, CatalogModelSpec};
use crate::crd::endpoint::{
    InferenceEndpointConfigSpec, KvCacheSpec, MAX_INSTANCE_TYPES, ModelSourceType, RoutingStrategy,
    SchedulingMode,
};

/// Why a spec cannot be served.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SpecError {
    /// The placement fields are not exactly one of the three.
    #[error("exactly one of instanceType, instanceTypes or nodeAffinity must be set")]
    Placement,
    /// `instanceTypes` is empty, too long, or repeats a type.
    #[error("instanceTypes: {0}")]
    InstanceTypes(String),
    /// `Ordered` without a list.
    #[error("schedulingPolicy.mode Ordered needs instanceTypes")]
    OrderedWithoutList,
    /// A malformed duration.
    #[error("invalid duration {0:?}: use forms like 90s, 5m or 1h30m")]
    Duration(String),
    /// A malformed byte quantity.
    #[error("invalid byte quantity {0:?}: use forms like 512Mi or 8Gi")]
    Quantity(String),
    /// The storage member does not match `modelSourceType`.
    #[error("modelSourceConfig: {0}")]
    Source(String),
    /// Any other field out of range.
    #[error("{0}")]
    Field(String),
    /// The catalog ConfigMap or entry is missing or malformed.
    #[error("catalog: {0}")]
    Catalog(String),
    /// Another resource already controls the Deployment of this name.
    #[error("name conflict: {0}")]
    Conflict(String),
}

/// How pods are placed on instance types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Instance types in preference order, and how they are applied.
    InstanceTypes {
        /// The list (one entry for `instanceType`).
        types: Vec<String>,
        /// Preferred or Ordered.
        mode: SchedulingMode,
        /// How long pods stay Unschedulable before `Ordered` widens.
        fallback_delay: Duration,
    },
    /// The user's own node affinity.
    NodeAffinity,
}

/// KV tier sizes in bytes: `None` lets the server choose, `Some(0)` turns a tier off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KvBytes {
    /// Device tier.
    pub device: Option<u64>,
    /// Host tier.
    pub host: Option<u64>,
    /// Disk tier.
    pub disk: Option<u64>,
}

/// A checked endpoint spec: everything the renderer needs, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    /// The spec as written (or as resolved from the catalog).
    pub spec: InferenceEndpointConfigSpec,
    /// Placement plan.
    pub placement: Placement,
    /// KV tier sizes.
    pub kv: KvBytes,
    /// Disk tier directory, when the disk tier is on.
    pub kv_disk_dir: Option<String>,
    /// SDK strategy name (`prefix-aware`, `kv-aware`, `round-robin`).
    pub strategy: &'static str,
}

impl Endpoint {
    /// Checks a spec.
    pub fn check(spec: &InferenceEndpointConfigSpec) -> Result<Self, SpecError> {
        let placement = check_placement(spec)?;
        check_source(spec)?;
        if spec.replicas < 0 {
            return Err(SpecError::Field("replicas must not be negative".into()));
        }
        if spec.model_name.is_empty() {
            return Err(SpecError::Field("modelName must not be empty".into()));
        }
        let port = spec.worker.model_invocation_port.container_port;
        if !(1..=65535).contains(&port) {
            return Err(SpecError::Field(format!(
                "containerPort {port} is not 1 to 65535"
            )));
        }
        if let Some(a) = &spec.auto_scaling_spec
            && (a.min_replica_count < 0
                || a.max_replica_count < 1
                || a.min_replica_count > a.max_replica_count)
        {
            return Err(SpecError::Field(format!(
                "autoScalingSpec needs 0 <= minReplicaCount ({}) <= maxReplicaCount ({}), max >= 1",
                a.min_replica_count, a.max_replica_count
            )));
        }
        let (kv, kv_disk_dir) = check_kv(spec.kv_cache_spec.as_ref())?;
        Ok(Self {
            spec: spec.clone(),
            placement,
            kv,
            kv_disk_dir,
            strategy: strategy_name(spec),
        })
    }
}

/// The SDK strategy name for a spec (routing off means round-robin).
pub fn strategy_name(spec: &InferenceEndpointConfigSpec) -> &'static str {
    match &spec.intelligent_routing_spec {
        Some(r) if !r.enabled => "round-robin",
        Some(r) => match r.routing_strategy {
            RoutingStrategy::Prefixaware => "prefix-aware",
            RoutingStrategy::Kvaware => "kv-aware",
            RoutingStrategy::Roundrobin => "round-robin",
        },
        None => "prefix-aware",
    }
}

fn check_placement(spec: &InferenceEndpointConfigSpec) -> Result<Placement, SpecError> {
    let (mode, delay) = spec
        .scheduling_policy
        .as_ref()
        .map_or((SchedulingMode::Preferred, "5m"), |p| {
            (p.mode, p.fallback_delay.as_str())
        });
    let types = match (
        &spec.instance_type,
        &spec.instance_types,
        &spec.node_affinity,
    ) {
        (Some(t), None, None) => vec![t.clone()],
        (None, Some(ts), None) => ts.clone(),
        (None, None, Some(_)) => {
            if mode == SchedulingMode::Ordered {
                return Err(SpecError::OrderedWithoutList);
            }
            return Ok(Placement::NodeAffinity);
        }
        _ => return Err(SpecError::Placement),
    };
    if types.is_empty() || types.len() > MAX_INSTANCE_TYPES {
        return Err(SpecError::InstanceTypes(format!(
            "list {} types; 1 to {MAX_INSTANCE_TYPES} allowed",
            types.len()
        )));
    }
    for (i, t) in types.iter().enumerate() {
        if t.is_empty() {
            return Err(SpecError::InstanceTypes("an entry is empty".into()));
        }
        if types[..i].contains(t) {
            return Err(SpecError::InstanceTypes(format!("{t} is listed twice")));
        }
    }
    if mode == SchedulingMode::Ordered && spec.instance_types.is_none() {
        return Err(SpecError::OrderedWithoutList);
    }
    Ok(Placement::InstanceTypes {
        types,
        mode,
        fallback_delay: parse_duration(delay)?,
    })
}

fn check_source(spec: &InferenceEndpointConfigSpec) -> Result<(), SpecError> {
    let s = &spec.model_source_config;
    let present = [
        (ModelSourceType::S3, s.s3_storage.is_some()),
        (ModelSourceType::Fsx, s.fsx_storage.is_some()),
        (ModelSourceType::Pvc, s.pvc.is_some()),
        (ModelSourceType::HostPath, s.host_path.is_some()),
    ];
    for (kind, set) in present {
        if (kind == s.model_source_type) != set {
            return Err(SpecError::Source(format!(
                "modelSourceType is {:?}; set exactly its storage member",
                s.model_source_type
            )));
        }
    }
    if let Some(loc) = &s.model_location
        && (loc.starts_with('/') || loc.split('/').any(|p| p == ".."))
    {
        return Err(SpecError::Source(format!(
            "modelLocation {loc:?} must be relative, without '..'"
        )));
    }
    if let Some(h) = &s.host_path
        && !h.path.starts_with('/')
    {
        return Err(SpecError::Source("hostPath.path must be absolute".into()));
    }
    Ok(())
}

fn check_kv(kv: Option<&KvCacheSpec>) -> Result<(KvBytes, Option<String>), SpecError> {
    let Some(kv) = kv else {
        return Ok((KvBytes::default(), None));
    };
    let tier = |enabled: bool, size: &Option<String>| -> Result<Option<u64>, SpecError> {
        if !enabled {
            return Ok(Some(0));
        }
        size.as_deref().map(parse_quantity).transpose()
    };
    let device = kv
        .device
        .as_ref()
        .map(|t| tier(t.enabled, &t.size))
        .transpose()?
        .flatten();
    let host = kv
        .host
        .as_ref()
        .map(|t| tier(t.enabled, &t.size))
        .transpose()?
        .flatten();
    let disk = kv
        .disk
        .as_ref()
        .map(|t| tier(t.enabled, &t.size))
        .transpose()?
        .flatten();
    let dir = kv
        .disk
        .as_ref()
        .filter(|d| d.enabled)
        .map(|d| d.path.clone());
    if let Some(d) = &dir
        && !d.starts_with('/')
    {
        return Err(SpecError::Field(
            "kvCacheSpec.disk.path must be absolute".into(),
        ));
    }
    Ok((KvBytes { device, host, disk }, dir))
}

/// Parses a Go-style duration made of `<n>h`, `<n>m`, `<n>s` parts (`1h30m`, `90s`).
pub fn parse_duration(s: &str) -> Result<Duration, SpecError> {
    let err = || SpecError::Duration(s.to_owned());
    let mut total = 0u64;
    let mut digits = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let n: u64 = digits.parse().map_err(|_| err())?;
        digits.clear();
        let unit = match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return Err(err()),
        };
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(err)?;
    }
    if !digits.is_empty() || total == 0 {
        return Err(err());
    }
    Ok(Duration::from_secs(total))
}

/// Parses a Kubernetes byte quantity (`512Mi`, `8Gi`, `1.5G`, `1000`) into bytes.
pub fn parse_quantity(s: &str) -> Result<u64, SpecError> {
    let err = || SpecError::Quantity(s.to_owned());
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let mult: u64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        _ => return Err(err()),
    };
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() || frac.len() > 9 || !frac.chars().all(|c| c.is_ascii_digit()) {
        return Err(err());
    }
    let int: u64 = int.parse().map_err(|_| err())?;
    let whole = int.checked_mul(mult).ok_or_else(err)?;
    let frac_part = if frac.is_empty() {
        0
    } else {
        let f: u128 = frac.parse().map_err(|_| err())?;
        let scale = 10u128.pow(frac.len() as u32);
        u64::try_from(f * u128::from(mult) / scale).map_err(|_| err())?
    };
    whole.checked_add(frac_part).ok_or_else(err)
}

/// Merges a catalog entry with a `CatalogModel`'s overrides into an endpoint spec.
pub fn resolve_catalog(
    model: &CatalogModelSpec,
    entry: &CatalogEntry,
) -> InferenceEndpointConfigSpec {
    let (instance_type, instance_types) = match (&model.instance_type, &model.instance_types) {
        (Some(t), _) => (Some(t.clone()), None),
        (None, Some(ts)) => (None, Some(ts.clone())),
        (None, None) => (None, Some(entry.instance_types.clone())),
    };
    let mut worker = entry.worker.clone();
    for var in &model.environment_variables {
        worker.environment_variables.retain(|v| v.name != var.name);
        worker.environment_variables.push(var.clone());
    }
    InferenceEndpointConfigSpec {
        model_name: entry
            .model_name
            .clone()
            .unwrap_or_else(|| entry.model_id.clone()),
        model_source_config: entry.model_source_config.clone(),
        worker,
        replicas: model.replicas,
        instance_type,
        instance_types,
        node_affinity: None,
        scheduling_policy: model.scheduling_policy.clone(),
        auto_scaling_spec: model.auto_scaling_spec.clone(),
        kv_cache_spec: model
            .kv_cache_spec
            .clone()
            .or_else(|| entry.kv_cache_spec.clone()),
        intelligent_routing_spec: model
            .intelligent_routing_spec
            .clone()
            .or_else(|| entry.intelligent_routing_spec.clone()),
        metrics: model.metrics.clone().or_else(|| entry.metrics.clone()),
    }
}

/// Finds `model_id` among the catalog ConfigMap's data values (one YAML entry each).
pub fn find_catalog_entry<'a>(
    data: impl IntoIterator<Item = (&'a String, &'a String)>,
    model_id: &str,
) -> Result<CatalogEntry, SpecError> {
    for (key, value) in data {
        let entry: CatalogEntry = serde_yaml_ng::from_str(value)
            .map_err(|e| SpecError::Catalog(format!("entry {key:?} does not parse: {e}")))?;
        if entry.model_id == model_id {
            return Ok(entry);
        }
    }
    Err(SpecError::Catalog(format!(
        "no entry has modelId {model_id:?}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_to_bytes() {
        assert_eq!(parse_quantity("8Gi"), Ok(8 << 30));
        assert_eq!(parse_quantity("512Mi"), Ok(512 << 20));
        assert_eq!(parse_quantity("1.5G"), Ok(1_500_000_000));
        assert_eq!(parse_quantity("1000"), Ok(1000));
        assert_eq!(parse_quantity("0.5Ki"), Ok(512));
        for bad in ["", "Gi", "8gb", "1..2", "-1", "1e3", "99999999999Pi"] {
            assert!(parse_quantity(bad).is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        for bad in ["", "5", "0s", "5d", "m", "1.5m"] {
            assert!(parse_duration(bad).is_err(), "{bad} should not parse");
        }
    }
}
