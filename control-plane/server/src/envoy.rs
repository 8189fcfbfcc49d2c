//! Builds the Envoy resources of each pool: its listener (HTTP connection
//! manager: the ECDS routing filter, then the router), its route table, its
//! cluster (EDS members, `override_host` load balancing with a least-request
//! fallback) and its endpoints; and the ECDS resource of its routing filter.

use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::accesslog::v3::{
    AccessLogFilter, ComparisonFilter, StatusCodeFilter, access_log_filter, comparison_filter,
};
use envoy_types::pb::envoy::config::cluster::v3::{
    CircuitBreakers, Cluster, LoadBalancingPolicy, circuit_breakers, cluster, load_balancing_policy,
};
use envoy_types::pb::envoy::config::common::mutation_rules::v3::{
    HeaderMutation as RuleMutation, header_mutation as rule_mutation,
};
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, AsyncDataSource, ConfigSource, DataSource,
    ExtensionConfigSource, RuntimeUInt32, SocketAddress, SubstitutionFormatString,
    TypedExtensionConfig, address, async_data_source, config_source, data_source, socket_address,
    substitution_format_string,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{
    FilterConfig, RetryPolicy, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
    retry_policy, route, route_action, route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::header_mutation::v3::{
    HeaderMutation as HeaderMutationFilter, Mutations,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, LocalReplyConfig, Rds, ResponseMapper,
    http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::load_balancing_policies::least_request::v3::LeastRequest;
use envoy_types::pb::envoy::extensions::load_balancing_policies::override_host::v3::{
    OverrideHost, override_host,
};
use envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate;
use envoy_types::pb::envoy::extensions::wasm::v3::{PluginConfig, VmConfig, plugin_config};
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::{
    Any, BoolValue, Duration as PbDuration, StringValue, Struct, UInt32Value, Value, value,
};
use kvmesh_control_plane_xds::{Resource, type_url};
use prost::{Message, Name};

use crate::config::{KubernetesSource, PoolSpec};

/// The header the routing filter writes (Gateway API Inference Extension).
pub const DESTINATION_HEADER: &str = "x-gateway-destination-endpoint";
/// `vm_id` shared by the routing filters and the state pump (one shared-data map).
pub const VM_ID: &str = "kvmesh";

fn any<M: Message + Name>(msg: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: msg.encode_to_vec(),
    }
}

fn duration(d: Duration) -> PbDuration {
    PbDuration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: 2, // V3
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

fn socket(addr: SocketAddr) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: addr.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                addr.port(),
            ))),
            ..Default::default()
        })),
    }
}

/// Envoy's per-connection buffer: above the filter's body limit, so a body
/// the filter may parse is never cut off (larger ones get 413).
fn buffer_limit(pool: &PoolSpec) -> u32 {
    pool.max_body_bytes.saturating_mul(2)
}

/// Resource names for a pool.
pub fn listener_name(pool: &str) -> String {
    format!("kvmesh/{pool}")
}
pub fn route_name(pool: &str) -> String {
    format!("kvmesh/{pool}")
}
pub fn cluster_name(pool: &str) -> String {
    format!("kvmesh/{pool}")
}
/// ECDS name of a pool's routing filter.
pub fn filter_name(pool: &str) -> String {
    format!("kvmesh.routing/{pool}")
}

/// Name of the listener (and route table) shared by the pools from Kubernetes. Two slashes:
/// no file pool's `kvmesh/<pool>` can take it (pool names have no '/').
pub const GATEWAY: &str = "kvmesh/kubernetes/gateway";

