//! One VM of a plugin: its lifecycle, and the driver that walks HTTP streams,
//! ticks, queue notifications and callout answers through its callbacks.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use wasmtime::{Store, TypedFunc, WasmParams, WasmResults};
use wasmtime_wasi::WasiCtxBuilder;

use crate::abi::{CallData, Ctx, StreamState};
use crate::types::{
    Action, GrpcCallout, Headers, HttpCallout, HttpRequest, HttpResponse, LogEntry, Outcome,
    RequestState,
};
use crate::{Host, HostError, Module};

static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

/// How to start a plugin VM: what Envoy's `Wasm` filter config carries.
#[derive(Debug, Clone)]
pub struct PluginConfig {
    /// VMs with the same id share data, queues and metrics.
    pub vm_id: String,
    /// The plugin's root id (property `plugin_root_id`).
    pub root_id: String,
    /// `vm_config.configuration`, given to `proxy_on_vm_start`.
    pub vm_configuration: Vec<u8>,
    /// `configuration`, given to `proxy_on_configure`.
    pub configuration: Vec<u8>,
    /// Extra properties, by dotted path (`"xds.cluster_name"`).
    pub properties: Vec<(String, Vec<u8>)>,
    /// Clusters callouts may target; `None` accepts any name.
    pub clusters: Option<Vec<String>>,
    /// Initial virtual time, nanoseconds since the epoch.
    pub start_ns: u64,
}

impl PluginConfig {
    /// A config with this `vm_id` and plugin configuration.
    pub fn new(vm_id: &str, configuration: &[u8]) -> Self {
        Self {
            vm_id: vm_id.to_owned(),
            root_id: String::new(),
            vm_configuration: Vec::new(),
            configuration: configuration.to_vec(),
            properties: Vec::new(),
            clusters: None,
            start_ns: 1_700_000_000_000_000_000,
        }
    }

    /// Sets the root id.
    pub fn root_id(mut self, root_id: &str) -> Self {
        self.root_id = root_id.to_owned();
        self
    }

    /// Sets the VM configuration.
    pub fn vm_configuration(mut self, bytes: &[u8]) -> Self {
        self.vm_configuration = bytes.to_vec();
        self
    }

    /// Adds a property.
    pub fn property(mut self, path: &str, value: &[u8]) -> Self {
        self.properties.push((path.to_owned(), value.to_vec()));
        self
    }

    /// Restricts callouts to these clusters (others get `BadArgument`).
    pub fn clusters(mut self, clusters: &[&str]) -> Self {
        self.clusters = Some(clusters.iter().map(|c| (*c).to_owned()).collect());
        self
    }
}

type F<P, R> = Option<TypedFunc<P, R>>;

/// The module's exported callbacks; a missing one behaves as the SDK default.
struct Callbacks {
    context_create: F<(u32, u32), ()>,
    vm_start: F<(u32, u32), u32>,
    configure: F<(u32, u32), u32>,
    tick: F<u32, ()>,
    queue_ready: F<(u32, u32), ()>,
    done: F<u32, u32>,
    log: F<u32, ()>,
    delete: F<u32, ()>,
    request_headers: F<(u32, u32, u32), u32>,
    request_body: F<(u32, u32, u32), u32>,
    request_trailers: F<(u32, u32), u32>,
    response_headers: F<(u32, u32, u32), u32>,
    response_body: F<(u32, u32, u32), u32>,
    response_trailers: F<(u32, u32), u32>,
    http_call_response: F<(u32, u32, u32, u32, u32), ()>,
    grpc_initial_metadata: F<(u32, u32, u32), ()>,
    grpc_receive: F<(u32, u32, u32), ()>,
    grpc_trailing_metadata: F<(u32, u32, u32), ()>,
    grpc_close: F<(u32, u32, u32), ()>,
}

