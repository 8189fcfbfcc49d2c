//! The proxy-wasm 0.2.1 imports (`env.proxy_*`), and the per-VM state they
//! act on. Every hostcall answers with a status code; only a failing guest
//! allocator traps.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use wasmtime::{Caller, Linker, Memory, Result, TypedFunc, format_err};
use wasmtime_wasi::p1::WasiP1Ctx;

use crate::Registry;
use crate::shared::{MetricKind, SharedVm};
use crate::types::{GrpcCallout, Headers, HttpCallout, LocalResponse, LogEntry, Status};

/// One HTTP stream's maps and buffers, as the plugin sees them.
#[derive(Debug, Default)]
pub(crate) struct StreamState {
    pub(crate) request_headers: Headers,
    pub(crate) request_trailers: Headers,
    /// The request body buffered so far (what `HttpRequestBody` shows).
    pub(crate) request_body: Vec<u8>,
    pub(crate) response_headers: Headers,
    pub(crate) response_trailers: Headers,
    pub(crate) response_body: Vec<u8>,
    /// Set by `proxy_continue_stream`, taken by the driver.
    pub(crate) continue_request: bool,
    pub(crate) continue_response: bool,
    pub(crate) closed: bool,
    pub(crate) local_response: Option<LocalResponse>,
    pub(crate) properties: HashMap<String, Vec<u8>>,
}

/// What a callout callback may read while it runs.
#[derive(Debug, Default)]
pub(crate) struct CallData {
    pub(crate) headers: Headers,
    pub(crate) body: Vec<u8>,
    pub(crate) trailers: Headers,
    pub(crate) status: Option<(u32, String)>,
}

/// The store data of one VM.
pub(crate) struct Ctx {
    pub(crate) wasi: WasiP1Ctx,
    pub(crate) registry: Arc<Registry>,
    pub(crate) vm: Arc<SharedVm>,
    pub(crate) vm_id: String,
    pub(crate) instance_id: u64,
    pub(crate) memory: Option<Memory>,
    pub(crate) alloc: Option<TypedFunc<u32, u32>>,
    pub(crate) root_id: u32,
    pub(crate) effective: u32,
    pub(crate) vm_configuration: Vec<u8>,
    pub(crate) configuration: Vec<u8>,
    pub(crate) properties: HashMap<String, Vec<u8>>,
    pub(crate) clusters: Option<Vec<String>>,
    pub(crate) streams: HashMap<u32, StreamState>,
    pub(crate) call: Option<CallData>,
    pub(crate) http_callouts: BTreeMap<u32, HttpCallout>,
    pub(crate) grpc_callouts: BTreeMap<u32, GrpcCallout>,
    pub(crate) next_token: u32,
    pub(crate) now_ns: u64,
    pub(crate) tick_period_ms: u32,
    pub(crate) next_tick_ns: Option<u64>,
    pub(crate) log_level: u32,
    pub(crate) logs: Vec<LogEntry>,
    pub(crate) refused_foreign: Vec<String>,
    pub(crate) done: bool,
}

impl Ctx {
    fn stream(&mut self) -> Result<&mut StreamState, Status> {
        self.streams
            .get_mut(&self.effective)
            .ok_or(Status::NotFound)
    }

    fn token(&mut self) -> u32 {
        self.next_token = self.next_token.wrapping_add(1).max(1);
        self.next_token
    }

    fn map(&mut self, map_type: u32) -> Result<&mut Headers, Status> {
        match map_type {
            0..=3 => {
                let s = self.stream()?;
                Ok(match map_type {
                    0 => &mut s.request_headers,
                    1 => &mut s.request_trailers,
                    2 => &mut s.response_headers,
                    _ => &mut s.response_trailers,
                })
            }
            4 | 6 => self
                .call
                .as_mut()
                .map(|c| &mut c.headers)
                .ok_or(Status::NotFound),
            5 | 7 => self
                .call
                .as_mut()
                .map(|c| &mut c.trailers)
                .ok_or(Status::NotFound),
            _ => Err(Status::BadArgument),
        }
    }