/// Drops the client's destination header: clients never pick the replica.
fn strip_destination() -> HttpFilter {
    let strip = HeaderMutationFilter {
        mutations: Some(Mutations {
            request_mutations: vec![RuleMutation {
                action: Some(rule_mutation::Action::Remove(DESTINATION_HEADER.into())),
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    HttpFilter {
        name: "envoy.filters.http.header_mutation".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(any(&strip))),
        ..Default::default()
    }
}

/// A pool's routing filter in a listener: its configuration comes by ECDS. `disabled`: off
/// unless a route turns it on (the shared gateway, where each route is one pool's).
fn routing_filter_slot(pool: &str, disabled: bool) -> HttpFilter {
    HttpFilter {
        name: filter_name(pool),
        disabled,
        config_type: Some(http_filter::ConfigType::ConfigDiscovery(
            ExtensionConfigSource {
                config_source: Some(ads()),
                type_urls: vec![Wasm::type_url()],
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

/// Envoy's own error replies, in the shape the model server answers with
/// (`{"error":{"message","type","param","code"}}`, `application/json`), so that an OpenAI
/// client reads a gateway error as an API error: `(status, type, code, message)`, the first
/// match wins; a `None` message keeps Envoy's own text ("no healthy upstream", the reset
/// reason of a refused connection). Every other status of 400 or more gets the type of
/// its class and no code. A reply under 400 (the state probe's 200) is left as it is.
/// `envoy/static/*.yaml` carry the same table.
const LOCAL_REPLIES: &[(u32, &str, Option<&str>, Option<&str>)] = &[
    (
        404,
        "invalid_request_error",
        Some("not_found"),
        Some("no route for this path"),
    ),
    (
        413,
        "invalid_request_error",
        Some("request_too_large"),
        None,
    ),
    (429, "rate_limit_error", Some("rate_limited"), None),
    (503, "server_error", Some("upstream_unavailable"), None),
    (
        504,
        "server_error",
        Some("upstream_timeout"),
        Some("the model server sent nothing within the gateway's timeout"),
    ),
];

/// The HTTP connection manager's `local_reply_config`: [`LOCAL_REPLIES`], then every other
/// 5xx as `server_error` and 4xx as `invalid_request_error`, with no code.
fn local_reply_config() -> LocalReplyConfig {
    fn string(s: &str) -> Value {
        Value {
            kind: Some(value::Kind::StringValue(s.into())),
        }
    }
    fn or_null(s: Option<&str>) -> Value {
        s.map_or(
            Value {
                kind: Some(value::Kind::NullValue(0)),
            },
            string,
        )
    }
    fn mapper(
        op: comparison_filter::Op,
        status: u32,
        kind: &str,
        code: Option<&str>,
        message: Option<&str>,
    ) -> ResponseMapper {
        let error = Struct {
            fields: [
                ("message", string(message.unwrap_or("%LOCAL_REPLY_BODY%"))),
                ("type", string(kind)),
                ("param", or_null(None)), // always null, as the model server's
                ("code", or_null(code)),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        };
        let body = Struct {
            fields: [(
                "error".to_owned(),
                Value {
                    kind: Some(value::Kind::StructValue(error)),
                },
            )]
            .into(),
        };
        let runtime_key = format!(
            "kvmesh.local_reply.{}_{status}",
            op.as_str_name().to_lowercase()
        );
        ResponseMapper {
            filter: Some(AccessLogFilter {
                filter_specifier: Some(access_log_filter::FilterSpecifier::StatusCodeFilter(
                    StatusCodeFilter {
                        comparison: Some(ComparisonFilter {
                            op: op as i32,
                            value: Some(RuntimeUInt32 {
                                default_value: status,
                                runtime_key,
                            }),
                        }),
                    },
                )),
            }),
            body_format_override: Some(SubstitutionFormatString {
                format: Some(substitution_format_string::Format::JsonFormat(body)),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
    use comparison_filter::Op;
    let mut mappers: Vec<ResponseMapper> = LOCAL_REPLIES
        .iter()
        .map(|&(status, kind, code, message)| mapper(Op::Eq, status, kind, code, message))
        .collect();
    mappers.push(mapper(Op::Ge, 500, "server_error", None, None));
    mappers.push(mapper(Op::Ge, 400, "invalid_request_error", None, None));
    LocalReplyConfig {
        mappers,
        ..Default::default()
    }
}

fn router() -> HttpFilter {
    HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(
            any(&Router::default()),
        )),
        ..Default::default()
    }
}

/// An HTTP listener on `address` whose routes come by RDS as `route_config`.
fn http_listener(
    name: &str,
    stat_prefix: String,
    address: SocketAddr,
    buffer_limit: u32,
    route_config: &str,
    http_filters: Vec<HttpFilter>,
) -> Resource {
    let hcm = HttpConnectionManager {
        stat_prefix,
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: route_config.to_owned(),
        })),
        http_filters,
        local_reply_config: Some(local_reply_config()),
        ..Default::default()
    };
    let l = Listener {
        name: name.to_owned(),
        address: Some(socket(address)),
        per_connection_buffer_limit_bytes: Some(UInt32Value {
            value: buffer_limit,
        }),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(filter::ConfigType::TypedConfig(any(&hcm))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    Resource::from_message(l.name.clone(), type_url::LISTENER, &l)
}

/// The listener shared by the pools from Kubernetes: every pool's routing filter is in its
/// chain, off by default; the route of a pool (its path prefix) turns its own one on.
/// Its buffer limit is twice `kubernetes.max_body_bytes`, the body limit of all those pools.
pub fn gateway_listener(k: &KubernetesSource, pools: &[(&PoolSpec, bool)]) -> Resource {
    let mut http_filters = vec![strip_destination()];
    for (pool, with_filter) in pools {
        if *with_filter {
            http_filters.push(routing_filter_slot(&pool.name, true));
        }
    }
    http_filters.push(router());
    http_listener(
        GATEWAY,
        "kvmesh_gateway".into(),
        k.listener,
        k.max_body_bytes.saturating_mul(2),
        GATEWAY,
        http_filters,
    )
}

/// The gateway's routes: `/<namespace>/<name>/...` goes to that pool's cluster with the
/// prefix removed (the model server sees `/v1/...`) and that pool's routing filter on.
pub fn gateway_route(pools: &[(&PoolSpec, bool)]) -> Resource {
    let routes = pools
        .iter()
        .filter_map(|(pool, with_filter)| {
            let prefix = &pool.gateway.as_ref()?.path_prefix;
            let mut action = route_action(pool);
            action.prefix_rewrite = "/".into();
            let mut per_filter = std::collections::HashMap::new();
            if *with_filter {
                // `config` present but an empty Any: Envoy's way to turn a filter that is
                // disabled by default on for this route (no `config` at all is refused).
                let on = FilterConfig {
                    config: Some(Any::default()),
                    disabled: false,
                    ..Default::default()
                };
                per_filter.insert(filter_name(&pool.name), any(&on));
            }
            Some(Route {
                name: pool.name.clone(),
                r#match: Some(RouteMatch {
                    path_specifier: Some(route_match::PathSpecifier::Prefix(format!(
                        "{}/",
                        prefix.trim_end_matches('/')
                    ))),
                    ..Default::default()
                }),
                action: Some(route::Action::Route(action)),
                typed_per_filter_config: per_filter,
                ..Default::default()
            })
        })
        .collect();
    let r = RouteConfiguration {
        name: GATEWAY.into(),
        virtual_hosts: vec![VirtualHost {
            name: "kvmesh-gateway".into(),
            domains: vec!["*".into()],
            routes,
            ..Default::default()
        }],
        ..Default::default()
    };
    Resource::from_message(r.name.clone(), type_url::ROUTE, &r)
}

pub fn listener(pool: &PoolSpec, with_filter: bool) -> Resource {
    let mut http_filters = Vec::new();
    if let Some(probe) = &pool.probe_module {
        let plugin = wasm_plugin("kvmesh.state_probe", probe, "{}");
        http_filters.push(HttpFilter {
            name: "kvmesh.state_probe".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(any(&Wasm {
                config: Some(plugin),
            }))),
            ..Default::default()
        });
    }
    // Clients never pick the destination: drop their header before the
    // routing filter (or its absence) decides.
    http_filters.push(strip_destination());
    if with_filter {
        http_filters.push(routing_filter_slot(&pool.name, false));
    }
    http_filters.push(router());
    http_listener(
        &listener_name(&pool.name),
        format!("kvmesh_{}", pool.name),
        pool.listener,
        buffer_limit(pool),
        &route_name(&pool.name),
        http_filters,
    )
}

/// Where a pool's requests go: its cluster, its timeout, retries that walk to the next
/// host the filter listed. The timeout is an idle one (no byte from the replica for
/// `timeout_ms`), never a bound on the whole response: Envoy's route `timeout` covers
/// the stream to its last byte, so it cut every generation that streamed longer than
/// it, however steadily its tokens came (12 of 120 streams in an overloaded bench run).
/// The model server sends an SSE keep-alive while a stream waits in its queue, so a
/// live replica is never idle that long; a hung one is cut, and so is a non-streamed
/// answer that takes longer. Once the list is spent (or the filter listed none) the
/// fallback balancer picks, and `previous_hosts` keeps it off the hosts already tried:
/// least-request alone would prefer a dead replica, whose count of active requests is 0.
fn route_action(pool: &PoolSpec) -> RouteAction {
    RouteAction {
        cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster_name(
            &pool.name,
        ))),
        // 0 turns the whole-response bound off.
        timeout: Some(duration(Duration::ZERO)),
        idle_timeout: Some(duration(Duration::from_millis(pool.timeout_ms))),
        retry_policy: Some(RetryPolicy {
            retry_on: "connect-failure,refused-stream,reset,retriable-status-codes".into(),
            retriable_status_codes: vec![503],
            num_retries: Some(UInt32Value { value: 2 }),
            retry_host_predicate: vec![retry_policy::RetryHostPredicate {
                name: "envoy.retry_host_predicates.previous_hosts".into(),
                config_type: Some(retry_policy::retry_host_predicate::ConfigType::TypedConfig(
                    any(&PreviousHostsPredicate {}),
                )),
            }],
            host_selection_retry_max_attempts: 3,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Concurrent retries a pool allows, as a share of its active requests, and at least.
///
/// Envoy's default is 3 retries in flight per cluster, and a retry stays in flight for
/// as long as the retried request runs: a generation of seconds. When a replica dies,
/// every request that had picked it is retried on the others at once, so with the
/// default a fourth concurrent one fails outright. Each request still retries at most
/// twice (the route's `num_retries`), so retries can at most triple the load.
const RETRY_BUDGET_PERCENT: f64 = 100.0;
const MIN_RETRY_CONCURRENCY: u32 = 16;

fn circuit_breakers() -> CircuitBreakers {
    CircuitBreakers {
        thresholds: vec![circuit_breakers::Thresholds {
            retry_budget: Some(circuit_breakers::thresholds::RetryBudget {
                budget_percent: Some(Percent {
                    value: RETRY_BUDGET_PERCENT,
                }),
                min_retry_concurrency: Some(UInt32Value {
                    value: MIN_RETRY_CONCURRENCY,
                }),
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

pub fn route(pool: &PoolSpec) -> Resource {
    let r = RouteConfiguration {
        name: route_name(&pool.name),
        virtual_hosts: vec![VirtualHost {
            name: pool.name.clone(),
            domains: vec!["*".into()],
            routes: vec![Route {
                r#match: Some(RouteMatch {
                    path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: Some(route::Action::Route(route_action(pool))),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    Resource::from_message(r.name.clone(), type_url::ROUTE, &r)
}

pub fn cluster(pool: &PoolSpec) -> Resource {
    let override_host = OverrideHost {
        override_host_sources: vec![override_host::OverrideHostSource {
            header: DESTINATION_HEADER.into(),
            ..Default::default()
        }],
        fallback_policy: Some(LoadBalancingPolicy {
            policies: vec![load_balancing_policy::Policy {
                typed_extension_config: Some(TypedExtensionConfig {
                    name: "envoy.load_balancing_policies.least_request".into(),
                    typed_config: Some(any(&LeastRequest::default())),
                }),
            }],
        }),
        ..Default::default()
    };
    let c = Cluster {
        name: cluster_name(&pool.name),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: String::new(),
        }),
        connect_timeout: Some(duration(Duration::from_secs(1))),
        per_connection_buffer_limit_bytes: Some(UInt32Value {
            value: buffer_limit(pool),
        }),
        circuit_breakers: Some(circuit_breakers()),
        load_balancing_policy: Some(LoadBalancingPolicy {
            policies: vec![load_balancing_policy::Policy {
                typed_extension_config: Some(TypedExtensionConfig {
                    name: "envoy.load_balancing_policies.override_host".into(),
                    typed_config: Some(any(&override_host)),
                }),
            }],
        }),
        ..Default::default()
    };
    Resource::from_message(c.name.clone(), type_url::CLUSTER, &c)
}

/// A pool's EDS members: `host:port` addresses of its live replicas.
pub fn endpoints(pool: &str, members: &[SocketAddr]) -> Resource {
    let cla = ClusterLoadAssignment {
        cluster_name: cluster_name(pool),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: members
                .iter()
                .map(|a| LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(socket(*a)),
                        ..Default::default()
                    })),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    };
    Resource::from_message(cla.cluster_name.clone(), type_url::ENDPOINT, &cla)
}

/// The ECDS resource of a pool's routing filter: the wasm module (a local,
/// content-addressed file) and the filter's JSON configuration.
pub fn routing_filter(pool: &str, module_path: &str, configuration_json: &str) -> Resource {
    let plugin = wasm_plugin(&filter_name(pool), module_path, configuration_json);
    let wasm = Wasm {
        config: Some(plugin),
    };
    let tec = TypedExtensionConfig {
        name: filter_name(pool),
        typed_config: Some(any(&wasm)),
    };
    Resource::from_message(tec.name.clone(), type_url::EXTENSION_CONFIG, &tec)
}

fn wasm_plugin(name: &str, module_path: &str, configuration_json: &str) -> PluginConfig {
    PluginConfig {
        name: name.to_owned(),
        root_id: "kvmesh".into(),
        configuration: Some(any(&StringValue {
            value: configuration_json.to_owned(),
        })),
        failure_policy: envoy_types::pb::envoy::extensions::wasm::v3::FailurePolicy::FailReload
            as i32,
        allow_on_headers_stop_iteration: Some(BoolValue { value: true }),
        vm: Some(plugin_config::Vm::VmConfig(VmConfig {
            vm_id: VM_ID.into(),
            runtime: "envoy.wasm.runtime.v8".into(),
            code: Some(AsyncDataSource {
                specifier: Some(async_data_source::Specifier::Local(DataSource {
                    specifier: Some(data_source::Specifier::Filename(module_path.to_owned())),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(op, status, type, code, message)` of each mapper, in order.
    type Row = (String, u64, String, Option<String>, String);

    fn rows_of_yaml(mappers: &serde_yaml::Value) -> Vec<Row> {
        let seq = mappers.as_sequence().expect("mappers");
        seq.iter()
            .map(|m| {
                let cmp = &m["filter"]["status_code_filter"]["comparison"];
                let e = &m["body_format_override"]["json_format"]["error"];
                assert!(e["param"].is_null());
                (
                    cmp["op"].as_str().expect("op").to_owned(),
                    cmp["value"]["default_value"].as_u64().expect("status"),
                    e["type"].as_str().expect("type").to_owned(),
                    e["code"].as_str().map(str::to_owned),
                    e["message"].as_str().expect("message").to_owned(),
                )
            })
            .collect()
    }

    fn rows_of(config: &LocalReplyConfig) -> Vec<Row> {
        let text = |v: &Value| match &v.kind {
            Some(value::Kind::StringValue(s)) => Some(s.clone()),
            Some(value::Kind::NullValue(_)) => None,
            other => panic!("unexpected value {other:?}"),
        };
        config
            .mappers
            .iter()
            .map(|m| {
                let Some(access_log_filter::FilterSpecifier::StatusCodeFilter(f)) =
                    m.filter.as_ref().and_then(|f| f.filter_specifier.as_ref())
                else {
                    panic!("not a status filter: {m:?}")
                };
                let cmp = f.comparison.as_ref().expect("comparison");
                let op = comparison_filter::Op::try_from(cmp.op).expect("op");
                let Some(substitution_format_string::Format::JsonFormat(body)) = m
                    .body_format_override
                    .as_ref()
                    .and_then(|b| b.format.as_ref())
                else {
                    panic!("not a JSON body: {m:?}")
                };
                let Some(value::Kind::StructValue(e)) =
                    body.fields.get("error").and_then(|v| v.kind.as_ref())
                else {
                    panic!("no error object: {body:?}")
                };
                assert_eq!(text(&e.fields["param"]), None);
                (
                    op.as_str_name().to_owned(),
                    u64::from(cmp.value.as_ref().expect("value").default_value),
                    text(&e.fields["type"]).expect("type"),
                    text(&e.fields["code"]),
                    text(&e.fields["message"]).expect("message"),
                )
            })
            .collect()
    }

    #[test]
    fn static_configs_answer_envoys_errors_as_the_control_plane_does() {
        let ours = rows_of(&local_reply_config());
        // Errors only, and the catch-alls last: a mapper's order is its precedence.
        assert!(ours.iter().all(|r| r.1 >= 400));
        assert_eq!(
            ours.iter()
                .rev()
                .take(2)
                .map(|r| (r.0.as_str(), r.1))
                .collect::<Vec<_>>(),
            [("GE", 400), ("GE", 500)]
        );
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../envoy/static");
        let mut seen = 0;
        for entry in std::fs::read_dir(&root).expect("envoy/static") {
            let path = entry.expect("entry").path();
            let text = std::fs::read_to_string(&path).expect("read");
            let yaml: serde_yaml::Value = serde_yaml::from_str(&text).expect("yaml");
            let hcm = &yaml["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
            let theirs = rows_of_yaml(&hcm["local_reply_config"]["mappers"]);
            assert_eq!(theirs, ours, "{}", path.display());
            seen += 1;
        }
        assert_eq!(seen, 3);
    }
}