/// One running VM of a plugin (one Envoy worker's copy).
pub struct Plugin {
    store: Store<Ctx>,
    cb: Callbacks,
    poisoned: Option<&'static str>,
    next_context: u32,
    driver: HashMap<u32, Meta>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("vm_id", &self.store.data().vm_id)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

/// Which half of a stream a body belongs to.
#[derive(Clone, Copy)]
enum Half {
    Request,
    Response,
}

// === impl Plugin ===

impl Plugin {
    pub(crate) fn start(
        host: &Host,
        module: &Module,
        config: PluginConfig,
    ) -> Result<Self, HostError> {
        let root_id = 1;
        let mut properties = HashMap::new();
        properties.insert(
            "plugin_root_id".to_owned(),
            config.root_id.clone().into_bytes(),
        );
        properties.insert(
            "plugin_name".to_owned(),
            config.root_id.clone().into_bytes(),
        );
        properties.insert("plugin_vm_id".to_owned(), config.vm_id.clone().into_bytes());
        for (k, v) in &config.properties {
            properties.insert(k.clone(), v.clone());
        }
        let ctx = Ctx {
            wasi: WasiCtxBuilder::new().build_p1(),
            registry: host.registry.clone(),
            vm: host.registry.vm(&config.vm_id),
            vm_id: config.vm_id.clone(),
            instance_id: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
            memory: None,
            alloc: None,
            root_id,
            effective: root_id,
            vm_configuration: config.vm_configuration,
            configuration: config.configuration,
            properties,
            clusters: config.clusters,
            streams: HashMap::new(),
            call: None,
            http_callouts: BTreeMap::new(),
            grpc_callouts: BTreeMap::new(),
            next_token: 0,
            now_ns: config.start_ns,
            tick_period_ms: 0,
            next_tick_ns: None,
            log_level: 0,
            logs: Vec::new(),
            refused_foreign: Vec::new(),
            done: false,
        };
        let mut store = Store::new(&host.engine, ctx);
        let instance = module
            .pre
            .instantiate(&mut store)
            .map_err(|e| HostError::BadModule(format!("instantiation failed: {e:#}")))?;
        let memory = instance.get_memory(&mut store, "memory").ok_or_else(|| {
            HostError::BadModule("it exports no memory named \"memory\"".to_owned())
        })?;
        let alloc = instance
            .get_typed_func::<u32, u32>(&mut store, "proxy_on_memory_allocate")
            .or_else(|_| instance.get_typed_func::<u32, u32>(&mut store, "malloc"))
            .map_err(|_| {
                HostError::BadModule("it exports no proxy_on_memory_allocate nor malloc".to_owned())
            })?;
        store.data_mut().memory = Some(memory);
        store.data_mut().alloc = Some(alloc);

        macro_rules! func {
            ($name:literal) => {
                match instance.get_func(&mut store, $name) {
                    None => None,
                    Some(f) => Some(f.typed(&store).map_err(|e| {
                        HostError::BadModule(format!("{} has the wrong signature: {e:#}", $name))
                    })?),
                }
            };
        }
        let init: F<(), ()> = func!("_initialize");
        let start: F<(), ()> = func!("_start");
        let cb = Callbacks {
            context_create: func!("proxy_on_context_create"),
            vm_start: func!("proxy_on_vm_start"),
            configure: func!("proxy_on_configure"),
            tick: func!("proxy_on_tick"),
            queue_ready: func!("proxy_on_queue_ready"),
            done: func!("proxy_on_done"),
            log: func!("proxy_on_log"),
            delete: func!("proxy_on_delete"),
            request_headers: func!("proxy_on_request_headers"),
            request_body: func!("proxy_on_request_body"),
            request_trailers: func!("proxy_on_request_trailers"),
            response_headers: func!("proxy_on_response_headers"),
            response_body: func!("proxy_on_response_body"),
            response_trailers: func!("proxy_on_response_trailers"),
            http_call_response: func!("proxy_on_http_call_response"),
            grpc_initial_metadata: func!("proxy_on_grpc_receive_initial_metadata"),
            grpc_receive: func!("proxy_on_grpc_receive"),
            grpc_trailing_metadata: func!("proxy_on_grpc_receive_trailing_metadata"),
            grpc_close: func!("proxy_on_grpc_close"),
        };
        let mut plugin = Self {
            store,
            cb,
            poisoned: None,
            next_context: root_id + 1,
            driver: HashMap::new(),
        };
        if init.is_some() {
            plugin.invoke("_initialize", init, ())?;
        } else if start.is_some() {
            plugin.invoke("_start", start, ())?;
        }
        plugin.invoke(
            "proxy_on_context_create",
            plugin.cb.context_create.clone(),
            (root_id, 0),
        )?;
        let size = plugin.store.data().vm_configuration.len() as u32;
        if plugin.invoke(
            "proxy_on_vm_start",
            plugin.cb.vm_start.clone(),
            (root_id, size),
        )? == Some(0)
        {
            return Err(HostError::Rejected("VM"));
        }
        let size = plugin.store.data().configuration.len() as u32;
        if plugin.invoke(
            "proxy_on_configure",
            plugin.cb.configure.clone(),
            (root_id, size),
        )? == Some(0)
        {
            return Err(HostError::Rejected("plugin"));
        }
        plugin.poll()?;
        Ok(plugin)
    }

