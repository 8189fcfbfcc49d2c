//! Runs proxy-wasm (ABI 0.2.1) modules outside Envoy, on wasmtime, and
//! records what they do.
//!
//! A [`Host`] compiles modules ([`Host::load`]) and starts plugin instances
//! ([`Host::start`]); each [`Plugin`] is one VM with its root context, like one
//! Envoy worker's copy of a filter. Instances started with the same `vm_id`
//! share data, queues and metrics ([`SharedVm`]) the way Envoy's workers do.
//!
//! ```no_run
//! use kvmesh_host_runtime::{Host, HttpRequest, PluginConfig};
//! # fn main() -> Result<(), kvmesh_host_runtime::HostError> {
//! let host = Host::new()?;
//! let module = host.load_file("target/plugins/round-robin.wasm")?;
//! let mut plugin = host.start(&module, PluginConfig::new("kvmesh", br#"{}"#))?;
//! let out = plugin.send(HttpRequest::post_json("/v1/completions", br#"{"prompt":"hi"}"#))?;
//! println!("{:?}", out.request_headers.get("x-gateway-destination-endpoint"));
//! # Ok(()) }
//! ```
//!
//! Everything the host cannot honour is answered with a proxy-wasm status
//! (foreign functions: `NotFound`, plus a log line); a trap, a missing
//! import or a module of another ABI is a [`HostError`], never a panic.
//! Time is virtual: [`Plugin::advance`] moves the clock and fires due ticks.

mod abi;
mod plugin;
mod shared;
mod types;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

pub use plugin::{Plugin, PluginConfig};
pub use shared::{MetricKind, MetricValue, SharedVm};
pub use types::{
    Action, GrpcCallout, Headers, HttpCallout, HttpRequest, HttpResponse, LocalResponse, LogEntry,
    Outcome, RequestState, Status,
};

/// Why the host could not load or run a plugin.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The engine could not be set up.
    #[error("wasm engine: {0}")]
    Engine(String),
    /// The module file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid wasm, or wasm that does not compile.
    #[error("invalid wasm module: {0}")]
    Compile(String),
    /// Valid wasm that is not a proxy-wasm 0.2.1 module, or imports what the
    /// host does not provide.
    #[error("not a usable proxy-wasm module: {0}")]
    BadModule(String),
    /// The plugin trapped (a panic, `unreachable`, out-of-bounds access...).
    #[error("plugin trapped in {callback}: {message}")]
    Trap {
        /// The callback that was running.
        callback: &'static str,
        /// wasmtime's description, with the wasm backtrace.
        message: String,
    },
    /// An earlier trap left this VM unusable (Envoy would reload it).
    #[error("plugin VM is unusable: it trapped earlier in {0}")]
    Poisoned(&'static str),
    /// `proxy_on_vm_start` or `proxy_on_configure` returned false.
    #[error("plugin rejected its {0} configuration")]
    Rejected(&'static str),
    /// The test referred to a stream, callout or context that does not exist.
    #[error("no such {0}")]
    Unknown(String),
}

/// The `vm_id` groups of one host: each holds the state its VMs share.
#[derive(Debug, Default)]
pub struct Registry {
    vms: Mutex<HashMap<String, Arc<SharedVm>>>,
}

impl Registry {
    /// The shared state of `vm_id`, created on first use.
    pub fn vm(&self, vm_id: &str) -> Arc<SharedVm> {
        let mut vms = self.vms.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(vms.entry(vm_id.to_owned()).or_default())
    }
}

/// A wasmtime engine with the proxy-wasm imports, and the `vm_id` groups.
#[derive(Clone)]
pub struct Host {
    engine: wasmtime::Engine,
    linker: Arc<wasmtime::Linker<abi::Ctx>>,
    registry: Arc<Registry>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

/// A compiled proxy-wasm module, ready to start instances of.
#[derive(Clone)]
pub struct Module {
    pre: wasmtime::InstancePre<abi::Ctx>,
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Module").finish_non_exhaustive()
    }
}

// === impl Host ===

impl Host {
    /// A host with its own engine and `vm_id` groups.
    pub fn new() -> Result<Self, HostError> {
        let engine = wasmtime::Engine::new(&wasmtime::Config::new())
            .map_err(|e| HostError::Engine(format!("{e:#}")))?;
        let mut linker = wasmtime::Linker::new(&engine);
        abi::add_to_linker(&mut linker).map_err(|e| HostError::Engine(format!("{e:#}")))?;
        Ok(Self {
            engine,
            linker: Arc::new(linker),
            registry: Arc::new(Registry::default()),
        })
    }

    /// Compiles a module and checks that it is a proxy-wasm 0.2.1 module
    /// whose imports the host provides.
    pub fn load(&self, wasm: &[u8]) -> Result<Module, HostError> {
        let module = wasmtime::Module::new(&self.engine, wasm)
            .map_err(|e| HostError::Compile(format!("{e:#}")))?;
        if module.get_export("proxy_abi_version_0_2_1").is_none() {
            let abi: Vec<_> = module
                .exports()
                .map(|e| e.name())
                .filter(|n| n.starts_with("proxy_abi_version_"))
                .collect();
            return Err(HostError::BadModule(format!(
                "it does not export proxy_abi_version_0_2_1 (ABI exports found: {abi:?})"
            )));
        }
        let pre = self
            .linker
            .instantiate_pre(&module)
            .map_err(|e| HostError::BadModule(format!("{e:#}")))?;
        Ok(Module { pre })
    }

    /// Reads and compiles a `.wasm` file.
    pub fn load_file(&self, path: impl AsRef<Path>) -> Result<Module, HostError> {
        let path = path.as_ref();
        let wasm = std::fs::read(path).map_err(|source| HostError::Read {
            path: path.display().to_string(),
            source,
        })?;
        self.load(&wasm)
    }

    /// Starts one VM of `module`: creates its root context, then runs
    /// `proxy_on_vm_start` and `proxy_on_configure`.
    pub fn start(&self, module: &Module, config: PluginConfig) -> Result<Plugin, HostError> {
        Plugin::start(self, module, config)
    }

    /// The state shared by the VMs of `vm_id` (shared data, queues, metrics).
    pub fn vm(&self, vm_id: &str) -> Arc<SharedVm> {
        self.registry.vm(vm_id)
    }
}

/// Where `scripts/build-plugins.sh` puts the modules: `$KVMESH_PLUGIN_DIR`, or
/// `target/plugins` of this workspace.
pub fn plugin_dir() -> std::path::PathBuf {
    match std::env::var_os("KVMESH_PLUGIN_DIR") {
        Some(dir) => dir.into(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/plugins"),
    }
}

/// The path of `target/plugins/<name>.wasm`, or an error that says how to
/// build it.
pub fn locate_plugin(name: &str) -> Result<std::path::PathBuf, HostError> {
    let path = plugin_dir().join(format!("{name}.wasm"));
    if path.is_file() {
        Ok(path)
    } else {
        Err(HostError::Read {
            path: path.display().to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "module missing: run scripts/build-plugins.sh (scripts/test.sh does) first",
            ),
        })
    }
}