    fn property(&self, path: &str) -> Option<Vec<u8>> {
        let stream = self.streams.get(&self.effective);
        if let Some(v) = stream.and_then(|s| s.properties.get(path)) {
            return Some(v.clone());
        }
        if let Some(s) = stream {
            let header = |name: &str| s.request_headers.get_bytes(name).map(<[u8]>::to_vec);
            let derived = match path {
                "request.path" => header(":path"),
                "request.url_path" => header(":path")
                    .map(|p| p.split(|&b| b == b'?').next().unwrap_or_default().to_vec()),
                "request.method" => header(":method"),
                "request.host" => header(":authority"),
                "request.scheme" => header(":scheme"),
                "request.id" => header("x-request-id"),
                "request.total_size" | "request.size" => {
                    Some((s.request_body.len() as u64).to_le_bytes().to_vec())
                }
                _ => None,
            };
            if derived.is_some() {
                return derived;
            }
        }
        self.properties.get(path).cloned()
    }
}

/// Fails the hostcall with a status instead of trapping.
macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(status) => return Ok(status as u32),
        }
    };
}

type C<'a> = Caller<'a, Ctx>;

fn memory(caller: &C<'_>) -> Result<Memory> {
    caller
        .data()
        .memory
        .ok_or_else(|| format_err!("module has no exported memory"))
}

fn read(caller: &C<'_>, ptr: u32, len: u32) -> Result<Result<Vec<u8>, Status>> {
    let mem = memory(caller)?;
    let data = mem.data(caller);
    let (start, end) = (ptr as usize, ptr as usize + len as usize);
    Ok(data
        .get(start..end)
        .map(<[u8]>::to_vec)
        .ok_or(Status::InvalidMemoryAccess))
}

fn read_str(caller: &C<'_>, ptr: u32, len: u32) -> Result<Result<String, Status>> {
    Ok(read(caller, ptr, len)?.and_then(|b| String::from_utf8(b).map_err(|_| Status::BadArgument)))
}

fn write(caller: &mut C<'_>, ptr: u32, bytes: &[u8]) -> Result<Result<(), Status>> {
    let mem = memory(caller)?;
    let data = mem.data_mut(caller);
    let start = ptr as usize;
    Ok(match data.get_mut(start..start + bytes.len()) {
        Some(dst) => {
            dst.copy_from_slice(bytes);
            Ok(())
        }
        None => Err(Status::InvalidMemoryAccess),
    })
}

fn write_u32(caller: &mut C<'_>, ptr: u32, v: u32) -> Result<Result<(), Status>> {
    write(caller, ptr, &v.to_le_bytes())
}

/// Copies `data` into guest memory (allocated by the guest) and stores its
/// address and size at `ptr_ptr` / `size_ptr`. Empty data is returned as a
/// null pointer, as Envoy does.
fn put_bytes(caller: &mut C<'_>, data: &[u8], ptr_ptr: u32, size_ptr: u32) -> Result<u32> {
    let ptr = if data.is_empty() {
        0
    } else {
        let alloc =
            caller.data().alloc.clone().ok_or_else(|| {
                format_err!("module exports no proxy_on_memory_allocate or malloc")
            })?;
        let p = alloc.call(&mut *caller, data.len() as u32)?;
        if p == 0 {
            return Err(format_err!(
                "guest allocator returned null for {} bytes",
                data.len()
            ));
        }
        tri!(write(caller, p, data)?);
        p
    };
    tri!(write_u32(caller, ptr_ptr, ptr)?);
    tri!(write_u32(caller, size_ptr, data.len() as u32)?);
    Ok(Status::Ok as u32)
}

fn property_path(raw: &[u8]) -> String {
    raw.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(String::from_utf8_lossy)
        .collect::<Vec<_>>()
        .join(".")
}

fn set_body(buf: &mut Vec<u8>, start: u32, size: u32, data: &[u8]) -> Result<(), Status> {
    let (start, size) = (start as usize, size as usize);
    if start == 0 {
        if size == 0 {
            buf.splice(0..0, data.iter().copied());
        } else if size >= buf.len() {
            *buf = data.to_vec();
        } else {
            return Err(Status::BadArgument);
        }
    } else if start >= buf.len() {
        buf.extend_from_slice(data);
    } else {
        return Err(Status::BadArgument);
    }
    Ok(())
}

fn known_cluster(ctx: &Ctx, upstream: &str) -> Result<(), Status> {
    match &ctx.clusters {
        Some(list) if !list.iter().any(|c| c == upstream) => Err(Status::BadArgument),
        _ => Ok(()),
    }
}