    /// Calls one export; a trap poisons the VM and becomes an error.
    fn invoke<P: WasmParams, R: WasmResults>(
        &mut self,
        callback: &'static str,
        f: F<P, R>,
        params: P,
    ) -> Result<Option<R>, HostError> {
        if let Some(earlier) = self.poisoned {
            return Err(HostError::Poisoned(earlier));
        }
        let Some(f) = f else { return Ok(None) };
        match f.call(&mut self.store, params) {
            Ok(r) => Ok(Some(r)),
            Err(e) => {
                self.poisoned = Some(callback);
                Err(HostError::Trap {
                    callback,
                    message: format!("{e:?}"),
                })
            }
        }
    }

    fn effective(&mut self, id: u32) {
        self.store.data_mut().effective = id;
    }

    /// Runs `proxy_on_configure` again with new plugin configuration (what a
    /// config-only ECDS update does); `Rejected` when the plugin refuses it.
    pub fn configure(&mut self, configuration: &[u8]) -> Result<(), HostError> {
        let root = self.store.data().root_id;
        self.store.data_mut().configuration = configuration.to_vec();
        self.effective(root);
        let size = configuration.len() as u32;
        if self.invoke(
            "proxy_on_configure",
            self.cb.configure.clone(),
            (root, size),
        )? == Some(0)
        {
            return Err(HostError::Rejected("plugin"));
        }
        self.poll()
    }

    /// Delivers pending queue-ready notifications for queues this VM
    /// registered (an enqueue from any VM of the `vm_id` posts one).
    pub fn poll(&mut self) -> Result<(), HostError> {
        let (vm, instance) = {
            let d = self.store.data();
            (d.vm.clone(), d.instance_id)
        };
        while let Some((context, queue)) = vm.next_ready(instance) {
            self.effective(context);
            self.invoke(
                "proxy_on_queue_ready",
                self.cb.queue_ready.clone(),
                (context, queue),
            )?;
        }
        Ok(())
    }

    /// The virtual clock, nanoseconds since the epoch.
    pub fn now_ns(&self) -> u64 {
        self.store.data().now_ns
    }

    /// The tick period the plugin asked for (0: none).
    pub fn tick_period(&self) -> Duration {
        Duration::from_millis(u64::from(self.store.data().tick_period_ms))
    }

    /// Moves the virtual clock forward and fires the tick if one is due. Like
    /// Envoy's re-armed timer, a long jump fires one tick, not one per period.
    pub fn advance(&mut self, by: Duration) -> Result<(), HostError> {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        let now = self.store.data().now_ns.saturating_add(by);
        self.store.data_mut().now_ns = now;
        if let Some(due) = self.store.data().next_tick_ns
            && due <= now
        {
            self.tick()?;
        }
        self.poll()
    }

