//! proxy-wasm adapter of the probe; only `Result`-returning hostcalls.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use kvmesh_plugins_sdk::snapshot::Snapshot;
use kvmesh_plugins_sdk::state::StateReader;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType};

const VM_COUNTER: &str = "kvmesh.probe/next_vm";

#[derive(Default)]
struct VmState {
    vm: u64,
    readers: HashMap<String, StateReader>,
}

/// Takes the next VM id from shared data (compare-and-swap).
fn claim_vm_id() -> u64 {
    for _ in 0..64 {
        let Ok((value, cas)) = hostcalls::get_shared_data(VM_COUNTER) else {
            return 0;
        };
        let current = value
            .and_then(|v| v.try_into().ok())
            .map_or(0, u64::from_le_bytes);
        let next = current + 1;
        if hostcalls::set_shared_data(VM_COUNTER, Some(&next.to_le_bytes()), cas).is_ok() {
            return next;
        }
    }
    0
}

struct Root(Rc<RefCell<VmState>>);

impl Context for Root {}

impl RootContext for Root {
    fn on_vm_start(&mut self, _: usize) -> bool {
        self.0.borrow_mut().vm = claim_vm_id();
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Probe(self.0.clone())))
    }
}

struct Probe(Rc<RefCell<VmState>>);

impl Context for Probe {}

impl HttpContext for Probe {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let Ok(Some(path)) = hostcalls::get_map_value(MapType::HttpRequestHeaders, ":path") else {
            return Action::Continue;
        };
        let Some(pool) = crate::pool_of(&path) else {
            return Action::Continue;
        };
        let mut state = self.0.borrow_mut();
        let vm = state.vm;
        let reader = state
            .readers
            .entry(pool.to_owned())
            .or_insert_with(|| StateReader::new(pool, Snapshot::new("", 256)));
        let get = |key: &str| hostcalls::get_shared_data(key).ok().and_then(|(v, _)| v);
        let (status, body) = match reader.refresh(get) {
            Ok(_) => (200, crate::describe(vm, reader.seq(), reader.snapshot())),
            Err(e) => (500, format!("{{\"error\": \"{e}\"}}")),
        };
        let seq = reader.seq().to_string();
        let vm = vm.to_string();
        let headers = vec![
            ("content-type", "application/json"),
            ("x-kvmesh-seq", seq.as_str()),
            ("x-kvmesh-vm", vm.as_str()),
        ];
        if let Err(e) = hostcalls::send_http_response(status, headers, Some(body.as_bytes())) {
            let _ = hostcalls::log(
                LogLevel::Warn,
                &format!("kvmesh probe: send_http_response: {e:?}"),
            );
            return Action::Continue;
        }
        Action::Pause
    }
}

// SAFETY: `proxy_wasm::main!` only emits the `#[no_mangle] _initialize`
// entry point the proxy-wasm ABI requires; no unsafe code of ours.
#[allow(unsafe_code)]
mod entry {
    proxy_wasm::main! {{
        proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
        proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> {
            Box::new(super::Root(Default::default()))
        });
    }}
}
