//! Every routing plugin in plugins/ through the kvmesh host, with the
//! data-plane scenarios: the same .wasm files Envoy runs.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use kvmesh_host_conformance::{
    ReplicaSpec, chat_body, chunks, plugin_names, primary, publish, start, text,
};
use kvmesh_host_runtime::{Host, HttpRequest, MetricValue, Plugin, RequestState};

const DEST: &str = "x-gateway-destination-endpoint";
const CHAT: &str = "/v1/chat/completions";

fn pool(n: usize) -> Vec<ReplicaSpec> {
    (0..n).map(ReplicaSpec::idle).collect()
}

/// `n` worker VMs of plugin `name` over `replicas`.
fn workers(host: &Host, name: &str, n: usize, replicas: &[ReplicaSpec]) -> Vec<Plugin> {
    let vms = start(host, name, n).unwrap_or_else(|e| panic!("{name}: {e}"));
    publish(&host.vm(&kvmesh_host_conformance::vm_id(name)), replicas);
    vms
}

fn one(host: &Host, name: &str, replicas: &[ReplicaSpec]) -> Plugin {
    workers(host, name, 1, replicas).remove(0)
}

fn route(p: &mut Plugin, path: &str, body: &[u8]) -> String {
    let out = p
        .send(HttpRequest::post_json(path, body))
        .unwrap_or_else(|e| panic!("request failed: {e}"));
    assert_eq!(out.state, RequestState::Forwarded, "{out:?}");
    primary(out.request_headers.get(DEST))
        .unwrap_or_else(|| panic!("no {DEST} header: {:?}", out.request_headers))
}

fn counters(p: &Plugin) -> HashMap<String, u64> {
    p.shared()
        .metrics()
        .into_iter()
        .filter_map(|(n, v)| match v {
            MetricValue::Counter(c) => Some((n, c)),
            _ => None,
        })
        .collect()
}

#[test]
fn the_routing_plugins_exist() {
    let names = plugin_names();
    for expected in ["round-robin", "prefix-aware", "kv-aware"] {
        assert!(
            names.iter().any(|n| n == expected),
            "plugin crate {expected} not found under plugins/ (found {names:?})"
        );
    }
}

#[test]
fn every_plugin_overwrites_the_client_endpoint_header() {
    let host = Host::new().unwrap();
    let replicas = pool(3);
    let addresses: Vec<&str> = replicas.iter().map(|r| r.address.as_str()).collect();
    for name in plugin_names() {
        let mut p = one(&host, &name, &replicas);
        let out = p
            .send(
                HttpRequest::post_json(CHAT, &chat_body("sys", "hello"))
                    .header(DEST, "203.0.113.9:1"),
            )
            .unwrap();
        let all = out.request_headers.get_all(DEST);
        assert_eq!(all.len(), 1, "{name}: one header, not appended: {all:?}");
        let first = primary(out.request_headers.get(DEST)).unwrap();
        assert!(addresses.contains(&first.as_str()), "{name}: chose {first}");
    }
}

#[test]
fn every_plugin_routes_and_counts_bad_bodies() {
    let host = Host::new().unwrap();
    let replicas = pool(2);
    let addresses: Vec<&str> = replicas.iter().map(|r| r.address.as_str()).collect();
    let huge = chat_body(&"x".repeat(900 * 1024), "q");
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("malformed", b"{\"model\": \"m\", \"messages\": [".to_vec()),
        ("not json", b"hello".to_vec()),
        ("non-UTF-8", vec![0xff, 0xfe, b'{', 0x80]),
        ("empty", Vec::new()),
        ("no prompt", br#"{"model":"m"}"#.to_vec()),
        ("huge", huge),
    ];
    for name in plugin_names() {
        let mut p = one(&host, &name, &replicas);
        for (what, body) in &bodies {
            let before = counters(&p);
            let req = HttpRequest::new("POST", CHAT)
                .header("content-type", "application/json")
                .body_in_chunks(body, 64 * 1024);
            let out = p
                .send(req)
                .unwrap_or_else(|e| panic!("{name}, {what} body: {e}"));
            assert_eq!(out.state, RequestState::Forwarded, "{name}, {what}");
            let first = primary(out.request_headers.get(DEST))
                .unwrap_or_else(|| panic!("{name}, {what}: not routed"));
            assert!(
                addresses.contains(&first.as_str()),
                "{name}, {what}: {first}"
            );
            assert_eq!(
                &out.request_body, body,
                "{name}, {what}: body must pass unchanged"
            );
            if *what != "huge" {
                let after = counters(&p);
                let counted = after
                    .iter()
                    .any(|(k, v)| before.get(k).copied().unwrap_or(0) < *v && k.contains("pars"));
                assert!(
                    counted,
                    "{name}, {what}: no parse-failure counter moved: {after:?}"
                );
            }
        }
    }
}

#[test]
fn round_robin_spreads_evenly() {
    let host = Host::new().unwrap();
    let replicas = pool(3);
    let mut p = one(&host, "round-robin", &replicas);
    let mut count: HashMap<String, usize> = HashMap::new();
    for i in 0..30 {
        *count
            .entry(route(
                &mut p,
                CHAT,
                &chat_body("same system", &format!("q{i}")),
            ))
            .or_default() += 1;
    }
    assert_eq!(count.len(), 3, "{count:?}");
    assert!(count.values().all(|&c| c == 10), "{count:?}");
}

