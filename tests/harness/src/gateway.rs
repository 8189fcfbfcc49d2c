//! The committed static gateway configs (envoy/static/*.yaml), re-pointed at
//! test upstreams and ephemeral ports. Tests run the very files users run.

use anyhow::{Context, bail};
use serde_yaml_ng::Value;

use crate::envoy::{plugin_path, workspace_root};

/// A committed static config, patched for a test.
#[derive(Debug, Clone)]
pub struct StaticGateway {
    doc: Value,
}

impl StaticGateway {
    /// Loads `envoy/static/<strategy>.yaml`.
    pub fn load(strategy: &str) -> anyhow::Result<Self> {
        let path = workspace_root().join(format!("envoy/static/{strategy}.yaml"));
        let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
        let mut doc: Value = serde_yaml_ng::from_str(&text)?;
        // Ephemeral admin and listener ports.
        doc["admin"]["address"]["socket_address"]["port_value"] = 0.into();
        doc["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] =
            0.into();
        let mut g = StaticGateway { doc };
        let wasm = plugin_path(strategy)?;
        g.wasm_config()?["vm_config"]["code"]["local"]["filename"] =
            wasm.display().to_string().into();
        Ok(g)
    }

    fn wasm_config(&mut self) -> anyhow::Result<&mut Value> {
        let filters = self.doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]
            [0]["typed_config"]["http_filters"]
            .as_sequence_mut()
            .context("http_filters")?;
        for f in filters {
            if f["name"] == "kvmesh.routing" {
                return Ok(&mut f["typed_config"]["config"]);
            }
        }
        bail!("no kvmesh.routing filter")
    }

    /// The filter's JSON configuration as committed.
    pub fn filter_config(&mut self) -> anyhow::Result<serde_json::Value> {
        let text = self.wasm_config()?["configuration"]["value"]
            .as_str()
            .context("configuration value")?
            .to_owned();
        Ok(serde_json::from_str(&text)?)
    }

    /// Replaces the filter's JSON configuration.
    pub fn set_filter_config(&mut self, config: &serde_json::Value) -> anyhow::Result<&mut Self> {
        self.wasm_config()?["configuration"]["value"] = config.to_string().into();
        Ok(self)
    }

    /// Points the pool cluster at `addrs` (and the filter's static replicas
    /// at the same addresses, keeping the rest of its configuration).
    pub fn set_upstreams(&mut self, addrs: &[&str]) -> anyhow::Result<&mut Self> {
        let endpoints: Vec<Value> = addrs
            .iter()
            .map(|a| {
                let (host, port) = a.rsplit_once(':').unwrap_or((a, "0"));
                let port: u64 = port.parse().unwrap_or(0);
                serde_yaml_ng::from_str(&format!(
                    "endpoint: {{address: {{socket_address: {{address: {host}, port_value: {port}}}}}}}"
                ))
                .unwrap_or(Value::Null)
            })
            .collect();
        let cluster = &mut self.doc["static_resources"]["clusters"][0];
        cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = Value::Sequence(endpoints);
        let mut cfg = self.filter_config()?;
        cfg["replicas"] = addrs
            .iter()
            .map(|a| serde_json::json!({"address": a}))
            .collect();
        self.set_filter_config(&cfg)
    }

    /// Removes the routing filter and the header mutation before it: plain
    /// Envoy with the same listener, route and cluster (the baseline of the
    /// overhead benchmark).
    pub fn without_routing(&mut self) -> anyhow::Result<&mut Self> {
        let filters = self.doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]
            [0]["typed_config"]["http_filters"]
            .as_sequence_mut()
            .context("http_filters")?;
        filters.retain(|f| f["name"] == "envoy.filters.http.router");
        Ok(self)
    }

    /// The YAML to start Envoy with.
    pub fn render(&self) -> anyhow::Result<String> {
        Ok(serde_yaml_ng::to_string(&self.doc)?)
    }
}
