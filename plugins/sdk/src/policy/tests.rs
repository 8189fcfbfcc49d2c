use std::collections::HashMap;

use proptest::prelude::*;

use super::testing::{chain, pool, replica};
use super::*;
use crate::proto::Tier;

fn route(p: &mut dyn Policy, s: &Snapshot, chunks: &[u64]) -> Choice {
    let req = Request {
        chunks,
        prompt_bytes: chunks.len() * 256,
    };
    let choice = p.select(s, &req);
    p.observe(
        s,
        &Event::Routed {
            request: &req,
            choice: &choice,
        },
    );
    choice
}

fn id(s: &Snapshot, r: Option<ReplicaRef>) -> String {
    s.get(r.unwrap()).unwrap().id.clone()
}

#[test]
fn round_robin_spreads_evenly() {
    let s = pool(4);
    let mut p = RoundRobin::default();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..400 {
        let c = route(&mut p, &s, &[]);
        assert_eq!(c.fallbacks.len(), 2);
        assert!(!c.fallbacks.contains(&c.primary.unwrap()));
        *counts.entry(id(&s, c.primary)).or_default() += 1;
    }
    assert_eq!(counts.len(), 4);
    assert!(counts.values().all(|&n| n == 100), "{counts:?}");
}

#[test]
fn empty_pool_chooses_nothing() {
    let s = pool(0);
    for p in [
        &RoundRobin::default() as &dyn Policy,
        &PrefixAware::default(),
        &KvAware::default(),
    ] {
        let c = p.select(
            &s,
            &Request {
                chunks: &[1],
                prompt_bytes: 256,
            },
        );
        assert_eq!(c, Choice::none());
    }
}

/// Each tenant stays on one replica however small a part of each prompt its
/// prefix is: a prefix of 1 chunk in 5 (a system prompt before a long
/// retrieved context) is followed as a prefix of 4 in 6 is. A router that
/// follows a prefix only above a share of the prompt (SGLang's
/// `cache_threshold`, 0.3) spreads such a tenant over every replica, and each
/// replica computes its prefix again (docs/benchmarks.md, runs 11 and 12).
#[test]
fn prefix_aware_keeps_shared_prefix_together_sequentially() {
    for (shared, len) in [(4, 6), (1, 5)] {
        let s = pool(4);
        let mut p = PrefixAware::default();
        let mut by_tenant: HashMap<u64, String> = HashMap::new();
        for round in 0..20u64 {
            for tenant in 0..8u64 {
                let c = route(
                    &mut p,
                    &s,
                    &chain(tenant, shared, round * 100 + tenant, len),
                );
                let r = c.primary.unwrap();
                p.observe(&s, &Event::Finished { replica: r });
                let at = id(&s, Some(r));
                let first = by_tenant.entry(tenant).or_insert_with(|| at.clone());
                assert_eq!(
                    *first, at,
                    "{shared}/{len}: tenant {tenant} moved in round {round}"
                );
                if round > 0 {
                    assert_eq!(c.reason, Reason::Affinity);
                    assert_eq!(c.matched_chunks, shared as u32);
                }
            }
        }
        // Eight tenants over four replicas: more than one used.
        let used: std::collections::HashSet<_> = by_tenant.values().collect();
        assert!(used.len() > 1, "{shared}/{len}: {by_tenant:?}");
    }
}

#[test]
fn prefix_aware_spills_a_hot_prefix_within_the_bound() {
    let s = pool(4);
    let mut p = PrefixAware::default();
    let mut held = Vec::new();
    // 40 concurrent requests of one prefix, none finishing.
    for i in 0..40u64 {
        let bound = p.load_bound(&s);
        let c = route(&mut p, &s, &chain(1, 4, i, 5));
        let r = c.primary.unwrap();
        assert!(
            p.in_flight(r) <= bound,
            "request {i}: {} > {bound}",
            p.in_flight(r)
        );
        held.push(r);
    }
    let mut per: HashMap<ReplicaRef, u64> = HashMap::new();
    for r in held {
        *per.entry(r).or_default() += 1;
    }
    assert_eq!(per.len(), 4, "a hot prefix must spread: {per:?}");
    assert!(per.values().all(|&n| n <= 13), "{per:?}");
}

#[test]
fn prefix_aware_does_not_spill_a_small_imbalance() {
    // Two replicas, a prefix whose home takes every request while it is fewer
    // than `spill_gap` (4) requests ahead of the other replica.
    let s = pool(2);
    let mut p = PrefixAware::default();
    let home = route(&mut p, &s, &chain(7, 4, 0, 5)).primary.unwrap();
    for i in 1..4u64 {
        let c = route(&mut p, &s, &chain(7, 4, i, 5));
        assert_eq!(
            c.primary,
            Some(home),
            "request {i} spilled at {i} in flight"
        );
        assert_eq!(c.reason, Reason::Affinity);
    }
    // Four ahead: the fifth spills. With `spill_gap = 1` (the relative bound
    // alone) the third would already have spilled: two of three in flight on
    // one of two replicas is over `ceil(1.25 * 3 / 2)`.
    let c = route(&mut p, &s, &chain(7, 4, 4, 5));
    assert_eq!(c.reason, Reason::Spilled);
    assert_ne!(c.primary, Some(home));
    let mut strict = PrefixAware::new(PrefixAwareConfig {
        spill_gap: 1,
        ..PrefixAwareConfig::default()
    })
    .unwrap();
    route(&mut strict, &s, &chain(7, 4, 0, 5));
    route(&mut strict, &s, &chain(7, 4, 1, 5));
    assert_eq!(
        route(&mut strict, &s, &chain(7, 4, 2, 5)).reason,
        Reason::Spilled
    );
}

