//! Node affinity for an instance-type list: a required term allowing exactly the listed types
//! and one preferred term per type with strictly descending weights.

use k8s_openapi::api::core::v1::{
    NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, PreferredSchedulingTerm,
};

/// The well-known node label carrying the instance type.
pub const INSTANCE_TYPE_LABEL: &str = "node.kubernetes.io/instance-type";

/// Weight of the `i`-th preferred type: 100, 95, ..., 5 for the 20 types a list may hold.
/// Independent of the list length, so widening an `Ordered` placement keeps earlier weights.
pub fn weight(i: usize) -> i32 {
    // The CRD caps lists at 20 entries; clamp anyway so a longer list still yields valid weights.
    100 - 5 * i32::try_from(i.min(19)).unwrap_or(19)
}

/// Required affinity to `allowed` plus descending preferences in list order.
pub fn instance_type_affinity(allowed: &[String]) -> NodeAffinity {
    let expr = |values: Vec<String>| NodeSelectorTerm {
        match_expressions: Some(vec![NodeSelectorRequirement {
            key: INSTANCE_TYPE_LABEL.to_owned(),
            operator: "In".to_owned(),
            values: Some(values),
        }]),
        match_fields: None,
    };
    NodeAffinity {
        required_during_scheduling_ignored_during_execution: Some(NodeSelector {
            node_selector_terms: vec![expr(allowed.to_vec())],
        }),
        preferred_during_scheduling_ignored_during_execution: Some(
            allowed
                .iter()
                .enumerate()
                .map(|(i, t)| PreferredSchedulingTerm {
                    weight: weight(i),
                    preference: expr(vec![t.clone()]),
                })
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    fn types() -> impl Strategy<Value = Vec<String>> {
        proptest::collection::btree_set("[a-z]{1,3}\\.[a-z0-9]{1,8}", 1..=20)
            .prop_map(|set| set.into_iter().collect::<Vec<_>>())
            .prop_shuffle()
    }

    proptest! {
        #[test]
        fn weights_descend_within_range_and_required_set_equals_list(list in types()) {
            let a = instance_type_affinity(&list);
            let prefs = a.preferred_during_scheduling_ignored_during_execution.unwrap_or_default();
            prop_assert_eq!(prefs.len(), list.len());
            for w in prefs.windows(2) {
                prop_assert!(w[0].weight > w[1].weight, "weights must strictly descend");
            }
            for (p, t) in prefs.iter().zip(&list) {
                prop_assert!((1..=100).contains(&p.weight));
                let e = &p.preference.match_expressions.as_ref().unwrap()[0];
                prop_assert_eq!(e.key.as_str(), INSTANCE_TYPE_LABEL);
                prop_assert_eq!(e.values.as_deref(), Some(std::slice::from_ref(t)));
            }
            let req = a.required_during_scheduling_ignored_during_execution.unwrap();
            prop_assert_eq!(req.node_selector_terms.len(), 1);
            let e = &req.node_selector_terms[0].match_expressions.as_ref().unwrap()[0];
            prop_assert_eq!(e.operator.as_str(), "In");
            let required: BTreeSet<_> = e.values.iter().flatten().collect();
            let listed: BTreeSet<_> = list.iter().collect();
            prop_assert_eq!(required, listed);
        }

        #[test]
        fn widening_keeps_the_weights_of_earlier_types(list in types(), k in 1usize..=20) {
            let k = k.min(list.len());
            let narrow = instance_type_affinity(&list[..k]);
            let wide = instance_type_affinity(&list);
            let n = narrow.preferred_during_scheduling_ignored_during_execution.unwrap();
            let w = wide.preferred_during_scheduling_ignored_during_execution.unwrap();
            prop_assert_eq!(&w[..k], &n[..]);
        }
    }
}
