//! Byte-level BPE, the pure-Rust part: chunk counting, training and encoding. No Python in here.
//!
//! Training works on unique regex chunks ("words") with their counts. Pair counts are kept incrementally:
//! merging a pair only touches the words that contain it, and a max-heap of merge jobs is refreshed lazily
//! (a popped job whose count is stale is pushed back with the current count). Ties go to the smallest pair
//! (a, b), so training is deterministic whatever the thread count or hash seeds, and equal to upstream's.
//! Words live back to back in one buffer and shrink in place as pairs merge.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use ahash::AHashMap;
use dary_heap::OctonaryHeap;
use rayon::prelude::*;
use rustc_hash::FxHasher;

use crate::split::Splitter;

pub type Pair = (u32, u32);

// ------------------------------------------------------------------------------------------------
// counting chunks

/// Split every text and count each distinct chunk (in parallel over texts). Keys borrow from `texts`.
pub fn count_chunks<'t, T: AsRef<str> + Sync>(
    texts: &'t [T],
    splitter: &Splitter,
) -> Result<AHashMap<&'t str, i64>, String> {
    // few, large maps: each split of the work starts an empty map, and merging maps costs as much as filling
    let min_len = texts.len() / (4 * rayon::current_num_threads());
    texts
        .par_iter()
        .with_min_len(min_len.max(1))
        .try_fold(AHashMap::new, |mut counts: AHashMap<&'t str, i64>, text| {
            splitter.for_each(text.as_ref(), |piece| {
                *counts.entry(piece).or_default() += 1
            })?;
            Ok(counts)
        })
        .try_reduce(AHashMap::new, |a, b| Ok(merge_counts(a, b)))
}

/// Add the smaller map into the larger one.
fn merge_counts<'t>(
    a: AHashMap<&'t str, i64>,
    b: AHashMap<&'t str, i64>,
) -> AHashMap<&'t str, i64> {
    let (mut big, small) = if a.len() >= b.len() { (a, b) } else { (b, a) };
    for (k, v) in small {
        *big.entry(k).or_default() += v;
    }
    big
}