#[test]
fn prefix_aware_keeps_a_cached_request_at_a_home_busy_prefilling_for_a_while() {
    // Two replicas; a tenant's home takes requests until it is `spill_gap` (4) ahead.
    let mut s = pool(2);
    let mut p = PrefixAware::default();
    let request = |i: u64| chain(7, 4, i, 5); // 4 chunks cached, 1 of its own
    let home = route(&mut p, &s, &request(0)).primary.unwrap();
    let slot = |r: ReplicaRef| s.get(r).unwrap().id[1..].parse::<usize>().unwrap();
    let (h, o) = (slot(home), 1 - slot(home));
    for i in 1..4 {
        assert_eq!(route(&mut p, &s, &request(i)).primary, Some(home));
    }
    assert_eq!(p.in_flight(home), p.load_bound(&s));
    let at = |s: &mut Snapshot, home_queued, other_queued| {
        s.upsert(&replica(h, home_queued));
        s.upsert(&replica(o, other_queued));
    };
    let try_route = |p: &PrefixAware, s: &Snapshot, i| {
        p.select(
            s,
            &Request {
                chunks: &request(i),
                prompt_bytes: 5 * 256,
            },
        )
    };
    // The home reports `spill_tokens` (1,024) or more queued prefill: the request's own
    // chunk is computed there soon (shortest work first), its whole prompt elsewhere
    // would wait behind the prefill there. It stays, however idle the other replica,
    // and says why.
    for other in [2008, 0] {
        at(&mut s, 2057, other);
        let c = try_route(&p, &s, 10);
        assert_eq!((c.primary, c.reason), (Some(home), Reason::Affinity));
        let figures: HashMap<_, _> = c.figures.iter().copied().collect();
        assert_eq!(figures["home_queued"], 2057);
        assert_eq!(figures["home_in_flight"], figures["in_flight_bound"]);
    }
    // A home queueing less prefill is decoding: the in-flight bound alone decides.
    at(&mut s, 1023, 0);
    assert_eq!(try_route(&p, &s, 11).reason, Reason::Spilled);
    // Kept home, it takes requests up to `spill_gap` (4) over the bound, then they leave.
    at(&mut s, 2057, 2008);
    for i in 20.. {
        assert!(i < 100, "never left");
        let bound = p.load_bound(&s);
        if route(&mut p, &s, &request(i)).primary != Some(home) {
            assert_eq!(p.in_flight(home), bound + 4);
            break;
        }
    }
    // `spill_tokens: 0` (no prefill awareness) keeps the hard bound.
    let mut off = PrefixAware::new(PrefixAwareConfig {
        spill_tokens: 0,
        ..PrefixAwareConfig::default()
    })
    .unwrap();
    at(&mut s, 0, 0);
    let home = route(&mut off, &s, &request(0)).primary.unwrap();
    at(&mut s, 2057, 2008);
    for i in 1..4 {
        assert_eq!(route(&mut off, &s, &request(i)).primary, Some(home));
    }
    assert_eq!(route(&mut off, &s, &request(4)).reason, Reason::Spilled);
}

#[test]
fn prefix_aware_spill_keeps_the_prefix_home_and_a_steady_second_holder() {
    let s = pool(4);
    let mut p = PrefixAware::default();
    let mut held = Vec::new();
    let first = route(&mut p, &s, &chain(3, 4, 0, 5));
    let home = first.primary.unwrap();
    held.push(home);
    // Enough concurrent requests of one prefix to spill several times.
    let mut spilled_to = Vec::new();
    for i in 1..12u64 {
        let c = route(&mut p, &s, &chain(3, 4, i, 5));
        if c.reason == Reason::Spilled {
            spilled_to.push((i, c.primary.unwrap()));
        }
        held.push(c.primary.unwrap());
    }
    assert!(!spilled_to.is_empty(), "the prefix never spilled");
    // The first spill goes to the prefix's second replica in rendezvous order,
    // not wherever is least loaded.
    let (spilled, second) = spilled_to[0];
    assert_eq!(second, first.fallbacks[0]);
    for r in held {
        p.observe(&s, &Event::Finished { replica: r });
    }
    // All finished: the prefix is still at home, with its whole depth matched.
    let c = route(&mut p, &s, &chain(3, 4, 100, 5));
    assert_eq!((c.primary, c.reason), (Some(home), Reason::Affinity));
    assert_eq!(c.matched_chunks, 4);
    // A spilled request's own chunks follow it: its next turn (its whole
    // chain and one chunk more) goes where its history is cached.
    let c = route(&mut p, &s, &chain(3, 4, spilled, 6));
    assert_eq!((c.primary, c.matched_chunks), (Some(second), 5));
}