    /// Fires `proxy_on_tick` now and re-arms the timer.
    pub fn tick(&mut self) -> Result<(), HostError> {
        let root = self.store.data().root_id;
        let d = self.store.data_mut();
        d.next_tick_ns =
            (d.tick_period_ms > 0).then(|| d.now_ns + u64::from(d.tick_period_ms) * 1_000_000);
        self.effective(root);
        self.invoke("proxy_on_tick", self.cb.tick.clone(), root)?;
        self.poll()
    }

    /// Sends one request through the request callbacks, replays `200 {}` as
    /// the upstream response when it was forwarded, and ends the stream.
    pub fn send(&mut self, request: HttpRequest) -> Result<Outcome, HostError> {
        let id = self.begin(request)?;
        self.finish(id, Some(HttpResponse::new(200, b"{}")))
    }

    /// Creates a stream and runs its request callbacks (headers, each body
    /// frame, trailers). The stream stays open: answer callouts, then
    /// [`Plugin::finish`] it.
    pub fn begin(&mut self, request: HttpRequest) -> Result<u32, HostError> {
        let id = self.next_context;
        self.next_context += 1;
        let root = self.store.data().root_id;
        let HttpRequest {
            headers,
            body_chunks,
            trailers,
        } = request;
        let n_headers = headers.len() as u32;
        let n_trailers = trailers.len() as u32;
        let has_trailers = !trailers.is_empty();
        self.store.data_mut().streams.insert(
            id,
            StreamState {
                request_headers: headers,
                request_trailers: trailers,
                ..StreamState::default()
            },
        );
        self.metas().insert(id, Meta::default());
        self.effective(id);
        self.invoke(
            "proxy_on_context_create",
            self.cb.context_create.clone(),
            (id, root),
        )?;
        let eos = body_chunks.is_empty() && !has_trailers;
        let action = self.invoke(
            "proxy_on_request_headers",
            self.cb.request_headers.clone(),
            (id, n_headers, u32::from(eos)),
        )?;
        self.after(id, "on_request_headers", action, Half::Request);
        let last = body_chunks.len();
        for (i, chunk) in body_chunks.into_iter().enumerate() {
            if self.stopped(id) {
                break;
            }
            let eos = i + 1 == last && !has_trailers;
            let size = {
                let s = self.stream(id)?;
                s.request_body.extend_from_slice(&chunk);
                s.request_body.len() as u32
            };
            self.effective(id);
            let action = self.invoke(
                "proxy_on_request_body",
                self.cb.request_body.clone(),
                (id, size, u32::from(eos)),
            )?;
            self.after(id, "on_request_body", action, Half::Request);
        }
        if has_trailers && !self.stopped(id) {
            self.effective(id);
            let action = self.invoke(
                "proxy_on_request_trailers",
                self.cb.request_trailers.clone(),
                (id, n_trailers),
            )?;
            self.after(id, "on_request_trailers", action, Half::Request);
        }
        self.poll()?;
        Ok(id)
    }

    /// Where a stream begun with [`Plugin::begin`] stands now.
    pub fn request_state(&mut self, id: u32) -> Result<RequestState, HostError> {
        self.take_continue(id, Half::Request);
        let s = self
            .store
            .data()
            .streams
            .get(&id)
            .ok_or_else(|| unknown_stream(id))?;
        let meta = self.meta(id);
        Ok(if s.local_response.is_some() {
            RequestState::LocalResponse
        } else if s.closed {
            RequestState::Closed
        } else if meta.request_paused {
            RequestState::Paused
        } else {
            RequestState::Forwarded
        })
    }

