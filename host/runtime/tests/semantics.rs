//! Host semantics, driven through the fixture plugin (host/fixture, built to
//! target/plugins/host-fixture.wasm by scripts/build-plugins.sh).

#![allow(clippy::unwrap_used)]

use std::sync::OnceLock;
use std::time::Duration;

use kvmesh_host_runtime::{
    Action, Headers, Host, HostError, HttpRequest, HttpResponse, MetricValue, Module, Plugin,
    PluginConfig, RequestState,
};

fn fixture() -> (Host, Module) {
    static LOADED: OnceLock<(Host, Module)> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let host = Host::new().expect("engine");
            let path = kvmesh_host_runtime::locate_plugin("host-fixture")
                .unwrap_or_else(|e| panic!("fixture plugin: {e}"));
            let module = host.load_file(path).expect("fixture compiles");
            (host, module)
        })
        .clone()
}

/// A fresh VM in its own `vm_id` group (tests run in parallel).
fn start(vm_id: &str, config: &str) -> Plugin {
    let (host, module) = fixture();
    host.start(
        &module,
        PluginConfig::new(vm_id, config.as_bytes()).root_id("fixture"),
    )
    .expect("fixture starts")
}

fn op(op: &str) -> HttpRequest {
    HttpRequest::new("GET", "/fixture?q=1").header("x-op", op)
}

#[test]
fn body_in_several_frames_is_buffered_until_end_of_stream() {
    let mut p = start("body", "");
    let body = b"0123456789abcdefghij";
    let out = p
        .send(HttpRequest::new("POST", "/v1/completions").body_in_chunks(body, 7))
        .unwrap();
    assert_eq!(out.state, RequestState::Forwarded);
    assert_eq!(out.request_headers.get("x-body-len"), Some("20"));
    assert_eq!(out.request_headers.get("x-body-calls"), Some("3"));
    assert_eq!(out.request_body, body);
    assert_eq!(
        out.actions,
        vec![
            ("on_request_headers", Action::Pause),
            ("on_request_body", Action::Pause),
            ("on_request_body", Action::Pause),
            ("on_request_body", Action::Continue),
            ("on_response_headers", Action::Continue),
            ("on_response_body", Action::Continue),
        ]
    );
    assert_eq!(out.response_headers.get("x-fixture-response"), Some(""));
}

#[test]
fn plugin_can_replace_the_body() {
    let mut p = start("rewrite", "");
    let out = p
        .send(
            HttpRequest::new("POST", "/x")
                .header("x-rewrite", "new body")
                .chunk(b"old"),
        )
        .unwrap();
    assert_eq!(out.request_body, b"new body");
}

#[test]
fn shared_data_cas_conflict_between_two_vms_of_one_vm_id() {
    let mut a = start("cas", "");
    let mut b = start("cas", "");
    a.send(op("set").header("x-key", "k").header("x-value", "v1"))
        .unwrap();
    let read_a = a.send(op("get").header("x-key", "k")).unwrap();
    let read_b = b.send(op("get").header("x-key", "k")).unwrap();
    assert_eq!(
        read_b.request_headers.get("x-value"),
        Some("v1"),
        "VMs of one vm_id share data"
    );
    let cas = read_a.request_headers.get("x-cas").unwrap().to_owned();
    assert_eq!(read_b.request_headers.get("x-cas"), Some(cas.as_str()));

    let w = a
        .send(
            op("set")
                .header("x-key", "k")
                .header("x-value", "from-a")
                .header("x-cas", &cas),
        )
        .unwrap();
    assert_eq!(w.request_headers.get("x-status"), Some("Ok(())"));
    let stale = b
        .send(
            op("set")
                .header("x-key", "k")
                .header("x-value", "from-b")
                .header("x-cas", &cas),
        )
        .unwrap();
    assert_eq!(
        stale.request_headers.get("x-status"),
        Some("Err(CasMismatch)")
    );
    assert_eq!(a.shared().get("k").unwrap().0, b"from-a");

    // Another vm_id does not see it.
    let mut other = start("cas-other", "");
    let r = other.send(op("get").header("x-key", "k")).unwrap();
    assert_eq!(r.request_headers.get("x-value"), Some("<none>"));
}

#[test]
fn queue_items_reach_the_registering_vm_in_order() {
    let mut owner = start("queue", "");
    let mut sender = start("queue", "");
    for v in ["one", "two", "three"] {
        let out = sender.send(op("enqueue").header("x-value", v)).unwrap();
        assert_eq!(out.request_headers.get("x-status"), Some("Ok(())"));
    }
    // Queue ids are per vm_id: the second VM re-registered the queue on
    // start, as every Envoy worker does, so it is the owner now.
    sender.poll().unwrap();
    owner.poll().unwrap();
    let got = owner.shared().get("fixture.dequeued").map(|v| v.0);
    assert_eq!(got.as_deref(), Some(&b"one\ntwo\nthree\n"[..]));
    assert!(
        sender
            .logs()
            .iter()
            .any(|l| l.message == "fixture: dequeued two")
    );
}