#[test]
fn prefix_aware_spills_only_requests_mostly_their_own_off_a_home_with_queued_prefill() {
    let mut s = pool(4);
    let mut p = PrefixAware::default();
    // A tenant's system prompt (4 chunks) and a short question: its home.
    let home = route(&mut p, &s, &chain(7, 4, 0, 5)).primary.unwrap();
    p.observe(&s, &Event::Finished { replica: home });
    let slot = |s: &Snapshot, r: ReplicaRef| s.get(r).unwrap().id[1..].parse::<usize>().unwrap();
    let i = slot(&s, home);
    let long = chain(7, 4, 1, 16); // 4 cached, 12 of its own
    let short = chain(7, 4, 2, 6); // 4 cached, 2 of its own

    // The home reports a long prefill queued, far over the mean (1250) plus
    // 1024; the others are idle.
    s.upsert(&replica(i, 5000));
    let c = route(&mut p, &s, &long);
    assert_eq!(c.reason, Reason::Spilled);
    assert_ne!(c.primary, Some(home));
    assert_eq!(c.matched_chunks, 0);
    // A request mostly cached stays home whatever is queued there.
    let c = route(&mut p, &s, &short);
    assert_eq!((c.primary, c.reason), (Some(home), Reason::Affinity));

    // Within the bound (1.25 * mean + 1024) the long one stays home: 1800
    // queued against a bound of 1.25 * 450 + 1024 = 1587 spills, 1500
    // against 1493 spills, 1400 against 1462 does not.
    // (Each a new question: a repeat would follow its own chunks.)
    for (k, (queued, spills)) in [(1800, true), (1500, true), (1400, false)]
        .into_iter()
        .enumerate()
    {
        s.upsert(&replica(i, queued));
        let c = route(&mut p, &s, &chain(7, 4, 10 + k as u64, 16));
        assert_eq!(c.primary != Some(home), spills, "queued {queued}: {c:?}");
    }
    // The spills did not move the prefix's home.
    s.upsert(&replica(i, 0));
    let c = route(&mut p, &s, &chain(7, 4, 3, 6));
    assert_eq!((c.primary, c.matched_chunks), (Some(home), 4));

    // `spill_tokens: 0` turns the prefill bound off.
    let mut off = PrefixAware::new(PrefixAwareConfig {
        spill_tokens: 0,
        ..PrefixAwareConfig::default()
    })
    .unwrap();
    s.upsert(&replica(i, 0));
    let home = route(&mut off, &s, &chain(7, 4, 0, 5)).primary.unwrap();
    let j = slot(&s, home);
    s.upsert(&replica(j, 50_000));
    assert_eq!(route(&mut off, &s, &long).primary, Some(home));
}

#[test]
fn prefix_aware_spills_a_request_mostly_its_own_to_the_least_queued_prefill() {
    let mut s = pool(4);
    let mut p = PrefixAware::default();
    let first = route(&mut p, &s, &chain(7, 4, 0, 5));
    let home = first.primary.unwrap();
    p.observe(&s, &Event::Finished { replica: home });
    let slot = |r: ReplicaRef| s.get(r).unwrap().id[1..].parse::<usize>().unwrap();
    // The rendezvous order's first two others are busy (under the bound of
    // 1.25 * 1825 + 1024 = 3306 all the same), the last is idle.
    let (next, then) = (first.fallbacks[0], first.fallbacks[1]);
    let idle = s
        .replicas()
        .map(|(r, _)| r)
        .find(|&r| ![home, next, then].contains(&r))
        .unwrap();
    let (h, n, t) = (slot(home), slot(next), slot(then));
    s.upsert(&replica(h, 5000));
    s.upsert(&replica(n, 1500));
    s.upsert(&replica(t, 800));
    let c = route(&mut p, &s, &chain(7, 4, 1, 16));
    assert_eq!((c.primary, c.reason), (Some(idle), Reason::Spilled));
    // The decision header says why: the home's queue over the bound, and
    // where it went instead.
    assert_eq!(
        c.figures,
        [
            ("home_in_flight", 0),
            ("in_flight_bound", 4),
            ("home_queued", 5000),
            ("prefill_bound", 3306),
            ("home_recent", 5),
            ("lightest_recent", 0),
            ("primary_in_flight", 0),
            ("primary_queued", 0),
            ("primary_recent", 0),
        ]
    );
    // A short one still stays home, with nothing to explain.
    let c = route(&mut p, &s, &chain(7, 4, 2, 6));
    assert_eq!((c.primary, c.reason), (Some(home), Reason::Affinity));
    assert!(c.figures.is_empty(), "{:?}", c.figures);

    // Among replicas equally idle, the one sent the least own prefill lately:
    // `next` (first of them in rendezvous order) just got another tenant's
    // long request from a worker VM, so `then` takes it. By the rendezvous
    // order alone it would go to `next`, piling a second long prefill there.
    let mut p = PrefixAware::default();
    let first = route(&mut p, &s, &chain(7, 4, 0, 5));
    p.observe(&s, &Event::Finished { replica: home });
    assert_eq!(
        (first.primary, &first.fallbacks[..]),
        (Some(home), &[next, then][..])
    );
    for r in [n, t] {
        s.upsert(&replica(r, 0));
    }
    let other = chain(9, 4, 0, 40);
    p.observe(
        &s,
        &Event::Shared {
            chunks: &other[..4],
            total_chunks: 40,
            own_chunks: 36,
            placed: false,
            replica: next,
        },
    );
    let c = route(&mut p, &s, &chain(7, 4, 3, 16));
    assert_eq!((c.primary, c.reason), (Some(then), Reason::Spilled));
}

