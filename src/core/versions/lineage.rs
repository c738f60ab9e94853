//! The lineages of versions (their changes from the base, oldest first), cached in memory within a byte budget.

use super::*;

/// Lineages read from the blob store, least recently used first out, within a byte budget: a rewrite's
/// change is a few kilobytes, a global fine-tune's as large as the model.
pub(super) struct LineageCache {
    pub(super) entries: LruCache<(String, u32), Lineage>,
    pub(super) bytes: usize,
    pub(super) budget: usize,
}

/// What the lineage cache may hold.
pub(super) const LINEAGE_CACHE_BYTES: usize = 256 * 1024 * 1024;

pub(super) fn lineage_bytes(lineage: &Lineage) -> usize {
    lineage.iter().map(Bytes::len).sum()
}

impl LineageCache {
    pub(super) fn new(budget: usize) -> Self {
        Self { entries: LruCache::unbounded(), bytes: 0, budget }
    }

    pub(super) fn get(&mut self, key: &(String, u32)) -> Option<Lineage> {
        self.entries.get(key).cloned()
    }

    pub(super) fn insert(&mut self, key: (String, u32), lineage: Lineage) {
        let size = lineage_bytes(&lineage);
        if size > self.budget {
            return;
        }
        if let Some(replaced) = self.entries.put(key, lineage) {
            self.bytes -= lineage_bytes(&replaced);
        }
        self.bytes += size;
        while self.bytes > self.budget {
            match self.entries.pop_lru() {
                Some((_, evicted)) => self.bytes -= lineage_bytes(&evicted),
                None => break,
            }
        }
    }

    pub(super) fn remove(&mut self, key: &(String, u32)) {
        if let Some(removed) = self.entries.pop(key) {
            self.bytes -= lineage_bytes(&removed);
        }
    }
}
