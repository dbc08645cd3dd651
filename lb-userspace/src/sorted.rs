//! Walking two maps sorted by the same keys together, to find what differs
//! in one pass (no lookups).

use std::collections::BTreeMap;

/// Calls `f(key, old, new)` for every key of `old` or `new` whose entries
/// differ: present in only one, or present in both and not `same`.
pub fn diff<'o, 'n, K: Ord, A, B>(
    old: &'o BTreeMap<K, A>,
    new: &'n BTreeMap<K, B>,
    same: impl Fn(&A, &B) -> bool,
    mut f: impl FnMut(&K, Option<&'o A>, Option<&'n B>),
) {
    let (mut o, mut n) = (old.iter().peekable(), new.iter().peekable());
    loop {
        match (o.peek(), n.peek()) {
            (None, None) => break,
            (Some((ko, vo)), Some((kn, vn))) if ko == kn => {
                if !same(vo, vn) {
                    f(ko, Some(vo), Some(vn));
                }
                o.next();
                n.next();
            }
            (Some((ko, vo)), Some((kn, _))) if ko < kn => {
                f(ko, Some(vo), None);
                o.next();
            }
            (Some((ko, vo)), None) => {
                f(ko, Some(vo), None);
                o.next();
            }
            (_, Some((kn, vn))) => {
                f(kn, None, Some(vn));
                n.next();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_removed_added_and_changed_keys_in_order() {
        let old = BTreeMap::from([(1, 'a'), (2, 'b'), (4, 'd')]);
        let new = BTreeMap::from([(2, 'b'), (3, 'c'), (4, 'x')]);
        let mut seen = Vec::new();
        diff(&old, &new, |a, b| a == b, |k, o, n| seen.push((*k, o.copied(), n.copied())));
        assert_eq!(seen, vec![(1, Some('a'), None), (3, None, Some('c')), (4, Some('d'), Some('x'))]);
    }
}