#[test]
fn prefix_aware_moves_a_request_mostly_its_own_off_a_home_that_recently_got_more_own_prefill() {
    // Four tenants, one per replica, placed; then tenant 0 sends long
    // requests (4 chunks of system prompt, 36 of its own) one after another,
    // each finished before the next: no queue is ever reported, no in-flight
    // bound is reached.
    let s = pool(4);
    let mut p = PrefixAware::default();
    let homes: Vec<ReplicaRef> = (0..4u64)
        .map(|t| {
            let r = route(&mut p, &s, &chain(t, 4, t, 5)).primary.unwrap();
            p.observe(&s, &Event::Finished { replica: r });
            r
        })
        .collect();
    let mut served = Vec::new();
    for q in 0..6u64 {
        let c = route(&mut p, &s, &chain(0, 4, 100 + q, 40));
        let r = c.primary.unwrap();
        p.observe(&s, &Event::Finished { replica: r });
        if r == homes[0] {
            assert_eq!((c.reason, c.matched_chunks), (Reason::Affinity, 4));
        } else {
            assert_eq!((c.reason, c.matched_chunks), (Reason::Spilled, 0));
        }
        served.push(r);
        if q == 0 {
            // The home is now 36 own chunks ahead of the others; a request
            // mostly cached stays there all the same.
            let ahead = p.recent_prefill(homes[0]) - p.recent_prefill(homes[1]);
            assert!(ahead > 30.0, "{ahead}");
            let c = route(&mut p, &s, &chain(0, 4, 50, 6));
            p.observe(&s, &Event::Finished { replica: homes[0] });
            assert_eq!((c.primary, c.reason), (Some(homes[0]), Reason::Affinity));
        }
    }
    // The first stays home (every replica got one tenant's 5 chunks); the
    // next moves (home 36 own chunks ahead, more than twice the 4 it
    // recomputes), and the six spread over the four replicas.
    assert_eq!(served[0], homes[0]);
    assert_ne!(served[1], homes[0]);
    let mut per: HashMap<ReplicaRef, usize> = HashMap::new();
    for &r in &served {
        *per.entry(r).or_default() += 1;
    }
    assert_eq!(per.len(), 4, "{per:?}");
    assert!(per.values().all(|&n| n <= 2), "{per:?}");
    // A replica reporting more queued prefill than the mean takes no move,
    // however little own prefill it was sent: with one idle replica left
    // (the others queue 3000 tokens, the mean 2250), the next move goes there.
    let (h0, idle) = (homes[0], homes[3]);
    let mut busy = s.clone();
    for (i, (r, _)) in s.replicas().enumerate() {
        if r != idle {
            busy.upsert(&replica(i, 3000));
        }
    }
    let moved = (0..6u64)
        .map(|q| {
            let c = route(&mut p, &busy, &chain(0, 4, 300 + q, 40));
            p.observe(
                &busy,
                &Event::Finished {
                    replica: c.primary.unwrap(),
                },
            );
            c.primary.unwrap()
        })
        .filter(|&r| r != h0)
        .collect::<Vec<_>>();
    assert!(
        !moved.is_empty() && moved.iter().all(|&r| r == idle),
        "{moved:?}"
    );
    // The home stayed: a short request of the tenant is still cached there.
    let c = route(&mut p, &s, &chain(0, 4, 200, 6));
    assert_eq!(
        (c.primary, c.reason, c.matched_chunks),
        (Some(homes[0]), Reason::Affinity, 4)
    );
    // `balance_window: 0` turns it off.
    let mut off = PrefixAware::new(PrefixAwareConfig {
        balance_window: 0,
        ..PrefixAwareConfig::default()
    })
    .unwrap();
    let home = route(&mut off, &s, &chain(0, 4, 0, 5)).primary.unwrap();
    off.observe(&s, &Event::Finished { replica: home });
    for q in 0..6u64 {
        let c = route(&mut off, &s, &chain(0, 4, 100 + q, 40));
        off.observe(
            &s,
            &Event::Finished {
                replica: c.primary.unwrap(),
            },
        );
        assert_eq!((c.primary, c.reason), (Some(home), Reason::Affinity));
    }
}

#[test]
fn prefix_aware_worker_vms_count_each_others_own_prefill_through_the_board() {
    // Two worker VMs take turns: a tenant placed by `a`, then its long
    // requests (4 chunks of system prompt, 36 of its own) alternate between
    // `b` and `a`. The first stays home; the second, on `a`, must see the
    // 36 own chunks `b` sent home and move. Without the shared figures `a`
    // counts only its own 5 and keeps it home.
    let s = pool(4);
    for share in [true, false] {
        let (mut a, mut b) = (PrefixAware::default(), PrefixAware::default());
        let mut quiet = PrefixAware::default();
        let home = route_shared(&mut a, &mut b, &s, &chain(0, 4, 0, 5))
            .primary
            .unwrap();
        let first = if share {
            route_shared(&mut b, &mut a, &s, &chain(0, 4, 100, 40))
        } else {
            // `b` routes it but does not share it: `a` hears nothing.
            route_shared(&mut b, &mut quiet, &s, &chain(0, 4, 100, 40))
        };
        assert_eq!(
            (first.primary, first.reason),
            (Some(home), Reason::Affinity)
        );
        let second = route_shared(&mut a, &mut b, &s, &chain(0, 4, 101, 40));
        if share {
            assert_ne!(second.primary, Some(home), "{second:?}");
            assert_eq!((second.reason, second.matched_chunks), (Reason::Spilled, 0));
            // And `b`, told of the move, sends the third to neither the
            // home nor the replica `a` moved the second to.
            let third = route_shared(&mut b, &mut a, &s, &chain(0, 4, 102, 40));
            assert_eq!(third.reason, Reason::Spilled, "{third:?}");
            assert!(![Some(home), second.primary].contains(&third.primary));
        } else {
            assert_eq!(second.primary, Some(home), "{second:?}");
        }
    }
}

#[test]
fn prefix_aware_least_counts_a_tenant_with_a_long_first_request_once() {
    // 16 tenants on 4 replicas; the first one's first request carries a long
    // text of its own (40 chunks after a 4-chunk system prompt). Counted by
    // chunks its replica looked like eight tenants and got one; counted by
    // prefixes every replica gets four, reported or not.
    for report in [true, false] {
        for salt in 0..20u64 {
            let mut s = pool(4);
            let mut p = PrefixAware::default();
            let mut per: HashMap<ReplicaRef, usize> = HashMap::new();
            for t in 0..16u64 {
                let tenant = salt * 1000 + t;
                let ch = chain(tenant, 4, tenant, if t == 0 { 44 } else { 5 });
                let c = route(&mut p, &s, &ch);
                assert_eq!(c.reason, Reason::Placed);
                let r = c.primary.unwrap();
                p.observe(&s, &Event::Finished { replica: r });
                if report {
                    s.add_resident(&id(&s, Some(r)), Tier::Device as i32, &ch);
                }
                *per.entry(r).or_default() += 1;
            }
            let counts: Vec<usize> = per.into_values().collect();
            assert_eq!(counts, vec![4; 4], "salt {salt} report {report}");
        }
    }
}

