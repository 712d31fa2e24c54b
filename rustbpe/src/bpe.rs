//! Byte-level BPE, the pure-Rust part: chunk counting, training and encoding. No Python in here.
//!
//! Training works on unique regex chunks ("words") with their counts. Pair counts are kept incrementally:
//! merging a pair only touches the words that contain it, and a max-heap of merge jobs is refreshed lazily
//! (a popped job whose count is stale is pushed back with the current count). Ties go to the smallest pair
//! (a, b), so training is deterministic whatever the thread count or hash seeds.

use std::cmp::Ordering;

use ahash::{AHashMap, AHashSet};
use dary_heap::OctonaryHeap;
use fancy_regex::Regex;
use rayon::prelude::*;

pub type Pair = (u32, u32);

// ------------------------------------------------------------------------------------------------
// counting chunks

/// Split every text with `pattern` and count each distinct chunk (in parallel over texts).
pub fn count_chunks(texts: &[String], pattern: &Regex) -> Result<AHashMap<String, i64>, String> {
    texts
        .par_iter()
        .try_fold(AHashMap::new, |mut counts: AHashMap<String, i64>, text| {
            for m in pattern.find_iter(text) {
                let piece = m.map_err(|e| format!("regex split failed: {e}"))?.as_str();
                match counts.get_mut(piece) {
                    Some(c) => *c += 1,
                    None => {
                        counts.insert(piece.to_owned(), 1);
                    }
                }
            }
            Ok(counts)
        })
        .try_reduce(AHashMap::new, |a, b| Ok(merge_counts(a, b)))
}

/// Add the smaller map into the larger one.
pub fn merge_counts(a: AHashMap<String, i64>, b: AHashMap<String, i64>) -> AHashMap<String, i64> {
    let (mut big, small) = if a.len() >= b.len() { (a, b) } else { (b, a) };
    for (k, v) in small {
        *big.entry(k).or_default() += v;
    }
    big
}

// ------------------------------------------------------------------------------------------------
// training

struct Word {
    ids: Vec<u32>,
}

impl Word {
    /// Merge every non-overlapping occurrence of `pair` (left to right) into `new_id`, appending the
    /// pair-count changes of this one word to `deltas`: -1 per pair destroyed, +1 per pair created.
    fn merge_pair(&mut self, pair: Pair, new_id: u32, deltas: &mut Vec<(Pair, i64)>) {
        let (a, b) = pair;
        let n = self.ids.len();
        let mut out: Vec<u32> = Vec::with_capacity(n);
        let mut i = 0;
        while i < n {
            if i + 1 < n && self.ids[i] == a && self.ids[i + 1] == b {
                if let Some(&left) = out.last() {
                    deltas.push(((left, a), -1));
                    deltas.push(((left, new_id), 1));
                }
                deltas.push(((a, b), -1));
                if i + 2 < n {
                    let right = self.ids[i + 2];
                    deltas.push(((b, right), -1));
                    deltas.push(((new_id, right), 1));
                }
                out.push(new_id);
                i += 2;
            } else {
                out.push(self.ids[i]);
                i += 1;
            }
        }
        self.ids = out;
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

type PairStats = (AHashMap<Pair, i64>, AHashMap<Pair, AHashSet<u32>>);

/// Count every adjacent pair (weighted by word count) and remember which words hold it.
fn count_pairs(words: &[Word], counts: &[i64]) -> PairStats {
    words
        .par_iter()
        .enumerate()
        .fold(
            || (AHashMap::new(), AHashMap::new()),
            |(mut pc, mut pos): PairStats, (i, w)| {
                for p in w.ids.windows(2) {
                    let pair = (p[0], p[1]);
                    *pc.entry(pair).or_default() += counts[i];
                    pos.entry(pair)
                        .or_insert_with(AHashSet::new)
                        .insert(i as u32);
                }
                (pc, pos)
            },
        )
        .reduce(
            || (AHashMap::new(), AHashMap::new()),
            |(mut pc, mut pos), (pc2, pos2)| {
                for (k, v) in pc2 {
                    *pc.entry(k).or_default() += v;
                }
                for (k, s) in pos2 {
                    pos.entry(k).or_insert_with(AHashSet::new).extend(s);
                }
                (pc, pos)
            },
        )
}

/// Learn up to `num_merges` merges from unique chunks and their counts. Returns the merged pairs in
/// order; merge i creates token id 256 + i. Stops early when no pair occurs any more.
pub fn train(chunks: AHashMap<String, i64>, num_merges: u32) -> Vec<Pair> {
    // Sort the chunks so word indices (and so everything below) do not depend on hash order.
    let mut chunks: Vec<(String, i64)> = chunks.into_iter().collect();
    chunks.par_sort_unstable();
    let counts: Vec<i64> = chunks.iter().map(|(_, c)| *c).collect();
    let mut words: Vec<Word> = chunks
        .into_iter()
        .map(|(s, _)| Word {
            ids: s.bytes().map(u32::from).collect(),
        })
        .collect();

    let (mut pair_counts, positions) = count_pairs(&words, &counts);
    let mut heap: OctonaryHeap<MergeJob> = OctonaryHeap::with_capacity(positions.len());
    for (pair, pos) in positions {
        let count = pair_counts[&pair];
        if count > 0 {
            let mut pos: Vec<u32> = pos.into_iter().collect();
            pos.sort_unstable();
            heap.push(MergeJob { count, pair, pos });
        }
    }

    let mut merges: Vec<Pair> = Vec::with_capacity(num_merges as usize);
    let mut deltas: Vec<(Pair, i64)> = Vec::new();
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
        let mut created: AHashMap<Pair, Vec<u32>> = AHashMap::new();
        for &wi in &top.pos {
            deltas.clear();
            words[wi as usize].merge_pair(top.pair, new_id, &mut deltas);
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
        for (pair, pos) in created {
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

/// Split `text` with `pattern` and encode every chunk.
pub fn encode(
    text: &str,
    pattern: &Regex,
    ranks: &AHashMap<Vec<u8>, u32>,
) -> Result<Vec<u32>, String> {
    let mut ids = Vec::with_capacity(text.len() / 3 + 1);
    for m in pattern.find_iter(text) {
        let piece = m.map_err(|e| format!("regex split failed: {e}"))?.as_str();
        encode_chunk(piece.as_bytes(), ranks, &mut ids);
    }
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
        let mut w = Word {
            ids: vec![97, 97, 97, 97],
        };
        let mut deltas = Vec::new();
        w.merge_pair((97, 97), 256, &mut deltas);
        assert_eq!(w.ids, vec![256, 256]);
        let net = |p: Pair| {
            deltas
                .iter()
                .filter(|(q, _)| *q == p)
                .map(|(_, d)| d)
                .sum::<i64>()
        };
        assert_eq!(net((97, 97)), -3);
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