#[test]
fn prefix_aware_keeps_shared_prefixes_together() {
    let host = Host::new().unwrap();
    let mut vms = workers(&host, "prefix-aware", 2, &pool(4));
    let systems: Vec<String> = (0..3).map(|g| text(g, 2048)).collect();
    let mut homes: HashMap<usize, Vec<String>> = HashMap::new();
    for i in 0..30 {
        let g = i % 3;
        // Alternate worker VMs: affinity is shared across workers.
        let p = &mut vms[i % 2];
        let body = chat_body(&systems[g], &format!("question {i}"));
        homes.entry(g).or_default().push(route(p, CHAT, &body));
    }
    for (g, chosen) in &homes {
        assert!(
            chosen.iter().all(|c| *c == chosen[0]),
            "group {g} split across replicas: {chosen:?}"
        );
    }
}

#[test]
fn prefix_aware_worker_vms_balance_long_requests_through_the_board() {
    // One tenant (4 chunks of system prompt) placed by VM 0; then its long
    // requests (about 35 chunks of their own) from VM 1, then VM 0. The
    // first stays home; VM 0 can only know that the home was just sent 35
    // own chunks from the board, and must move the second to a replica
    // sent none (a plugin that shares placements only keeps it home).
    let host = Host::new().unwrap();
    let mut vms = workers(&host, "prefix-aware", 2, &pool(4));
    let system = text(7, 1024);
    let home = route(&mut vms[0], CHAT, &chat_body(&system, "hello"));
    let long = |i: u64| chat_body(&system, &text(100 + i, 9000));
    assert_eq!(route(&mut vms[1], CHAT, &long(0)), home);
    let second = route(&mut vms[0], CHAT, &long(1));
    assert_ne!(second, home, "VM 0 did not see VM 1's long request");
    // A short request of the tenant still goes home, on either VM.
    for vm in &mut vms {
        assert_eq!(route(vm, CHAT, &chat_body(&system, "again")), home);
    }
    let shared = counters(&vms[0])
        .into_iter()
        .find(|(k, _)| k.ends_with("board.shared"))
        .map_or(0, |(_, v)| v);
    assert!(shared >= 2, "board entries read: {shared}");
}

#[test]
fn prefix_aware_spills_a_hot_prefix_past_its_load_bound() {
    let host = Host::new().unwrap();
    let replicas = pool(4);
    let mut p = one(&host, "prefix-aware", &replicas);
    let system = text(99, 2048);
    // Keep the streams open: in flight on the chosen replica.
    let mut chosen: HashMap<String, usize> = HashMap::new();
    let mut open = Vec::new();
    for i in 0..40 {
        let id = p
            .begin(HttpRequest::post_json(
                CHAT,
                &chat_body(&system, &format!("q{i}")),
            ))
            .unwrap();
        open.push(id);
        let state = p.request_state(id).unwrap();
        assert_eq!(state, RequestState::Forwarded);
    }
    for id in open {
        let out = p.finish(id, None).unwrap();
        *chosen
            .entry(primary(out.request_headers.get(DEST)).unwrap())
            .or_default() += 1;
    }
    let max = *chosen.values().max().unwrap();
    assert!(
        chosen.len() > 1,
        "a hot prefix pinned one replica: {chosen:?}"
    );
    assert!(
        max >= 40 / 4,
        "the home replica should still take its share: {chosen:?}"
    );
}

#[test]
fn kv_aware_follows_the_resident_prefix() {
    let host = Host::new().unwrap();
    let system = text(7, 4096);
    let body = chat_body(&system, "which replica holds me?");
    let hashes = chunks(CHAT, &body);
    assert!(hashes.len() >= 16, "prefix of {} chunks", hashes.len());
    let mut replicas = pool(4);
    replicas[2].resident[0] = hashes[..hashes.len() - 1].to_vec();
    replicas[1].resident[0] = hashes[..2].to_vec();
    let mut p = one(&host, "kv-aware", &replicas);
    assert_eq!(route(&mut p, CHAT, &body), replicas[2].address);
}

#[test]
fn kv_aware_avoids_high_queued_prefill() {
    let host = Host::new().unwrap();
    let system = text(8, 2048);
    let body = chat_body(&system, "q");
    let hashes = chunks(CHAT, &body);
    let mut replicas = pool(3);
    replicas[0].resident[0] = hashes.clone();
    replicas[0].queued_prefill_tokens = 2_000_000;
    replicas[0].waiting = 500;
    let mut p = one(&host, "kv-aware", &replicas);
    let chosen = route(&mut p, CHAT, &body);
    assert_ne!(chosen, replicas[0].address, "picked the overloaded holder");

    // With the holder idle again, it wins.
    replicas[0].queued_prefill_tokens = 0;
    replicas[0].waiting = 0;
    let mut p = one(&Host::new().unwrap(), "kv-aware", &replicas);
    assert_eq!(route(&mut p, CHAT, &body), replicas[0].address);
}

#[test]
fn no_plugin_chooses_a_replica_that_left_the_pool() {
    let host = Host::new().unwrap();
    for name in plugin_names() {
        let mut replicas = pool(3);
        let mut p = one(&host, &name, &replicas);
        for i in 0..6 {
            route(&mut p, CHAT, &chat_body("s", &format!("{i}")));
        }
        let gone = replicas.remove(1);
        publish(&host.vm(&kvmesh_host_conformance::vm_id(&name)), &replicas);
        for i in 0..12 {
            let c = route(&mut p, CHAT, &chat_body("s", &format!("later {i}")));
            assert_ne!(c, gone.address, "{name} chose a removed replica");
        }
    }
}