/// Every placement rule.
const PLACEMENTS: [Placement; 3] = [
    Placement::Least,
    Placement::TwoChoices,
    Placement::Rendezvous,
];

fn placing(placement: Placement) -> PrefixAware {
    PrefixAware::new(PrefixAwareConfig {
        placement,
        ..PrefixAwareConfig::default()
    })
    .unwrap()
}

/// Routes `chunks` on `on` (the request finishes at once) and tells `peer`
/// what `on` placed, as the filter does through the placement board.
fn route_shared(
    on: &mut PrefixAware,
    peer: &mut PrefixAware,
    s: &Snapshot,
    chunks: &[u64],
) -> Choice {
    let c = route(on, s, chunks);
    on.observe(
        s,
        &Event::Finished {
            replica: c.primary.unwrap(),
        },
    );
    let req = Request {
        chunks,
        prompt_bytes: chunks.len() * 256,
    };
    if on.shares(&req, &c) {
        peer.observe(
            s,
            &Event::Shared {
                chunks,
                total_chunks: chunks.len() as u32,
                own_chunks: c.own_chunks(&req),
                placed: c.reason.is_placement(),
                replica: c.primary.unwrap(),
            },
        );
    }
    c
}

#[test]
fn prefix_aware_new_prefix_placement_agrees_across_instances_that_share_placements() {
    // Two worker VMs with separate tables and different histories (each routes
    // its own requests, and learns the other's placements as the board hands
    // them over) place every new prefix identically, under every placement.
    for placement in PLACEMENTS {
        let mut s = pool(8);
        let (mut a, mut b) = (placing(placement), placing(placement));
        for t in 100..110 {
            route_shared(&mut b, &mut a, &s, &chain(t, 3, t, 3));
            route_shared(&mut a, &mut b, &s, &chain(t + 50, 3, t, 3 + t as usize % 4));
        }
        // Uneven residency, so the counts have something to choose by.
        for (i, (_, rep)) in s.clone().replicas().enumerate() {
            let held: Vec<u64> = (0..i as u64 * 3)
                .map(|c| 900_000 + 100 * i as u64 + c)
                .collect();
            s.add_resident(&rep.id, Tier::Device as i32, &held);
        }
        for t in 0..50 {
            let ch = chain(t, 3, t, 3);
            let req = Request {
                chunks: &ch,
                prompt_bytes: 768,
            };
            let (ca, cb) = (a.select(&s, &req), b.select(&s, &req));
            assert_eq!(ca.primary, cb.primary, "{placement:?}");
            let reason = match placement {
                Placement::Rendezvous => Reason::Hash,
                _ => Reason::Placed,
            };
            assert_eq!(ca.reason, reason);
            // One of them places it, the other learns it.
            let (on, peer) = if t % 2 == 0 {
                (&mut a, &mut b)
            } else {
                (&mut b, &mut a)
            };
            route_shared(on, peer, &s, &ch);
            let next = chain(t, 3, t + 1000, 4);
            assert_eq!(
                (peer.select(
                    &s,
                    &Request {
                        chunks: &next,
                        prompt_bytes: 1024
                    }
                ))
                .primary,
                ca.primary,
                "{placement:?}: the peer follows the shared placement"
            );
        }
    }
}

/// Places `tenants` new prefixes one after another on `replicas`; with
/// `report`, each is reported resident on its replica before the next
/// arrives, else none is (a burst of placements faster than any prefill).
/// The largest number of prefixes on one replica.
fn most_prefixes_on_one(
    placement: Placement,
    replicas: usize,
    tenants: u64,
    salt: u64,
    report: bool,
) -> usize {
    let mut s = pool(replicas);
    let mut p = placing(placement);
    let mut per: HashMap<ReplicaRef, usize> = HashMap::new();
    for t in 0..tenants {
        let ch = chain(salt * 1000 + t, 4, salt * 1000 + t, 4);
        let c = route(&mut p, &s, &ch);
        let r = c.primary.unwrap();
        p.observe(&s, &Event::Finished { replica: r });
        if report {
            let rid = id(&s, Some(r));
            s.add_resident(&rid, Tier::Device as i32, &ch);
        }
        *per.entry(r).or_default() += 1;
    }
    per.into_values().max().unwrap_or(0)
}

#[test]
fn prefix_aware_least_places_new_prefixes_evenly_reported_or_not() {
    // 16 equal prefixes on 4 replicas, over 200 sets of prefixes: always 4
    // each, whether or not the replicas report them before the next arrives.
    for salt in 0..200 {
        for report in [true, false] {
            assert_eq!(
                most_prefixes_on_one(Placement::Least, 4, 16, salt, report),
                4,
                "salt {salt} report {report}"
            );
        }
    }
}

#[test]
fn prefix_aware_two_choices_spreads_new_prefixes_more_evenly_than_rendezvous() {
    // 16 prefixes on 4 replicas (4 each would be even), over 200 sets of
    // prefixes.
    let (mut two, mut hash) = (Vec::new(), Vec::new());
    for salt in 0..200 {
        two.push(most_prefixes_on_one(
            Placement::TwoChoices,
            4,
            16,
            salt,
            true,
        ));
        hash.push(most_prefixes_on_one(
            Placement::Rendezvous,
            4,
            16,
            salt,
            true,
        ));
    }
    let mean = |v: &[usize]| v.iter().sum::<usize>() as f64 / v.len() as f64;
    let worst = |v: &[usize]| *v.iter().max().unwrap();
    assert!(
        mean(&two) <= 5.0 && worst(&two) <= 6,
        "two choices: mean {} worst {}",
        mean(&two),
        worst(&two)
    );
    assert!(
        mean(&hash) >= mean(&two) + 0.75,
        "rendezvous {} two choices {}",
        mean(&hash),
        mean(&two)
    );
}