fn headers_arg(caller: &C<'_>, ptr: u32, len: u32) -> Result<Result<Headers, Status>> {
    Ok(read(caller, ptr, len)?.and_then(|b| Headers::deserialize(&b).ok_or(Status::ParseFailure)))
}

/// Adds every proxy-wasm import and the WASI preview1 imports to `linker`.
pub(crate) fn add_to_linker(linker: &mut Linker<Ctx>) -> Result<()> {
    wasmtime_wasi::p1::add_to_linker_sync(linker, |c: &mut Ctx| &mut c.wasi)?;
    lifecycle(linker)?;
    maps_and_buffers(linker)?;
    shared(linker)?;
    callouts(linker)?;
    Ok(())
}

fn lifecycle(l: &mut Linker<Ctx>) -> Result<()> {
    l.func_wrap(
        "env",
        "proxy_log",
        |mut c: C<'_>, level: u32, p: u32, n: u32| -> Result<u32> {
            let msg = tri!(read(&c, p, n)?);
            let ctx = c.data_mut();
            ctx.logs.push(LogEntry {
                level,
                context_id: ctx.effective,
                message: String::from_utf8_lossy(&msg).into_owned(),
            });
            Ok(0u32)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_log_level",
        |mut c: C<'_>, ret: u32| -> Result<u32> {
            let level = c.data().log_level;
            tri!(write_u32(&mut c, ret, level)?);
            Ok(0u32)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut c: C<'_>, ret: u32| -> Result<u32> {
            let now = c.data().now_ns;
            tri!(write(&mut c, ret, &now.to_le_bytes())?);
            Ok(0u32)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut c: C<'_>, period: u32| -> Result<u32> {
            let ctx = c.data_mut();
            ctx.tick_period_ms = period;
            ctx.next_tick_ns = (period > 0).then(|| ctx.now_ns + u64::from(period) * 1_000_000);
            Ok(0u32)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut c: C<'_>, id: u32| -> Result<u32> {
            let ctx = c.data_mut();
            if id == ctx.root_id || ctx.streams.contains_key(&id) {
                ctx.effective = id;
                Ok(0u32)
            } else {
                Ok(Status::BadArgument as u32)
            }
        },
    )?;
    l.func_wrap("env", "proxy_done", |mut c: C<'_>| -> Result<u32> {
        c.data_mut().done = true;
        Ok(0u32)
    })?;
    l.func_wrap(
        "env",
        "proxy_continue_stream",
        |mut c: C<'_>, ty: u32| -> Result<u32> {
            let s = tri!(c.data_mut().stream());
            match ty {
                0 => s.continue_request = true,
                1 => s.continue_response = true,
                _ => return Ok(Status::BadArgument as u32),
            }
            Ok(0u32)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_close_stream",
        |mut c: C<'_>, _ty: u32| -> Result<u32> {
            tri!(c.data_mut().stream()).closed = true;
            Ok(0u32)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: C<'_>,
         status: u32,
         dp: u32,
         dn: u32,
         bp: u32,
         bn: u32,
         hp: u32,
         hn: u32,
         grpc_status: i32|
         -> Result<u32> {
            let details = String::from_utf8_lossy(&tri!(read(&c, dp, dn)?)).into_owned();
            let body = tri!(read(&c, bp, bn)?);
            let headers = tri!(headers_arg(&c, hp, hn)?);
            tri!(c.data_mut().stream()).local_response = Some(LocalResponse {
                status,
                details,
                headers,
                body,
                grpc_status,
            });
            Ok(0u32)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |mut c: C<'_>, np: u32, nn: u32, _ap: u32, _an: u32, _rp: u32, _rn: u32| -> Result<u32> {
            let name = String::from_utf8_lossy(&tri!(read(&c, np, nn)?)).into_owned();
            let ctx = c.data_mut();
            ctx.logs.push(LogEntry {
                level: 3,
                context_id: ctx.effective,
                message: format!(
                    "kvmesh host: foreign function {name:?} is not provided; refused with NotFound"
                ),
            });
            ctx.refused_foreign.push(name);
            Ok(Status::NotFound as u32)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: C<'_>, pp: u32, pn: u32, rp: u32, rn: u32| -> Result<u32> {
            let path = property_path(&tri!(read(&c, pp, pn)?));
            let Some(value) = c.data().property(&path) else {
                return Ok(Status::NotFound as u32);
            };
            put_bytes(&mut c, &value, rp, rn)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_property",
        |mut c: C<'_>, pp: u32, pn: u32, vp: u32, vn: u32| -> Result<u32> {
            let path = property_path(&tri!(read(&c, pp, pn)?));
            let value = tri!(read(&c, vp, vn)?);
            let ctx = c.data_mut();
            match ctx.streams.get_mut(&ctx.effective) {
                Some(s) => s.properties.insert(path, value),
                None => ctx.properties.insert(path, value),
            };
            Ok(0u32)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: C<'_>, ty: u32, np: u32, nn: u32, ret: u32| -> Result<u32> {
            let kind = match ty {
                0 => MetricKind::Counter,
                1 => MetricKind::Gauge,
                2 => MetricKind::Histogram,
                _ => return Ok(Status::BadArgument as u32),
            };
            let name = tri!(read_str(&c, np, nn)?);
            let id = tri!(c.data().vm.define_metric(kind, &name));
            tri!(write_u32(&mut c, ret, id)?);
            Ok(0u32)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_metric",
        |mut c: C<'_>, id: u32, ret: u32| -> Result<u32> {
            let v = tri!(c.data().vm.get_metric(id));
            tri!(write(&mut c, ret, &v.to_le_bytes())?);
            Ok(0u32)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_record_metric",
        |c: C<'_>, id: u32, v: u64| -> Result<u32> {
            tri!(c.data().vm.record_metric(id, v));
            Ok(0u32)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_increment_metric",
        |c: C<'_>, id: u32, d: i64| -> Result<u32> {
            tri!(c.data().vm.increment_metric(id, d));
            Ok(0u32)
        },
    )?;
    Ok(())
}

