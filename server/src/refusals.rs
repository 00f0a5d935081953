//! Refusals folded per caller and interval: the one rule by which a caller
//! that is refused over and over (a bogus attestation per address, a
//! non-operator on the admin socket per uid) cannot flood the event stream.
//! The first refusal of a key in an interval is recorded at once; the rest
//! are counted and recorded as one event with `count` when the interval is
//! flushed. Beyond `max_keys` keys in one interval, the rest are counted
//! under one overflow key, so memory stays bounded too.
//!
//! May depend on nothing in the crate.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

/// The refusals of one key in the current interval after its first.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Folded {
    /// How many were folded.
    pub count: u64,
    /// How many of them the caller flagged (e.g. rate-limited).
    pub flagged: u64,
    /// The last one's reason.
    pub last_reason: String,
}

/// Refusals folded by key until the next [`RefusalFolder::take`].
#[derive(Debug)]
pub struct RefusalFolder<K> {
    folded: Mutex<HashMap<K, Folded>>,
    max_keys: usize,
    overflow: K,
}

impl<K: Hash + Eq + Clone> RefusalFolder<K> {
    /// A folder of at most `max_keys` keys per interval; refusals of keys
    /// beyond that are folded under `overflow`.
    pub fn new(max_keys: usize, overflow: K) -> Self {
        Self { folded: Mutex::new(HashMap::new()), max_keys, overflow }
    }

    /// Notes a refusal of `key`: true when it is the key's first of the
    /// interval (record it now), false when it was folded.
    pub fn note(&self, key: K, reason: &str, flagged: bool) -> bool {
        let mut folded = self.folded.lock().unwrap_or_else(|e| e.into_inner());
        let key = if folded.len() >= self.max_keys && !folded.contains_key(&key) {
            self.overflow.clone()
        } else {
            key
        };
        match folded.get_mut(&key) {
            Some(f) => {
                f.count += 1;
                f.flagged += u64::from(flagged);
                f.last_reason = reason.to_string();
                false
            }
            None => {
                folded.insert(key, Folded::default());
                true
            }
        }
    }

    /// The refusals folded since the last call (keys with none left out);
    /// starts the next interval.
    pub fn take(&self) -> Vec<(K, Folded)> {
        let folded = std::mem::take(&mut *self.folded.lock().unwrap_or_else(|e| e.into_inner()));
        folded.into_iter().filter(|(_, f)| f.count > 0).collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_first_refusal_of_a_key_is_recorded_and_the_rest_folded() {
        let folder = RefusalFolder::new(2, 0u32);
        assert!(folder.note(7, "a", false));
        assert!(!folder.note(7, "b", true));
        assert!(!folder.note(7, "c", false));
        assert!(folder.note(8, "x", false));
        // A third key in the interval goes under the overflow key.
        assert!(folder.note(9, "y", false));
        assert!(!folder.note(10, "z", false));
        let mut taken = folder.take();
        taken.sort_by_key(|(k, _)| *k);
        assert_eq!(
            taken,
            vec![
                (0, Folded { count: 1, flagged: 0, last_reason: "z".into() }),
                (7, Folded { count: 2, flagged: 1, last_reason: "c".into() }),
            ]
        );
        // A new interval: first refusals are recorded again.
        assert!(folder.note(7, "d", false));
        assert!(folder.take().is_empty());
    }
}