#[test]
fn prefix_aware_counts_a_placement_once_reported_or_not() {
    let mut s = pool(2);
    let mut p = PrefixAware::default();
    let ch = chain(3, 4, 3, 6);
    let r = route(&mut p, &s, &ch).primary.unwrap();
    assert_eq!(p.placed_chunks(&s, r), 6, "placed, not reported");
    // Reported (its first blocks sealed): counted from the report only.
    s.add_resident(&id(&s, Some(r)), Tier::Device as i32, &ch[..2]);
    assert_eq!(p.placed_chunks(&s, r), 2);
    p.observe(&s, &Event::Finished { replica: r });
    s.add_resident(&id(&s, Some(r)), Tier::Host as i32, &ch);
    assert_eq!(p.placed_chunks(&s, r), 6);
    // Evicted later: not counted again as pending.
    s.remove_resident(&id(&s, Some(r)), Tier::Device as i32, &ch);
    s.remove_resident(&id(&s, Some(r)), Tier::Host as i32, &ch);
    route(&mut p, &s, &chain(4, 4, 4, 1));
    assert_eq!(p.placed_chunks(&s, r), 0);
}

#[test]
fn prefix_aware_learns_a_shared_placement_as_affinity() {
    // What another VM placed is where this one sends the prefix next, even
    // where this VM would have placed it elsewhere.
    let s = pool(4);
    let mut p = PrefixAware::default();
    let ch = chain(5, 4, 0, 5);
    let req = Request {
        chunks: &ch,
        prompt_bytes: 5 * 256,
    };
    let own = p.select(&s, &req).primary.unwrap();
    let other = s.replicas().map(|(r, _)| r).find(|&r| r != own).unwrap();
    p.observe(
        &s,
        &Event::Shared {
            chunks: &ch[..4],
            total_chunks: 5,
            own_chunks: 5,
            placed: true,
            replica: other,
        },
    );
    assert_eq!(p.placed_chunks(&s, other), 5);
    let c = route(&mut p, &s, &chain(5, 4, 1, 5));
    assert_eq!(
        (c.primary, c.reason, c.matched_chunks),
        (Some(other), Reason::Affinity, 4)
    );
}

#[test]
fn prefix_aware_keeps_a_placed_prefix_where_it_is() {
    let mut s = pool(4);
    let mut p = PrefixAware::default();
    let mut home = HashMap::new();
    for t in 0..16u64 {
        let ch = chain(t, 4, t, 5);
        let c = route(&mut p, &s, &ch);
        assert_eq!(c.reason, Reason::Placed);
        let r = c.primary.unwrap();
        p.observe(&s, &Event::Finished { replica: r });
        let rid = id(&s, Some(r));
        s.add_resident(&rid, Tier::Device as i32, &ch[..4]);
        home.insert(t, r);
    }
    for round in 1..4u64 {
        for t in 0..16u64 {
            let c = route(&mut p, &s, &chain(t, 4, 100 * round + t, 5));
            p.observe(
                &s,
                &Event::Finished {
                    replica: c.primary.unwrap(),
                },
            );
            assert_eq!((c.primary, c.reason), (Some(home[&t]), Reason::Affinity));
        }
    }
}

#[test]
fn prefix_aware_places_a_new_prefix_on_the_emptier_replica() {
    // Two replicas: both are the prefix's two choices; the one reporting more
    // resident chunks does not get it, whatever the rendezvous order.
    for fuller in ["r0", "r1"] {
        let mut s = pool(2);
        let held: Vec<u64> = (0..10).map(|c| 500_000 + c).collect();
        s.add_resident(fuller, Tier::Host as i32, &held);
        let p = PrefixAware::default();
        for t in 0..20u64 {
            let ch = chain(t, 4, t, 5);
            let c = p.select(
                &s,
                &Request {
                    chunks: &ch,
                    prompt_bytes: 5 * 256,
                },
            );
            assert_eq!(c.reason, Reason::Placed);
            assert_ne!(id(&s, c.primary), fuller);
        }
    }
}

#[test]
fn prefix_aware_learns_placements_of_other_instances_from_residency() {
    // A worker VM that never saw a prefix sends it to the replica reporting
    // the deepest part of it (placed there by another VM, or cached before a
    // swap), not where it would place a new prefix; then keeps it there.
    let mut s = pool(4);
    let mut b = PrefixAware::default();
    let ch = chain(7, 4, 0, 5);
    let req = Request {
        chunks: &ch,
        prompt_bytes: 5 * 256,
    };
    let own = b.select(&s, &req).primary.unwrap();
    let others: Vec<ReplicaRef> = s.replicas().map(|(r, _)| r).filter(|&r| r != own).collect();
    let (home, shallow) = (others[0], others[1]);
    s.add_resident(&id(&s, Some(home)), Tier::Host as i32, &ch[..3]);
    // Another replica holds only the first chunk: the deeper holder wins.
    s.add_resident(&id(&s, Some(shallow)), Tier::Device as i32, &ch[..1]);
    let c = route(&mut b, &s, &chain(7, 4, 1, 5));
    assert_eq!(
        (c.primary, c.reason, c.matched_chunks),
        (Some(home), Reason::Resident, 3)
    );
    // Learned: the next request of the prefix is an affinity hit.
    let c = route(&mut b, &s, &chain(7, 4, 2, 5));
    assert_eq!((c.primary, c.reason), (Some(home), Reason::Affinity));
}

