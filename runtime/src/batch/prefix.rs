//! The prefix cache of a [`Scheduler`]: prompts (and finished sequences) kept with
//! their KV caches, shared by later sequences that start with the same tokens, charged
//! to the KV budget (admission evicts the least recently used when it needs room).
use llama_graph::{KvCache, KV_PAGE};

use super::{Scheduler, Slot};

/// A kept prefix: its tokens and a cache holding them (pages shared with the
/// sequences that start from it).
pub(super) struct PrefixEntry {
    pub(super) id: u64,
    pub(super) tokens: Vec<u32>,
    pub(super) cache: KvCache,
    pub(super) last_used: u64,
    /// Running sequences sharing its pages: while there are any it is not evicted.
    pub(super) users: usize,
    /// Loaded from the disk tier and not used yet (the first use is a disk hit).
    pub(super) from_disk: bool,
}

/// Length of the common prefix of two token lists.
pub(super) fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl Scheduler<'_> {
    /// Bytes of host KV memory that running sequences and the prefix cache hold,
    /// each page counted once however many of them share it.
    pub fn kv_bytes(&self) -> usize {
        let mut seen = std::collections::HashSet::new();
        let caches = self.active.iter().map(|s| &s.cache);
        caches
            .chain(self.prefixes.iter().map(|p| &p.cache))
            .flat_map(KvCache::page_sizes)
            .filter(|&(at, _)| seen.insert(at))
            .map(|(_, bytes)| bytes)
            .sum()
    }

    /// Positions held by the prefix cache.
    pub fn prefix_positions(&self) -> usize {
        self.prefixes.iter().map(|p| p.tokens.len()).sum()
    }

    /// Drops every prefix cache entry that no running sequence shares.
    pub fn clear_prefixes(&mut self) {
        let used = &mut self.used;
        self.prefixes.retain(|p| {
            if p.users > 0 {
                return true;
            }
            *used -= p.tokens.len();
            false
        });
    }

    /// Gives back what an ended sequence held: its charge, and its pin on the entry
    /// whose pages it shared.
    pub(super) fn release(&mut self, s: &Slot) {
        self.used -= s.reserve;
        if let Some(p) = self.prefixes.iter_mut().find(|p| Some(p.id) == s.pinned) {
            p.users -= 1;
        }
    }

    /// Keeps what a finished sequence cached (its prompt and what it generated) for
    /// later prompts that continue it: the next turn of a chat starts with the
    /// previous turn's prompt and answer. Kept prefixes it extends are dropped.
    pub(super) fn keep_finished(&mut self, tokens: Vec<u32>, cache: KvCache) {
        let len = cache.len();
        if !self.opts.prefix_cache || len < self.opts.min_prefix {
            return;
        }
        if let Some(disk) = &self.disk {
            // Pages are shared, so this copies nothing; the writer thread does the rest.
            disk.spill(tokens[..len].to_vec(), cache.clone());
        }
        let tokens = &tokens[..len];
        let mut i = 0;
        while i < self.prefixes.len() {
            let p = &self.prefixes[i];
            // (One that running sequences share stays until they end.)
            if p.users == 0
                && p.tokens.len() <= len
                && common_prefix(&p.tokens, tokens) == p.tokens.len()
            {
                let p = self.prefixes.remove(i);
                self.used -= p.tokens.len();
            } else {
                i += 1;
            }
        }
        if self.used + len > self.opts.kv_budget {
            return;
        }
        self.clock += 1;
        self.used += len;
        self.next_entry += 1;
        self.prefixes.push(PrefixEntry {
            id: self.next_entry,
            tokens: tokens.to_vec(),
            cache,
            last_used: self.clock,
            users: 0,
            from_disk: false,
        });
    }

    /// Asks the disk tier for the prompt of the first waiting sequence: when an entry
    /// there shares more of it than any kept in RAM, the pages holding the shared
    /// positions are loaded and kept as a RAM entry, which admission then reuses.
    pub(super) fn load_from_disk(&mut self) {
        let Some(w) = self.waiting.front_mut() else {
            return;
        };
        w.disk_checked = true;
        let prompt = w.prompt.clone();
        let Some(disk) = self.disk.as_ref().filter(|_| self.opts.prefix_cache) else {
            return;
        };
        let (_, ram) = self.best_prefix(&prompt);
        let more_than = ram.max(self.opts.min_prefix.saturating_sub(1));
        let Some((tokens, cache)) = disk.load(
            &prompt,
            more_than,
            prompt.len() - 1,
            self.program,
            self.cache_type,
        ) else {
            return;
        };
        // Room for it, as for any entry: the least recently used unused ones go.
        while self.used + tokens.len() > self.opts.kv_budget {
            let victim = self
                .prefixes
                .iter()
                .enumerate()
                .filter(|(_, p)| p.users == 0)
                .min_by_key(|(_, p)| p.last_used)
                .map(|(i, _)| i);
            let Some(v) = victim else { return };
            let p = self.prefixes.remove(v);
            self.used -= p.tokens.len();
        }
        self.clock += 1;
        self.next_entry += 1;
        self.used += tokens.len();
        self.prefixes.push(PrefixEntry {
            id: self.next_entry,
            tokens,
            cache,
            last_used: self.clock,
            users: 0,
            from_disk: true,
        });
    }

    /// Counts an admitted sequence in the tiers' hits and misses: `hit` is whether
    /// it reused an entry, and if so whether that came from disk.
    pub(super) fn count_hit(&self, hit: Option<bool>) {
        let s = &self.cache_stats;
        let add = |c: &std::sync::atomic::AtomicU64| {
            c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        };
        match hit {
            Some(false) => add(&s.ram_hits),
            Some(true) => {
                add(&s.ram_misses);
                add(&s.disk_hits);
            }
            None => {
                add(&s.ram_misses);
                if self.disk.as_ref().is_some_and(|d| d.enabled()) {
                    add(&s.disk_misses);
                }
            }
        }
    }

    /// Brings the RAM tier's byte count up to date (pages counted once).
    pub(super) fn count_ram_bytes(&mut self) {
        // Counted again only when entries came or went.
        let now = (self.next_entry, self.prefixes.len());
        if self.ram_counted == Some(now) {
            return;
        }
        self.ram_counted = Some(now);
        let mut seen = std::collections::HashSet::new();
        let bytes: usize = self
            .prefixes
            .iter()
            .flat_map(|p| p.cache.page_sizes())
            .filter(|&(at, _)| seen.insert(at))
            .map(|(_, b)| b)
            .sum();
        self.cache_stats
            .ram_bytes
            .store(bytes as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// The kept prefix sharing the most tokens with `prompt` (leaving at least its
    /// last token to run), if that is at least `min_prefix`.
    pub(super) fn best_prefix(&self, prompt: &[u32]) -> (Option<usize>, usize) {
        if !self.opts.prefix_cache {
            return (None, 0);
        }
        self.prefixes
            .iter()
            .enumerate()
            .map(|(i, p)| (i, common_prefix(&p.tokens, prompt).min(prompt.len() - 1)))
            .filter(|&(_, n)| n >= self.opts.min_prefix)
            .max_by_key(|&(_, n)| n)
            .map_or((None, 0), |(i, n)| (Some(i), n))
    }

    /// Positions of the first `reuse` of entry `e` that a sequence starting from them
    /// shares rather than holds: the whole pages, where the cache shares pages (host
    /// layers; a device cache copies).
    pub(super) fn shared(&self, e: usize, reuse: usize) -> usize {
        if self.prefixes[e].cache.shares_pages() {
            reuse / KV_PAGE * KV_PAGE
        } else {
            0
        }
    }
}
