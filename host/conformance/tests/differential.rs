//! The host's routing decisions equal real Envoy's (1.40) for the same module
//! and the same state, on the committed corpus (corpus/differential.json).
//!
//! Per plugin and case, Envoy runs the plugin as its HTTP wasm filter and the
//! host fixture as a bootstrap wasm service in the same `vm_id` that seeds
//! the case's state into shared data (the writes the state pump would make).
//! Envoy's choice is what an in-process upstream receives in
//! `x-gateway-destination-endpoint`; the host's is the same header in the
//! `Outcome`. Decision response headers (`x-kvmesh-*`) must match too.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvmesh_host_conformance::{
    Case, corpus, plugin_config, plugin_names, state_writes, vm_id, workspace_root,
};
use kvmesh_host_runtime::{Headers, Host, HttpRequest, PluginConfig};

const DEST: &str = "x-gateway-destination-endpoint";
const REPEAT: usize = 3;

fn envoy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KVMESH_ENVOY") {
        return p.into();
    }
    let out = Command::new("bash")
        .arg("-c")
        .arg("source scripts/lib.sh && envoy_bin")
        .current_dir(workspace_root())
        .output()
        .expect("running bash");
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        out.status.success() && !path.is_empty(),
        "Envoy 1.40 not found: set KVMESH_ENVOY or run scripts/setup.sh ({})",
        String::from_utf8_lossy(&out.stderr)
    );
    path.into()
}

/// What the upstream received: (case tag, destination header) per request.
type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// An HTTP/1.1 upstream on 127.0.0.1 that records the destination header.
fn upstream() -> (u16, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let port = listener.local_addr().expect("addr").port();
    let seen: Seen = Arc::default();
    let record = Arc::clone(&seen);
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let record = Arc::clone(&record);
            std::thread::spawn(move || serve(conn, &record));
        }
    });
    (port, seen)
}

fn serve(conn: TcpStream, seen: &Seen) {
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut conn = conn;
    loop {
        let Some(headers) = read_head(&mut reader) else {
            return;
        };
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        seen.lock().unwrap().push((
            headers.get("x-case").unwrap_or("").to_owned(),
            headers.get(DEST).unwrap_or("<none>").to_owned(),
        ));
        let reply =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        if conn.write_all(reply).is_err() {
            return;
        }
    }
}

/// Reads a request or response head; the first line is stored as ":line".
fn read_head(r: &mut impl BufRead) -> Option<Headers> {
    let mut h = Headers::new();
    let mut first = true;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            return Some(h);
        }
        if first {
            h.add(":line", line.as_bytes());
            first = false;
        } else if let Some((k, v)) = line.split_once(':') {
            h.add(k.trim(), v.trim().as_bytes());
        }
    }
}

/// POSTs through Envoy; returns (status line, response headers).
fn post(port: u16, case: &str, path: &str, body: &[u8]) -> Headers {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to Envoy");
    s.set_read_timeout(Some(Duration::from_secs(20))).ok();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: kvmesh.test\r\ncontent-type: application/json\r\n\
         x-case: {case}\r\n{DEST}: 203.0.113.9:1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut r = BufReader::new(s);
    let h = read_head(&mut r).expect("Envoy answered");
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);
    h
}

struct Envoy {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

fn start_envoy(plugin: &str, seed: &[(String, Vec<u8>)], upstream_port: u16) -> Envoy {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "kvmesh-diff-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let dir = TempDir(dir);
    let wasm = kvmesh_host_runtime::locate_plugin(plugin).unwrap_or_else(|e| panic!("{e}"));
    let fixture =
        kvmesh_host_runtime::locate_plugin("host-fixture").unwrap_or_else(|e| panic!("{e}"));
    let mut seed_text = String::from("seed:\n");
    for (k, v) in seed {
        seed_text.push_str(k);
        seed_text.push(' ');
        for b in v {
            seed_text.push_str(&format!("{b:02x}"));
        }
        seed_text.push('\n');
    }
    let config = format!(
        r#"
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
bootstrap_extensions:
- name: envoy.bootstrap.wasm
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.wasm.v3.WasmService
    singleton: true
    config:
      name: seeder
      root_id: seeder
      vm_config:
        vm_id: {vm_id}
        runtime: envoy.wasm.runtime.v8
        code: {{local: {{filename: {fixture}}}}}
        configuration:
          "@type": type.googleapis.com/google.protobuf.StringValue
          value: {seed}
static_resources:
  listeners:
  - name: gateway
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    per_connection_buffer_limit_bytes: 4194304
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: gateway
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{{match: {{prefix: "/"}}, route: {{cluster: upstream, timeout: 20s}}}}]
          http_filters:
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: {plugin}
                root_id: {plugin}
                allow_on_headers_stop_iteration: true
                failure_policy: FAIL_CLOSED
                vm_config:
                  vm_id: {vm_id}
                  runtime: envoy.wasm.runtime.v8
                  code: {{local: {{filename: {wasm}}}}}
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: {plugin_config}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    connect_timeout: 2s
    type: STATIC
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream_port}}}}}}}
"#,
        vm_id = vm_id(plugin),
        fixture = yaml_str(&fixture.display().to_string()),
        wasm = yaml_str(&wasm.display().to_string()),
        seed = yaml_str(&seed_text),
        plugin_config = yaml_str(&plugin_config()),
    );
    let cfg_path = dir.0.join("envoy.yaml");
    std::fs::write(&cfg_path, config).unwrap();
    let admin_path = dir.0.join("admin.txt");
    let log = std::fs::File::create(dir.0.join("envoy.log")).unwrap();
    let child = Command::new(envoy_bin())
        .arg("-c")
        .arg(&cfg_path)
        .arg("--concurrency")
        .arg("1")
        .arg("--base-id")
        .arg(
            (std::process::id() % 50_000 + N.load(std::sync::atomic::Ordering::Relaxed) * 7)
                .to_string(),
        )
        .arg("--admin-address-path")
        .arg(&admin_path)
        .arg("-l")
        .arg("warning")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("starting Envoy");
    let mut envoy = Envoy {
        child,
        port: 0,
        _dir: dir,
    };
    envoy.port = wait_listener(&mut envoy, &admin_path);
    envoy
}