    /// The request headers of an open stream as they stand now (what would
    /// go upstream once it is forwarded).
    pub fn request_headers(&self, id: u32) -> Option<&Headers> {
        self.store
            .data()
            .streams
            .get(&id)
            .map(|s| &s.request_headers)
    }

    /// Ends a stream: replays `response` through the response callbacks if
    /// the request was forwarded, then runs done, log and delete.
    pub fn finish(
        &mut self,
        id: u32,
        response: Option<HttpResponse>,
    ) -> Result<Outcome, HostError> {
        let state = self.request_state(id)?;
        if state == RequestState::Forwarded {
            let rest = std::mem::take(&mut self.stream(id)?.request_body);
            self.meta_mut(id).forwarded_request.extend(rest);
        }
        if let (RequestState::Forwarded, Some(resp)) = (state, response) {
            self.respond(id, resp)?;
        }
        self.effective(id);
        self.invoke("proxy_on_done", self.cb.done.clone(), id)?;
        self.invoke("proxy_on_log", self.cb.log.clone(), id)?;
        self.invoke("proxy_on_delete", self.cb.delete.clone(), id)?;
        let root = self.store.data().root_id;
        self.effective(root);
        let s = self
            .store
            .data_mut()
            .streams
            .remove(&id)
            .ok_or_else(|| unknown_stream(id))?;
        let meta = self.metas().remove(&id).unwrap_or_default();
        self.poll()?;
        let mut response_body = meta.forwarded_response;
        response_body.extend(s.response_body);
        Ok(Outcome {
            context_id: id,
            state,
            request_headers: s.request_headers,
            request_body: meta.forwarded_request,
            request_trailers: s.request_trailers,
            response_headers: s.response_headers,
            response_body,
            local_response: s.local_response,
            actions: meta.actions,
        })
    }

    fn respond(&mut self, id: u32, resp: HttpResponse) -> Result<(), HostError> {
        let HttpResponse {
            headers,
            body_chunks,
            trailers,
        } = resp;
        let n_headers = headers.len() as u32;
        let n_trailers = trailers.len() as u32;
        let has_trailers = !trailers.is_empty();
        {
            let s = self.stream(id)?;
            s.response_headers = headers;
            s.response_trailers = trailers;
        }
        self.effective(id);
        let eos = body_chunks.is_empty() && !has_trailers;
        let action = self.invoke(
            "proxy_on_response_headers",
            self.cb.response_headers.clone(),
            (id, n_headers, u32::from(eos)),
        )?;
        self.after(id, "on_response_headers", action, Half::Response);
        let last = body_chunks.len();
        for (i, chunk) in body_chunks.into_iter().enumerate() {
            let eos = i + 1 == last && !has_trailers;
            let size = {
                let s = self.stream(id)?;
                s.response_body.extend_from_slice(&chunk);
                s.response_body.len() as u32
            };
            self.effective(id);
            let action = self.invoke(
                "proxy_on_response_body",
                self.cb.response_body.clone(),
                (id, size, u32::from(eos)),
            )?;
            self.after(id, "on_response_body", action, Half::Response);
        }
        if has_trailers {
            self.effective(id);
            let action = self.invoke(
                "proxy_on_response_trailers",
                self.cb.response_trailers.clone(),
                (id, n_trailers),
            )?;
            self.after(id, "on_response_trailers", action, Half::Response);
        }
        Ok(())
    }

    /// Records a callback's action, and forwards the buffered body when the
    /// stream flows (a paused body stays buffered, as Envoy's
    /// StopIterationAndBuffer does).
    fn after(&mut self, id: u32, name: &'static str, action: Option<u32>, half: Half) {
        let action = match action {
            Some(1) => Action::Pause,
            _ => Action::Continue,
        };
        let paused = action == Action::Pause;
        let Some(s) = self.store.data_mut().streams.get_mut(&id) else {
            return;
        };
        let moved = match half {
            Half::Request => {
                s.continue_request = false;
                if paused {
                    Vec::new()
                } else {
                    std::mem::take(&mut s.request_body)
                }
            }
            Half::Response => {
                s.continue_response = false;
                if paused {
                    Vec::new()
                } else {
                    std::mem::take(&mut s.response_body)
                }
            }
        };
        let meta = self.meta_mut(id);
        meta.actions.push((name, action));
        match half {
            Half::Request => {
                meta.request_paused = paused;
                meta.forwarded_request.extend(moved);
            }
            Half::Response => meta.forwarded_response.extend(moved),
        }
    }