/// Add one batch's counts into the running totals (copying only the chunks not seen before).
pub fn add_counts(total: &mut AHashMap<String, i64>, batch: AHashMap<&str, i64>) {
    for (k, v) in batch {
        match total.get_mut(k) {
            Some(c) => *c += v,
            None => {
                total.insert(k.to_owned(), v);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// training

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// The unique chunks as byte-id sequences, back to back in one buffer. Merging only ever shortens a
/// word, so it is rewritten in place: no allocation per word or per merge.
struct Words {
    ids: Vec<u32>,
    /// word i is ids[start[i] .. start[i] + len[i]]
    start: Vec<usize>,
    len: Vec<u32>,
}

impl Words {
    fn new<'a>(chunks: impl Iterator<Item = &'a [u8]>) -> Self {
        let (mut ids, mut start, mut len) = (Vec::new(), Vec::new(), Vec::new());
        for chunk in chunks {
            start.push(ids.len());
            len.push(chunk.len() as u32);
            ids.extend(chunk.iter().map(|&b| b as u32));
        }
        Self { ids, start, len }
    }

    fn word(&self, i: usize) -> &[u32] {
        &self.ids[self.start[i]..self.start[i] + self.len[i] as usize]
    }

    /// Merge every non-overlapping occurrence of `pair` (left to right) in word `i` into `new_id`,
    /// appending the changes to the counts of the pairs around each occurrence: -1 per pair destroyed,
    /// +1 per pair created. (The merged pair itself is left out: its count just goes to zero.)
    fn merge_pair(&mut self, i: usize, pair: Pair, new_id: u32, deltas: &mut Vec<(Pair, i64)>) {
        let (a, b) = pair;
        let s = self.start[i];
        let ids = &mut self.ids[s..s + self.len[i] as usize];
        let n = ids.len();
        let (mut r, mut w) = (0, 0); // read and write positions: w <= r, so in place is safe
        while r < n {
            if r + 1 < n && ids[r] == a && ids[r + 1] == b {
                if w > 0 {
                    let left = ids[w - 1];
                    deltas.push(((left, a), -1));
                    deltas.push(((left, new_id), 1));
                }
                if r + 2 < n {
                    let right = ids[r + 2];
                    deltas.push(((b, right), -1));
                    deltas.push(((new_id, right), 1));
                }
                ids[w] = new_id;
                r += 2;
            } else {
                ids[w] = ids[r];
                r += 1;
            }
            w += 1;
        }
        self.len[i] = w as u32;
    }
}

struct MergeJob {
    count: i64,
    pair: Pair,
    /// Indices of the words that may contain `pair` (a superset: entries go stale, never missing).
    pos: Vec<u32>,
}

impl PartialEq for MergeJob {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for MergeJob {}

impl Ord for MergeJob {
    fn cmp(&self, other: &Self) -> Ordering {
        // Max-heap on count; among equal counts the smaller pair is "greater", i.e. popped first.
        self.count
            .cmp(&other.count)
            .then_with(|| other.pair.cmp(&self.pair))
    }
}

impl PartialOrd for MergeJob {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Count every adjacent pair (weighted by word count) and list the words holding it, in parallel over
/// contiguous ranges of words; joining the ranges in order keeps every word list sorted and unique.
fn count_pairs(words: &Words, counts: &[i64]) -> FxMap<Pair, (i64, Vec<u32>)> {
    let n = counts.len();
    let span = n.div_ceil(rayon::current_num_threads() * 4).max(1);
    let parts: Vec<FxMap<Pair, (i64, Vec<u32>)>> = (0..n.div_ceil(span))
        .into_par_iter()
        .map(|k| {
            let mut stats: FxMap<Pair, (i64, Vec<u32>)> = FxMap::default();
            for (i, &count) in counts
                .iter()
                .enumerate()
                .take((k + 1) * span)
                .skip(k * span)
            {
                for p in words.word(i).windows(2) {
                    let entry = stats.entry((p[0], p[1])).or_default();
                    entry.0 += count;
                    if entry.1.last() != Some(&(i as u32)) {
                        entry.1.push(i as u32);
                    }
                }
            }
            stats
        })
        .collect();
    let mut parts = parts.into_iter();
    let mut total = parts.next().unwrap_or_default();
    for part in parts {
        for (pair, (count, pos)) in part {
            let entry = total.entry(pair).or_default();
            entry.0 += count;
            entry.1.extend(pos);
        }
    }
    total
}

/// Learn up to `num_merges` merges from unique chunks and their counts. Returns the merged pairs in
/// order; merge i creates token id 256 + i. Stops early when no pair occurs any more. The result does not
/// depend on the order of `chunks`: each merge is the most frequent pair, ties going to the smallest.
pub fn train(chunks: AHashMap<String, i64>, num_merges: u32) -> Vec<Pair> {
    let counts: Vec<i64> = chunks.values().copied().collect();
    let mut words = Words::new(chunks.keys().map(|s| s.as_bytes()));
    drop(chunks);

    let stats = count_pairs(&words, &counts);
    let mut pair_counts: FxMap<Pair, i64> = FxMap::default();
    pair_counts.reserve(stats.len());
    let mut heap: OctonaryHeap<MergeJob> = OctonaryHeap::with_capacity(stats.len());
    for (pair, (count, pos)) in stats {
        if count > 0 {
            pair_counts.insert(pair, count);
            heap.push(MergeJob { count, pair, pos });
        }
    }

    // (capacity capped: vocab_size may be huge when the caller wants "all the merges there are")
    let mut merges: Vec<Pair> = Vec::with_capacity(num_merges.min(1 << 20) as usize);
    let mut deltas: Vec<(Pair, i64)> = Vec::new();
    let mut created: FxMap<Pair, Vec<u32>> = FxMap::default();
    while (merges.len() as u32) < num_merges {
        let Some(mut top) = heap.pop() else { break };
        // Counts only ever drop for pairs already in the heap (new pairs all contain the new id), so a
        // stored count is an upper bound: refresh and retry until the top is exact.
        let current = pair_counts.get(&top.pair).copied().unwrap_or(0);
        if current <= 0 {
            continue;
        }
        if top.count != current {
            top.count = current;
            heap.push(top);
            continue;
        }

        let new_id = 256 + merges.len() as u32;
        merges.push(top.pair);
        for &wi in &top.pos {
            deltas.clear();
            words.merge_pair(wi as usize, top.pair, new_id, &mut deltas);
            let weight = counts[wi as usize];
            for &(pair, d) in &deltas {
                *pair_counts.entry(pair).or_default() += d * weight;
                if d > 0 {
                    let pos = created.entry(pair).or_default();
                    if pos.last() != Some(&wi) {
                        pos.push(wi);
                    }
                }
            }
        }
        pair_counts.remove(&top.pair);
        for (pair, pos) in created.drain() {
            let count = pair_counts.get(&pair).copied().unwrap_or(0);
            if count > 0 {
                heap.push(MergeJob { count, pair, pos });
            }
        }
    }
    merges
}

// ------------------------------------------------------------------------------------------------
// vocabulary and encoding

/// The byte string of every token id: 256 single bytes, then one per merge.
pub fn build_vocab(merges: &[Pair]) -> Vec<Vec<u8>> {
    let mut vocab: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for &(a, b) in merges {
        let mut bytes = vocab[a as usize].clone();
        bytes.extend_from_slice(&vocab[b as usize]);
        vocab.push(bytes);
    }
    vocab
}

/// Encode one chunk exactly as tiktoken does: repeatedly join the adjacent pair of parts whose joined
/// bytes have the lowest rank (leftmost on ties) until no joined pair is a token.
pub fn encode_chunk(piece: &[u8], ranks: &AHashMap<Vec<u8>, u32>, out: &mut Vec<u32>) {
    if piece.len() == 1 {
        out.push(piece[0] as u32);
        return;
    }
    if let Some(&rank) = ranks.get(piece) {
        out.push(rank);
        return;
    }
    // bounds[i] is where part i starts; the last entry is piece.len().
    let mut bounds: Vec<usize> = (0..=piece.len()).collect();
    let rank_of = |bounds: &[usize], i: usize| -> u32 {
        if i + 2 < bounds.len() {
            ranks
                .get(&piece[bounds[i]..bounds[i + 2]])
                .copied()
                .unwrap_or(u32::MAX)
        } else {
            u32::MAX
        }
    };
    // pair_ranks[i]: rank of part i joined with part i+1.
    let mut pair_ranks: Vec<u32> = (0..bounds.len() - 1).map(|i| rank_of(&bounds, i)).collect();
    loop {
        let (mut best, mut best_rank) = (0usize, u32::MAX);
        for (i, &r) in pair_ranks.iter().enumerate() {
            if r < best_rank {
                best = i;
                best_rank = r;
            }
        }
        if best_rank == u32::MAX {
            break;
        }
        bounds.remove(best + 1);
        pair_ranks.remove(best + 1);
        pair_ranks[best] = rank_of(&bounds, best);
        if best > 0 {
            pair_ranks[best - 1] = rank_of(&bounds, best - 1);
        }
    }
    for w in bounds.windows(2) {
        out.push(ranks[&piece[w[0]..w[1]]]);
    }
}

/// Split `text` and encode every chunk.
pub fn encode(
    text: &str,
    splitter: &Splitter,
    ranks: &AHashMap<Vec<u8>, u32>,
) -> Result<Vec<u32>, String> {
    let mut ids = Vec::with_capacity(text.len() / 3 + 1);
    splitter.for_each(text, |piece| {
        encode_chunk(piece.as_bytes(), ranks, &mut ids)
    })?;
    Ok(ids)
}

// ------------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(items: &[(&str, i64)]) -> AHashMap<String, i64> {
        items.iter().map(|(s, c)| (s.to_string(), *c)).collect()
    }

    fn ranks_of(merges: &[Pair]) -> AHashMap<Vec<u8>, u32> {
        build_vocab(merges)
            .into_iter()
            .enumerate()
            .map(|(i, b)| (b, i as u32))
            .collect()
    }

    #[test]
    fn merge_pair_overlapping_runs() {
        let mut w = Words::new([&b"xy"[..], b"aaaa", b"z"].into_iter());
        let mut deltas = Vec::new();
        w.merge_pair(1, (97, 97), 256, &mut deltas);
        assert_eq!(w.word(1), &[256, 256]);
        assert_eq!((w.word(0), w.word(2)), (&[120, 121][..], &[122][..]));
        let net = |p: Pair| {
            deltas
                .iter()
                .filter(|(q, _)| *q == p)
                .map(|(_, d)| d)
                .sum::<i64>()
        };
        assert_eq!(net((97, 97)), -1); // + the 2 merged occurrences, left out of the deltas
        assert_eq!(net((256, 256)), 1);
        assert_eq!(net((256, 97)), 0);
    }

    #[test]
    fn most_frequent_then_smallest_pair() {
        // "ab" x10 beats "cd" x5; then (99,100) and (97,98)->... ties resolve to the smaller pair.
        let merges = train(chunks(&[("ab", 10), ("cd", 5), ("ef", 5)]), 3);
        assert_eq!(merges, vec![(97, 98), (99, 100), (101, 102)]);
    }

    #[test]
    fn chained_merges_and_early_stop() {
        let merges = train(chunks(&[("aaa", 10)]), 10);
        assert_eq!(merges, vec![(97, 97), (256, 97)]);
    }

    #[test]
    fn encode_uses_ranks() {
        let merges = vec![(97, 97), (256, 97)];
        let ranks = ranks_of(&merges);
        let mut out = Vec::new();
        encode_chunk(b"aaaaa", &ranks, &mut out);
        assert_eq!(out, vec![256, 257]);
        out.clear();
        encode_chunk(b"ab", &ranks, &mut out);
        assert_eq!(out, vec![97, 98]);
    }
}