fn maps_and_buffers(l: &mut Linker<Ctx>) -> Result<()> {
    l.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: C<'_>, ty: u32, rp: u32, rn: u32| -> Result<u32> {
            let bytes = tri!(c.data_mut().map(ty)).serialize();
            put_bytes(&mut c, &bytes, rp, rn)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut c: C<'_>, ty: u32, p: u32, n: u32| -> Result<u32> {
            let h = tri!(headers_arg(&c, p, n)?);
            *tri!(c.data_mut().map(ty)) = h;
            Ok(0u32)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: C<'_>, ty: u32, kp: u32, kn: u32, rp: u32, rn: u32| -> Result<u32> {
            let key = tri!(read_str(&c, kp, kn)?);
            let Some(v) = tri!(c.data_mut().map(ty))
                .get_bytes(&key)
                .map(<[u8]>::to_vec)
            else {
                return Ok(Status::NotFound as u32);
            };
            put_bytes(&mut c, &v, rp, rn)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_replace_header_map_value",
        |mut c: C<'_>, ty: u32, kp: u32, kn: u32, vp: u32, vn: u32| -> Result<u32> {
            let key = tri!(read_str(&c, kp, kn)?);
            let v = tri!(read(&c, vp, vn)?);
            tri!(c.data_mut().map(ty)).replace(&key, &v);
            Ok(0u32)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_add_header_map_value",
        |mut c: C<'_>, ty: u32, kp: u32, kn: u32, vp: u32, vn: u32| -> Result<u32> {
            let key = tri!(read_str(&c, kp, kn)?);
            let v = tri!(read(&c, vp, vn)?);
            tri!(c.data_mut().map(ty)).add(&key, &v);
            Ok(0u32)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: C<'_>, ty: u32, kp: u32, kn: u32| -> Result<u32> {
            let key = tri!(read_str(&c, kp, kn)?);
            tri!(c.data_mut().map(ty)).remove(&key);
            Ok(0u32)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut c: C<'_>, ty: u32, start: u32, max: u32, rp: u32, rn: u32| -> Result<u32> {
            let cut = |buf: &[u8]| {
                let from = (start as usize).min(buf.len());
                let to = from.saturating_add(max as usize).min(buf.len());
                buf[from..to].to_vec()
            };
            let ctx = c.data_mut();
            let slice = match ty {
                0 => cut(&tri!(ctx.stream()).request_body),
                1 => cut(&tri!(ctx.stream()).response_body),
                4 | 5 => cut(&tri!(ctx.call.as_ref().ok_or(Status::NotFound)).body),
                6 => cut(&ctx.vm_configuration),
                7 => cut(&ctx.configuration),
                _ => return Ok(Status::NotFound as u32),
            };
            put_bytes(&mut c, &slice, rp, rn)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut c: C<'_>, ty: u32, start: u32, size: u32, p: u32, n: u32| -> Result<u32> {
            let data = tri!(read(&c, p, n)?);
            let s = tri!(c.data_mut().stream());
            let buf = match ty {
                0 => &mut s.request_body,
                1 => &mut s.response_body,
                _ => return Ok(Status::NotFound as u32),
            };
            tri!(set_body(buf, start, size, &data));
            Ok(0u32)
        },
    )?;
    Ok(())
}