    /// Applies a `proxy_continue_stream` that arrived outside a callback.
    fn take_continue(&mut self, id: u32, half: Half) {
        let Some(s) = self.store.data_mut().streams.get_mut(&id) else {
            return;
        };
        let go = match half {
            Half::Request => std::mem::take(&mut s.continue_request),
            Half::Response => std::mem::take(&mut s.continue_response),
        };
        if go && matches!(half, Half::Request) {
            let rest = std::mem::take(&mut s.request_body);
            let meta = self.meta_mut(id);
            meta.request_paused = false;
            meta.forwarded_request.extend(rest);
        }
    }

    fn stopped(&mut self, id: u32) -> bool {
        self.store
            .data()
            .streams
            .get(&id)
            .is_none_or(|s| s.local_response.is_some() || s.closed)
    }

    fn stream(&mut self, id: u32) -> Result<&mut StreamState, HostError> {
        self.store
            .data_mut()
            .streams
            .get_mut(&id)
            .ok_or_else(|| unknown_stream(id))
    }

    fn metas(&mut self) -> &mut HashMap<u32, Meta> {
        &mut self.driver
    }

    fn meta(&self, id: u32) -> Meta {
        self.driver.get(&id).cloned().unwrap_or_default()
    }

    fn meta_mut(&mut self, id: u32) -> &mut Meta {
        self.metas().entry(id).or_default()
    }

    // --- callouts -------------------------------------------------------

    /// HTTP callouts dispatched and not answered yet, oldest first.
    pub fn http_callouts(&self) -> Vec<HttpCallout> {
        self.store.data().http_callouts.values().cloned().collect()
    }

    /// Answers an HTTP callout (`None`: the call failed, as Envoy reports a
    /// reset or timeout: no headers, no body).
    pub fn answer_http_callout(
        &mut self,
        token: u32,
        response: Option<HttpResponse>,
    ) -> Result<(), HostError> {
        let call = self
            .store
            .data_mut()
            .http_callouts
            .remove(&token)
            .ok_or_else(|| HostError::Unknown(format!("HTTP callout token {token}")))?;
        let data = match response {
            Some(r) => CallData {
                headers: r.headers,
                body: r.body_chunks.concat(),
                trailers: r.trailers,
                status: None,
            },
            None => CallData::default(),
        };
        let args = (
            call.context_id,
            token,
            data.headers.len() as u32,
            data.body.len() as u32,
            data.trailers.len() as u32,
        );
        self.with_call(call.context_id, data, |p| {
            p.invoke(
                "proxy_on_http_call_response",
                p.cb.http_call_response.clone(),
                args,
            )
        })
    }

    /// gRPC calls and streams opened and not closed by the host yet.
    pub fn grpc_callouts(&self) -> Vec<GrpcCallout> {
        self.store.data().grpc_callouts.values().cloned().collect()
    }

    fn grpc_context(&self, token: u32) -> Result<u32, HostError> {
        match self.store.data().grpc_callouts.get(&token) {
            Some(c) if !c.cancelled => Ok(c.context_id),
            Some(_) => Err(HostError::Unknown(format!(
                "gRPC token {token}: the plugin cancelled it"
            ))),
            None => Err(HostError::Unknown(format!("gRPC token {token}"))),
        }
    }