#[test]
fn ticks_follow_the_virtual_clock() {
    let mut p = start("ticks", "tick");
    assert_eq!(p.tick_period(), Duration::from_secs(1));
    p.advance(Duration::from_millis(999)).unwrap();
    assert!(p.shared().get("fixture.ticks").is_none());
    p.advance(Duration::from_millis(1)).unwrap();
    assert_eq!(p.shared().get("fixture.ticks").unwrap().0, b"1");
    // A long jump fires once, like Envoy's re-armed timer.
    p.advance(Duration::from_secs(10)).unwrap();
    assert_eq!(p.shared().get("fixture.ticks").unwrap().0, b"2");
    p.advance(Duration::from_secs(1)).unwrap();
    assert_eq!(p.shared().get("fixture.ticks").unwrap().0, b"3");
    assert_eq!(
        p.shared().metric("fixture_ticks"),
        Some(MetricValue::Counter(3))
    );
}

#[test]
fn ticks_of_two_vms_count_through_cas() {
    let mut a = start("ticks2", "tick");
    let mut b = start("ticks2", "tick");
    for _ in 0..5 {
        a.tick().unwrap();
        b.tick().unwrap();
    }
    assert_eq!(a.shared().get("fixture.ticks").unwrap().0, b"10");
}

#[test]
fn http_callout_is_answered_by_the_test_and_resumes_the_request() {
    let mut p = start("callout", "");
    let id = p.begin(op("callout")).unwrap();
    assert_eq!(p.request_state(id).unwrap(), RequestState::Paused);
    let calls = p.http_callouts();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].upstream, "backend");
    assert_eq!(calls[0].headers.get(":path"), Some("/lookup"));
    assert_eq!(calls[0].timeout_ms, 5000);
    p.answer_http_callout(calls[0].token, Some(HttpResponse::new(200, b"looked-up")))
        .unwrap();
    assert_eq!(p.request_state(id).unwrap(), RequestState::Forwarded);
    let out = p.finish(id, None).unwrap();
    assert_eq!(out.request_headers.get("x-callout-body"), Some("looked-up"));
    assert!(p.http_callouts().is_empty());
    assert!(matches!(
        p.answer_http_callout(calls[0].token, None),
        Err(HostError::Unknown(_))
    ));
}

#[test]
fn failed_callout_is_reported_to_the_plugin() {
    let mut p = start("callout-fail", "");
    let id = p.begin(op("callout")).unwrap();
    let token = p.http_callouts()[0].token;
    p.answer_http_callout(token, None).unwrap();
    let out = p.finish(id, None).unwrap();
    assert_eq!(out.request_headers.get("x-callout-body"), Some("<failed>"));
}

#[test]
fn callout_to_an_unknown_cluster_is_refused() {
    let (host, module) = fixture();
    let mut p = host
        .start(
            &module,
            PluginConfig::new("clusters", b"").clusters(&["other"]),
        )
        .unwrap();
    let out = p.send(op("callout")).unwrap();
    assert_eq!(out.request_headers.get("x-status"), Some("BadArgument"));
    assert_eq!(out.state, RequestState::Forwarded);
}

#[test]
fn grpc_stream_messages_flow_both_ways() {
    let mut p = start("grpc", "");
    let id = p.begin(op("grpc")).unwrap();
    let calls = p.grpc_callouts();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert!(call.streaming);
    assert_eq!(
        (
            call.upstream.as_str(),
            call.service.as_str(),
            call.method.as_str()
        ),
        ("control", "kvmesh.v1.ReplicaState", "Report")
    );
    assert_eq!(call.sent, vec![b"hello".to_vec()]);
    p.grpc_initial_metadata(call.token, Headers::from_pairs([("x-md", "1")]))
        .unwrap();
    p.grpc_message(call.token, b"welcome").unwrap();
    p.grpc_close(call.token, 14, "unavailable").unwrap();
    assert!(p.grpc_callouts().is_empty());
    let out = p.finish(id, None).unwrap();
    assert_eq!(out.request_headers.get("x-grpc-message"), Some("welcome"));
    assert!(p.logs().iter().any(|l| {
        l.message
            .contains(&format!("grpc stream {} closed with 14", call.token))
    }));
}