fn shared(l: &mut Linker<Ctx>) -> Result<()> {
    l.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: C<'_>, kp: u32, kn: u32, rp: u32, rn: u32, rcas: u32| -> Result<u32> {
            let key = tri!(read_str(&c, kp, kn)?);
            let Some((value, cas)) = c.data().vm.get(&key) else {
                return Ok(Status::NotFound as u32);
            };
            let st = put_bytes(&mut c, &value, rp, rn)?;
            if st != 0 {
                return Ok(st);
            }
            tri!(write_u32(&mut c, rcas, cas)?);
            Ok(0u32)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_shared_data",
        |c: C<'_>, kp: u32, kn: u32, vp: u32, vn: u32, cas: u32| -> Result<u32> {
            let key = tri!(read_str(&c, kp, kn)?);
            let value = tri!(read(&c, vp, vn)?);
            tri!(c.data().vm.set(&key, &value, cas));
            Ok(0u32)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_register_shared_queue",
        |mut c: C<'_>, np: u32, nn: u32, ret: u32| -> Result<u32> {
            let name = tri!(read_str(&c, np, nn)?);
            let ctx = c.data();
            let id = ctx
                .vm
                .register_queue(&name, (ctx.instance_id, ctx.effective));
            tri!(write_u32(&mut c, ret, id)?);
            Ok(0u32)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_resolve_shared_queue",
        |mut c: C<'_>, vp: u32, vn: u32, np: u32, nn: u32, ret: u32| -> Result<u32> {
            let vm_id = tri!(read_str(&c, vp, vn)?);
            let name = tri!(read_str(&c, np, nn)?);
            let ctx = c.data();
            let vm = if vm_id.is_empty() || vm_id == ctx.vm_id {
                Arc::clone(&ctx.vm)
            } else {
                ctx.registry.vm(&vm_id)
            };
            let Some(id) = vm.resolve_queue(&name) else {
                return Ok(Status::NotFound as u32);
            };
            if !Arc::ptr_eq(&vm, &ctx.vm) {
                // Queue ids are per vm_id; a queue of another VM group is
                // not reachable through this VM's id space.
                return Ok(Status::Unimplemented as u32);
            }
            tri!(write_u32(&mut c, ret, id)?);
            Ok(0u32)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_dequeue_shared_queue",
        |mut c: C<'_>, id: u32, rp: u32, rn: u32| -> Result<u32> {
            let v = tri!(c.data().vm.dequeue(id));
            put_bytes(&mut c, &v, rp, rn)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_enqueue_shared_queue",
        |c: C<'_>, id: u32, vp: u32, vn: u32| -> Result<u32> {
            let v = tri!(read(&c, vp, vn)?);
            tri!(c.data().vm.enqueue(id, &v));
            Ok(0u32)
        },
    )?;
    Ok(())
}