    /// Delivers initial metadata on a gRPC stream.
    pub fn grpc_initial_metadata(&mut self, token: u32, md: Headers) -> Result<(), HostError> {
        let ctx = self.grpc_context(token)?;
        let args = (ctx, token, md.len() as u32);
        let data = CallData {
            headers: md,
            ..CallData::default()
        };
        self.with_call(ctx, data, |p| {
            p.invoke(
                "proxy_on_grpc_receive_initial_metadata",
                p.cb.grpc_initial_metadata.clone(),
                args,
            )
        })
    }

    /// Delivers one message on a gRPC call or stream. A unary call is done
    /// after its message.
    pub fn grpc_message(&mut self, token: u32, message: &[u8]) -> Result<(), HostError> {
        let ctx = self.grpc_context(token)?;
        let unary = self
            .store
            .data()
            .grpc_callouts
            .get(&token)
            .is_some_and(|c| !c.streaming);
        if unary {
            self.store.data_mut().grpc_callouts.remove(&token);
        }
        let args = (ctx, token, message.len() as u32);
        let data = CallData {
            body: message.to_vec(),
            ..CallData::default()
        };
        self.with_call(ctx, data, |p| {
            p.invoke("proxy_on_grpc_receive", p.cb.grpc_receive.clone(), args)
        })
    }

    /// Delivers trailing metadata on a gRPC stream.
    pub fn grpc_trailing_metadata(&mut self, token: u32, md: Headers) -> Result<(), HostError> {
        let ctx = self.grpc_context(token)?;
        let args = (ctx, token, md.len() as u32);
        let data = CallData {
            trailers: md,
            ..CallData::default()
        };
        self.with_call(ctx, data, |p| {
            p.invoke(
                "proxy_on_grpc_receive_trailing_metadata",
                p.cb.grpc_trailing_metadata.clone(),
                args,
            )
        })
    }

    /// Closes a gRPC call or stream from the remote side with a status.
    pub fn grpc_close(&mut self, token: u32, status: u32, message: &str) -> Result<(), HostError> {
        let ctx = self.grpc_context(token)?;
        self.store.data_mut().grpc_callouts.remove(&token);
        let data = CallData {
            status: Some((status, message.to_owned())),
            ..CallData::default()
        };
        self.with_call(ctx, data, |p| {
            p.invoke(
                "proxy_on_grpc_close",
                p.cb.grpc_close.clone(),
                (ctx, token, status),
            )
        })
    }

    fn with_call(
        &mut self,
        context: u32,
        data: CallData,
        f: impl FnOnce(&mut Self) -> Result<Option<()>, HostError>,
    ) -> Result<(), HostError> {
        self.store.data_mut().call = Some(data);
        self.effective(context);
        let r = f(self);
        self.store.data_mut().call = None;
        let root = self.store.data().root_id;
        self.effective(root);
        r?;
        self.poll()
    }

    // --- recorded effects -------------------------------------------------

    /// Everything the plugin logged, oldest first.
    pub fn logs(&self) -> &[LogEntry] {
        &self.store.data().logs
    }

    /// Takes the log lines recorded so far.
    pub fn take_logs(&mut self) -> Vec<LogEntry> {
        std::mem::take(&mut self.store.data_mut().logs)
    }

    /// Foreign functions the plugin asked for (all refused).
    pub fn refused_foreign_functions(&self) -> &[String] {
        &self.store.data().refused_foreign
    }

    /// The state this VM shares with the others of its `vm_id`.
    pub fn shared(&self) -> &crate::SharedVm {
        &self.store.data().vm
    }

    /// True once an earlier trap made this VM unusable.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }
}

fn unknown_stream(id: u32) -> HostError {
    HostError::Unknown(format!("stream context {id}"))
}

/// The driver's bookkeeping for one stream.
#[derive(Debug, Default, Clone)]
pub(crate) struct Meta {
    actions: Vec<(&'static str, Action)>,
    request_paused: bool,
    forwarded_request: Vec<u8>,
    forwarded_response: Vec<u8>,
}
