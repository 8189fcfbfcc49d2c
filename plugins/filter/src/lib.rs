//! The proxy-wasm HTTP filter every kvmesh strategy shares. A strategy crate
//! only names its [`Policy`]; this crate maps Envoy's callbacks onto it:
//!
//! 1. request headers: note the API from `:path`; pause (the body is needed);
//! 2. request body: pause until end of stream, then parse and hash the prompt,
//!    bring the pool view up to date from shared data, `select`, and write
//!    `x-gateway-destination-endpoint: primary,fallback,...` (always
//!    replacing what the client sent); for a strategy that shares its
//!    placements, read the placement board first and publish the decision
//!    on it when the policy shares it (a new prefix's placement; for
//!    prefix-aware also a request mostly its own) (`kvmesh_plugins_sdk::board`);
//! 3. response headers: add `x-kvmesh-decision` describing the decision;
//! 4. log: tell the policy the request finished.
//!
//! Nothing here panics on input: a body that is not JSON, has no prompt, is
//! not UTF-8 or is over `max_body_bytes` is still routed (by the strategy's
//! no-prompt path) and counted. Host calls use the `Result`-returning forms.

mod board;
mod config;
mod filter;
mod metrics;

pub use config::{DEFAULT_MAX_BODY_BYTES, FilterConfig, StaticReplica};
pub use filter::{DECISION_HEADER, ENDPOINT_HEADER, Root};

use kvmesh_plugins_sdk::policy::Policy;
#[doc(hidden)]
pub use proxy_wasm;

/// Registers a strategy as this module's root context. `make` builds the
/// policy from the `strategy` parameters of the plugin configuration.
///
/// ```text
/// kvmesh_plugins_filter::export_strategy!(|params| {
///     PrefixAware::new(parse_params("prefix-aware", params)?)
/// });
/// ```
#[macro_export]
macro_rules! export_strategy {
    ($make:expr) => {
        $crate::proxy_wasm::main! {{
            $crate::proxy_wasm::set_log_level($crate::proxy_wasm::types::LogLevel::Info);
            $crate::proxy_wasm::set_root_context(|_| Box::new($crate::Root::new($make)));
        }}
    };
}

/// Builds a policy from strategy parameters.
pub type MakePolicy<P> =
    fn(&serde_json::Value) -> Result<P, kvmesh_plugins_sdk::policy::ConfigError>;

#[doc(hidden)]
pub fn _assert_policy<P: Policy>() {}
