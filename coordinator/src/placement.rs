//! Placement: which target owns an object, and which of its mountpaths holds it.
//!
//! Highest-random-weight (rendezvous) hashing: every candidate node gets a score for the key, and the
//! highest score wins. The score is `xxh3_64_with_seed(key, seed = xxh3_64(node id))` over explicit
//! bytes (never `Hash` impls or a per-process seeded hasher), so every process, build and version computes
//! the same owner. Ties (astronomically rare) go to the smaller node id, so the order is total.
//!
//! Adding a node moves only the keys the new node wins (about 1/N of them) and removing one moves only the
//! keys it owned: the relative order of the remaining nodes never changes.
//!
//! The key of an object is its *uname*, `"<bucket>/<object>"` (bucket names hold no `/`, so it is
//! unambiguous): the same object name in two buckets is placed independently. The same function with
//! mountpath identities (the mountpath's path as the target reports it) picks the mountpath inside the
//! owner target.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// The score of `node_id` for `key`: higher wins.
pub fn score(node_id: &str, key: &[u8]) -> u64 {
    xxh3_64_with_seed(key, xxh3_64(node_id.as_bytes()))
}

/// The placement key of an object: `"<bucket>/<object>"` as bytes.
pub fn object_key(bucket: &str, object: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(bucket.len() + 1 + object.len());
    k.extend_from_slice(bucket.as_bytes());
    k.push(b'/');
    k.extend_from_slice(object.as_bytes());
    k
}

/// The node that owns `key` among `nodes` (by their ids), or `None` when there is none.
pub fn owner<'a, N: AsRef<str>>(key: &[u8], nodes: &'a [N]) -> Option<&'a N> {
    nodes
        .iter()
        .map(|n| (score(n.as_ref(), key), n))
        .max_by(|(sa, a), (sb, b)| sa.cmp(sb).then_with(|| b.as_ref().cmp(a.as_ref())))
        .map(|(_, n)| n)
}

/// The index in `nodes` of the owner of `key` (see [`owner`]).
pub fn owner_index<N: AsRef<str>>(key: &[u8], nodes: &[N]) -> Option<usize> {
    (0..nodes.len())
        .map(|i| (score(nodes[i].as_ref(), key), i))
        .max_by(|(sa, a), (sb, b)| sa.cmp(sb).then_with(|| nodes[*b].as_ref().cmp(nodes[*a].as_ref())))
        .map(|(_, i)| i)
}

/// All `nodes` in HRW order for `key`: the owner first, then the node that would own it were the owner
/// gone, and so on (Quickwit's `sort_by_rendez_vous_hash`). Useful for fallbacks and replicas.
pub fn rank<'a, N: AsRef<str>>(key: &[u8], nodes: &'a [N]) -> Vec<&'a N> {
    let mut scored: Vec<(u64, &N)> = nodes.iter().map(|n| (score(n.as_ref(), key), n)).collect();
    scored.sort_by(|(sa, a), (sb, b)| sb.cmp(sa).then_with(|| a.as_ref().cmp(b.as_ref())));
    scored.into_iter().map(|(_, n)| n).collect()
}

/// The target (by id) that owns `bucket/object` among `target_ids`.
pub fn owner_target<'a, N: AsRef<str>>(bucket: &str, object: &str, target_ids: &'a [N]) -> Option<&'a N> {
    owner(&object_key(bucket, object), target_ids)
}

/// The index of the mountpath (identified by its path string, as the target reports it) that holds
/// `bucket/object` on its owner target; `None` only when `mountpaths` is empty.
pub fn mountpath_index<N: AsRef<str>>(bucket: &str, object: &str, mountpaths: &[N]) -> Option<usize> {
    owner_index(&object_key(bucket, object), mountpaths)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("train/shard-{i:06}.tar")).collect()
    }

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("t{i}")).collect()
    }

    #[test]
    fn deterministic_and_pinned() {
        let nodes = ids(5);
        for name in names(100) {
            let k = object_key("b", &name);
            assert_eq!(owner(&k, &nodes), owner(&k, &nodes));
            let mut rev = nodes.clone();
            rev.reverse();
            assert_eq!(owner(&k, &nodes), owner(&k, &rev), "order of the node list does not matter");
            assert_eq!(owner(&k, &nodes).map(String::as_str), Some(nodes[owner_index(&k, &nodes).unwrap()].as_str()));
            assert_eq!(rank(&k, &nodes)[0], owner(&k, &nodes).unwrap());
        }
        // The function is pinned: xxh3 follows a public spec, so these never change across builds.
        assert_eq!(score("t0", b"b/x"), xxh3_64_with_seed(b"b/x", xxh3_64(b"t0")));
        assert_eq!(object_key("bkt", "a/b.tar"), b"bkt/a/b.tar");
        assert!(owner::<String>(b"k", &[]).is_none());
        assert_eq!(mountpath_index::<&str>("b", "o", &[]), None);
        assert_eq!(mountpath_index("b", "o", &["/only"]), Some(0));
    }

    #[test]
    fn balanced_over_10k_names() {
        for n in [2usize, 3, 5, 8] {
            let nodes = ids(n);
            let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
            let total = 10_000;
            for name in names(total) {
                *counts.entry(owner(&object_key("bucket", &name), &nodes).unwrap()).or_default() += 1;
            }
            assert_eq!(counts.len(), n, "every node owns something");
            let expected = total as f64 / n as f64;
            let chi2: f64 = counts.values().map(|&c| (c as f64 - expected).powi(2) / expected).sum();
            // 99.9th percentile of chi-square with n-1 <= 7 degrees of freedom is about 24.3.
            assert!(chi2 < 24.3, "n={n}: chi-square {chi2:.2} too large: {counts:?}");
        }
    }

    #[test]
    fn minimal_movement_on_add_and_remove() {
        let before = ids(4);
        let mut after_add = before.clone();
        after_add.push("t-new".into());
        let after_remove: Vec<String> = before.iter().filter(|n| *n != "t2").cloned().collect();
        let total = 10_000;
        let (mut moved_add, mut moved_remove) = (0, 0);
        for name in names(total) {
            let k = object_key("bucket", &name);
            let o = owner(&k, &before).unwrap();
            let oa = owner(&k, &after_add).unwrap();
            if o != oa {
                assert_eq!(oa, "t-new", "{name}: a key only ever moves to the added node");
                moved_add += 1;
            }
            let or = owner(&k, &after_remove).unwrap();
            if o != or {
                assert_eq!(o, "t2", "{name}: only keys of the removed node move");
                moved_remove += 1;
            }
            // The order of the survivors is the order before, minus the removed node.
            let r: Vec<&String> = rank(&k, &before).into_iter().filter(|n| *n != "t2").collect();
            assert_eq!(r, rank(&k, &after_remove));
        }
        // Expected 1/5 and 1/4 of the keys; allow a generous margin.
        let frac_add = moved_add as f64 / total as f64;
        let frac_remove = moved_remove as f64 / total as f64;
        assert!((0.17..0.23).contains(&frac_add), "moved on add: {frac_add}");
        assert!((0.22..0.28).contains(&frac_remove), "moved on remove: {frac_remove}");
    }

    #[test]
    fn bucket_is_part_of_the_key() {
        let nodes = ids(5);
        let differ =
            names(1000).iter().filter(|n| owner_target("a", n, &nodes) != owner_target("b", n, &nodes)).count();
        assert!(differ > 500, "the same name in two buckets is placed independently ({differ}/1000 differ)");
    }
}