#[test]
fn prefix_aware_forgets_removed_replicas() {
    let mut s = pool(3);
    let mut p = PrefixAware::default();
    let ch = chain(9, 4, 9, 4);
    let first = route(&mut p, &s, &ch).primary.unwrap();
    let gone = s.get(first).unwrap().id.clone();
    s.remove(&gone);
    s.upsert(&replica(7, 0)); // may reuse the slot
    let c = route(&mut p, &s, &ch);
    assert_ne!(id(&s, c.primary), gone);
    assert!(c.endpoints().all(|r| s.get(r).is_some()));
}

fn kv_pool() -> Snapshot {
    let mut s = pool(3);
    let ch = chain(5, 8, 5, 8);
    s.add_resident("r1", Tier::Device as i32, &ch[..6]);
    s.add_resident("r2", Tier::Disk as i32, &ch);
    s
}

#[test]
fn kv_aware_follows_the_resident_prefix() {
    let s = kv_pool();
    let p = KvAware::default();
    let ch = chain(5, 8, 5, 8);
    let c = p.select(
        &s,
        &Request {
            chunks: &ch,
            prompt_bytes: 8 * 256,
        },
    );
    // r1: 6 device chunks = 6*64*1.0 = 384 tokens; r2: 8 disk chunks = 8*64*0.4 = 204.8.
    assert_eq!(id(&s, c.primary), "r1");
    assert_eq!(c.matched_chunks, 6);
    assert_eq!(c.reason, Reason::Resident);
    assert_eq!(id(&s, c.fallbacks.first().copied()), "r2");
}

#[test]
fn kv_aware_moves_off_a_replica_with_high_queued_prefill() {
    let mut s = kv_pool();
    let p = KvAware::default();
    let ch = chain(5, 8, 5, 8);
    let req = Request {
        chunks: &ch,
        prompt_bytes: 8 * 256,
    };
    // A queue a bit shorter than what r1 saves over r2: r1 still wins ...
    s.upsert(&replica(1, 150));
    assert_eq!(id(&s, p.select(&s, &req).primary), "r1");
    // ... a longer one tips it, smoothly, to the disk copy on r2.
    s.upsert(&replica(1, 200));
    assert_eq!(id(&s, p.select(&s, &req).primary), "r2");
    // And a long queue everywhere with residency leaves the idle replica best.
    s.upsert(&replica(2, 10_000));
    s.upsert(&replica(1, 10_000));
    assert_eq!(id(&s, p.select(&s, &req).primary), "r0");
}

#[test]
fn kv_aware_counts_only_contiguous_prefix() {
    let mut s = pool(2);
    let ch = chain(3, 6, 3, 6);
    // r0 holds chunks 1..6 but not 0: nothing counts.
    s.add_resident("r0", Tier::Device as i32, &ch[1..]);
    s.add_resident("r1", Tier::Host as i32, &ch[..1]);
    let p = KvAware::default();
    let c = p.select(
        &s,
        &Request {
            chunks: &ch,
            prompt_bytes: 6 * 256,
        },
    );
    assert_eq!(id(&s, c.primary), "r1");
    assert_eq!(c.matched_chunks, 1);
}

#[test]
fn kv_aware_zero_weight_tier_does_not_count() {
    let mut s = pool(2);
    let ch = chain(4, 4, 4, 4);
    s.add_resident("r0", Tier::Disk as i32, &ch);
    let p = KvAware::new(KvAwareConfig {
        disk_weight: 0.0,
        ..Default::default()
    })
    .unwrap();
    let c = p.select(
        &s,
        &Request {
            chunks: &ch,
            prompt_bytes: 4 * 256,
        },
    );
    assert_eq!(c.matched_chunks, 0);
    assert_eq!(c.reason, Reason::Load);
}

#[test]
fn kv_aware_burst_of_a_new_prefix_stays_together_then_spreads_with_load() {
    let s = pool(4);
    let mut p = KvAware::default();
    let ch = chain(8, 16, 8, 16); // 16 chunks = 1024 tokens
    let first = route(&mut p, &s, &ch).primary.unwrap();
    // The same prompt again before any load report: on `first` it would save
    // 0.9 * 1024 speculative tokens but wait behind the 1024 just routed there.
    let second = route(&mut p, &s, &ch).primary.unwrap();
    assert_ne!(first, second, "1024 queued tokens outweigh 922 saved");
    // Once `first` reports (an empty queue), the speculative prefix wins.
    let mut s2 = s.clone();
    let rid = s2.get(first).unwrap().id.clone();
    s2.upsert(&replica(rid[1..].parse().unwrap(), 0));
    let req = Request {
        chunks: &ch,
        prompt_bytes: 16 * 256,
    };
    assert_eq!(p.select(&s2, &req).primary, Some(first));
    // A longer shared prefix with a short unique tail stays together.
    let mut p = KvAware::default();
    let a = chain(9, 15, 1, 16);
    let b = chain(9, 15, 2, 16);
    let first = route(&mut p, &s, &a).primary.unwrap();
    let req = Request {
        chunks: &b,
        prompt_bytes: 16 * 256,
    };
    // pending(first) = 1024; saved = 15 * 64 * 0.9 = 864 < 1024: spreads.
    assert_ne!(p.select(&s, &req).primary.unwrap(), first);
}

#[test]
fn kv_aware_pending_resets_on_a_new_load_report() {
    let mut s = pool(2);
    let mut p = KvAware::default();
    let ch = chain(1, 4, 1, 4);
    let r = route(&mut p, &s, &ch).primary.unwrap();
    assert!(p.pending(&s, r) > 0);
    let rid = s.get(r).unwrap().id.clone();
    let idx: usize = rid[1..].parse().unwrap();
    s.upsert(&replica(idx, 0));
    assert_eq!(p.pending(&s, r), 0);
}