/// Polls the admin API (deadline 60 s) until the gateway listener is bound.
fn wait_listener(envoy: &mut Envoy, admin_path: &std::path::Path) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = envoy.child.try_wait() {
            let log = std::fs::read_to_string(envoy._dir.0.join("envoy.log")).unwrap_or_default();
            panic!("Envoy exited with {status}:\n{log}");
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(envoy._dir.0.join("envoy.log")).unwrap_or_default();
            let admin = std::fs::read_to_string(admin_path).unwrap_or_default();
            panic!("Envoy did not come up in 60 s (admin {admin:?}):\n{log}");
        }
        if let Some(port) = std::fs::read_to_string(admin_path)
            .ok()
            .and_then(|a| {
                a.trim()
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse::<u16>().ok())
            })
            .and_then(listener_port)
        {
            return port;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn listener_port(admin: u16) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", admin)).ok()?;
    // Envoy refuses HTTP/1.0 (426), and answers 1.1 with a chunked body.
    s.write_all(b"GET /listeners?format=json HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, mut rest) = text.split_once("\r\n\r\n")?;
    let mut body = String::new();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            if n == 0 {
                break;
            }
            body.push_str(after.get(..n)?);
            rest = after.get(n + 2..)?;
        }
    } else {
        body.push_str(rest);
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["listener_statuses"]
        .as_array()?
        .iter()
        .find(|l| l["name"] == "gateway")?["local_address"]["socket_address"]["port_value"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .filter(|&p| p != 0)
}

fn decision_headers(h: &Headers) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = h
        .pairs()
        .iter()
        .filter(|(k, _)| k.starts_with("x-kvmesh"))
        // The decision header ends with the decision's wall time (`us=`),
        // which differs run to run; compare everything else.
        .map(|(k, v)| {
            let text = String::from_utf8_lossy(v).into_owned();
            let stable = match text.rfind("; us=") {
                Some(i) => text[..i].to_owned(),
                None => text,
            };
            (k.clone(), stable)
        })
        .collect();
    v.sort();
    v
}

fn host_decisions(
    plugin: &str,
    case: &Case,
    seed: &[(String, Vec<u8>)],
) -> Vec<(String, Vec<(String, String)>)> {
    let host = Host::new().unwrap();
    let module = host
        .load_file(kvmesh_host_runtime::locate_plugin(plugin).unwrap())
        .unwrap();
    let vm = host.vm(&vm_id(plugin));
    for (k, v) in seed {
        vm.set(k, v, 0).unwrap();
    }
    let mut p = host
        .start(
            &module,
            PluginConfig::new(&vm_id(plugin), plugin_config().as_bytes()).root_id(plugin),
        )
        .unwrap();
    (0..REPEAT)
        .map(|_| {
            let req = HttpRequest::new("POST", &case.path)
                .header("content-type", "application/json")
                .header("x-case", &case.name)
                .header(DEST, "203.0.113.9:1")
                .chunk(case.body.as_bytes());
            let out = p.send(req).unwrap();
            (
                out.request_headers.get(DEST).unwrap_or("<none>").to_owned(),
                decision_headers(&out.response_headers),
            )
        })
        .collect()
}

#[test]
fn host_and_envoy_choose_the_same_endpoints() {
    let envoy = envoy_bin();
    assert!(envoy.is_file(), "Envoy binary {} missing", envoy.display());
    let cases = corpus();
    assert!(cases.len() >= 5, "corpus too small");
    let plugins = plugin_names();
    assert!(!plugins.is_empty(), "no plugins under plugins/");
    let mut compared = 0;
    for plugin in &plugins {
        for case in &cases {
            let seed = state_writes(&case.replica_specs());
            let expected = host_decisions(plugin, case, &seed);
            // A comparison only means something if the seeded state reached
            // the plugin: every choice must be one of the case's replicas.
            for (dest, _) in &expected {
                let first = dest.split(',').next().unwrap_or_default();
                assert!(
                    case.replicas.iter().any(|r| r.address == first),
                    "{plugin} / {}: host chose {dest:?}, not a replica of the case",
                    case.name
                );
            }
            let (up_port, seen) = upstream();
            let envoy = start_envoy(plugin, &seed, up_port);
            let mut got = Vec::new();
            for _ in 0..REPEAT {
                let resp = post(envoy.port, &case.name, &case.path, case.body.as_bytes());
                let dest = seen
                    .lock()
                    .unwrap()
                    .pop()
                    .map(|(_, d)| d)
                    .unwrap_or_else(|| format!("<not forwarded: {:?}>", resp.get(":line")));
                got.push((dest, decision_headers(&resp)));
            }
            assert_eq!(
                got, expected,
                "{plugin} / {}: Envoy (left) and host (right) disagree",
                case.name
            );
            compared += 1;
        }
    }
    eprintln!("differential: {compared} (plugin, case) pairs agree, {REPEAT} requests each");
}