fn callouts(l: &mut Linker<Ctx>) -> Result<()> {
    l.func_wrap(
        "env",
        "proxy_http_call",
        |mut c: C<'_>,
         up: u32,
         un: u32,
         hp: u32,
         hn: u32,
         bp: u32,
         bn: u32,
         tp: u32,
         tn: u32,
         timeout_ms: u32,
         ret: u32|
         -> Result<u32> {
            let upstream = tri!(read_str(&c, up, un)?);
            let headers = tri!(headers_arg(&c, hp, hn)?);
            let body = tri!(read(&c, bp, bn)?);
            let trailers = tri!(headers_arg(&c, tp, tn)?);
            tri!(known_cluster(c.data(), &upstream));
            let ctx = c.data_mut();
            let token = ctx.token();
            let context_id = ctx.effective;
            ctx.http_callouts.insert(
                token,
                HttpCallout {
                    token,
                    context_id,
                    upstream,
                    headers,
                    body,
                    trailers,
                    timeout_ms,
                },
            );
            tri!(write_u32(&mut c, ret, token)?);
            Ok(0u32)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_grpc_call",
        |mut c: C<'_>,
         up: u32,
         un: u32,
         sp: u32,
         sn: u32,
         mp: u32,
         mn: u32,
         hp: u32,
         hn: u32,
         msgp: u32,
         msgn: u32,
         _timeout_ms: u32,
         ret: u32|
         -> Result<u32> {
            let upstream = tri!(read_str(&c, up, un)?);
            let service = tri!(read_str(&c, sp, sn)?);
            let method = tri!(read_str(&c, mp, mn)?);
            let initial_metadata = tri!(headers_arg(&c, hp, hn)?);
            let message = tri!(read(&c, msgp, msgn)?);
            tri!(known_cluster(c.data(), &upstream));
            let ctx = c.data_mut();
            let token = ctx.token();
            let context_id = ctx.effective;
            ctx.grpc_callouts.insert(
                token,
                GrpcCallout {
                    token,
                    context_id,
                    upstream,
                    service,
                    method,
                    initial_metadata,
                    sent: vec![message],
                    streaming: false,
                    half_closed: true,
                    cancelled: false,
                },
            );
            tri!(write_u32(&mut c, ret, token)?);
            Ok(0u32)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_grpc_stream",
        |mut c: C<'_>,
         up: u32,
         un: u32,
         sp: u32,
         sn: u32,
         mp: u32,
         mn: u32,
         hp: u32,
         hn: u32,
         ret: u32|
         -> Result<u32> {
            let upstream = tri!(read_str(&c, up, un)?);
            let service = tri!(read_str(&c, sp, sn)?);
            let method = tri!(read_str(&c, mp, mn)?);
            let initial_metadata = tri!(headers_arg(&c, hp, hn)?);
            tri!(known_cluster(c.data(), &upstream));
            let ctx = c.data_mut();
            let token = ctx.token();
            let context_id = ctx.effective;
            ctx.grpc_callouts.insert(
                token,
                GrpcCallout {
                    token,
                    context_id,
                    upstream,
                    service,
                    method,
                    initial_metadata,
                    sent: Vec::new(),
                    streaming: true,
                    half_closed: false,
                    cancelled: false,
                },
            );
            tri!(write_u32(&mut c, ret, token)?);
            Ok(0u32)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_grpc_send",
        |mut c: C<'_>, token: u32, mp: u32, mn: u32, end: u32| -> Result<u32> {
            let msg = tri!(read(&c, mp, mn)?);
            let Some(call) = c.data_mut().grpc_callouts.get_mut(&token) else {
                return Ok(Status::NotFound as u32);
            };
            if !call.streaming || call.half_closed || call.cancelled {
                return Ok(Status::BadArgument as u32);
            }
            call.sent.push(msg);
            call.half_closed = end != 0;
            Ok(0u32)
        },
    )?;
    for name in ["proxy_grpc_cancel", "proxy_grpc_close"] {
        l.func_wrap("env", name, |mut c: C<'_>, token: u32| -> Result<u32> {
            match c.data_mut().grpc_callouts.get_mut(&token) {
                Some(call) => {
                    call.cancelled = true;
                    Ok(0u32)
                }
                None => Ok(Status::NotFound as u32),
            }
        })?;
    }
    l.func_wrap(
        "env",
        "proxy_get_status",
        |mut c: C<'_>, rc: u32, rp: u32, rn: u32| -> Result<u32> {
            let Some((code, msg)) = c.data().call.as_ref().and_then(|d| d.status.clone()) else {
                return Ok(Status::NotFound as u32);
            };
            tri!(write_u32(&mut c, rc, code)?);
            put_bytes(&mut c, msg.as_bytes(), rp, rn)
        },
    )?;
    Ok(())
}