#[test]
fn local_response_stops_the_request() {
    let mut p = start("local", "");
    let out = p.send(op("local").chunk(b"ignored body")).unwrap();
    assert_eq!(out.state, RequestState::LocalResponse);
    let local = out.local_response.unwrap();
    assert_eq!(local.status, 418);
    assert_eq!(local.body, b"teapot");
    assert_eq!(local.headers.get("x-fixture"), Some("local"));
    assert!(out.request_body.is_empty());
    assert_eq!(out.actions, vec![("on_request_headers", Action::Pause)]);
}

#[test]
fn a_panicking_plugin_is_an_error_not_a_host_panic() {
    let mut p = start("panic", "");
    let err = p.send(op("panic")).unwrap_err();
    match &err {
        HostError::Trap { callback, message } => {
            assert_eq!(*callback, "proxy_on_request_headers");
            assert!(message.contains("unreachable"), "{message}");
        }
        other => panic!("expected a trap, got {other:?}"),
    }
    // The SDK's panic hook logged the panic message at critical level first.
    assert!(
        p.logs()
            .iter()
            .any(|l| l.level == 5 && l.message.contains("deliberate panic"))
    );
    assert!(p.is_poisoned());
    assert!(matches!(
        p.send(op("echo")),
        Err(HostError::Poisoned("proxy_on_request_headers"))
    ));
    // Other VMs of the same module keep working.
    let mut fresh = start("panic", "");
    assert_eq!(
        fresh.send(op("echo")).unwrap().state,
        RequestState::Forwarded
    );
}

#[test]
fn foreign_functions_are_refused_with_not_found() {
    let mut p = start("foreign", "");
    let out = p.send(op("foreign")).unwrap();
    assert_eq!(out.request_headers.get("x-status"), Some("Err(NotFound)"));
    assert_eq!(p.refused_foreign_functions(), ["compress"]);
}

#[test]
fn properties_come_from_the_request_and_the_config() {
    let mut p = start("props", "");
    let out = p.send(op("property")).unwrap();
    assert_eq!(out.request_headers.get("x-path"), Some("/fixture?q=1"));
    assert_eq!(out.request_headers.get("x-root-id"), Some("fixture"));
}

#[test]
fn rejected_configuration_is_an_error_and_reconfigure_works() {
    let (host, module) = fixture();
    let err = host
        .start(&module, PluginConfig::new("reject", b"reject"))
        .unwrap_err();
    assert!(matches!(err, HostError::Rejected("plugin")), "{err}");
    let mut p = start("reconfigure", "");
    assert!(matches!(
        p.configure(b"reject"),
        Err(HostError::Rejected("plugin"))
    ));
    p.configure(b"tick").unwrap();
    assert_eq!(p.tick_period(), Duration::from_secs(1));
}

#[test]
fn metrics_are_shared_by_vm_id() {
    let mut a = start("metrics", "");
    let mut b = start("metrics", "");
    a.send(op("echo")).unwrap();
    b.send(op("echo")).unwrap();
    b.send(op("echo")).unwrap();
    assert_eq!(
        a.shared().metric("fixture_requests"),
        Some(MetricValue::Counter(3))
    );
}

#[test]
fn bad_modules_are_errors() {
    let host = Host::new().unwrap();
    assert!(matches!(host.load(b"not wasm"), Err(HostError::Compile(_))));
    let no_abi = wat(r#"(module (memory (export "memory") 1))"#);
    let err = host.load(&no_abi).unwrap_err();
    assert!(err.to_string().contains("proxy_abi_version_0_2_1"), "{err}");
    let unknown_import = wat(r#"(module (import "env" "proxy_teleport" (func))
                   (memory (export "memory") 1)
                   (func (export "proxy_abi_version_0_2_1")))"#);
    let err = host.load(&unknown_import).unwrap_err();
    assert!(err.to_string().contains("proxy_teleport"), "{err}");
    let traps_on_start = wat(r#"(module (memory (export "memory") 1)
                   (func (export "proxy_abi_version_0_2_1"))
                   (func (export "malloc") (param i32) (result i32) i32.const 0)
                   (func (export "proxy_on_vm_start") (param i32 i32) (result i32) unreachable))"#);
    let module = host.load(&traps_on_start).unwrap();
    let err = host
        .start(&module, PluginConfig::new("t", b""))
        .unwrap_err();
    assert!(
        matches!(
            err,
            HostError::Trap {
                callback: "proxy_on_vm_start",
                ..
            }
        ),
        "{err}"
    );
}

fn wat(text: &str) -> Vec<u8> {
    wat_to_wasm(text)
}

fn wat_to_wasm(text: &str) -> Vec<u8> {
    // wasmtime accepts text directly when its `wat` feature is on; keep the
    // bytes as text so the same input works for `Host::load`.
    text.as_bytes().to_vec()
}