#[test]
fn by_name_builds_and_refuses() {
    assert_eq!(
        by_name("round-robin", &serde_json::Value::Null)
            .unwrap()
            .name(),
        "round-robin"
    );
    assert_eq!(
        by_name("kv-aware", &serde_json::json!({"disk_weight": 0.1}))
            .unwrap()
            .name(),
        "kv-aware"
    );
    assert!(matches!(
        by_name("nope", &serde_json::Value::Null),
        Err(ConfigError::UnknownStrategy(_))
    ));
    assert!(by_name("prefix-aware", &serde_json::json!({"load_factor": 0.5})).is_err());
    assert!(by_name("prefix-aware", &serde_json::json!({"spill_gap": 0})).is_err());
    assert!(by_name("prefix-aware", &serde_json::json!({"typo": 1})).is_err());
    for placement in ["least", "two-choices", "rendezvous"] {
        assert!(by_name("prefix-aware", &serde_json::json!({"placement": placement})).is_ok());
    }
    assert!(by_name("prefix-aware", &serde_json::json!({"placement": "random"})).is_err());
    assert!(by_name("kv-aware", &serde_json::json!({"load_weight": -1.0})).is_err());
}

#[derive(Debug, Clone)]
enum Op {
    Route {
        prefix: u64,
        len: usize,
    },
    Finish(usize),
    Remove(usize),
    Add(usize),
    Resident {
        replica: usize,
        prefix: u64,
        tier: i32,
    },
    Load {
        replica: usize,
        queued: u64,
    },
    Shared {
        replica: usize,
        prefix: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..6, 0usize..8).prop_map(|(prefix, len)| Op::Route { prefix, len }),
        2 => (0usize..64).prop_map(Op::Finish),
        1 => (0usize..8).prop_map(Op::Remove),
        1 => (0usize..8).prop_map(Op::Add),
        1 => (0usize..8, 0u64..6, 1i32..4).prop_map(|(replica, prefix, tier)| Op::Resident { replica, prefix, tier }),
        1 => (0usize..8, 0u64..5000).prop_map(|(replica, queued)| Op::Load { replica, queued }),
        1 => (0usize..8, 0u64..6).prop_map(|(replica, prefix)| Op::Shared { replica, prefix }),
    ]
}

proptest! {
    /// Whatever happens, no policy chooses a replica that is not in the
    /// snapshot, lists it twice, or breaks prefix-aware's load bound.
    #[test]
    fn choices_are_live_distinct_and_bounded(ops in proptest::collection::vec(op(), 1..120)) {
        let mut s = pool(4);
        let mut policies: Vec<Box<dyn Policy>> = vec![
            Box::new(RoundRobin::default()),
            Box::new(PrefixAware::default()),
            Box::new(KvAware::default()),
        ];
        let mut routed: Vec<Vec<ReplicaRef>> = vec![Vec::new(); 3];
        let mut pa = PrefixAware::default();
        for op in ops {
            match op {
                Op::Route { prefix, len } => {
                    let ch = chain(prefix, len, prefix, len);
                    let req = Request { chunks: &ch, prompt_bytes: len * 256 };
                    for (i, p) in policies.iter_mut().enumerate() {
                        let c = p.select(&s, &req);
                        let eps: Vec<_> = c.endpoints().collect();
                        prop_assert!(eps.iter().all(|&r| s.get(r).is_some()));
                        let distinct: std::collections::HashSet<_> = eps.iter().collect();
                        prop_assert_eq!(distinct.len(), eps.len());
                        prop_assert_eq!(c.primary.is_none(), s.is_empty());
                        p.observe(&s, &Event::Routed { request: &req, choice: &c });
                        routed[i].extend(c.primary);
                    }
                    let bound = pa.load_bound(&s);
                    let c = pa.select(&s, &req);
                    if let Some(r) = c.primary {
                        // Hard for a request moved or mostly its own; soft, up to `spill_gap`
                        // (4) over, for one mostly cached kept at a home busy prefilling.
                        let m = c.matched_chunks as usize;
                        let kept = c.reason != Reason::Spilled && m > 0 && len - m <= m;
                        let limit = if kept { bound + 4 } else { bound };
                        prop_assert!(pa.in_flight(r) < limit, "{} of {limit}", pa.in_flight(r));
                    }
                    pa.observe(&s, &Event::Routed { request: &req, choice: &c });
                }
                Op::Finish(k) => {
                    for (i, p) in policies.iter_mut().enumerate() {
                        let len = routed[i].len();
                        if len > 0 {
                            let r = routed[i].remove(k % len);
                            p.observe(&s, &Event::Finished { replica: r });
                        }
                    }
                }
                Op::Remove(i) => s.remove(&format!("r{i}")),
                Op::Add(i) => s.upsert(&replica(i, 0)),
                Op::Resident { replica: i, prefix, tier } => {
                    s.add_resident(&format!("r{i}"), tier, &chain(prefix, 4, prefix, 4));
                }
                Op::Load { replica: i, queued } => {
                    if s.find(&format!("r{i}")).is_some() {
                        s.upsert(&replica(i, queued));
                    }
                }
                Op::Shared { replica: i, prefix } => {
                    // A placement read from the board may name a replica this
                    // VM's snapshot no longer has.
                    let gone = pool(8);
                    let r = s.find(&format!("r{i}")).or_else(|| gone.find(&format!("r{i}"))).map(|(r, _)| r);
                    let ch = chain(prefix, 4, prefix, 4);
                    if let Some(replica) = r {
                        let e = Event::Shared { chunks: &ch, total_chunks: 4, own_chunks: 4, placed: true, replica };
                        for p in policies.iter_mut() {
                            p.observe(&s, &e);
                        }
                        pa.observe(&s, &e);
                    }
                }
            }
        }
    }
}
